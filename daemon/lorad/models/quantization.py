"""``base_quantization``: store a frozen base model's linear weights in fp8, int8 or NF4 with torchao.

Why torchao (over optimum-quanto and bitsandbytes): it is PyTorch's own quantization library,
actively released in step with torch; one library covers all three formats (float8 weight-only
with per-row scales, int8 weight-only, and QLoRA's NF4); its weight-only formats run on CUDA and on
the CPU (so lorad's tests exercise them); and peft trains LoRA on top of its tensors
(``TorchaoLoraLinear`` for int8/fp8, a plain LoRA layer over ``NF4Tensor``). bitsandbytes has no
fp8 and is CUDA-first; optimum-quanto is in maintenance mode.

All three are weight-only: a layer dequantizes its weight to the compute dtype for the matmul, so
activations and LoRA weights keep full precision and no special hardware is needed, except that
float8 storage does not exist on Apple's MPS backend.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from lorad.errors import ModelLoadError

BASE_QUANTIZATIONS = ("none", "fp8", "int8", "nf4")
INSTALL_HINT = "Install it with `pip install 'lorad[quant]'` (torchao), or set `base_quantization: none`."
# NF4 as in QLoRA: 64 weights share a scale; the scales are themselves quantized in groups.
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256


def _torchao(method: str):
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as exc:
        raise ModelLoadError(
            f"`base_quantization: {method}` needs the torchao package, which is not installed ({exc})", INSTALL_HINT
        ) from exc


def check_quantization(method: str, device: torch.device | str) -> None:
    """Fail fast, before any weight is read, when ``method`` cannot run here.

    Raises ModelLoadError naming ``base_quantization`` for an unknown method, a missing torchao,
    or fp8 on a device without float8 tensors.
    """
    if method not in BASE_QUANTIZATIONS:
        raise ModelLoadError(f"`base_quantization` is {method!r}", f"Use one of {', '.join(BASE_QUANTIZATIONS)}.")
    if method == "none":
        return
    _torchao(method)
    if method == "fp8" and torch.device(device).type == "mps":
        raise ModelLoadError(
            "`base_quantization: fp8` needs float8 tensors, which Apple's MPS backend does not have",
            "Use `base_quantization: int8` or `nf4` on this machine.",
        )


def _nf4_scaler_block(numel: int) -> int | None:
    """The scaler group size for an NF4 tensor of ``numel`` weights: 256, or the largest power of two that fits."""
    if numel % NF4_BLOCK:
        return None
    blocks = numel // NF4_BLOCK
    size = NF4_SCALER_BLOCK
    while size > 1 and blocks % size:
        size //= 2
    return size


def quantize_linears(model: nn.Module, method: str, *, where: Callable[[str], bool] = lambda path: True) -> list[str]:
    """Quantize, in place, the weights of ``model``'s ``nn.Linear`` layers whose path passes ``where``.

    Call it before attaching LoRA (peft then wraps the quantized layers). Layers whose weight
    NF4's 64-weight blocks do not divide stay as they are. Returns the quantized layers' paths.
    The base weights change (they are rounded): a resident model is quantized once, as its own copy.
    """
    check_quantization(method, next(model.parameters()).device)
    if method == "none":
        return []
    ao = _torchao(method)
    paths = [p for p, m in model.named_modules() if isinstance(m, nn.Linear) and where(p)]
    if method in ("fp8", "int8"):
        config = ao.Float8WeightOnlyConfig() if method == "fp8" else ao.Int8WeightOnlyConfig()
        chosen = set(paths)
        ao.quantize_(model, config, filter_fn=lambda module, path: path in chosen)
        return paths
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    done = []
    for path in paths:
        layer = model.get_submodule(path)
        scaler = _nf4_scaler_block(layer.weight.numel())
        if scaler is None:
            continue
        nf4 = to_nf4(layer.weight.detach(), NF4_BLOCK, scaler)
        layer.weight = nn.Parameter(nf4, requires_grad=False)
        done.append(path)
    return done


def in_blocks(prefixes: Iterable[str]) -> Callable[[str], bool]:
    """A ``where`` filter for :func:`quantize_linears`: layers under any of ``prefixes`` (e.g. the blocks)."""
    starts = tuple(p.rstrip(".") + "." for p in prefixes)
    return lambda path: path.startswith(starts)
