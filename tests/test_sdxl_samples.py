"""Sample images of SDXL runs (issue 16 on the SDXL family): drawn as diffusers' SDXL pipeline draws them
(both text encoders, the pooled embedding, time ids of the image's own size), written as PNGs A1111 reads,
never changing what is trained, and encoded before training when the text encoders are frozen. Tiny random
SDXL on the CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorad.config.dispatch import parse_any_config
from lorad.errors import ConfigError
from lorad.events import Event, SampleImage
from lorad.families.sdxl.config import SDXL_SAMPLE_CFG, SdxlTrainConfig
from lorad.training.loop import train
from tests.support.a1111 import parse_a1111
from tests.support.datasets import tiny_sdxl_values
from tests.support.text_encoders import count_text_encoder_forwards

PROMPTS = ["a red circle --d 7", "[trigger] a blue square --n green --ss ddim --w 128 --h 64"]


def config_of(tmp_path: Path, tiny_sdxl: Path, dataset: Path, out: str, **overrides: object) -> SdxlTrainConfig:
    values = tiny_sdxl_values(
        tiny_sdxl, dataset, tmp_path / out, cache_dir=tmp_path / "cache", trigger_word="mystyle", max_train_steps=4
    )
    config = parse_any_config(values | overrides, base_dir=tmp_path)
    assert isinstance(config, SdxlTrainConfig)
    return config


def run(config: SdxlTrainConfig) -> tuple[dict[str, torch.Tensor], list[Event]]:
    events: list[Event] = []
    result = train(config, on_event=events.append)
    return load_file(result.outputs["kohya"]), events


def pixels(path: str | Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_sdxl_sample_defaults_suit_sdxl(tmp_path: Path, tiny_sdxl: Path, dataset: Path) -> None:
    from lorad.families.sd.sampling import sd_sample_settings

    config = parse_any_config(
        {"train_data_dir": str(dataset), "base_model": str(tiny_sdxl), "output_dir": "o", "sample_prompts": ["a"]},
        base_dir=tmp_path,
    )
    settings = sd_sample_settings(config)
    assert (settings.width, settings.height, settings.steps, settings.cfg_scale) == (1024, 1024, 30, 5.0)
    sd = parse_any_config(
        {"train_data_dir": str(dataset), "base_model": "sd15.safetensors", "output_dir": "o", "sample_prompts": ["a"]},
        base_dir=tmp_path,
    )
    assert (sd.resolution, sd.sample_steps, sd.sample_cfg_scale) == (512, 20, 7.0)
    # SDXL configs get the sampling checks too.
    with pytest.raises(ConfigError, match="sample_every_n_steps"):
        parse_any_config(
            {
                "train_data_dir": str(dataset),
                "base_model": str(tiny_sdxl),
                "output_dir": "o",
                "sample_every_n_steps": 2,
            },
            base_dir=tmp_path,
        )


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["euler_a", "dpm++_2m_karras"])
def test_a_sample_is_what_diffusers_sdxl_pipeline_draws_with_the_same_seed(
    tmp_path: Path, tiny_sdxl: Path, dataset: Path, sampler: str
) -> None:
    from diffusers import StableDiffusionXLPipeline

    from lorad.families.sd.sampling import SdSampler
    from lorad.families.sdxl.family import FAMILY, sdxl_traits
    from lorad.sampling.samplers import build_sampler
    from lorad.training.placement import pick_placement

    config = config_of(
        tmp_path, tiny_sdxl, dataset, "out", sample_prompts=["a red circle --n blurry --w 64 --h 96 --d 5 --s 4"],
        sample_sampler=sampler,
    )  # fmt: skip
    placement = pick_placement("cpu", "no")
    model = FAMILY.load(FAMILY.model_key(config, placement))
    sampler_run = SdSampler(config, model, sdxl_traits(config, model), placement, lambda _: None, trainable=False)
    (prompt,) = sampler_run.prompts
    ours = sampler_run.render(prompt, torch.Generator("cpu").manual_seed(prompt.seed), sampler_run.encodings)

    pipe = StableDiffusionXLPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        text_encoder_2=model.text_encoder_2,
        tokenizer=model.tokenizer,
        tokenizer_2=model.tokenizer_2,
        unet=model.unet,
        scheduler=build_sampler(sampler, model.noise_scheduler.config),
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def draw(**extra: object) -> np.ndarray:
        image = pipe(
            prompt="a red circle", negative_prompt="blurry", width=64, height=96, num_inference_steps=4,
            guidance_scale=SDXL_SAMPLE_CFG, generator=torch.Generator("cpu").manual_seed(5), output_type="np", **extra,
        ).images[0]  # fmt: skip
        return np.round(image * 255).astype(np.int16)

    assert ours.size == (64, 96)
    diffusers_image = draw()
    # The same picture (rounding to 8 bits may differ by one level); the time ids matter: other sizes or
    # crops condition the UNet otherwise and move the pixels far more than that.
    assert np.abs(np.asarray(ours, dtype=np.int16) - diffusers_image).max() <= 1
    elsewhere = draw(original_size=(192, 128), crops_coords_top_left=(16, 0))
    assert np.abs(elsewhere - diffusers_image).max() > 1


@pytest.mark.slow
def test_sdxl_samples_are_pngs_a1111_reads_and_the_lora_is_bit_identical_to_a_run_without(
    tmp_path: Path, tiny_sdxl: Path, dataset: Path
) -> None:
    plain, _ = run(config_of(tmp_path, tiny_sdxl, dataset, "plain"))
    sampled, events = run(
        config_of(
            tmp_path, tiny_sdxl, dataset, "sampled", sample_prompts=PROMPTS, sample_every_n_steps=2, sample_steps=3
        )
    )
    assert plain.keys() == sampled.keys()
    assert all(torch.equal(plain[k], sampled[k]) for k in plain)

    images = [e for e in events if isinstance(e, SampleImage)]
    assert [(e.step, e.prompt_index, e.seed) for e in images] == [(2, 0, 7), (2, 1, 43), (4, 0, 7), (4, 1, 43)]
    first, second = images[0], images[1]
    assert Path(second.path).name == "sampled_00000002_01_43.png"
    with Image.open(first.path) as png:
        assert png.size == (64, 64)  # unset size: the training resolution
        parsed = parse_a1111(png.info["parameters"])
    assert parsed["Prompt"] == "a red circle <lora:sampled:1>"
    assert (parsed["Steps"], parsed["CFG scale"], parsed["Sampler"]) == ("3", "5", "Euler a")  # SDXL's CFG
    with Image.open(second.path) as png:
        assert png.size == (128, 64)
        parsed = parse_a1111(png.info["parameters"])
    assert parsed["Prompt"] == "mystyle a blue square <lora:sampled:1>"
    assert (parsed["Negative prompt"], parsed["Sampler"], parsed["Seed"]) == ("green", "DDIM", "43")
    assert (tmp_path / "sampled" / "samples" / "sampled_contact_sheet.png").is_file()


@pytest.mark.slow
def test_frozen_encoders_encode_the_sample_prompts_before_training_and_never_during_it(
    tmp_path: Path, tiny_sdxl: Path, dataset: Path
) -> None:
    # A first run puts every caption in the text-encoder cache, so the second one encodes only its prompts.
    count_text_encoder_forwards(config_of(tmp_path, tiny_sdxl, dataset, "plain"), tiny_sdxl)
    config = config_of(
        tmp_path, tiny_sdxl, dataset, "out", sample_prompts=PROMPTS, sample_every_n_steps=1, sample_at_first=True,
        sample_steps=2,
    )  # fmt: skip
    before, during, _ = count_text_encoder_forwards(config, tiny_sdxl)
    # Before training: the four distinct sample texts (two prompts, "green" and the first one's empty negative),
    # each once through both encoders; then five rounds of two images and four steps without a text encoder.
    assert (before, during) == (4 * 2, 0)
    assert len(list((tmp_path / "out" / "samples").glob("out_0*.png"))) == 5 * 2


@pytest.mark.slow
def test_sdxl_sample_at_first_is_the_base_model_and_the_lora_changes_the_image(
    tmp_path: Path, tiny_sdxl: Path, dataset: Path
) -> None:
    from lorad.families.sd.sampling import SdSampler
    from lorad.families.sdxl.family import FAMILY, sdxl_traits
    from lorad.training.placement import pick_placement

    # A LoRA on the UNet and both text encoders, non-zero from the first step (init_lora): the baseline must
    # still be the bare base model, its prompts re-encoded without the text encoders' LoRA.
    keys = {"train_text_encoder": True, "learning_rate": "5e-2", "sample_prompts": PROMPTS, "sample_steps": 3}
    first, _ = run(config_of(tmp_path, tiny_sdxl, dataset, "first", **keys))
    assert any(v.abs().sum() > 0 for k, v in first.items() if k.startswith("lora_te2_") and "lora_up" in k)
    config = config_of(
        tmp_path, tiny_sdxl, dataset, "again", init_lora=str(tmp_path / "first" / "first.safetensors"),
        sample_at_first=True, max_train_steps=1, **keys,
    )  # fmt: skip
    _, events = run(config)
    baseline = [e for e in events if isinstance(e, SampleImage) and e.step == 0]
    trained = [e for e in events if isinstance(e, SampleImage) and e.step == 1]
    assert len(baseline) == len(trained) == 2
    assert "<lora:" not in parse_a1111(Image.open(baseline[0].path).info["parameters"])["Prompt"]

    # The base model alone (no adapter attached at all), drawn by the same renderer: the same pixels.
    placement = pick_placement("cpu", "no")
    model = FAMILY.load(FAMILY.model_key(config, placement))
    bare = SdSampler(config, model, sdxl_traits(config, model), placement, lambda _: None, trainable=False)
    for event in baseline:
        prompt = bare.prompts[event.prompt_index]
        image = bare.render(prompt, torch.Generator("cpu").manual_seed(prompt.seed), bare.encodings)
        assert Image.open(event.path).tobytes() == image.tobytes()
    # With the LoRA (same prompt, same seed) the picture differs.
    for before, after in zip(baseline, trained, strict=True):
        assert np.abs(pixels(before.path) - pixels(after.path)).max() > 0


@pytest.mark.slow
def test_fp8_base_and_v_prediction_runs_draw_their_samples(tmp_path: Path, tiny_sdxl: Path, dataset: Path) -> None:
    from lorad.events import LogLine

    # float8 UNet weights (the sampler computes in the weight dtype, not the first weight's), and a v-prediction
    # model with a zero-terminal-SNR schedule (each sampler is built from the model's own noise schedule).
    config = config_of(
        tmp_path, tiny_sdxl, dataset, "out", fp8_base=True, prediction_type="v_prediction", zero_terminal_snr=True,
        sample_prompts=PROMPTS, sample_every_n_steps=2, sample_steps=3, max_train_steps=2,
    )  # fmt: skip
    _, events = run(config)
    warnings = [e.message for e in events if isinstance(e, LogLine) and e.level == "warning"]
    assert [e.prompt_index for e in events if isinstance(e, SampleImage)] == [0, 1], warnings
    assert not any("sample prompt" in w for w in warnings)
    for event in (e for e in events if isinstance(e, SampleImage)):
        assert pixels(event.path).std() > 0  # a picture, not a NaN decoded to one flat colour
