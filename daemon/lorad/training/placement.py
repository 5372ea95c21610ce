"""Choosing the device and the autocast precision for a run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorad.errors import ConfigError, ConfigProblem


@dataclass(frozen=True)
class Placement:
    """Where and how a run computes: device, autocast dtype (None = full fp32), weight dtype."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    weight_dtype: torch.dtype

    @property
    def precision(self) -> str:
        return {None: "no", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.autocast_dtype]


def pick_device(requested: str) -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda[:N]``/``mps``; an unavailable device is a config error."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(
            [ConfigProblem("device", f"{requested} is not available on this machine", "use `auto` or `cpu`")]
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError([ConfigProblem("device", "mps is not available on this machine", "use `auto` or `cpu`")])
    return device


def pick_placement(device_name: str, mixed_precision: str) -> Placement:
    """Device plus precision. Frozen base weights use the autocast dtype on GPUs to halve their
    memory; LoRA weights always stay fp32. On CPU everything is fp32 (CPU autocast is slow and
    would break run-to-run determinism)."""
    device = pick_device(device_name)
    if mixed_precision == "auto" and device.type == "cuda":
        mixed_precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif mixed_precision == "auto":
        mixed_precision = "no"
    if mixed_precision != "no" and device.type == "cpu":
        raise ConfigError(
            [
                ConfigProblem(
                    "mixed_precision",
                    f"{mixed_precision} on the CPU is slower than fp32",
                    "use `no` or `auto` when training on the CPU",
                )
            ]
        )
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError([ConfigProblem("mixed_precision", "this GPU does not support bf16", "use fp16 or auto")])
    dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]
    return Placement(device=device, autocast_dtype=dtype, weight_dtype=dtype or torch.float32)


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions use TF32 tensor cores: the fp32 parts of a step
    (LoRA weights, an fp32 run) run several times faster, with products rounded to 10 mantissa bits
    and fp32 sums, far below the noise of training. torch's setting is process-wide."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
