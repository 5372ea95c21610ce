"""AUTOMATIC1111's LoRA name rules (SD 1.x), restated from its extensions-builtin/Lora code, to check our
files against."""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors import safe_open

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


def parse_a1111(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    prompt, negative, done = "", "", False
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done, line = True, line[16:].strip()
        if done:
            negative += ("" if not negative else "\n") + line
        else:
            prompt += ("" if not prompt else "\n") + line
    result["Prompt"], result["Negative prompt"] = prompt, negative
    for key, value in _RE_PARAM.findall(last):
        if value[:1] == '"' and value[-1:] == '"':
            value = json.loads(value)
        size = _RE_SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        else:
            result[key] = value
    return result


# A1111's infotext parsing (modules/infotext_utils.py parse_generation_parameters), as documented there:
# the last line holds `Key: value` pairs when it has at least three; lines before it are the prompt
# until one starts with "Negative prompt:"; quoted values are JSON strings; `Size: WxH` splits in two.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
