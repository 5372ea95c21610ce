"""FLUX.1 sample images while training (issue 16 for the FLUX family), on the tiny FLUX models on the CPU:
FLUX's sample defaults and checks, the images diffusers' FluxPipeline draws from the exported LoRA, PNGs A1111
reads, and sampling that never changes what is trained (block swap and a quantized base included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorad.config.dispatch import parse_any_config
from lorad.errors import ConfigError
from lorad.events import Event, LogLine, SampleImage
from lorad.families.flux.config import FluxTrainConfig
from lorad.models.tiny_flux import TINY_T5_MAX_LENGTH, FluxFiles
from lorad.training.loop import train
from tests.support.a1111 import parse_a1111
from tests.support.datasets import make_dataset
from tests.support.flux import flux_file_values, flux_values, parse_flux

PROMPTS = ["a red circle --d 7", "[trigger] a blue square --n green --l 3 --w 96 --h 64 --s 3"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "style_train")


def run(values: dict, tmp_path: Path) -> tuple[dict[str, str], list[Event]]:
    events: list[Event] = []
    result = train(parse_flux(values, tmp_path), on_event=events.append)
    return result.outputs, events


def images(events: list[Event]) -> list[SampleImage]:
    return [e for e in events if isinstance(e, SampleImage)]


def pixels(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def same_lora(a: str, b: str) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# --- config ----------------------------------------------------------------------------------------------


def test_flux_sample_defaults_suit_a_guidance_distilled_flow_model(
    tmp_path: Path, tiny_flux_files: FluxFiles, data: Path
) -> None:
    config = parse_flux(
        flux_values(tiny_flux_files.transformer, data, tmp_path / "o", sample_prompts=PROMPTS), tmp_path
    )
    assert isinstance(config, FluxTrainConfig)
    assert (config.sample_sampler, config.sample_cfg_scale, config.sample_guidance_scale) == (
        "flow_match_euler",
        1.0,
        3.5,
    )
    assert config.sample_steps is None  # 20 for dev, 4 for schnell: decided by the model
    assert config.sample_width is None and config.resolution == 64  # samples are resolution-sized


def test_samplers_and_sizes_flux_cannot_draw_are_config_errors_naming_the_prompt(
    tmp_path: Path, tiny_flux_files: FluxFiles, data: Path
) -> None:
    values = flux_values(
        tiny_flux_files.transformer,
        data,
        tmp_path / "o",
        sample_prompts=["a cat --ss ddim", "a dog --w 72"],
        sample_sampler="euler_a",
        sample_height=200,
    )
    with pytest.raises(ConfigError) as err:
        parse_any_config(values, base_dir=tmp_path)
    text = str(err.value)
    assert {p.key for p in err.value.problems} >= {"sample_prompts", "sample_sampler", "sample_height"}
    assert "prompt 1 ('a cat')" in text and "ddim" in text and "flow_match_euler" in text
    assert "prompt 2 ('a dog'): --w 72" in text and "--w 64" in text and "multiples of 16" in text


# --- what the images are ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_samples_are_what_fluxpipeline_draws_with_the_exported_lora(
    tmp_path: Path, tiny_flux: dict[str, Path], data: Path, variant: str
) -> None:
    """The real consumer: diffusers' FluxPipeline with the run's diffusers file loaded, same prompt, seed,
    steps and guidance, draws the same picture as the sample taken with the live adapter."""
    from diffusers import FluxPipeline

    out = tmp_path / "out"
    values = flux_values(
        tiny_flux[variant],
        data,
        out,
        max_train_steps=2,
        learning_rate="1e-2",
        save_precision="fp32",
        lora_dropout=0.5,  # sampling runs the adapter in eval mode, as the pipeline does
        sample_prompts=PROMPTS,
        sample_every_n_steps=2,
        trigger_word="mystyle",
    )
    outputs, events = run(values, tmp_path)
    drawn = images(events)
    assert [(e.step, e.prompt_index, e.seed, e.width, e.height) for e in drawn] == [
        (2, 0, 7, 64, 64),
        (2, 1, 43, 96, 64),
    ]
    pipe = FluxPipeline.from_pretrained(str(tiny_flux[variant]), local_files_only=True)
    pipe.load_lora_weights(str(Path(outputs["diffusers"]).parent))
    pipe.transformer.eval()  # load_lora_weights leaves the LoRA layers it adds (their dropout) in training mode
    pipe.set_progress_bar_config(disable=True)
    steps = {"dev": 20, "schnell": 4}[variant]  # FLUX's defaults when a prompt has no --s
    calls = [
        {"prompt": "a red circle", "num_inference_steps": steps},
        {
            "prompt": "mystyle a blue square",
            "num_inference_steps": 3,
            "negative_prompt": "green",
            "true_cfg_scale": 3.0,
        },
    ]
    for event, call in zip(drawn, calls, strict=True):
        expected = pipe(
            **call,
            width=event.width,
            height=event.height,
            guidance_scale=3.5,
            max_sequence_length=TINY_T5_MAX_LENGTH[variant],
            generator=torch.Generator("cpu").manual_seed(event.seed),
            output_type="np",
        ).images[0]
        ours = pixels(event.path)
        assert ours.shape == expected.shape and ours.std() > 5  # a picture, not a flat field
        # Same arithmetic in fp32; the tolerance is one level of 8-bit rounding.
        assert np.abs(ours - (expected * 255).round()).max() <= 1, event.path
    with Image.open(drawn[1].path) as png:
        parsed = parse_a1111(png.info["parameters"])
    assert parsed["Prompt"] == "mystyle a blue square <lora:out:1>" and parsed["Negative prompt"] == "green"
    assert (parsed["Sampler"], parsed["Steps"], parsed["CFG scale"], parsed["Seed"]) == ("Euler", "3", "3", "43")
    assert (parsed["Size-1"], parsed["Size-2"]) == ("96", "64")
    # Schnell has no guidance embedding: its images name no distilled guidance.
    assert parsed.get("Distilled CFG Scale") == ("3.5" if variant == "dev" else None)
    with Image.open(drawn[0].path) as png:
        assert parse_a1111(png.info["parameters"])["Steps"] == str(steps)


@pytest.mark.slow
def test_sample_at_first_is_the_base_model_and_the_lora_changes_the_image(
    tmp_path: Path, tiny_flux: dict[str, Path], data: Path
) -> None:
    from diffusers import FluxPipeline

    common = {"save_precision": "fp32", "learning_rate": "5e-2", "sample_prompts": PROMPTS[:1]}
    first, _ = run(flux_values(tiny_flux["dev"], data, tmp_path / "first", max_train_steps=2, **common), tmp_path)
    # init_lora makes the adapter non-zero from the start: the baseline must still be the bare base model.
    values = flux_values(
        tiny_flux["dev"],
        data,
        tmp_path / "again",
        max_train_steps=1,
        init_lora=first["kohya"],
        sample_at_first=True,
        sample_every_n_steps=1,
        **common,
    )
    _, events = run(values, tmp_path)
    baseline, trained = images(events)
    assert (baseline.step, trained.step) == (0, 1)
    with Image.open(baseline.path) as png:
        assert "<lora:" not in parse_a1111(png.info["parameters"])["Prompt"]
    pipe = FluxPipeline.from_pretrained(str(tiny_flux["dev"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    bare = pipe(
        prompt="a red circle",
        width=64,
        height=64,
        num_inference_steps=20,
        guidance_scale=3.5,
        max_sequence_length=TINY_T5_MAX_LENGTH["dev"],
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    assert np.abs(pixels(baseline.path) - (bare * 255).round()).max() <= 1
    # With the LoRA active (same prompt, same seed) the picture differs.
    assert np.abs(pixels(trained.path) - pixels(baseline.path)).mean() > 1


# --- sampling never changes training ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "memory",
    [
        {"train_text_encoder": True, "lora_dropout": 0.1, "shuffle_caption": True},
        {"blocks_to_swap": 3, "gradient_checkpointing": True},
        {"base_quantization": "int8"},
        {"fp8_base": True, "blocks_to_swap": 2, "gradient_checkpointing": True},
    ],
    ids=["clip-trained", "block-swap", "int8-base", "fp8-base-swap"],
)
def test_sampling_leaves_the_lora_bit_identical(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path, memory: dict
) -> None:
    common = {"max_train_steps": 3, "save_precision": "fp32", "learning_rate": "1e-2", **memory}
    plain, _ = run(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "plain", **common), tmp_path)
    values = flux_file_values(
        tiny_flux_files,
        tiny_flux,
        data,
        tmp_path / "sampled",
        sample_prompts=[*PROMPTS, "a green triangle " + "on a wide open field, " * 30 + "--s 2"],
        sample_every_n_steps=1,
        sample_at_first=True,
        sample_steps=2,
        **common,
    )
    sampled, events = run(values, tmp_path)
    assert same_lora(plain["kohya"], sampled["kohya"])
    assert [(e.step, e.prompt_index) for e in images(events)] == [(s, i) for s in range(4) for i in range(3)]
    warnings = [e.message for e in events if isinstance(e, LogLine) and e.level == "warning"]
    assert any("sample prompt 2 is" in w and "CLIP-L reads 77" in w for w in warnings)
    assert not any("failed" in w for w in warnings)
    assert Path(sampled["samples"]).is_file()  # the contact sheet


@pytest.mark.slow
def test_block_swap_draws_the_same_images(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path
) -> None:
    common = {"max_train_steps": 2, "gradient_checkpointing": True, "sample_prompts": PROMPTS, "sample_steps": 3}
    _, plain = run(
        flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "plain", sample_every_n_steps=2, **common),
        tmp_path,
    )
    values = flux_file_values(
        tiny_flux_files, tiny_flux, data, tmp_path / "swap", blocks_to_swap=3, sample_every_n_steps=2, **common
    )
    _, swapped = run(values, tmp_path)
    assert len(images(plain)) == len(images(swapped)) == 2
    for a, b in zip(images(plain), images(swapped), strict=True):
        assert np.array_equal(pixels(a.path), pixels(b.path))


@pytest.mark.slow
def test_samples_need_no_text_encoder_once_the_cache_is_warm(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = {"max_train_steps": 1, "sample_prompts": PROMPTS, "sample_every_n_steps": 1, "sample_steps": 2}
    _, first = run(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "a", **common), tmp_path)
    assert any(isinstance(e, LogLine) and "sample prompts: 3 encoded now, 0 from the cache" in e.message for e in first)
    from transformers import CLIPTextModel, T5EncoderModel

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("sampling must not run a text encoder that training freed")

    for cls in (CLIPTextModel, T5EncoderModel):
        monkeypatch.setattr(cls, "forward", refuse)
    monkeypatch.setattr("lorad.families.flux.family.load_t5xxl", refuse)
    monkeypatch.setattr("lorad.families.flux.family.load_clip_l", refuse)
    _, second = run(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "b", **common), tmp_path)
    assert len(images(second)) == 2
    for a, b in zip(images(first), images(second), strict=True):
        assert np.array_equal(pixels(a.path), pixels(b.path))  # same seed, same step, same LoRA: same image
