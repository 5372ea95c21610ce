"""Every kohya key lorad writes resolves to a layer of the model as AUTOMATIC1111 names it.

A1111's built-in Lora extension maps diffusers-style kohya names (``lora_unet_down_blocks_0_…``)
onto the original LDM modules (``diffusion_model_input_blocks_1_1_…``) by fixed rules, then looks
them up among the loaded checkpoint's module names with dots turned into underscores. This test
re-states those rules and checks them against the LDM-layout single file of the same model, so a
key that A1111 would silently skip fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open

from lorad.config import parse_config
from lorad.models.tiny import write_original_checkpoint
from lorad.training.loop import train as train_sd_lora
from tests.conftest import tiny_train_values

RESNET_PARTS = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_compvis_name(key: str, per: int = 3, unet_config: dict | None = None) -> str:
    """The module name A1111 looks up for a kohya module name (SD 1.x rules).

    ``per`` is LDM blocks per UNet level: A1111 hard-codes 3 (SD's layers_per_block 2, plus the
    down/upsampler); the tiny model has layers_per_block 1, so its files need 2. Down/upsamplers
    (LoCon) follow A1111's rules too: ``input_blocks_{3 + 3i}_0_op`` and ``output_blocks_{2 + 3i}_{2 if
    i > 0 else 1}_conv`` (the first up level has no attention in SD, nor in the tiny model).
    """
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{per + int(m[1]) * per}_0_op"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        block = int(m[1])
        return f"diffusion_model_output_blocks_{per - 1 + block * per}_{2 if block > 0 else 1}_conv"
    if m := re.fullmatch(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = RESNET_PARTS.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + block * per + index}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, index, rest = m[1], int(m[2]), m[3]
        rest = RESNET_PARTS.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else index * 2}_{rest}"
    if m := re.fullmatch(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        block, kind, index, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = RESNET_PARTS.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{block * per + index}_{1 if kind == 'attentions' else 0}_{rest}"
    if m := re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def ldm_module_names(single_file: Path) -> set[str]:
    """Module names as A1111 registers them: UNet under sd_model.model, CLIP under the wrapper."""
    names = set()
    with safe_open(str(single_file), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118
            module = key.rsplit(".", 1)[0]
            for prefix in ("model.", "cond_stage_model."):
                if module.startswith(prefix):
                    names.add(module[len(prefix) :].replace(".", "_"))
    return names


def test_every_key_maps_to_an_a1111_module(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    # The tiny model has two cross-attention levels, like SD's layout per level (layers_per_block
    # differs, so the block arithmetic is checked against the tiny model's own LDM file).
    values = tiny_train_values(
        tiny_sd,
        dataset,
        tmp_path / "out",
        train_text_encoder=True,
        unet_target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"],
        text_encoder_target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    )
    result = train_sd_lora(parse_config(values, base_dir=tmp_path))
    single = write_original_checkpoint(tiny_sd, tmp_path / "tiny.safetensors")
    known = ldm_module_names(single)
    with safe_open(result.outputs["kohya"], "pt") as fh:
        modules = {k.split(".")[0] for k in fh.keys()}  # noqa: SIM118
    assert any(m.startswith("lora_te_") for m in modules)
    per = json.loads((tiny_sd / "unet" / "config.json").read_text())["layers_per_block"] + 1
    unmatched = sorted(m for m in modules if a1111_compvis_name(m, per) not in known)
    assert unmatched == []
