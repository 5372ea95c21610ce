"""Tiny captioner models, built locally for tests, benchmarks and demos (nothing is downloaded).

- :func:`build_tiny_blip`: a random ``BlipForConditionalGeneration`` (32 px images, 2 layers of
  width 32 per tower) with a BERT WordPiece tokenizer whose vocabulary is the tiny corpus's words;
  :func:`build_tiny_git` the same for ``GitForCausalLM``, another family the sentence captioner runs.
- :func:`build_tiny_clip`: a random ``CLIPModel`` of the same size with lorad's tiny CLIP tokenizer.
- :func:`build_tiny_wd14`: a WD14-format tagger (``model.onnx`` + ``selected_tags.csv``) whose
  network is written by hand, not random: it averages the image's BGR channels and scores
  :data:`TINY_TAGS` from them, so tests can predict its tags exactly (a red picture gets
  "red_theme", and so on).

Each folder has the on-disk layout of the real models, so lorad loads it through the same code
path. Random models give random captions: they prove the plumbing, not caption quality. The same
``seed`` gives the same weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorad.atomic import atomic_directory, write_bytes_atomic, write_text_atomic
from lorad.models.tiny_tokenizer import BOS, CORPUS, EOS, write_tiny_clip_tokenizer

TINY_CAPTION_IMAGE_SIZE = 32
_WIDTH = 32
# CLIP's normalisation (BLIP uses the same constants).
_MEAN = [0.48145466, 0.4578275, 0.40821073]
_STD = [0.26862954, 0.26130258, 0.27577711]
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _image_processor_config(processor: str, image_processor: str, *, crop: bool) -> dict[str, object]:
    side = TINY_CAPTION_IMAGE_SIZE
    config: dict[str, object] = {
        "processor_class": processor,
        "image_processor_type": image_processor,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": _MEAN,
        "image_std": _STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": side} if crop else {"height": side, "width": side},
    }
    if crop:
        config |= {"do_center_crop": True, "crop_size": {"height": side, "width": side}}
    return config


def _word_piece_vocab() -> list[str]:
    """A BERT vocabulary without training: specials, single characters (word-initial and "##"
    continuations, so any lower-case ASCII text can be spelt), then every word of the tiny corpus.
    BLIP's decoder start token [DEC] comes last, as in Salesforce's BLIP vocabulary."""
    text = " ".join(CORPUS).lower()
    words = sorted({w.strip(".,'!?") for w in text.split()} - {""})
    characters = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,'!?-") | set("".join(words)))
    return [*_BERT_SPECIALS, *characters, *(f"##{c}" for c in characters), *(w for w in words if len(w) > 1), "[DEC]"]


def _write_bert_tokenizer(folder: Path, vocab: list[str], *, bos_token: str | None = None) -> None:
    """vocab.txt and the configs that make transformers load it as a BertTokenizer."""
    write_text_atomic(folder / "vocab.txt", "\n".join(vocab) + "\n")
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
        **({"bos_token": bos_token} if bos_token else {}),
    }
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 64, **specials}
    write_text_atomic(folder / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_text_atomic(folder / "special_tokens_map.json", json.dumps(specials, indent=2, sort_keys=True) + "\n")


def build_tiny_blip(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny random BLIP captioning model folder at ``dest`` (replaced whole, atomically)."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration

    vocab = _word_piece_vocab()
    ids = {token: i for i, token in enumerate(vocab)}
    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        _write_bert_tokenizer(tmp, vocab, bos_token="[DEC]")
        write_text_atomic(
            tmp / "preprocessor_config.json",
            json.dumps(_image_processor_config("BlipProcessor", "BlipImageProcessor", crop=False), indent=2) + "\n",
        )
        config = BlipConfig(
            text_config={
                "vocab_size": len(vocab),
                "hidden_size": _WIDTH,
                "encoder_hidden_size": _WIDTH,
                "intermediate_size": 2 * _WIDTH,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 64,
                "bos_token_id": ids["[DEC]"],
                "eos_token_id": ids["[SEP]"],
                "pad_token_id": ids["[PAD]"],
                "sep_token_id": ids["[SEP]"],
            },
            # BLIP's default vision init (1e-10) would make every picture look the same to the decoder.
            vision_config={
                "hidden_size": _WIDTH,
                "intermediate_size": 2 * _WIDTH,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": TINY_CAPTION_IMAGE_SIZE,
                "patch_size": 8,
                "initializer_range": 0.02,
            },
            projection_dim=_WIDTH,
            image_text_hidden_size=_WIDTH,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BlipForConditionalGeneration(config)
        model.save_pretrained(tmp, safe_serialization=True)
    return dest


def build_tiny_git(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny random GIT captioning model folder at ``dest`` (another family the ``blip``
    captioner runs: a decoder-only text model reading CLIP-style image features)."""
    import torch
    from transformers import GitConfig, GitForCausalLM

    vocab = _word_piece_vocab()[:-1]  # GIT starts captions with [CLS]: no [DEC]
    ids = {token: i for i, token in enumerate(vocab)}
    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        _write_bert_tokenizer(tmp, vocab)
        write_text_atomic(
            tmp / "preprocessor_config.json",
            json.dumps(_image_processor_config("GitProcessor", "CLIPImageProcessor", crop=True), indent=2) + "\n",
        )
        config = GitConfig(
            vision_config={
                "hidden_size": _WIDTH,
                "intermediate_size": 2 * _WIDTH,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": TINY_CAPTION_IMAGE_SIZE,
                "patch_size": 8,
            },
            vocab_size=len(vocab),
            hidden_size=_WIDTH,
            intermediate_size=2 * _WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            bos_token_id=ids["[CLS]"],
            eos_token_id=ids["[SEP]"],
            pad_token_id=ids["[PAD]"],
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GitForCausalLM(config)
        model.save_pretrained(tmp, safe_serialization=True)
    return dest


def build_tiny_clip(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny random CLIP model folder at ``dest`` (replaced whole, atomically)."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        vocab = write_tiny_clip_tokenizer(tmp)
        write_text_atomic(
            tmp / "preprocessor_config.json",
            json.dumps(_image_processor_config("CLIPProcessor", "CLIPImageProcessor", crop=True), indent=2) + "\n",
        )
        config = CLIPConfig(
            text_config={
                "vocab_size": len(vocab),
                "hidden_size": _WIDTH,
                "intermediate_size": 2 * _WIDTH,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "max_position_embeddings": 77,
                "bos_token_id": vocab[BOS],
                "eos_token_id": vocab[EOS],
                "pad_token_id": vocab[EOS],
            },
            vision_config={
                "hidden_size": _WIDTH,
                "intermediate_size": 2 * _WIDTH,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "image_size": TINY_CAPTION_IMAGE_SIZE,
                "patch_size": 8,
            },
            projection_dim=16,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CLIPModel(config)
        model.save_pretrained(tmp, safe_serialization=True)
    return dest


@dataclass(frozen=True)
class TinyTag:
    """A tag of the tiny tagger: its selected_tags.csv row, and how its score is made:
    sigmoid(bias + weights · (mean blue, mean green, mean red) / 255)."""

    name: str
    category: int
    bias: float
    weights: tuple[float, float, float] = (0.0, 0.0, 0.0)


# Scores for a pure red picture: red_theme ~1.0, blue/green_theme ~0.0, simple_background 0.73,
# ^_^ 0.5, tiny_hero 0.92, tiny_villain 0.5, monochrome 0.05; the two ratings 0.88 and 0.12.
TINY_TAGS: tuple[TinyTag, ...] = (
    TinyTag("general", 9, 2.0),
    TinyTag("sensitive", 9, -2.0),
    TinyTag("red_theme", 0, -2.0, (-5.0, -5.0, 10.0)),
    TinyTag("green_theme", 0, -2.0, (-5.0, 10.0, -5.0)),
    TinyTag("blue_theme", 0, -2.0, (10.0, -5.0, -5.0)),
    TinyTag("simple_background", 0, 1.0),
    TinyTag("^_^", 0, 0.0),
    TinyTag("monochrome", 0, -3.0),
    TinyTag("tiny_hero", 4, 2.5),
    TinyTag("tiny_villain", 4, 0.0),
)


def build_tiny_wd14(
    dest: Path, *, size: int = TINY_CAPTION_IMAGE_SIZE, tags: tuple[TinyTag, ...] = TINY_TAGS, batch: int | None = None
) -> Path:
    """Write a WD14-format tagger folder at ``dest``: ``model.onnx`` taking float32 NHWC BGR images
    of ``size`` px (batch dimension ``batch``, None = any) and giving one sigmoid score per tag, and
    ``selected_tags.csv`` (tag_id,name,category,count). Needs the ``onnx`` package (dev extra)."""
    import numpy as np

    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as err:  # pragma: no cover - the dev extra installs it
        raise RuntimeError("building the tiny tagger needs the `onnx` package: pip install onnx") from err

    weights = np.array([tag.weights for tag in tags], dtype=np.float32).T / 255.0  # (3, tags), on 0-255 input
    bias = np.array([tag.bias for tag in tags], dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
            helper.make_node("MatMul", ["mean", "weights"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch or "batch", size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch or "batch", len(tags)])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    # Opset 17 / IR 8: what the WD14 exports in the wild use, and what any onnxruntime >= 1.14 reads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="lorad")
    model.ir_version = 8
    onnx.checker.check_model(model)
    dest = Path(dest)
    with atomic_directory(dest) as tmp:
        write_bytes_atomic(tmp / "model.onnx", model.SerializeToString())
        rows = [
            "tag_id,name,category,count",
            *(f"{1000 + i},{tag.name},{tag.category},{100 - i}" for i, tag in enumerate(tags)),
        ]
        write_text_atomic(tmp / "selected_tags.csv", "\n".join(rows) + "\n")
    return dest
