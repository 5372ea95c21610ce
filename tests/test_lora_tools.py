"""The LoRA toolbox on files lorad writes, checked by the tools that read them (diffusers, PEFT, A1111's
and ComfyUI's name rules) and by the linear algebra each operation promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorad.cli.main import main
from lorad.errors import LoraFileError
from lorad.lora_tools.bake import bake_loras
from lorad.lora_tools.convert import convert_lora
from lorad.lora_tools.extract import extract_lora
from lorad.lora_tools.inspect import inspect_lora
from lorad.lora_tools.layouts import read_lora
from lorad.lora_tools.merge import merge_loras
from lorad.lora_tools.resize import resize_lora
from lorad.lora_tools.tensor_files import TensorReader, TensorWriter
from lorad.models.single_file import convert_components
from lorad.models.tiny import build_tiny_sd, write_original_checkpoint
from tests.support.a1111 import a1111_compvis_name, ldm_module_names
from tests.support.lora_samples import write_diffusers_sample, write_kohya_sample


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, tiny_sd: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-tools")
    return {
        "kohya": write_kohya_sample(root / "a.safetensors", tiny_sd, rank=4, alpha=2.0, seed=0),
        "kohya_b": write_kohya_sample(root / "b.safetensors", tiny_sd, rank=2, alpha=1.0, seed=1),
        "diffusers": write_diffusers_sample(root / "diffusers", tiny_sd, rank=4, alpha=2.0, seed=0),
        "single": write_original_checkpoint(tiny_sd, root / "tiny.safetensors"),
    }


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    return {name: module.delta() for name, module in read_lora(path).modules.items()}


# --- inspect ---------------------------------------------------------------------------------------
def test_inspect_reports_each_layout_lorad_writes(files: dict[str, Path], tmp_path: Path) -> None:
    peft = convert_lora(files["kohya"], tmp_path / "peft", to="peft")
    comfy = convert_lora(files["kohya"], tmp_path / "comfy.safetensors", to="comfyui", base=files["single"])
    for layout, path in (
        ("kohya", files["kohya"]),
        ("diffusers", files["diffusers"]),
        ("peft", peft),
        ("comfyui", comfy),
    ):
        report = inspect_lora(path)
        assert (report.layout, report.family) == (layout, "sd1"), path
        assert report.ranks == [4] and report.alphas == [2.0]
        assert report.modules == 87 and report.parameters == 73_472 and report.precision == "fp32"
        assert report.problems == [], report.problems
    kohya = inspect_lora(files["kohya"])
    assert kohya.trigger_words == ["zkw"] and kohya.top_tags[0] == ("zkw", 8)
    assert {row.block for row in kohya.blocks} >= {"unet down_blocks.0", "unet mid_block", "te layer 1"}


def test_inspect_reports_damage_without_crashing(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = load_file(str(files["kohya"]))
    names = sorted({k.split(".")[0] for k in tensors})
    tensors[f"{names[0]}.lora_up.weight"][0, 0] = float("nan")
    tensors[f"{names[1]}.lora_down.weight"][0, 0] = float("inf")
    del tensors[f"{names[2]}.alpha"]
    tensors[f"{names[3]}.lora_down.weight"] = torch.zeros(3, tensors[f"{names[3]}.lora_down.weight"].shape[1])
    del tensors[f"{names[4]}.lora_up.weight"]
    tensors["lora_unet_no_such_block_to_q.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_block_to_q.lora_up.weight"] = torch.zeros(8, 4)
    tensors["lora_unet_no_such_block_to_q.alpha"] = torch.tensor(4.0)
    tensors["something_else"] = torch.zeros(1)
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged))
    report = inspect_lora(damaged)
    problems = {p.kind: p for p in report.problems}
    assert set(problems) == {"nan", "missing_alpha", "rank_mismatch", "incomplete", "unmapped", "unknown_keys"}
    assert set(problems["nan"].keys) == {f"{names[0]}.up", f"{names[1]}.down"}
    assert problems["missing_alpha"].keys == [names[2]]
    assert problems["rank_mismatch"].keys == [names[3]]
    assert problems["incomplete"].keys == [names[4]]
    assert problems["unmapped"].keys == ["lora_unet_no_such_block_to_q"]
    # The same through the CLI, as JSON; --strict turns problems into a failing exit status.
    assert main(["lora", "inspect", str(damaged), "--json", "--strict"]) == 1
    capsys.readouterr()
    # As text: each problem with the first keys it concerns.
    assert main(["lora", "inspect", str(damaged)]) == 0
    text = capsys.readouterr().out
    assert "problems:   6" in text and "- [missing_alpha] 1 modules have no alpha" in text
    assert f"\n        {names[2]}\n" in text and "- [unmapped]" in text


def test_inspect_cli_json(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lora", "inspect", str(files["kohya"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["family"] == "sd1" and data["metadata"]["ss_output_name"] == "sample" and data["problems"] == []


def test_inspect_tells_sdxl_and_flux_by_key_names(tmp_path: Path) -> None:
    def module(name: str, rank: int = 2) -> dict[str, torch.Tensor]:
        return {
            f"{name}.lora_down.weight": torch.ones(rank, 8),
            f"{name}.lora_up.weight": torch.ones(8, rank),
            f"{name}.alpha": torch.tensor(1.0),
        }

    sdxl = tmp_path / "sdxl.safetensors"
    save_file(
        module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q")
        | module("lora_te2_text_model_encoder_layers_0_mlp_fc1"),
        str(sdxl),
    )
    flux = tmp_path / "flux.safetensors"
    save_file(module("lora_unet_double_blocks_0_img_attn_qkv") | module("lora_unet_single_blocks_3_linear1"), str(flux))
    assert inspect_lora(sdxl).family == "sdxl" and inspect_lora(flux).family == "flux"
    # What needs no key map works on them: resize and merge (bake is covered for SD 1.x below).
    resize_lora(sdxl, tmp_path / "sdxl-r1.safetensors", rank=1)
    assert read_lora(tmp_path / "sdxl-r1.safetensors").ranks == {1}
    with pytest.raises(LoraFileError, match="different base models"):
        merge_loras([(sdxl, 1.0), (flux, 1.0)], tmp_path / "x.safetensors")
    with pytest.raises(LoraFileError, match="key map"):
        convert_lora(sdxl, tmp_path / "x", to="diffusers")


def test_not_a_lora_is_a_clear_error(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(LoraFileError, match="full checkpoint, not a LoRA"):
        inspect_lora(files["single"])
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoraFileError, match=r"not a \.safetensors file"):
        inspect_lora(junk)
    assert main(["lora", "inspect", str(junk)]) == 1


# --- resize ----------------------------------------------------------------------------------------
def test_resize_to_full_rank_is_lossless(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "full.safetensors"
    result = resize_lora(files["kohya"], out, rank=4)
    assert min(m.kept for m in result.modules) > 1 - 1e-9
    before, after = _deltas(files["kohya"]), _deltas(out)
    for name, delta in before.items():
        torch.testing.assert_close(after[name], delta, atol=1e-6, rtol=1e-5)


def test_resize_error_equals_the_discarded_singular_values(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "r2.safetensors"
    resize_lora(files["kohya"], out, rank=2)
    before, after = _deltas(files["kohya"]), _deltas(out)
    assert read_lora(out).ranks == {2}
    for name, delta in before.items():
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
        discarded = float(s[2:].pow(2).sum().sqrt())
        error = float((after[name].double() - delta.double()).norm())
        assert error == pytest.approx(discarded, rel=1e-4, abs=1e-6), name


def test_resize_dynamic_keeps_the_asked_energy(files: dict[str, Path], tmp_path: Path) -> None:
    result = resize_lora(files["kohya"], tmp_path / "dyn.safetensors", dynamic="sv_fro:0.9")
    assert all(m.kept >= 0.9 - 1e-9 or m.new_rank == 3 for m in result.modules)
    assert all(1 <= m.new_rank <= 3 for m in result.modules)
    with pytest.raises(LoraFileError, match="not a dynamic rank rule"):
        resize_lora(files["kohya"], tmp_path / "x.safetensors", dynamic="sv_fro:2")


# --- merge -----------------------------------------------------------------------------------------
def test_concat_merge_applied_equals_applying_both(files: dict[str, Path], tmp_path: Path) -> None:
    merged = tmp_path / "merged.safetensors"
    result = merge_loras([(files["kohya"], 0.7), (files["kohya_b"], 0.3)], merged)
    assert result.ranks == [6]
    one = bake_loras([(merged, 1.0)], files["single"], tmp_path / "one.safetensors")
    two = bake_loras([(files["kohya"], 0.7), (files["kohya_b"], 0.3)], files["single"], tmp_path / "two.safetensors")
    assert one.weights_changed == two.weights_changed == 87
    a, b = load_file(one.output), load_file(two.output)
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)


def test_merge_to_rank_is_the_best_approximation(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "svd.safetensors"
    merge_loras([(files["kohya"], 0.7), (files["kohya_b"], 0.3)], out, rank=3)
    a, b, m = _deltas(files["kohya"]), _deltas(files["kohya_b"]), _deltas(out)
    for name in a:
        target = (0.7 * a[name] + 0.3 * b[name]).reshape(a[name].shape[0], -1).double()
        discarded = float(torch.linalg.svdvals(target)[3:].pow(2).sum().sqrt())
        assert float((m[name].reshape(target.shape).double() - target).norm()) == pytest.approx(
            discarded, rel=1e-4, abs=1e-6
        )


def test_merge_refuses_other_families(files: dict[str, Path], tmp_path: Path) -> None:
    sd2 = build_tiny_sd(tmp_path / "tiny-sd2", version="sd2")
    other = write_kohya_sample(tmp_path / "sd2.safetensors", sd2)
    data = load_file(str(other))
    save_file(data, str(other), metadata={"ss_base_model_version": "sd_v2", "ss_v2": "True"})
    with pytest.raises(LoraFileError, match="different base models"):
        merge_loras([(files["kohya"], 1.0), (other, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# --- convert ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("first", ["diffusers", "peft", "comfyui"])
def test_convert_round_trips_are_bit_exact(files: dict[str, Path], tmp_path: Path, first: str) -> None:
    there = convert_lora(files["kohya"], tmp_path / first, to=first, base=files["single"])
    back = convert_lora(there, tmp_path / "back.safetensors", to="kohya", base=files["single"])
    original, returned = load_file(str(files["kohya"])), load_file(str(back))
    assert original.keys() == returned.keys()
    for key, tensor in original.items():
        assert returned[key].dtype == tensor.dtype and torch.equal(returned[key], tensor), key
    # ... and between the other layouts too.
    other = "peft" if first != "peft" else "diffusers"
    hop = convert_lora(there, tmp_path / f"hop-{other}", to=other, base=files["single"])
    again = convert_lora(hop, tmp_path / "again", to=first, base=files["single"])
    a, b = read_lora(there), read_lora(again)
    assert all(
        torch.equal(a.modules[n].down, b.modules[n].down) and torch.equal(a.modules[n].up, b.modules[n].up)
        for n in a.modules
    )


def _pipeline(tiny_sd: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)


def test_converted_files_load_in_diffusers_with_no_unused_keys(
    files: dict[str, Path], tmp_path: Path, tiny_sd: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    converted = convert_lora(files["kohya"], tmp_path / "conv.safetensors", to="diffusers")
    pipe = _pipeline(tiny_sd)
    capfd.readouterr()
    pipe.load_lora_weights(str(converted))
    printed = "".join(capfd.readouterr())
    assert "UNEXPECTED" not in printed and "not loaded" not in printed and "unexpected" not in printed.lower(), printed
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    # Fused weights = base + every module's delta: the same as our bake of the kohya original.
    baked = bake_loras([(files["kohya"], 1.0)], files["single"], tmp_path / "baked.safetensors")
    unet, _, text = convert_components(load_file(baked.output), tiny_sd, torch.float32, "baked")
    for ours, theirs in ((unet, pipe.unet), (text, pipe.text_encoder)):
        expected = theirs.state_dict()
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, expected[key], atol=2e-6, rtol=1e-5, msg=key)


def test_converted_peft_folders_load_in_peft(files: dict[str, Path], tmp_path: Path, tiny_sd: Path) -> None:
    from peft import PeftModel

    from lorad.lora_tools.sd_key_map import shipped_key_map
    from tests.support.lora_samples import load_parts

    folder = convert_lora(files["kohya"], tmp_path / "peft", to="peft")
    unet, text = load_parts(tiny_sd)
    base = {
        part: {k: v.clone() for k, v in m.state_dict().items()} for part, m in (("unet", unet), ("text_encoder", text))
    }
    merged = {
        "unet": PeftModel.from_pretrained(unet, folder / "unet").merge_and_unload().state_dict(),
        "text_encoder": PeftModel.from_pretrained(text, folder / "text_encoder").merge_and_unload().state_dict(),
    }
    key_map = shipped_key_map("sd1")
    for name, module in read_lora(files["kohya"]).modules.items():
        part, path = key_map.split(name)
        key = path + ".weight" if path + ".weight" in base[part] else path.removeprefix("text_model.") + ".weight"
        torch.testing.assert_close(merged[part][key], base[part][key] + module.delta(), atol=1e-6, rtol=1e-6, msg=key)


def test_comfyui_names_are_checkpoint_weights(files: dict[str, Path], tmp_path: Path) -> None:
    """ComfyUI's generic rule: `diffusion_model.X` / `text_encoders.clip_l.transformer.X` adapt the weight `X.weight`
    of the loaded model (comfy/lora.py model_lora_keys_unet/_clip); for SD 1.x that model's keys are the
    checkpoint's `model.diffusion_model.X` and `cond_stage_model.transformer.X`."""
    comfy = convert_lora(files["kohya"], tmp_path / "comfy.safetensors", to="comfyui", base=files["single"])
    weights = set(TensorReader(files["single"]).names())
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in load_file(str(comfy))}
    for module in modules:
        if module.startswith("diffusion_model."):
            assert f"model.{module}.weight" in weights, module
        else:
            assert module.startswith("text_encoders.clip_l.transformer.")
            assert (
                "cond_stage_model.transformer." + module.removeprefix("text_encoders.clip_l.transformer.") + ".weight"
                in weights
            )


def test_kohya_outputs_pass_a1111_name_rules(files: dict[str, Path], tmp_path: Path) -> None:
    names = ldm_module_names(files["single"])
    outputs = [
        convert_lora(files["diffusers"], tmp_path / "k.safetensors", to="kohya"),
        resize_lora(files["kohya"], tmp_path / "r.safetensors", rank=2).output,
        merge_loras([(files["kohya"], 1.0), (files["kohya_b"], 1.0)], tmp_path / "m.safetensors").output,
    ]
    for output in outputs:
        for key in load_file(str(output)):
            assert a1111_compvis_name(key.split(".")[0], per=2) in names, (output, key)


# --- bake ------------------------------------------------------------------------------------------
def test_bake_equals_diffusers_fuse_lora(files: dict[str, Path], tmp_path: Path, tiny_sd: Path) -> None:
    baked = bake_loras(
        [(files["kohya"], 0.8), (files["kohya_b"], 0.5)], files["single"], tmp_path / "baked.safetensors"
    )
    unet, _, text = convert_components(load_file(baked.output), tiny_sd, torch.float32, "baked")
    pipe = _pipeline(tiny_sd)
    # diffusers 0.42 with transformers >= 5.6 drops the text-encoder half of kohya-layout SD 1.x files
    # (its kohya converter names CLIP layers the old way), so the reference loads the diffusers layout.
    for name in ("kohya", "kohya_b"):
        diffusers_file = convert_lora(files[name], tmp_path / f"{name}.safetensors", to="diffusers")
        pipe.load_lora_weights(str(diffusers_file), adapter_name=name)
    pipe.set_adapters(["kohya", "kohya_b"], adapter_weights=[0.8, 0.5])
    pipe.fuse_lora(adapter_names=["kohya", "kohya_b"])
    pipe.unload_lora_weights()
    for ours, theirs in ((unet, pipe.unet), (text, pipe.text_encoder)):
        expected = theirs.state_dict()
        changed = 0
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(value, expected[key], atol=2e-6, rtol=1e-5, msg=key)
            changed += int(not torch.equal(value, _pipeline_weights(tiny_sd, ours)[key]))
        assert changed > 0
    assert TensorReader(Path(baked.output)).metadata["lorad_baked"]


def _pipeline_weights(tiny_sd: Path, model: torch.nn.Module, _cache: dict = {}) -> dict[str, torch.Tensor]:  # noqa: B006
    name = type(model).__name__
    if name not in _cache:
        from tests.support.lora_samples import load_parts

        unet, text = load_parts(tiny_sd)
        _cache["UNet2DConditionModel"], _cache["CLIPTextModel"] = unet.state_dict(), text.state_dict()
    return _cache[name]


def test_bake_refuses_mismatched_inputs_before_writing(files: dict[str, Path], tmp_path: Path) -> None:
    sd2 = write_original_checkpoint(build_tiny_sd(tmp_path / "tiny-sd2", version="sd2"), tmp_path / "sd2.safetensors")
    out = tmp_path / "out.safetensors"
    with pytest.raises(LoraFileError, match=r"Stable Diffusion 2\.x checkpoint"):
        bake_loras([(files["kohya"], 1.0)], sd2, out)
    with pytest.raises(LoraFileError, match="not a single-file"):
        bake_loras([(files["kohya"], 1.0)], files["kohya"], out)
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.*"))


# --- extract ---------------------------------------------------------------------------------------
def test_extract_recovers_a_baked_lora(files: dict[str, Path], tmp_path: Path) -> None:
    baked = bake_loras([(files["kohya"], 1.0)], files["single"], tmp_path / "baked.safetensors")
    out = tmp_path / "extracted.safetensors"
    result = extract_lora(files["single"], Path(baked.output), out, rank=4)
    original, extracted = _deltas(files["kohya"]), _deltas(out)
    # Attention, feed-forward, proj_in and text-encoder layers come back; 3x3 resnet convs need --conv-rank.
    assert set(extracted) == {n for n in original if "resnets" not in n}
    for name, delta in extracted.items():
        torch.testing.assert_close(delta, original[name], atol=2e-6, rtol=1e-4, msg=name)
    assert result.kept == pytest.approx(1.0)
    with_convs = extract_lora(files["single"], Path(baked.output), tmp_path / "c.safetensors", rank=4, conv_rank=4)
    assert set(_deltas(Path(with_convs.output))) == set(original)
    # To a lower rank: the best rank-2 approximation of each delta.
    low = tmp_path / "low.safetensors"
    extract_lora(files["single"], Path(baked.output), low, rank=2)
    for name, delta in _deltas(low).items():
        matrix = original[name].reshape(delta.shape[0], -1).double()
        discarded = float(torch.linalg.svdvals(matrix)[2:].pow(2).sum().sqrt())
        assert float((delta.reshape(matrix.shape).double() - matrix).norm()) == pytest.approx(
            discarded, rel=1e-3, abs=2e-5
        )


# --- streaming tensor files ------------------------------------------------------------------------
def test_tensor_writer_output_reads_back_in_safetensors(tmp_path: Path) -> None:
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.arange(5, dtype=torch.int64),
        "c": torch.tensor(2.5, dtype=torch.bfloat16),
    }
    path = tmp_path / "t.safetensors"
    writer = TensorWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()], {"x": "y"})
    for key, value in tensors.items():
        writer.write(key, value)
    writer.close()
    back = load_file(str(path))
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with TensorReader(path) as reader:
        assert reader.metadata == {"x": "y"} and torch.equal(reader.read("a"), tensors["a"])
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(LoraFileError, match="truncated"):
        TensorReader(path)
