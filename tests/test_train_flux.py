"""FLUX.1 on the one loop, end to end on the tiny model: sources, caches, memory options, outputs, resume, daemon."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from lorad.config.dispatch import parse_any_config
from lorad.errors import ConfigError, TrainingInterrupted
from lorad.events import LatentsCached, LogLine, StepDone
from lorad.families.flux.spec import render_flux_example
from lorad.models.tiny_flux import FluxFiles
from lorad.training.loop import train
from tests.support.daemons import worker_registry
from tests.support.datasets import make_dataset
from tests.support.flux import flux_file_values, flux_values, parse_flux


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "style_train")


# --- config ----------------------------------------------------------------------------------------------


def test_example_config_parses_and_detects_flux(tmp_path: Path, tiny_flux_files: FluxFiles) -> None:
    raw = yaml.safe_load(render_flux_example())
    (tmp_path / "data" / "style_train").mkdir(parents=True)
    config = parse_flux(
        {
            **raw,
            "base_model": str(tiny_flux_files.transformer),
            "clip_l": str(tiny_flux_files.clip_l),
            "t5xxl": str(tiny_flux_files.t5xxl),
            "ae": str(tiny_flux_files.ae),
        },
        tmp_path,
    )
    assert config.timestep_sampling == "flux_shift" and config.guidance_scale == 1.0
    assert config.transformer_target_modules == ("all-linear",)
    assert config.output_format == ("kohya", "diffusers") and config.resolution == 1024
    assert config.sigmoid_scale == 1.0 and config.discrete_flow_shift == 3.0


def test_sd_keys_and_bad_values_are_reported_together(tmp_path: Path, tiny_flux_files: FluxFiles, data: Path) -> None:
    values = flux_values(
        tiny_flux_files.transformer,
        data,
        tmp_path / "o",
        unet_target_modules=["to_q"],
        min_snr_gamma=5,
        output_format=["kohya", "ckpt"],
        resolution=72,
        timestep_sampling="sigma",
        t5xxl=tmp_path / "missing.safetensors",
        base_quantization="int4",
    )
    with pytest.raises(ConfigError) as err:
        parse_any_config(values, base_dir=tmp_path)
    keys = {p.key for p in err.value.problems}
    assert {
        "unet_target_modules",
        "min_snr_gamma",
        "output_format",
        "resolution",
        "timestep_sampling",
        "t5xxl",
        "base_quantization",
    } <= keys
    text = str(err.value)
    assert "transformer_target_modules" in text and "multiple of 16" in text


def test_image_options_flux_does_not_implement_yet_are_refused_not_ignored(
    tmp_path: Path, tiny_flux_files: FluxFiles, data: Path
) -> None:
    values = flux_values(
        tiny_flux_files.transformer,
        data,
        tmp_path / "o",
        network_type="loha",
        flip_aug=True,
        min_timestep=100,
        clip_skip=2,
    )
    with pytest.raises(ConfigError) as err:
        parse_any_config(values, base_dir=tmp_path)
    assert {p.key for p in err.value.problems} >= {"network_type", "flip_aug", "min_timestep", "clip_skip"}
    # The same keys at their defaults (as an exported config writes them) are fine.
    defaults = flux_values(tiny_flux_files.transformer, data, tmp_path / "o", network_type="lora", flip_aug=False)
    assert parse_flux(defaults, tmp_path).network_type == "lora"


def test_choices_match_the_modules_that_implement_them() -> None:
    from lorad.diffusion.flow_matching import TIMESTEP_SAMPLINGS
    from lorad.families.flux import config
    from lorad.families.flux.lora_files import FLUX_OUTPUT_FORMATS
    from lorad.models.quantization import BASE_QUANTIZATIONS

    assert set(config.TIMESTEP_SAMPLINGS) == set(TIMESTEP_SAMPLINGS)
    assert config.BASE_QUANTIZATIONS == BASE_QUANTIZATIONS and config.OUTPUT_FORMATS == FLUX_OUTPUT_FORMATS


# --- training ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trains_from_single_file_with_separate_files(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path
) -> None:
    from diffusers import FluxPipeline

    config = parse_flux(
        flux_file_values(
            tiny_flux_files,
            tiny_flux,
            data,
            tmp_path / "out",
            output_format=["kohya", "diffusers", "comfyui"],
            max_train_steps=3,
            learning_rate="1e-2",
        ),
        tmp_path,
    )
    events: list = []
    result = train(config, on_event=events.append)
    assert result.steps == 3 and set(result.outputs) >= {"kohya", "diffusers", "comfyui", "summary"}
    kohya = load_file(result.outputs["kohya"])
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in kohya
    assert kohya["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape == (16, 32)  # 4 parts x rank 4
    with safe_open(result.outputs["kohya"], framework="pt") as handle:
        meta = handle.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_steps"] == "3"
    comfy = load_file(result.outputs["comfyui"])
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in comfy
    # The diffusers file loads in FluxPipeline and changes the model.
    pipe = FluxPipeline.from_pretrained(str(tiny_flux["dev"]), local_files_only=True)
    pipe.load_lora_weights(str(Path(result.outputs["diffusers"]).parent))
    assert any("lora" in name for name, _ in pipe.transformer.named_modules())
    summary = json.loads(Path(result.outputs["summary"]).read_text())
    assert summary["text_encoder_outputs"]["encoded"] == 4 and summary["latents"]["encoded"] == 8
    assert any(
        isinstance(e, LogLine) and "4 distinct captions, 4 encoded now, 0 from the cache" in e.message for e in events
    )


@pytest.mark.slow
def test_trains_schnell_from_a_diffusers_folder(tmp_path: Path, tiny_flux: dict[str, Path], data: Path) -> None:
    config = parse_flux(
        flux_values(
            tiny_flux["schnell"],
            data,
            tmp_path / "out",
            epochs=2,
            batch_size=4,
            save_every_n_epochs=1,
            transformer_target_modules=["attention"],
        ),
        tmp_path,
    )
    result = train(config)
    assert result.steps == 4
    epoch_file = load_file(str(tmp_path / "out" / "out-000001.safetensors"))  # kohya's per-epoch name
    kohya = load_file(result.outputs["kohya"])
    assert epoch_file.keys() == kohya.keys()
    assert "lora_unet_single_blocks_0_linear1.alpha" in kohya
    assert not any("_mod_lin" in k or "linear2" in k for k in kohya)  # attention only
    with safe_open(result.outputs["kohya"], framework="pt") as handle:
        assert handle.metadata()["modelspec.architecture"] == "flux-1-schnell/lora"


@pytest.mark.slow
def test_warm_caches_run_no_text_encoder_and_no_vae(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = train(
        parse_flux(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "a", max_train_steps=1), tmp_path)
    )
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a warm cache must not run this")

    for cls in (CLIPTextModel, T5EncoderModel, AutoencoderKL):
        monkeypatch.setattr(cls, "forward", refuse)
    monkeypatch.setattr("lorad.families.flux.family.load_t5xxl", refuse)
    monkeypatch.setattr("lorad.families.flux.family.load_vae", refuse)
    events: list = []
    second = train(
        parse_flux(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "b", max_train_steps=2), tmp_path),
        on_event=events.append,
    )
    assert second.steps == 2 and first.steps == 1
    latents = next(e for e in events if isinstance(e, LatentsCached))
    assert (latents.encoded, latents.cached) == (0, 8)
    summary = json.loads(Path(second.outputs["summary"]).read_text())
    assert summary["text_encoder_outputs"]["encoded"] == 0 and summary["text_encoder_outputs"]["cached"] == 4


@pytest.mark.slow
def test_resume_is_exact(tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path) -> None:
    common = {
        "epochs": 3,
        "save_steps": 2,
        "save_precision": "fp32",
        "shuffle_caption": True,
        "caption_dropout": 0.2,
        "lora_dropout": 0.1,
        "train_text_encoder": True,
    }
    full = train(parse_flux(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "full", **common), tmp_path))
    stop = threading.Event()

    def stop_at_five(event: object) -> None:
        if isinstance(event, StepDone) and event.step == 5:
            stop.set()

    with pytest.raises(TrainingInterrupted) as err:
        train(
            parse_flux(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "part", **common), tmp_path),
            on_event=stop_at_five,
            stop=stop,
        )
    # A stopped run leaves a usable kohya LoRA of its last step beside the checkpoint.
    assert err.value.partial and Path(err.value.partial).name == "part-partial-step00000005.safetensors"
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in load_file(err.value.partial)
    resumed = train(
        parse_flux(
            flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "part", resume_from="latest", **common),
            tmp_path,
        )
    )
    assert resumed.steps == full.steps == 12
    a, b = load_file(full.outputs["kohya"]), load_file(resumed.outputs["kohya"])
    assert any(k.startswith("lora_te1_") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_block_swap_trains_the_same_lora(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path
) -> None:
    common = {"max_train_steps": 3, "gradient_checkpointing": True, "save_precision": "fp32"}
    plain = train(
        parse_flux(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "plain", **common), tmp_path)
    )
    swapped = train(
        parse_flux(
            flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "swap", blocks_to_swap=3, **common), tmp_path
        )
    )
    a, b = load_file(plain.outputs["kohya"]), load_file(swapped.outputs["kohya"])
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_ema_variant_is_written_beside_the_trained_lora(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path
) -> None:
    values = flux_file_values(
        tiny_flux_files,
        tiny_flux,
        data,
        tmp_path / "e",
        max_train_steps=3,
        ema_decay=0.5,
        output_format=["kohya", "diffusers"],
    )
    result = train(parse_flux(values, tmp_path))
    assert {"kohya", "diffusers", "kohya_ema", "diffusers_ema"} <= set(result.outputs)
    assert Path(result.outputs["kohya_ema"]).name == "e-ema.safetensors"
    assert Path(result.outputs["diffusers_ema"]).parent == tmp_path / "e" / "ema"
    trained, averaged = load_file(result.outputs["kohya"]), load_file(result.outputs["kohya_ema"])
    assert trained.keys() == averaged.keys()
    assert any(not torch.equal(trained[k], averaged[k]) for k in trained if k.endswith("lora_up.weight"))
    with safe_open(result.outputs["kohya_ema"], framework="pt") as handle:
        assert handle.metadata()["ss_ema"] == "True"


@pytest.mark.slow
def test_quantized_base_trains(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path
) -> None:
    result = train(
        parse_flux(
            flux_file_values(
                tiny_flux_files, tiny_flux, data, tmp_path / "q", base_quantization="nf4", max_train_steps=2
            ),
            tmp_path,
        )
    )
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
    assert load_file(result.outputs["kohya"])


@pytest.mark.slow
def test_fp8_base_trains_and_block_swap_keeps_it_bit_identical(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path
) -> None:
    from lorad.families.flux.family import FAMILY
    from lorad.training.placement import pick_placement

    common = {"max_train_steps": 3, "gradient_checkpointing": True, "save_precision": "fp32", "fp8_base": True}
    config = parse_flux(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "fp8", **common), tmp_path)
    placement = pick_placement("cpu", "no")
    key = FAMILY.model_key(config, placement)
    plain = parse_flux(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "plain"), tmp_path)
    assert key.option("fp8_base") == "true" and key != FAMILY.model_key(plain, placement)  # resident apart
    events: list = []
    fp8 = train(config, on_event=events.append)
    assert fp8.steps == 3 and torch.isfinite(torch.tensor(fp8.final_loss))
    assert any(isinstance(e, LogLine) and "fp8_base: 40 transformer layers hold float8" in e.message for e in events)
    swapped = train(
        parse_flux(
            flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "swap", blocks_to_swap=3, **common), tmp_path
        )
    )
    a, b = load_file(fp8.outputs["kohya"]), load_file(swapped.outputs["kohya"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp8_base_and_base_quantization_are_one_or_the_other(
    tmp_path: Path, tiny_flux_files: FluxFiles, data: Path
) -> None:
    values = flux_values(tiny_flux_files.transformer, data, tmp_path / "o", fp8_base=True, base_quantization="int8")
    with pytest.raises(ConfigError) as err:
        parse_any_config(values, base_dir=tmp_path)
    (problem,) = [p for p in err.value.problems if p.key == "fp8_base"]
    assert "base_quantization is 'int8'" in problem.message and "remove base_quantization" in problem.fix


# --- the daemon --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.in_process  # looks at the resident model itself
def test_daemon_keeps_the_transformer_resident_and_bit_identical(
    client,
    daemon,
    tmp_path: Path,
    tiny_flux: dict[str, Path],
    tiny_flux_files: FluxFiles,
    data: Path,
) -> None:
    from lorad.models.sd_components import state_dict_digest
    from lorad_api.v1 import jobs_pb2
    from tests.support.daemons import watch_all

    def submit(out: str, **overrides: object) -> list:
        values = flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / out, max_train_steps=2, **overrides)
        job = client.submit_training(yaml.safe_dump(values), base_dir=tmp_path)
        _, events = watch_all(client, job.job_id)
        assert client.get_job(job.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED, events[-1]
        return events

    submit("first")
    (info,) = worker_registry(daemon).list()
    assert info.key.kind == "flux"
    with worker_registry(daemon).use(info.key) as held:
        model = held.model
        before = state_dict_digest(model.transformer.state_dict())
        # Only the transformer is resident: no text encoder, no VAE.
        assert {type(v).__name__ for v in vars(model).values()} >= {"FluxTransformer2DModel"}
        assert not any(isinstance(v, torch.nn.Module) for k, v in vars(model).items() if k != "transformer")
    events = submit("second", lora_rank=2)
    loaded = next(e.model_loaded for e in events if e.HasField("model_loaded"))
    assert loaded.resident
    with worker_registry(daemon).use(info.key) as held:
        assert state_dict_digest(held.model.transformer.state_dict()) == before
        assert not any("lora" in name for name, _ in held.model.transformer.named_modules())


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["kohya", "comfyui", "diffusers"])
def test_init_lora_continues_a_flux_lora_in_any_layout(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path, layout: str
) -> None:
    common = {"save_precision": "fp32", "max_train_steps": 2, "transformer_target_modules": ["attention", "proj_out"]}
    first = train(
        parse_flux(
            flux_file_values(
                tiny_flux_files,
                tiny_flux,
                data,
                tmp_path / "first",
                learning_rate="5e-2",
                lora_alpha=2,
                output_format=["kohya", "diffusers", "comfyui"],
                **common,
            ),
            tmp_path,
        )
    )
    source = first.outputs[layout]
    cont = parse_flux(
        flux_file_values(
            tiny_flux_files,
            tiny_flux,
            data,
            tmp_path / "cont",
            learning_rate="1e-12",
            lora_alpha=4,
            init_lora=source,
            **common,
        ),
        tmp_path,
    )
    second = train(cont)
    a, b = load_file(first.outputs["kohya"]), load_file(second.outputs["kohya"])
    assert a.keys() == b.keys()
    # With a negligible learning rate the continued LoRA *is* the first one, alpha 2 -> 4 rescaled.
    for key in a:
        if key.endswith(".lora_up.weight"):
            name = key.removesuffix(".lora_up.weight")
            before = (
                a[f"{name}.alpha"] / a[f"{name}.lora_down.weight"].shape[0] * (a[key] @ a[f"{name}.lora_down.weight"])
            )
            after = (
                b[f"{name}.alpha"] / b[f"{name}.lora_down.weight"].shape[0] * (b[key] @ b[f"{name}.lora_down.weight"])
            )
            assert torch.allclose(before, after, atol=1e-6), name


@pytest.mark.slow
def test_init_lora_with_other_targets_names_the_key(
    tmp_path: Path, tiny_flux: dict[str, Path], tiny_flux_files: FluxFiles, data: Path
) -> None:
    first = train(
        parse_flux(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "first", max_train_steps=1), tmp_path)
    )
    narrow = parse_flux(
        flux_file_values(
            tiny_flux_files,
            tiny_flux,
            data,
            tmp_path / "n",
            max_train_steps=1,
            init_lora=first.outputs["kohya"],
            transformer_target_modules=["attention"],
        ),
        tmp_path,
    )
    with pytest.raises(ConfigError) as err:
        train(narrow)
    assert any(p.key == "transformer_target_modules" for p in err.value.problems)


# --- the command line --------------------------------------------------------------------------------------


def test_cli_prints_the_flux_example_and_checks_a_flux_config(
    tmp_path: Path,
    tiny_flux_files: FluxFiles,
    tiny_flux: dict[str, Path],
    data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lorad.cli.main import main

    assert main(["config", "--example", "flux"]) == 0
    out = capsys.readouterr().out
    assert "t5xxl:" in out and '# timestep_sampling: "flux_shift"' in out and "# blocks_to_swap: 0" in out
    good = tmp_path / "flux.yaml"
    good.write_text(yaml.safe_dump(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "out")))
    assert main(["config", "--check", str(good)]) == 0
    assert "FLUX.1" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "out", unet_target_modules=["to_q"])
        )
    )
    assert main(["config", "--check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "`unet_target_modules`" in err and "transformer_target_modules" in err and "Traceback" not in err
    # The cheap pre-flight: model files read by header, tokenizers found, target names resolved.
    values = flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "out", transformer_target_modules=["attn2"])
    values.pop("ae")
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump(values))
    assert main(["config", "--check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "`ae`" in err and "ae.safetensors" in err and "Traceback" not in err
    missing.write_text(yaml.safe_dump({**values, "ae": str(tiny_flux_files.ae)}))
    assert main(["config", "--check", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "`transformer_target_modules`" in err and "'attn2' matches no layer" in err


@pytest.mark.slow
def test_cli_trains_a_flux_lora(
    tmp_path: Path,
    tiny_flux_files: FluxFiles,
    tiny_flux: dict[str, Path],
    data: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lorad.cli.main import main

    config = tmp_path / "flux.yaml"
    config.write_text(
        yaml.safe_dump(flux_file_values(tiny_flux_files, tiny_flux, data, tmp_path / "out", max_train_steps=2))
    )
    code = main(["train", "--config", str(config)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (tmp_path / "out" / "out.safetensors").is_file()
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
