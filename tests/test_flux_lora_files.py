"""FLUX.1 LoRA files: kohya/BFL keys, the exact fused-qkv conversion, ComfyUI's and diffusers' layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import load_file

from lorad.errors import ConfigError
from lorad.families.flux.key_map import FluxShape, linear_modules
from lorad.families.flux.lora_files import (
    bfl_loras,
    clip_loras,
    comfyui_tensors,
    flux_metadata,
    kohya_tensors,
    save_flux_kohya,
)
from lorad.families.flux.targets import TARGET_SETS, transformer_target_paths
from lorad.lora.adapters import attach_lora, lora_state_dict
from lorad.lora.diffusers_format import save_diffusers_lora
from lorad.models.tiny_flux import write_flux_files

RANK, ALPHA = 4, 8.0


@pytest.fixture(scope="module")
def tiny(tiny_flux: dict[str, Path]) -> Path:
    """The session's tiny FLUX.1-dev folder (read only)."""
    return tiny_flux["dev"]


@pytest.fixture(scope="module")
def bfl_keys(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    files = write_flux_files(tiny, tmp_path_factory.mktemp("files"))
    with safe_open(str(files.transformer), framework="pt") as handle:
        return set(handle.keys())


def _trained(tiny: Path, targets: list[str], seed: int = 0) -> tuple[FluxTransformer2DModel, dict[str, torch.Tensor]]:
    """The tiny transformer with an adapter whose B is random (as after training), and the adapter's state."""
    model = FluxTransformer2DModel.from_pretrained(str(tiny / "transformer"))
    paths = transformer_target_paths(model, targets, key="targets")
    params = attach_lora(model, adapter_name="job", target_paths=paths, rank=RANK, alpha=ALPHA)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model, lora_state_dict(model, "job")


def _shape(model: FluxTransformer2DModel) -> FluxShape:
    return FluxShape.from_config(model.config)


def _part_delta(state: dict[str, torch.Tensor], path: str, alpha: float = ALPHA) -> torch.Tensor:
    a, b = state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]
    return (alpha / a.shape[0]) * (b.float() @ a.float())


def test_default_targets_are_kohyas_every_block_linear(tiny: Path) -> None:
    model, state = _trained(tiny, ["all-linear"])
    shape = _shape(model)
    loras = bfl_loras(state, shape, ALPHA)
    block_modules = {m.bfl for m in linear_modules(shape) if m.bfl.startswith(("double_blocks.", "single_blocks."))}
    assert set(loras) == block_modules
    attention = transformer_target_paths(model, ["attention"], key="targets")
    assert {p.rsplit(".", 1)[-1] for p in attention} == {
        "to_q",
        "to_k",
        "to_v",
        "0",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",
    }
    assert (
        set(attention)
        < set(transformer_target_paths(model, ["attention+mlp"], key="t"))
        < set(transformer_target_paths(model, ["all-linear"], key="t"))
    )


def test_every_kohya_key_maps_to_a_bfl_module_of_the_single_file(tiny: Path, bfl_keys: set[str]) -> None:
    model, state = _trained(tiny, ["all-linear", "proj_out", "x_embedder", "norm_out.linear"])
    loras = bfl_loras(state, _shape(model), ALPHA)
    kohya = kohya_tensors(loras, {}, torch.float16)
    # ComfyUI's rule (comfy/lora.py model_lora_keys_unet): "lora_unet_" + key without "diffusion_model." and
    # ".weight", dots to underscores, for every weight of the model.
    comfy_map = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in bfl_keys if k.endswith(".weight")}
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in kohya}
    assert names <= comfy_map
    assert "lora_unet_double_blocks_0_img_attn_qkv" in names and "lora_unet_single_blocks_0_linear1" in names
    assert "lora_unet_final_layer_adaLN_modulation_1" in names and "lora_unet_img_in" in names
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya)
    comfy = comfyui_tensors(loras, {}, torch.float16)
    assert {k.rsplit(".", 2)[0].removeprefix("diffusion_model.") + ".weight" for k in comfy if "lora_" in k} <= bfl_keys
    assert {k.rsplit(".", 1)[0] for k in comfy if k.endswith(".alpha")} == {"diffusion_model." + b for b in loras}


def test_fused_conversion_is_exact(tiny: Path) -> None:
    model, state = _trained(tiny, ["all-linear", "norm_out.linear"])
    shape = _shape(model)
    loras = bfl_loras(state, shape, ALPHA)
    for module in linear_modules(shape):
        if module.bfl not in loras:
            continue
        expected = torch.cat([_part_delta(state, p) for p in module.parts], dim=0)
        if module.swap_halves:
            first, second = expected.chunk(2)
            expected = torch.cat([second, first])
        lora = loras[module.bfl]
        assert lora.rank == RANK * len(module.parts)
        assert lora.alpha / lora.rank == ALPHA / RANK  # the scale loaders apply is unchanged
        assert torch.allclose(lora.delta(), expected, atol=1e-6), module.bfl
    # Read back from the written file, as a loader does: W' = W + alpha/rank * up @ down.
    qkv = loras["double_blocks.1.img_attn.qkv"]
    assert qkv.down.shape == (3 * RANK, 32) and qkv.up.shape == (3 * 32, 3 * RANK)
    assert torch.count_nonzero(qkv.up[:32, RANK:]) == 0  # block-diagonal


def test_partly_trained_fused_module_gets_zero_rows(tiny: Path) -> None:
    model, state = _trained(tiny, ["attention"])
    lora = bfl_loras(state, _shape(model), ALPHA)["single_blocks.0.linear1"]
    assert lora.rank == 3 * RANK and lora.alpha == 3 * ALPHA
    assert torch.count_nonzero(lora.up[3 * 32 :]) == 0  # the MLP-input rows were not trained
    expected = torch.cat([_part_delta(state, f"single_transformer_blocks.0.attn.to_{x}") for x in "qkv"])
    assert torch.allclose(lora.delta()[: 3 * 32], expected, atol=1e-6)


@pytest.mark.slow
def test_diffusers_reads_our_kohya_file_at_flux_width() -> None:
    """diffusers' kohya-FLUX reader (FluxPipeline.load_lora_weights' converter) takes every key back apart."""
    real = FluxShape(num_layers=19, num_single_layers=38, inner_dim=3072, guidance_embeds=True)
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    sizes = {
        "attn.to_q": 3072,
        "attn.to_k": 3072,
        "attn.to_v": 3072,
        "attn.to_out.0": 3072,
        "proj_mlp": 12288,
        "attn.add_q_proj": 3072,
        "attn.add_k_proj": 3072,
        "attn.add_v_proj": 3072,
        "attn.to_add_out": 3072,
        "ff.net.0.proj": 12288,
        "ff.net.2": 3072,
        "ff_context.net.0.proj": 12288,
        "ff_context.net.2": 3072,
        "norm1.linear": 18432,
        "norm1_context.linear": 18432,
        "norm.linear": 9216,
        "proj_out": 3072,
    }
    ins = {"ff.net.2": 12288, "ff_context.net.2": 12288, "proj_out": 15360}
    paths = [f"transformer_blocks.0.{n}" for n in TARGET_SETS["all-linear"][0]]
    paths += [f"single_transformer_blocks.5.{n}" for n in TARGET_SETS["all-linear"][1]]
    for path in paths:
        name = path.split(".", 2)[2]
        state[f"{path}.lora_A.weight"] = torch.randn(RANK, ins.get(name, 3072), generator=generator)
        state[f"{path}.lora_B.weight"] = torch.randn(sizes[name], RANK, generator=generator)
    kohya = kohya_tensors(bfl_loras(state, real, ALPHA), {}, torch.float32)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(kohya))  # raises if any key is left over
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted} == set(paths)
    for path in paths:
        a, b = converted[f"transformer.{path}.lora_A.weight"], converted[f"transformer.{path}.lora_B.weight"]
        assert torch.allclose(b @ a, _part_delta(state, path), rtol=1e-4, atol=1e-4), path


def _transformer_inputs(model: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=generator),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([1.0]),
        "img_ids": torch.zeros(16, 3),
        "txt_ids": torch.zeros(8, 3),
    }


def test_diffusers_file_loads_in_flux_pipeline_and_equals_base_plus_lora(
    tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, state = _trained(tiny, ["all-linear"])
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=sorted({k.rsplit(".lora_", 1)[0] for k in state}))
    path = save_diffusers_lora(
        tmp_path, {"transformer": state}, {"transformer": config}, torch.float32, pipeline="flux"
    )
    assert all(k.startswith("transformer.") for k in load_file(str(path)))
    pipe = FluxPipeline.from_pretrained(str(tiny), local_files_only=True)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(str(tmp_path), weight_name=path.name, adapter_name="ours")
    assert not [r for r in caplog.records if "unexpected" in r.getMessage() or "not" in r.getMessage().lower()]
    inputs = _transformer_inputs(model)
    with torch.no_grad():
        ours = model(**inputs).sample
        theirs = pipe.transformer(**inputs).sample
        base = FluxTransformer2DModel.from_pretrained(str(tiny / "transformer"))(**inputs).sample
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, base, atol=1e-3)  # the LoRA does change the output


def test_kohya_file_metadata_and_clip_keys(tiny: Path, tmp_path: Path) -> None:
    from transformers import CLIPTextModel

    clip = CLIPTextModel.from_pretrained(str(tiny / "text_encoder"))
    inject_adapter_in_model(
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "fc1"], init_lora_weights=False),
        clip,
        adapter_name="job",
    )
    clip_state = lora_state_dict(clip, "job")
    model, state = _trained(tiny, ["attention"])
    tensors = kohya_tensors(bfl_loras(state, _shape(model), ALPHA), clip_loras(clip_state, ALPHA), torch.bfloat16)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert "lora_te1_text_model_encoder_layers_1_mlp_fc1.alpha" in tensors
    meta = flux_metadata("dev", rank=RANK, alpha=ALPHA, extra={"ss_output_name": "x"})
    path = save_flux_kohya(tmp_path / "x.safetensors", tensors, meta)
    with safe_open(str(path), framework="pt") as handle:
        stored = handle.metadata()
        assert handle.get_tensor("lora_unet_single_blocks_1_linear1.alpha").item() == 3 * ALPHA
    assert stored["ss_base_model_version"] == "flux1"
    assert stored["modelspec.architecture"] == "flux-1-dev/lora"
    assert json.loads(stored["ss_network_dim"]) == RANK


def test_unknown_target_names_list_the_sets(tiny: Path) -> None:
    model = FluxTransformer2DModel.from_pretrained(str(tiny / "transformer"))
    with pytest.raises(ConfigError) as err:
        transformer_target_paths(model, ["attn2"], key="transformer_target_modules")
    text = str(err.value)
    assert "`transformer_target_modules`" in text and "'attn2' matches no layer" in text
    assert "attention+mlp" in text and "all-linear" in text


def test_reading_back_splits_fused_modules_exactly(tiny: Path, tmp_path: Path) -> None:
    from lorad.families.flux.lora_files import ModuleLora, read_flux_lora

    model, state = _trained(tiny, ["all-linear"])
    shape = _shape(model)
    loras = bfl_loras(state, shape, ALPHA)
    # A LoRA trained on the fused layer itself (kohya's own files): one shared down, a full up.
    generator = torch.Generator().manual_seed(3)
    loras["double_blocks.0.img_attn.qkv"] = ModuleLora(
        torch.randn(RANK, 32, generator=generator), torch.randn(96, RANK, generator=generator), 2.0
    )
    path = save_flux_kohya(tmp_path / "x.safetensors", kohya_tensors(loras, {}, torch.float32), {})
    paths = transformer_target_paths(model, ["all-linear"], key="t")
    loaded = read_flux_lora(path, shape, rank=RANK, transformer_targets=paths, clip_paths=[])
    assert loaded.rank == RANK and set(loaded.parts) == {"transformer"}
    back = loaded.parts["transformer"]

    def delta(prefix: str) -> torch.Tensor:
        a, b = back[f"{prefix}.lora_A.weight"], back[f"{prefix}.lora_B.weight"]
        return loaded.alphas[f"transformer:{prefix}"] / a.shape[0] * (b @ a)

    # lorad's own block-diagonal modules come back as the trained parts, exactly.
    for path_ in ("transformer_blocks.1.attn.to_k", "single_transformer_blocks.0.proj_mlp", "norm_out.linear"):
        if f"{path_}.lora_A.weight" in state:
            assert torch.allclose(delta(path_), _part_delta(state, path_), atol=1e-6), path_
    assert torch.allclose(
        delta("single_transformer_blocks.1.attn.to_v"),
        _part_delta(state, "single_transformer_blocks.1.attn.to_v"),
        atol=1e-6,
    )
    fused = loras["double_blocks.0.img_attn.qkv"].delta()
    for i, part in enumerate(("to_q", "to_k", "to_v")):
        assert torch.allclose(delta(f"transformer_blocks.0.attn.{part}"), fused[32 * i : 32 * (i + 1)], atol=1e-6)
