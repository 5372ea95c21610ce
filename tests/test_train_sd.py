"""End-to-end SD LoRA training on a tiny random model: outputs, formats, resume, caching."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lorad.config import load_config, parse_config
from lorad.errors import ConfigError, TrainingDiverged, TrainingInterrupted
from lorad.events import LatentsCached, StepDone
from lorad.training.loop import train as train_sd_lora
from tests.conftest import SEED_YAML, tiny_train_values


def config_for(tmp_path: Path, tiny_sd: Path, dataset: Path, out: str = "out", **overrides: object):
    return parse_config(tiny_train_values(tiny_sd, dataset, tmp_path / out, **overrides), base_dir=tmp_path)


def kohya_modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors = load_file(str(path))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, role = key.partition(".")
        modules.setdefault(name, {})[role] = value
    return modules


def test_seed_config_verbatim_trains(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "my_lora_config.yaml"
    cfg.write_text(SEED_YAML.format(base_model=tiny_sd))
    config = load_config(cfg, base_dir=tmp_path)
    result = train_sd_lora(config)
    out = tmp_path / "output" / "my_style_lora"
    assert Path(result.outputs["kohya"]) == out / "my_style_lora.safetensors"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert result.steps == 20  # 8 images / batch 4 * 10 epochs
    with safe_open(result.outputs["kohya"], "pt") as fh:
        meta = fh.metadata()
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}  # noqa: SIM118
    assert dtypes == {torch.float16}
    assert meta["ss_output_name"] == "my_style_lora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "20" and meta["ss_num_train_images"] == "8"
    assert json.loads(meta["ss_tag_frequency"])["style_train"]["mystyle"] == 8
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 20 and summary["data_report"]["images_used"] == 8
    assert any((out / "logs").iterdir())  # TensorBoard events
    # Only the q/v projections were trained: the README's q_proj/v_proj mean to_q/to_v here.
    names = kohya_modules(out / "my_style_lora.safetensors")
    assert names and all(n.endswith(("_to_q", "_to_v")) for n in names)


def test_kohya_keys_name_real_modules(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    from diffusers import UNet2DConditionModel

    config = config_for(
        tmp_path, tiny_sd, dataset, unet_target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj"]
    )
    result = train_sd_lora(config)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    real = {"lora_unet_" + p.replace(".", "_") for p, _ in unet.named_modules() if p}
    modules = kohya_modules(Path(result.outputs["kohya"]))
    assert set(modules) <= real
    for parts in modules.values():
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}


def test_alpha_differs_from_rank_loads_in_diffusers(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = config_for(
        tmp_path,
        tiny_sd,
        dataset,
        lora_rank=4,
        lora_alpha=2,
        epochs=2,
        learning_rate="5e-2",
        save_precision="fp32",
        train_text_encoder=True,
    )
    result = train_sd_lora(config)
    kohya = Path(result.outputs["kohya"])
    modules = kohya_modules(kohya)
    assert {float(m["alpha"]) for m in modules.values()} == {2.0}

    # The reference: base UNet with W += (alpha / rank) * up @ down, merged by hand.
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    merged = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()
    by_name = {"lora_unet_" + p.replace(".", "_"): m for p, m in merged.named_modules() if p}
    with torch.no_grad():
        for name, parts in modules.items():
            if name.startswith("lora_te_"):
                continue
            delta = parts["lora_up.weight"] @ parts["lora_down.weight"]
            by_name[name].weight += (2.0 / 4) * delta

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(kohya), adapter_name="mine")
    adapted = {p for p, m in pipe.unet.named_modules() if isinstance(m, BaseTunerLayer) and "mine" in m.lora_A}
    te_adapted = {
        p for p, m in pipe.text_encoder.named_modules() if isinstance(m, BaseTunerLayer) and "mine" in m.lora_A
    }
    unet_modules = {n for n in modules if n.startswith("lora_unet_")}
    assert {"lora_unet_" + p.replace(".", "_") for p in adapted} == unet_modules  # nothing unmatched
    assert len(te_adapted) == len(modules) - len(unet_modules) > 0

    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, base.config.cross_attention_dim)
    t = torch.tensor([500])
    with torch.no_grad():
        want = merged(sample, t, hidden).sample
        got = pipe.unet(sample, t, hidden).sample
        plain = base(sample, t, hidden).sample
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-3)
    assert not torch.allclose(got, plain, atol=1e-4)

    # diffusers' own format carries alpha too and gives the same UNet.
    pipe2 = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe2.load_lora_weights(str(config.output_dir))
    with torch.no_grad():
        assert torch.allclose(pipe2.unet(sample, t, hidden).sample, want, atol=1e-4, rtol=1e-3)


def test_same_seed_same_lora(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    a = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "a", shuffle_caption=True, caption_dropout=0.2))
    b = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "b", shuffle_caption=True, caption_dropout=0.2))
    ta, tb = load_file(a.outputs["kohya"]), load_file(b.outputs["kohya"])
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_matches_uninterrupted_run(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    common = {
        "epochs": 3,
        "save_steps": 2,
        "gradient_accumulation_steps": 1,
        "lr_scheduler": "cosine",
        "lora_dropout": 0.1,
        "train_text_encoder": True,
        "save_precision": "fp32",
    }
    full = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "full", **common))
    kept = sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir())
    assert kept == ["step-000006", "step-000008", "step-000010"]  # keep_checkpoints: 3 (the default)

    stop = threading.Event()

    def stop_at_five(event: object) -> None:
        if isinstance(event, StepDone) and event.step == 5:
            stop.set()

    partial_cfg = config_for(tmp_path, tiny_sd, dataset, "part", **common)
    with pytest.raises(TrainingInterrupted) as err:
        train_sd_lora(partial_cfg, on_event=stop_at_five, stop=stop)
    assert err.value.checkpoint and err.value.checkpoint.endswith("step-000005")
    assert not Path(partial_cfg.output_dir / "part.safetensors").exists()  # no half-finished LoRA

    resumed = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "part", resume_from="latest", **common))
    assert resumed.steps == full.steps == 12
    ta, tb = load_file(full.outputs["kohya"]), load_file(resumed.outputs["kohya"])
    assert any(k.startswith("lora_te_") for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_with_changed_settings_is_refused(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "r", epochs=2, save_steps=2))
    with pytest.raises(ConfigError) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "r", epochs=2, lora_rank=8, resume_from="latest"))
    assert any(p.key == "lora_rank" for p in err.value.problems)


def test_init_lora_starts_from_file(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    first = train_sd_lora(
        config_for(
            tmp_path,
            tiny_sd,
            dataset,
            "first",
            learning_rate="5e-2",
            save_precision="fp32",
            lora_alpha=2,
            train_text_encoder=True,
        )
    )
    seen: list[StepDone] = []
    cont = config_for(
        tmp_path,
        tiny_sd,
        dataset,
        "cont",
        init_lora=first.outputs["kohya"],
        learning_rate="1e-12",
        save_precision="fp32",
        lora_alpha=4,
        train_text_encoder=True,
    )
    second = train_sd_lora(cont, on_event=lambda e: seen.append(e) if isinstance(e, StepDone) else None)
    a, b = kohya_modules(Path(first.outputs["kohya"])), kohya_modules(Path(second.outputs["kohya"]))
    assert a.keys() == b.keys() and any(n.startswith("lora_te_") for n in a)
    # With a negligible learning rate the continued LoRA *is* the first one (alpha rescaled 2 → 4).
    for name, parts in a.items():
        delta_a = parts["lora_up.weight"] @ parts["lora_down.weight"] * (2 / 4)
        delta_b = b[name]["lora_up.weight"] @ b[name]["lora_down.weight"] * (4 / 4)
        assert torch.allclose(delta_a, delta_b, atol=1e-6)
        assert delta_b.abs().max() > 0  # not zeros


def test_second_run_encodes_no_latents(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    events: list[LatentsCached] = []
    sink = lambda e: events.append(e) if isinstance(e, LatentsCached) else None  # noqa: E731
    train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "one"), on_event=sink)
    train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "two", lora_rank=2), on_event=sink)
    assert (events[0].encoded, events[0].cached) == (8, 0)
    assert (events[1].encoded, events[1].cached) == (0, 8)


def test_resident_base_model_left_bit_identical(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    from contextlib import contextmanager

    from lorad.families.sd.family import load_for_training
    from lorad.training.activation_checkpointing import is_activation_checkpointing
    from lorad.training.family import ProvidedModel
    from lorad.training.placement import pick_placement

    components = load_for_training(str(tiny_sd), pick_placement("cpu", "no"))
    before = {k: v.clone() for k, v in components.unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in components.text_encoder.state_dict().items()}
    events: list[object] = []

    @contextmanager
    def resident(config, placement):
        yield ProvidedModel(model=components, resident=True, seconds=0.0)

    train_sd_lora(
        config_for(
            tmp_path, tiny_sd, dataset, train_text_encoder=True, learning_rate="1e-1", gradient_checkpointing=True
        ),
        models=resident,
        on_event=events.append,
    )
    assert any(getattr(e, "resident", False) for e in events)
    assert not components.unet.training and not components.text_encoder.training
    assert not any(is_activation_checkpointing(m) for m in (components.unet, components.text_encoder))
    after = components.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before_te[k], v) for k, v in components.text_encoder.state_dict().items())
    assert not any("lora" in name for name, _ in components.unet.named_modules())


def test_bad_target_module_lists_valid_names(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    with pytest.raises(ConfigError) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, unet_target_modules=["to_q", "qkv", "norm1"]))
    text = str(err.value)
    assert "'qkv' matches no layer" in text and "to_out.0" in text
    assert "'norm1' matches only GroupNorm, LayerNorm layers, which LoRA cannot adapt" in text
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_nan_loss_stops_with_clear_error(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    config = config_for(tmp_path, tiny_sd, dataset, max_grad_norm=0, epochs=5, save_steps=1)
    # Validation refuses a rate this absurd; the engine must still stop cleanly if a run diverges.
    config = dataclasses.replace(config, learning_rate=1e30)
    with pytest.raises(TrainingDiverged) as err:
        train_sd_lora(config)
    assert "learning_rate" in err.value.hint and "checkpoint" in err.value.hint
    assert not (config.output_dir / "out.safetensors").exists()


def test_single_file_checkpoint_trains(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    from lorad.models.tiny import write_original_checkpoint

    single = write_original_checkpoint(tiny_sd, tmp_path / "models" / "tiny-v1.safetensors")
    config = config_for(tmp_path, tiny_sd, dataset, base_model=single, model_config_dir=tiny_sd)
    result = train_sd_lora(config)
    assert Path(result.outputs["kohya"]).is_file()


def test_sd2_v_prediction_with_min_snr_and_noise_offset(tmp_path: Path, dataset: Path) -> None:
    from lorad.models.tiny import build_tiny_sd

    tiny_sd2 = build_tiny_sd(tmp_path / "tiny-sd2", version="sd2")
    config = config_for(
        tmp_path, tiny_sd2, dataset, min_snr_gamma=5, noise_offset=0.05, unet_target_modules=["to_q", "to_v", "proj_in"]
    )
    result = train_sd_lora(config)
    with safe_open(result.outputs["kohya"], "pt") as fh:
        meta = fh.metadata()
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_v2"] == "True"
    assert meta["ss_min_snr_gamma"] == "5.0"
    assert result.final_loss == result.final_loss  # finite, not NaN


def test_gradient_checkpointing_gives_the_same_lora(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    plain = train_sd_lora(config_for(tmp_path, tiny_sd, dataset, "plain", save_precision="fp32"))
    ckpt = train_sd_lora(
        config_for(tmp_path, tiny_sd, dataset, "ckpt", save_precision="fp32", gradient_checkpointing=True)
    )
    ta, tb = load_file(plain.outputs["kohya"]), load_file(ckpt.outputs["kohya"])
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_mixed_precision_on_cpu_is_a_config_error(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    with pytest.raises(ConfigError) as err:
        train_sd_lora(config_for(tmp_path, tiny_sd, dataset, mixed_precision="fp16"))
    assert err.value.problems[0].key == "mixed_precision"
