"""Defaults a kohya user would expect: kohya's UNet and text-encoder targets, and one default captioner
everywhere (CLI, TUI, WebUI, the API)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorad.config import parse_config
from lorad.training.loop import train as train_sd_lora
from tests.support.datasets import tiny_train_values


def kohya_default_modules(tiny_sd: Path) -> set[str]:
    """The modules kohya's networks.lora trains by default: every Linear and 1x1 Conv2d inside the
    UNet's Transformer2DModel blocks (UNET_TARGET_REPLACE_MODULE), and every Linear of the CLIP
    text encoder's attention and MLP blocks (TEXT_ENCODER_TARGET_REPLACE_MODULE), in kohya's names."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from transformers import CLIPTextModel
    from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

    names = set()
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    for path, block in unet.named_modules():
        if isinstance(block, Transformer2DModel):
            for sub, module in block.named_modules():
                one_by_one = isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)
                if sub and (isinstance(module, torch.nn.Linear) or one_by_one):
                    names.add("lora_unet_" + f"{path}.{sub}".replace(".", "_"))
    text_encoder = CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")
    for path, block in text_encoder.named_modules():
        if isinstance(block, (CLIPAttention, CLIPMLP)):
            for sub, module in block.named_modules():
                if sub and isinstance(module, torch.nn.Linear):
                    # Files use the classic `text_model.` names whatever transformers calls the path.
                    full = f"{path}.{sub}" if path.startswith("text_model.") else f"text_model.{path}.{sub}"
                    names.add("lora_te_" + full.replace(".", "_"))
    return names


@pytest.mark.slow
def test_the_default_targets_are_kohyas(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out", max_train_steps=1, train_text_encoder=True)
    values.pop("unet_target_modules")
    result = train_sd_lora(parse_config(values, base_dir=tmp_path))
    with safe_open(result.outputs["kohya"], "pt") as fh:
        trained = {key.split(".")[0] for key in fh.keys()}  # noqa: SIM118
    assert trained == kohya_default_modules(tiny_sd)


def test_one_default_captioner_everywhere() -> None:
    from lorad.cli.main import build_parser
    from lorad.config.schema import TrainConfig
    from lorad.server.proto_convert import CAPTIONER_FROM_PROTO, CAPTIONER_TO_PROTO
    from lorad_api.v1 import caption_pb2
    from lorad_webui import actions

    cli = build_parser().parse_args(["caption", "somewhere"]).captioner
    webui = actions.CAPTIONERS[next(iter(actions.CAPTIONERS))]
    api = CAPTIONER_FROM_PROTO[caption_pb2.CAPTIONER_KIND_UNSPECIFIED]
    assert cli == api == "blip"
    assert webui == CAPTIONER_TO_PROTO[cli]
    assert "blip" in str(next(f for f in TrainConfig.__dataclass_fields__.values() if f.name == "captioner").metadata)

    import inspect

    from lorad_tui.screens import captions

    assert "value=caption_pb2.CAPTIONER_KIND_BLIP" in inspect.getsource(captions.CaptionsScreen.compose)
