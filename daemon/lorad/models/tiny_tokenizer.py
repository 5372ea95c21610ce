"""A tiny CLIP BPE tokenizer, trained locally with the ``tokenizers`` library on a built-in corpus.

The files it writes (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``,
``special_tokens_map.json``) are in the format of OpenAI's CLIP tokenizer, so transformers'
``CLIPTokenizer`` (and the old slow one) loads the folder like any SD model's ``tokenizer/``:
byte-level symbols, the end-of-word marker ``</w>``, the specials ``<|startoftext|>`` and
``<|endoftext|>`` last in the vocabulary.

Training is deterministic: the same corpus always gives byte-identical files (see
:func:`train_merges` for how).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE

from lorad.atomic import write_text_atomic

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Prompt-style English: subjects, colours, styles, lighting, and the words LoRA captions use most.
CORPUS = (
    "a photo of a red cat sitting on a wooden table",
    "a photo of a black dog running on the beach at sunset",
    "a close up photo of a white rabbit in the grass",
    "a portrait of a young woman with long brown hair, soft light",
    "a portrait of an old man with a gray beard, studio lighting",
    "portrait photo of a smiling child wearing a yellow raincoat",
    "a landscape painting of green hills and a blue river",
    "a landscape with snowy mountains, a frozen lake and pine trees",
    "an oil painting of a small house in a quiet village",
    "a watercolor painting of pink flowers in a glass vase",
    "a sketch of a horse in pencil, black and white",
    "digital art of a castle on a cliff above the sea",
    "anime style illustration of a girl with purple eyes",
    "a painting in the style of van gogh, swirling stars over a town",
    "a painting in the style of monet, water lilies on a pond",
    "an orange and teal cinematic still of a city street at night",
    "a golden retriever puppy playing with a silver ball",
    "a brown bear standing in a dark forest, morning fog",
    "a green parrot on a branch, bright colors, highly detailed",
    "a red sports car parked in front of a modern building",
    "an old wooden boat on a calm lake, warm evening light",
    "a bowl of fruit with apples, oranges and grapes on a kitchen table",
    "a cup of coffee next to an open book by the window",
    "a robot walking through a desert under a violet sky",
    "a knight in shining armor holding a sword and a shield",
    "a dragon flying over a burning village, epic fantasy art",
    "a cozy living room with a fireplace and a sleeping cat",
    "an astronaut riding a horse on the moon, photorealistic",
    "a bird's eye view of a busy market full of people",
    "a black and white photograph of a rainy street in paris",
    "a tall lighthouse on a rocky coast during a storm",
    "a field of sunflowers under a clear blue summer sky",
    "a misty waterfall in a tropical jungle, lush green leaves",
    "a bowl of ramen with an egg, food photography",
    "a cute baby owl with big round eyes, soft focus",
    "a steampunk airship above the clouds, intricate details",
    "a minimalist poster of a mountain, flat design, pastel colors",
    "a charcoal drawing of a dancer in motion",
    "a stained glass window with blue and gold patterns",
    "a medieval town square with a stone fountain",
    "a photo of sks person smiling, sharp focus, 4k",
    "a photo of a sks dog wearing a red scarf",
    "an illustration of a fox in the snow, children's book style",
    "a neon sign glowing in a dark alley, cyberpunk style",
    "a marble statue of a woman in a museum hall",
    "a vintage photo of a family at the seaside",
    "a top down photo of a wooden desk with a laptop and a plant",
    "a close up of a human eye with a green iris, macro photography",
    "a small cabin in the woods covered in snow, winter night",
    "a ship sailing across the ocean under a full moon",
    "best quality, masterpiece, high resolution, detailed face",
    "low quality, blurry, deformed hands, extra fingers, watermark",
)

# CLIP's split before byte-level mapping: specials, English contractions, letter runs, single
# digits, runs of other symbols. Must match what transformers' CLIPTokenizer does at use time.
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Word-final symbols are trained as stand-in characters from a private-use block, one per byte
# symbol, then written back as "<symbol></w>".
_PRIVATE_USE_BASE = 0xE000


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in CLIP's vocabulary order.

    Printable Latin-1 bytes stand for themselves and come first; the other bytes, in byte order,
    get code points from 256 up, so no symbol is whitespace or a control character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    points = list(printable)
    for extra, _byte in enumerate(b for b in range(256) if b not in printable):
        points.append(256 + extra)
    return [chr(p) for p in points]


def _pre_tokenizer() -> tuple[normalizers.Normalizer, pre_tokenizers.PreTokenizer]:
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return normalizer, splitter


def train_merges(corpus: tuple[str, ...] = CORPUS) -> list[tuple[str, str]]:
    """Learn BPE merges over ``corpus`` with the ``tokenizers`` trainer, in CLIP's conventions.

    Why the stand-in characters: the trainer's own ``end_of_word_suffix`` numbers the suffixed
    symbols in hash-map order, so ties between equally frequent pairs break differently from run
    to run. Encoding "last symbol of a word" as its own single character instead puts every symbol
    into the trainer's alphabet, which it numbers in code-point order; ties then break the same way
    every time. The merges are translated back to ``</w>`` form afterwards.
    """
    normalizer, splitter = _pre_tokenizer()
    symbols = byte_symbols()
    final_of = {s: chr(_PRIVATE_USE_BASE + i) for i, s in enumerate(symbols)}
    symbol_of = {v: k for k, v in final_of.items()}

    def words(text: str) -> str:
        pieces = [p for p, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))]
        return " ".join(p[:-1] + final_of[p[-1]] for p in pieces if p)

    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, show_progress=False, special_tokens=[])
    model = Tokenizer(BPE())
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.train_from_iterator([words(t) for t in corpus], trainer)
    raw = json.loads(model.to_str())["model"]["merges"]

    def back(token: str) -> str:
        return "".join(symbol_of[c] + END_OF_WORD if c in symbol_of else c for c in token)

    # Older tokenizers serialise a merge as "a b", newer ones as ["a", "b"].
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in raw]
    return [(back(a), back(b)) for a, b in pairs]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: byte symbols, the same with ``</w>``, merge results, then specials."""
    symbols = byte_symbols()
    tokens = [*symbols, *(s + END_OF_WORD for s in symbols)]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_tiny_clip_tokenizer(dest: Path, *, pad_token: str = EOS) -> dict[str, int]:
    """Train the tiny tokenizer and write its files into folder ``dest`` (created if missing).

    ``pad_token`` is ``<|endoftext|>`` as in SD 1.x, or ``"!"`` as in SD 2.x's tokenizer. Returns
    the vocabulary (token -> id); its size is what the text encoder's ``vocab_size`` must cover.
    """
    merges = train_merges()
    vocab = build_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    write_text_atomic(dest / "vocab.json", json.dumps(vocab, ensure_ascii=False) + "\n")
    # The first line is a header that CLIP's loader skips.
    write_text_atomic(dest / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **specials,
    }
    write_text_atomic(dest / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_text_atomic(dest / "special_tokens_map.json", json.dumps(specials, indent=2, sort_keys=True) + "\n")
    return vocab
