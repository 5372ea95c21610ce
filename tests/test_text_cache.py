"""The text-encoder output cache (lorad.diffusion.text_cache): keys, disk round trips, pre-encoding,
and a cached SDXL encoding that needs no text encoder at all."""

from __future__ import annotations

import copy
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorad.data.captions import prepare_caption
from lorad.diffusion.text_cache import TextEncoderCache, text_encoder_identity, tokenizer_digest
from lorad.errors import OutputError
from lorad.families.sdxl.conditioning import HIDDEN, POOLED, encode_prompts
from lorad.models.sdxl_components import SDXLComponents
from lorad.models.sdxl_loader import load_sdxl_components
from lorad.models.tiny_sdxl import build_tiny_sdxl


def _entry(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hidden": torch.randn(77, 8, generator=g).to(torch.bfloat16), "pooled": torch.randn(4, generator=g)}


class FakeEncoder:
    """Encodes a caption as its length repeated, counting calls and captions."""

    def __init__(self) -> None:
        self.calls = 0
        self.captions = 0

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.calls += 1
        self.captions += len(captions)
        lengths = torch.tensor([float(len(c)) for c in captions])
        return {"hidden": lengths[:, None, None].expand(-1, 3, 2).clone(), "pooled": lengths[:, None].clone()}


def test_memory_round_trip_and_batches() -> None:
    cache = TextEncoderCache(None, "id")
    cache.put("a cat", _entry(0))
    cache.put("a dog", _entry(1))
    got = cache.get("a cat")
    assert got is not None and got["hidden"].dtype == torch.bfloat16
    assert all(torch.equal(got[k], _entry(0)[k]) for k in got)
    batch = cache.batch(["a dog", "a cat", "a dog"])
    assert batch["hidden"].shape == (3, 77, 8) and torch.equal(batch["pooled"][0], _entry(1)["pooled"])
    assert "a bird" not in cache and cache.get("a bird") is None
    with pytest.raises(KeyError, match="'a bird'"):
        cache.batch(["a cat", "a bird"])


def test_disk_entries_are_found_by_a_later_run_and_keyed_by_identity(tmp_path: Path) -> None:
    first = TextEncoderCache(tmp_path, "model-a")
    first.put("a cat, sitting", _entry(0))
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and (tmp_path / "CACHEDIR.TAG").is_file()
    assert not any(f.name.startswith(".") for f in tmp_path.iterdir() if f.suffix == ".tmp")

    later = TextEncoderCache(tmp_path, "model-a")
    got = later.get("a cat, sitting")
    assert got is not None and torch.equal(got["pooled"], _entry(0)["pooled"]) and later.loaded == 1
    assert TextEncoderCache(tmp_path, "model-b").get("a cat, sitting") is None
    assert later.get("a cat,  sitting") is None  # the caption text is the key, spacing included


def test_damaged_or_foreign_files_are_misses_and_removed(tmp_path: Path) -> None:
    cache = TextEncoderCache(tmp_path, "id")
    cache.put("one", _entry(0))
    cache.put("two", _entry(1))
    one, two = tmp_path / (cache.key("one") + ".safetensors"), tmp_path / (cache.key("two") + ".safetensors")
    os.replace(two, one)  # "two"'s file under "one"'s name: its metadata names another caption
    fresh = TextEncoderCache(tmp_path, "id")
    assert fresh.get("one") is None and not one.exists()
    cache.put("two", _entry(1))
    two.write_bytes(two.read_bytes()[:50])  # truncated
    assert TextEncoderCache(tmp_path, "id").get("two") is None and not two.exists()


def test_pre_encode_counts_encoded_and_cached_distinct_captions(tmp_path: Path) -> None:
    encoder = FakeEncoder()
    cache = TextEncoderCache(tmp_path, "id")
    captions = ["a", "bb", "a", "ccc", "", "bb", "dddd"]
    stats = cache.pre_encode(captions, encoder, batch_size=2)
    assert (stats.encoded, stats.cached) == (5, 0)
    assert (encoder.calls, encoder.captions) == (3, 5)  # five distinct captions, two per batch
    assert float(cache.batch(["ccc"])["pooled"][0, 0]) == 3.0

    again = FakeEncoder()
    stats = TextEncoderCache(tmp_path, "id").pre_encode([*captions, "eeeee"], again)
    assert (stats.encoded, stats.cached) == (1, 5) and again.captions == 1


def test_memory_bound_keeps_entries_on_disk(tmp_path: Path) -> None:
    cache = TextEncoderCache(tmp_path, "id", max_in_memory=2)
    cache.pre_encode(["a", "b", "c", "d"], FakeEncoder())
    assert len(cache) == 2
    assert float(cache.batch(["a"])["pooled"][0, 0]) == 1.0 and cache.loaded == 1
    # Without a folder nothing may be evicted (it would be lost).
    memory_only = TextEncoderCache(None, "id", max_in_memory=2)
    memory_only.pre_encode(["a", "b", "c"], FakeEncoder())
    assert len(memory_only) == 3


def test_unwritable_folder_names_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="`cache_dir`") as err:
        TextEncoderCache(blocker / "text", "id")
    assert err.value.hint


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> SDXLComponents:
    return load_sdxl_components(str(build_tiny_sdxl(tmp_path_factory.mktemp("tc") / "sdxl")))


def _encoders(c: SDXLComponents):
    return [c.text_encoder, c.text_encoder_2]


def test_identity_tracks_weights_dtype_tokenizers_and_settings(sdxl: SDXLComponents) -> None:
    settings = {"family": "sdxl", "max_length": 77}
    tokenizers = [sdxl.tokenizer, sdxl.tokenizer_2]
    base = text_encoder_identity(_encoders(sdxl), tokenizers, settings)
    assert text_encoder_identity(_encoders(sdxl), tokenizers, dict(settings)) == base
    assert text_encoder_identity(_encoders(sdxl), tokenizers, {**settings, "max_length": 225}) != base
    assert text_encoder_identity(_encoders(sdxl), tokenizers[::-1], settings) != base
    assert tokenizer_digest(sdxl.tokenizer) != tokenizer_digest(sdxl.tokenizer_2)  # pad tokens differ
    # A call leaves its padding and truncation on a fast tokenizer's backend; they do not change its identity
    # (else a run that tokenized a sample prompt first would miss every cached caption).
    first = tokenizer_digest(sdxl.tokenizer)
    sdxl.tokenizer("a prompt")
    sdxl.tokenizer(["a prompt"], padding="max_length", truncation=True, max_length=77)
    assert tokenizer_digest(sdxl.tokenizer) == first
    assert text_encoder_identity(_encoders(sdxl), tokenizers, settings) == base
    with torch.no_grad():
        weight = sdxl.text_encoder_2.text_projection.weight
        kept = weight[0, 0].clone()
        weight[0, 0] += 1.0
        try:
            assert text_encoder_identity(_encoders(sdxl), tokenizers, settings) != base
        finally:
            weight[0, 0] = kept
    assert text_encoder_identity(_encoders(sdxl), tokenizers, settings) == base
    full = torch.nn.Linear(2, 2)
    half = copy.deepcopy(full).to(torch.bfloat16)
    assert text_encoder_identity([half], [], {}) != text_encoder_identity([full], [], {})


def test_sdxl_run_pre_encodes_every_caption_and_steps_without_text_encoders(
    sdxl: SDXLComponents, tmp_path: Path
) -> None:
    """With shuffle and dropout, a run's captions all follow from its seed; once they are encoded
    the encoders are not needed again: zero text-encoder forwards, counted by hooks."""
    raw = ["ohwx, red cat, sofa, window", "ohwx, black dog, beach", "ohwx, white rabbit, grass, morning"]
    epochs, seed = 4, 7

    def caption(epoch: int, i: int) -> str:
        rng = random.Random(f"{seed}:{epoch}:{i}")
        return prepare_caption(raw[i], rng=rng, shuffle=True, keep_tokens=1, dropout=0.3, trigger_word="ohwx")

    planned = [caption(e, i) for e in range(epochs) for i in range(len(raw))]

    def encode(captions: list[str]) -> dict[str, torch.Tensor]:
        return encode_prompts(
            captions,
            tokenizer=sdxl.tokenizer,
            tokenizer_2=sdxl.tokenizer_2,
            text_encoder=sdxl.text_encoder,
            text_encoder_2=sdxl.text_encoder_2,
            device=torch.device("cpu"),
        )

    identity = text_encoder_identity(_encoders(sdxl), [sdxl.tokenizer, sdxl.tokenizer_2], {"family": "sdxl"})
    cache = TextEncoderCache(tmp_path, identity)
    stats = cache.pre_encode(planned, encode, batch_size=4)
    assert stats.encoded == len(set(planned)) > len(raw) and stats.cached == 0
    assert "" in set(planned)  # a dropped caption is cached like any other

    forwards = []
    hooks = [m.register_forward_hook(lambda *_: forwards.append(1)) for m in _encoders(sdxl)]
    try:
        for epoch in range(epochs):
            batch = cache.batch([caption(epoch, i) for i in range(len(raw))])
            assert batch[HIDDEN].shape[:2] == (3, 77) and batch[POOLED].shape[0] == 3
    finally:
        for hook in hooks:
            hook.remove()
    assert forwards == []
    with torch.no_grad():
        direct = encode([planned[0]])
    assert torch.equal(cache.batch([planned[0]])[HIDDEN], direct[HIDDEN])
    stored = load_file(str(tmp_path / (cache.key(planned[0]) + ".safetensors")))
    assert set(stored) == {HIDDEN, POOLED}


def test_a_run_with_too_many_distinct_captions_encodes_at_every_step_instead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorad.config import parse_config
    from lorad.diffusion import captions as run_captions
    from lorad.events import LogLine
    from lorad.training.family import Scalars
    from tests.support.datasets import make_dataset, tiny_train_values

    data = make_dataset(tmp_path / "data")
    config = parse_config(
        tiny_train_values(tmp_path, data, tmp_path / "out", cache_dir=tmp_path / "c"), base_dir=tmp_path
    )
    assert config.cache_text_encoder_outputs
    events, scalars, encoder = [], Scalars(), FakeEncoder()

    def conditioning(planned: list[str]):
        return run_captions.caption_conditioning(
            config,
            planned=planned,
            encode=encoder,
            identity=lambda: "id",
            trainable=False,
            device=torch.device("cpu"),
            on_event=events.append,
            scalars=scalars,
        )

    monkeypatch.setattr(run_captions, "MAX_CACHED_CAPTIONS", 3)
    cached = conditioning(["a", "bb", "a"])
    assert encoder.captions == 2 and scalars.summary["text_encoder_outputs"]["encoded"] == 2
    cached(["bb"])
    assert encoder.captions == 2  # from the cache
    live = conditioning(["a", "bb", "ccc", "dddd"])
    assert scalars.summary["text_encoder_outputs"] == {"distinct_captions": 4, "cached": False}
    assert any(isinstance(e, LogLine) and "not cached" in e.message for e in events)
    live(["a"])
    live(["a"])
    assert encoder.captions == 4  # the encoder ran at both steps
