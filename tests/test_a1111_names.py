"""Every kohya key lorad writes resolves to a layer of the model as AUTOMATIC1111 names it.

A1111's built-in Lora extension maps diffusers-style kohya names (``lora_unet_down_blocks_0_…``)
onto the original LDM modules (``diffusion_model_input_blocks_1_1_…``) by fixed rules, then looks
them up among the loaded checkpoint's module names with dots turned into underscores. This test
re-states those rules and checks them against the LDM-layout single file of the same model, so a
key that A1111 would silently skip fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from lorad.config import parse_config
from lorad.models.tiny import write_original_checkpoint
from lorad.training.loop import train as train_sd_lora
from tests.support.a1111 import a1111_compvis_name, ldm_module_names
from tests.support.datasets import tiny_train_values


@pytest.mark.slow
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
