"""Every SDXL kohya key lorad writes names a module of the SDXL single file as AUTOMATIC1111 names it,
and diffusers' SDXL pipeline loads the same file with no key left over and the hand-merged result.

A1111's built-in Lora extension registers an SDXL checkpoint's modules as ``diffusion_model_…``
(the UNet, from ``model.diffusion_model.*``) and ``{i}_…`` for conditioner embedder ``i``
(``0_transformer_text_model_…`` for CLIP-L, ``1_model_transformer_resblocks_…`` for OpenCLIP),
dots turned into underscores. It maps kohya keys onto them by fixed rules
(extensions-builtin/Lora/networks.py, ``convert_diffusers_name_to_compvis`` and ``load_network``):

- ``lora_te2_text_model_encoder_layers_N_…`` → ``1_model_transformer_resblocks_N_…`` with
  ``mlp_fc1`` → ``mlp_c_fc``, ``mlp_fc2`` → ``mlp_c_proj``, else ``self_attn`` → ``attn``;
- a name that is still unknown and ends in ``_q_proj``/``_k_proj``/``_v_proj`` resolves to the
  module before that suffix (OpenCLIP's fused ``nn.MultiheadAttention``);
- SDXL keys "already have correct compvis keys": ``lora_unet`` → ``diffusion_model``, and
  ``lora_te1_text_model`` → ``0_transformer_text_model``.

This test restates those rules and checks them against the tiny SDXL's own SGM single file, so a
key A1111 would silently skip fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lorad.families.sdxl.kohya_keys import PREFIXES, sdxl_kohya_name
from lorad.lora.adapters import attach_lora, lora_state_dict
from lorad.lora.kohya_format import save_kohya, to_kohya
from lorad.lora.targets import ADAPTABLE
from lorad.models.sdxl_components import SDXLComponents
from lorad.models.sdxl_loader import load_sdxl_components
from lorad.models.tiny_sdxl import build_tiny_sdxl, write_sdxl_checkpoint

RANK, ALPHA = 4, 2.0
RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def a1111_sdxl_module(key: str, known: set[str]) -> str | None:
    """The A1111 module a kohya module name resolves to on an SDXL checkpoint, or None."""
    converted = key
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key):
        rest = m[2]
        if "mlp_fc1" in rest:
            rest = rest.replace("mlp_fc1", "mlp_c_fc")
        elif "mlp_fc2" in rest:
            rest = rest.replace("mlp_fc2", "mlp_c_proj")
        else:
            rest = rest.replace("self_attn", "attn")
        converted = f"1_model_transformer_resblocks_{m[1]}_{rest}"
    if converted in known:
        return converted
    if (m := RE_X_PROJ.match(converted)) and m[1] in known:
        return m[1]
    if "lora_unet" in key:
        fallback = key.replace("lora_unet", "diffusion_model")
    elif "lora_te1_text_model" in key:
        fallback = key.replace("lora_te1_text_model", "0_transformer_text_model")
    else:
        return None
    return fallback if fallback in known else None


def a1111_module_names(single_file: Path) -> set[str]:
    """Module names as A1111 registers them for an SDXL checkpoint."""
    names = set()
    with safe_open(str(single_file), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118
            module = key.rsplit(".", 1)[0]
            if module.startswith("model.diffusion_model."):
                names.add(module.removeprefix("model.").replace(".", "_"))
            elif m := re.fullmatch(r"conditioner\.embedders\.(\d+)\.(.+)", module):
                names.add(f"{m[1]}_{m[2].replace('.', '_')}")
    return names


def _targets(module: nn.Module, part: str) -> list[str]:
    """Every layer LoRA can adapt in the blocks kohya trains (UNet: all blocks, convs included;
    text encoders: attention and MLP)."""
    paths = [p for p, m in module.named_modules() if isinstance(m, ADAPTABLE)]
    if part == "unet":
        return [p for p in paths if p.startswith(("down_blocks.", "mid_block.", "up_blocks."))] + [
            "conv_in",
            "conv_out",
            "time_embedding.linear_1",
            "add_embedding.linear_2",
        ]
    return [p for p in paths if ".self_attn." in p or ".mlp." in p]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("a1111-sdxl")
    folder = build_tiny_sdxl(root / "sdxl")
    return {"folder": folder, "file": write_sdxl_checkpoint(folder, root / "sdxl.safetensors")}


@pytest.fixture(scope="module")
def kohya_file(model: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kohya SDXL LoRA on every target of the tiny SDXL, with random (non-zero) up and down weights."""
    c = load_sdxl_components(str(model["folder"]))
    parts = {}
    torch.manual_seed(0)
    for part in PREFIXES:
        module = getattr(c, part)
        attach_lora(module, adapter_name="t", target_paths=_targets(module, part), rank=RANK, alpha=ALPHA)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if ".lora_B." in name:
                    param.normal_(0, 0.05)
        parts[part] = lora_state_dict(module, "t")
    tensors = to_kohya(parts, ALPHA, torch.float32, name_for=lambda part, p: sdxl_kohya_name(part, p, c.unet.config))
    path = tmp_path_factory.mktemp("lora") / "sdxl_lora.safetensors"
    save_kohya(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    return path


def _modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118
            name, _, role = key.partition(".")
            out.setdefault(name, {})[role] = fh.get_tensor(key)
    return out


def test_keys_use_sgm_unet_names_and_te1_te2_prefixes(kohya_file: Path) -> None:
    modules = _modules(kohya_file)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_unet_middle_block_1_transformer_blocks_1_ff_net_0_proj" in modules
    assert "lora_unet_output_blocks_0_1_proj_out" in modules
    assert "lora_unet_input_blocks_3_0_op" in modules  # the first level's downsampler
    assert "lora_unet_output_blocks_2_2_conv" in modules  # an upsampler after an attention
    assert "lora_unet_input_blocks_1_0_in_layers_2" in modules  # a resnet's conv1
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in modules
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1" in modules
    assert not any("down_blocks" in m or "mid_block_" in m or "up_blocks" in m for m in modules)
    for parts in modules.values():
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}
        assert float(parts["alpha"]) == ALPHA and parts["lora_down.weight"].shape[0] == RANK


def test_every_key_maps_to_an_a1111_module(model: dict[str, Path], kohya_file: Path) -> None:
    known = a1111_module_names(model["file"])
    modules = _modules(kohya_file)
    resolved = {m: a1111_sdxl_module(m, known) for m in modules}
    assert [m for m, target in resolved.items() if target is None] == []
    # The second encoder's q/k/v all land on one fused attention module, as in A1111.
    assert resolved["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"] == "1_model_transformer_resblocks_0_attn"
    assert resolved["lora_te2_text_model_encoder_layers_0_mlp_fc1"] == "1_model_transformer_resblocks_0_mlp_c_fc"
    assert (
        resolved["lora_te1_text_model_encoder_layers_1_mlp_fc2"] == "0_transformer_text_model_encoder_layers_1_mlp_fc2"
    )


def _merge_by_hand(module: nn.Module, part: str, modules: dict[str, dict[str, torch.Tensor]], config) -> None:
    """W += (alpha / rank) * up @ down for every module of ``part`` in the file."""
    by_name = {sdxl_kohya_name(part, p, config): m for p, m in module.named_modules() if isinstance(m, ADAPTABLE)}
    with torch.no_grad():
        for name, parts in modules.items():
            if not name.startswith(PREFIXES[part]):
                continue
            up, down = parts["lora_up.weight"], parts["lora_down.weight"]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(by_name[name].weight.shape)
            by_name[name].weight += float(parts["alpha"]) / down.shape[0] * delta


def test_diffusers_loads_every_key_and_matches_a_hand_merge(model: dict[str, Path], kohya_file: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = _modules(kohya_file)
    pipe = StableDiffusionXLPipeline.from_pretrained(model["folder"])
    pipe.load_lora_weights(str(kohya_file), adapter_name="mine")
    merged: SDXLComponents = load_sdxl_components(str(model["folder"]))
    for part in PREFIXES:
        adapted = {
            sdxl_kohya_name(part, p, pipe.unet.config)
            for p, m in getattr(pipe, part).named_modules()
            if isinstance(m, BaseTunerLayer) and "mine" in m.lora_A
        }
        assert adapted == {m for m in modules if m.startswith(PREFIXES[part])}, part  # nothing left unused
        _merge_by_hand(getattr(merged, part), part, modules, merged.unet.config)

    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    hidden = torch.randn(1, 77, merged.unet.config.cross_attention_dim, generator=generator)
    added = {
        "text_embeds": torch.randn(1, merged.text_encoder_2.config.projection_dim, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
    }
    ids = pipe.tokenizer(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    t = torch.tensor([500])
    with torch.no_grad():
        want = merged.unet(sample, t, hidden, added_cond_kwargs=added).sample
        got = pipe.unet(sample, t, hidden, added_cond_kwargs=added).sample
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-3)
        for part in ("text_encoder", "text_encoder_2"):
            want_h = getattr(merged, part)(ids, output_hidden_states=True).hidden_states[-2]
            got_h = getattr(pipe, part)(ids, output_hidden_states=True).hidden_states[-2]
            assert torch.allclose(got_h, want_h, atol=1e-4, rtol=1e-3), part


@pytest.mark.slow
def test_every_key_of_a_trained_file_maps_to_an_a1111_module(
    model: dict[str, Path], tmp_path: Path, dataset: Path
) -> None:
    from lorad.config.dispatch import parse_any_config
    from lorad.training.loop import train
    from tests.support.datasets import tiny_sdxl_values

    values = tiny_sdxl_values(
        model["folder"],
        dataset,
        tmp_path / "out",
        train_text_encoder=True,
        unet_target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
        text_encoder_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    result = train(parse_any_config(values, base_dir=tmp_path))
    known = a1111_module_names(model["file"])
    modules = _modules(Path(result.outputs["kohya"]))
    assert {m.split("_")[1] for m in modules} == {"unet", "te1", "te2"}
    assert [m for m in modules if a1111_sdxl_module(m, known) is None] == []
