"""End-to-end SDXL LoRA training on the tiny random SDXL: single file and folder, outputs that
diffusers loads, cached text-encoder outputs, fp8_base, v-prediction, resume, config."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorad.config.dispatch import parse_any_config
from lorad.events import StepDone
from lorad.families.sdxl.config import SdxlTrainConfig, render_sdxl_example
from lorad.families.sdxl.kohya_keys import sdxl_kohya_name
from lorad.lora.targets import ADAPTABLE
from lorad.models.tiny_sdxl import write_sdxl_checkpoint
from lorad.training.loop import train
from tests.support.datasets import tiny_sdxl_values
from tests.support.text_encoders import count_text_encoder_forwards

pytestmark = pytest.mark.slow

ALL_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def sdxl_config(tmp_path: Path, base: Path | str, dataset: Path, out: str = "out", **overrides: object):
    values = tiny_sdxl_values(Path(base), dataset, tmp_path / out, cache_dir=tmp_path / "cache", **overrides)
    config = parse_any_config(values, base_dir=tmp_path)
    assert isinstance(config, SdxlTrainConfig) and config.model_family == "sdxl"
    return config


def kohya_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        name, _, role = key.partition(".")
        modules.setdefault(name, {})[role] = value
    return modules


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_trains_the_same_lora_from_the_single_file_and_the_folder(
    tmp_path: Path, tiny_sdxl: Path, dataset: Path
) -> None:
    single = write_sdxl_checkpoint(tiny_sdxl, tmp_path / "tiny-sdxl.safetensors")
    folder_run = train(sdxl_config(tmp_path, tiny_sdxl, dataset, "folder"))
    file_run = train(sdxl_config(tmp_path, single, dataset, "file", model_config_dir=tiny_sdxl))
    assert folder_run.steps == file_run.steps == 4  # 8 images, batch 2, 1 epoch
    assert same_tensors(Path(folder_run.outputs["kohya"]), Path(file_run.outputs["kohya"]))

    with safe_open(folder_run.outputs["kohya"], "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    modules = kohya_modules(Path(folder_run.outputs["kohya"]))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert all(
        n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
        for n in modules
    )
    summary = json.loads((tmp_path / "folder" / "training_summary.json").read_text())
    captions = {line.split(",", 1)[1] for line in (dataset / "metadata.csv").read_text().splitlines()[1:]}
    assert summary["text_encoder_outputs"]["distinct_captions"] == len(captions)


def test_outputs_load_in_diffusers_and_equal_a_hand_merge(tmp_path: Path, tiny_sdxl: Path, dataset: Path) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = sdxl_config(
        tmp_path,
        tiny_sdxl,
        dataset,
        lora_rank=4,
        lora_alpha=2,
        epochs=2,
        learning_rate="5e-2",
        save_precision="fp32",
        train_text_encoder=True,
        unet_target_modules=ALL_ATTENTION,
    )
    result = train(config)
    modules = kohya_modules(Path(result.outputs["kohya"]))
    assert {float(m["alpha"]) for m in modules.values()} == {2.0}
    assert any(n.startswith("lora_te1_") for n in modules) and any(n.startswith("lora_te2_") for n in modules)

    merged = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").eval()
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet").eval()
    by_name = {
        sdxl_kohya_name("unet", p, merged.config): m for p, m in merged.named_modules() if isinstance(m, ADAPTABLE)
    }
    with torch.no_grad():
        for name, parts in modules.items():
            if name.startswith("lora_unet_"):
                delta = (parts["lora_up.weight"].flatten(1) @ parts["lora_down.weight"].flatten(1)).reshape(
                    by_name[name].weight.shape
                )
                by_name[name].weight += (2.0 / 4) * delta

    g = torch.Generator().manual_seed(0)
    sample, hidden = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 77, merged.config.cross_attention_dim, generator=g),
    )
    added = {"text_embeds": torch.randn(1, 40, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    t = torch.tensor([500])
    with torch.no_grad():
        want = merged(sample, t, hidden, added_cond_kwargs=added).sample
        plain = base(sample, t, hidden, added_cond_kwargs=added).sample
    assert not torch.allclose(want, plain, atol=1e-4)

    # kohya's file (SGM names) and diffusers' own file give the same UNet, every key used.
    for source in (result.outputs["kohya"], str(config.output_dir)):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.load_lora_weights(source, adapter_name="mine")
        for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_")):
            adapted = {
                sdxl_kohya_name(part, p, merged.config)
                for p, m in getattr(pipe, part).named_modules()
                if isinstance(m, BaseTunerLayer) and "mine" in m.lora_A
            }
            assert adapted == {n for n in modules if n.startswith(prefix)}, (source, part)
        with torch.no_grad():
            got = pipe.unet(sample, t, hidden, added_cond_kwargs=added).sample
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-3), source


def test_cached_text_encoder_outputs_mean_no_text_encoder_in_a_step(
    tmp_path: Path, tiny_sdxl: Path, dataset: Path
) -> None:
    shuffled = {"shuffle_caption": True, "caption_dropout": 0.25, "trigger_word": "mystyle", "epochs": 3}
    before, during, summary = count_text_encoder_forwards(
        sdxl_config(tmp_path, tiny_sdxl, dataset, **shuffled), tiny_sdxl
    )
    stats = summary["text_encoder_outputs"]
    assert during == 0 and before > 0
    # Shuffle and dropout: one entry per distinct caption string of the whole run. The 8 images have 4
    # captions of a trigger and two tags: at most 2 orders each, plus the dropped (empty) caption.
    assert 4 < stats["distinct_captions"] <= 9 and stats["encoded"] == stats["distinct_captions"]

    # A second run finds every caption on disk and runs no text encoder at all.
    before, during, summary = count_text_encoder_forwards(
        sdxl_config(tmp_path, tiny_sdxl, dataset, "again", **shuffled), tiny_sdxl
    )
    assert (before, during) == (0, 0)
    assert summary["text_encoder_outputs"]["encoded"] == 0

    # Without the cache the encoders run at every step.
    _, during, _ = count_text_encoder_forwards(
        sdxl_config(tmp_path, tiny_sdxl, dataset, "uncached", cache_text_encoder_outputs=False), tiny_sdxl
    )
    assert during == 2 * 4  # two encoders, four steps


def test_resume_matches_uninterrupted_run(tmp_path: Path, tiny_sdxl: Path, dataset: Path) -> None:
    from lorad.errors import TrainingInterrupted

    common = {"epochs": 3, "save_steps": 2, "shuffle_caption": True, "caption_dropout": 0.2, "save_precision": "fp32"}
    full = train(sdxl_config(tmp_path, tiny_sdxl, dataset, "full", **common))
    stop = threading.Event()

    def stop_at_five(event: object) -> None:
        if isinstance(event, StepDone) and event.step == 5:
            stop.set()

    with pytest.raises(TrainingInterrupted):
        train(sdxl_config(tmp_path, tiny_sdxl, dataset, "parted", **common), on_event=stop_at_five, stop=stop)
    resumed = train(sdxl_config(tmp_path, tiny_sdxl, dataset, "parted", resume_from="latest", **common))
    assert resumed.steps == full.steps == 12
    assert same_tensors(Path(full.outputs["kohya"]), Path(resumed.outputs["kohya"]))


def test_fp8_base_and_v_prediction_with_zero_terminal_snr_train(tmp_path: Path, tiny_sdxl: Path, dataset: Path) -> None:
    from lorad.families.sdxl.family import FAMILY
    from lorad.training.placement import pick_placement

    config = sdxl_config(
        tmp_path,
        tiny_sdxl,
        dataset,
        fp8_base=True,
        prediction_type="v_prediction",
        zero_terminal_snr=True,
        min_snr_gamma=5,
        epochs=2,
    )
    placement = pick_placement("cpu", "no")
    key = FAMILY.model_key(config, placement)
    assert key.kind == "sdxl" and key.option("fp8_base") == "true" and key.option("zero_terminal_snr") == "true"
    plain = FAMILY.model_key(sdxl_config(tmp_path, tiny_sdxl, dataset, "plain"), placement)
    assert plain != key  # the fp8 model is resident apart from the full-precision one
    result = train(config)
    assert torch.isfinite(torch.tensor(result.final_loss))
    with safe_open(result.outputs["kohya"], "pt") as fh:
        assert fh.metadata()["modelspec.prediction_type"] == "v_prediction"


def test_config_defaults_example_and_detection(tmp_path: Path, tiny_sdxl: Path, dataset: Path) -> None:
    import yaml

    config = parse_any_config(
        {"train_data_dir": str(dataset), "base_model": str(tiny_sdxl), "output_dir": str(tmp_path / "o")},
        base_dir=tmp_path,
    )
    assert isinstance(config, SdxlTrainConfig)
    assert (config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps) == (
        1024,
        512,
        2048,
        64,
    )
    assert config.fp8_base is False and config.zero_terminal_snr is None and config.cache_text_encoder_outputs
    example = render_sdxl_example()
    raw = yaml.safe_load(example)
    assert "# resolution: 1024" in example and "# max_bucket_reso: 2048" in example
    assert "fp8_base" in example and "zero_terminal_snr" in example
    raw |= {
        "train_data_dir": str(dataset),
        "base_model": str(tiny_sdxl),
        "metadata_path": str(dataset / "metadata.csv"),
    }
    assert isinstance(parse_any_config(raw, base_dir=tmp_path), SdxlTrainConfig)
    named = parse_any_config(
        {"model_family": "sdxl", "train_data_dir": str(dataset), "base_model": "org/not-cached", "output_dir": "o"},
        base_dir=tmp_path,
    )
    assert named.model_family == "sdxl"


def test_cli_example_check_and_train(
    tmp_path: Path, tiny_sdxl: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from tests.support.cli import run_cli
    from tests.support.datasets import write_config

    code, out, _ = run_cli(capsys, "config", "--example", "sdxl")
    assert code == 0 and yaml.safe_load(out)["gradient_checkpointing"] is True
    assert "# fp8_base: false" in out and "# resolution: 1024" in out
    cfg = write_config(tmp_path / "sdxl.yaml", **tiny_sdxl_values(tiny_sdxl, dataset, tmp_path / "out" / "my_sdxl"))
    code, out, err = run_cli(capsys, "config", "--check", str(cfg))
    assert code == 0, err
    code, out, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 0, err
    assert "<lora:my_sdxl:0.8>" in out


def test_init_lora_continues_an_sdxl_lora(tmp_path: Path, tiny_sdxl: Path, dataset: Path) -> None:
    first = train(
        sdxl_config(tmp_path, tiny_sdxl, dataset, "first", train_text_encoder=True, save_precision="fp32", lora_alpha=2)
    )
    # One step at a vanishing learning rate: the continued LoRA is the file it started from.
    again = train(
        sdxl_config(
            tmp_path,
            tiny_sdxl,
            dataset,
            "again",
            train_text_encoder=True,
            save_precision="fp32",
            lora_alpha=2,
            init_lora=first.outputs["kohya"],
            max_train_steps=1,
            learning_rate="1e-12",
        )
    )
    before, after = load_file(first.outputs["kohya"]), load_file(again.outputs["kohya"])
    assert before.keys() == after.keys() and any(k.startswith("lora_te2_") for k in before)
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    assert any(before[k].abs().sum() > 0 for k in before if k.endswith("lora_up.weight"))


def test_flip_aug_and_random_crop_reach_the_time_ids(tmp_path: Path, tiny_sdxl: Path) -> None:
    from contextlib import contextmanager

    from lorad.families.sdxl.family import FAMILY
    from lorad.training.family import ProvidedModel
    from lorad.training.placement import pick_placement
    from tests.support.datasets import make_dataset

    wide = make_dataset(tmp_path / "wide", count=4, size=(128, 64))
    config = sdxl_config(tmp_path, tiny_sdxl, wide, flip_aug=True, random_crop=True, epochs=3, enable_bucket=False)
    model = FAMILY.load(FAMILY.model_key(config, pick_placement("cpu", "no")))
    seen: list[torch.Tensor] = []
    model.unet.register_forward_pre_hook(
        lambda _m, _args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True
    )

    @contextmanager
    def provide(_config, _placement):
        yield ProvidedModel(model=model, resident=True, seconds=0.0)

    train(config, models=provide)
    ids = torch.cat(seen)
    # 128x64 images trained at 64x64: original size 64x128, target 64x64, and the crop's left edge
    # anywhere the random window fell (multiples of 8 px), not only the centre's 32.
    assert {tuple(row[[0, 1, 4, 5]].tolist()) for row in ids} == {(64.0, 128.0, 64.0, 64.0)}
    lefts = {int(row[3]) for row in ids}
    assert len(lefts) > 1 and lefts <= set(range(0, 65, 8)) and {int(row[2]) for row in ids} == {0}
