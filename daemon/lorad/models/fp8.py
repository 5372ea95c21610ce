"""``fp8_base``: a frozen model's Linear and Conv2d weights stored as float8 (e4m3), upcast one layer
at a time to compute, so the weights take half the memory of bf16 (a quarter of fp32).

This is what kohya's ``--fp8_base`` is for, with one difference: kohya casts the weights to
float8 as they are, while here each output channel is scaled by its largest magnitude first
(absmax / 448, the largest e4m3 value) and the scale kept beside it, as musubi-tuner's
``--fp8_scaled`` does. Without a scale, the many small weights of a trained model fall into e4m3's
coarse subnormal range. Everything but the Linear/Conv2d weights (biases, norms, embeddings) stays
in the compute dtype.

A converted layer stays an ``nn.Linear``/``nn.Conv2d`` (its class becomes a subclass), so PEFT
wraps it for LoRA as usual; it exposes ``compute_dtype``, which PEFT reads to give new adapters
that dtype rather than float8. The backward pass re-upcasts the weight instead of keeping each
layer's upcast copy alive until then, so activations are all that grows with depth.

Conversion is in place and lossy: a model converted for one run must not be handed to another
that expects the original weights (the registry keeps fp8 base models under their own key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


@dataclass(frozen=True)
class Fp8Summary:
    """What :func:`store_in_fp8` converted: layers, and their weight bytes before and after."""

    layers: int
    bytes_before: int
    bytes_after: int


def _upcast(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    shape = (-1,) + (1,) * (weight.ndim - 1)
    return weight.to(dtype) * scale.to(dtype).view(shape)


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with W upcast from float8 for this call only; backward re-upcasts W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Any, dtype: Any) -> Any:
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), _upcast(weight, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        weight, scale = ctx.saved_tensors
        grad_x = grad.to(ctx.dtype) @ _upcast(weight, scale, ctx.dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None


class _Fp8Conv2dFunction(torch.autograd.Function):
    """conv2d(x, W) with W upcast from float8 for this call only; backward re-upcasts W."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: Any, dtype: Any, conv: Any
    ) -> Any:
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype, ctx.x_shape, ctx.conv = dtype, x.dtype, x.shape, conv
        bias = None if bias is None else bias.to(dtype)
        return F.conv2d(
            x.to(dtype), _upcast(weight, scale, dtype), bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        weight, scale = ctx.saved_tensors
        conv = ctx.conv
        grad_x = torch.nn.grad.conv2d_input(
            ctx.x_shape,
            _upcast(weight, scale, ctx.dtype),
            grad.to(ctx.dtype),
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        return grad_x.to(ctx.x_dtype), None, None, None, None, None


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight is float8 with a per-output-channel scale."""

    compute_dtype: torch.dtype
    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype)


class Fp8Conv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose frozen weight is float8 with a per-output-channel scale."""

    compute_dtype: torch.dtype
    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Conv2dFunction.apply(x, self.weight, self.weight_scale, self.bias, self.compute_dtype, self)


def _convertible(module: nn.Module) -> bool:
    # Exact classes only: LoRA's own layers and other subclasses keep their forward.
    if type(module) is nn.Linear:
        pass
    elif type(module) is nn.Conv2d:
        # conv2d_input handles plain zero padding given as numbers, as in every diffusers UNet/VAE.
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return False
    else:
        return False
    return not any(p.requires_grad for p in module.parameters(recurse=False))


def store_in_fp8(model: nn.Module, *, compute_dtype: torch.dtype = torch.bfloat16) -> Fp8Summary:
    """Convert every frozen ``nn.Linear``/``nn.Conv2d`` in ``model`` to float8 storage, in place.

    A layer qualifies when none of its own parameters requires grad (attach trainable adapters
    before or after: PEFT's LoRA layers are never converted, the base layers they wrap are).
    Biases move to ``compute_dtype``; layers compute in ``compute_dtype`` (bf16, or fp32 on
    hardware without bf16). Calling it again converts nothing new. Returns what was converted.
    """
    layers = before = after = 0
    for module in model.modules():
        if not _convertible(module):
            continue
        weight = module.weight.detach()
        dims = tuple(range(1, weight.ndim))
        scale = (weight.float().abs().amax(dim=dims) / _FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        stored = (weight.float() / scale.view((-1,) + (1,) * len(dims))).to(FP8_DTYPE)
        before += weight.numel() * weight.element_size()
        module.weight = nn.Parameter(stored, requires_grad=False)
        module.register_buffer("weight_scale", scale.to(compute_dtype))
        if module.bias is not None:
            module.bias = nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)
        module.compute_dtype = compute_dtype
        module.__class__ = Fp8Linear if isinstance(module, nn.Linear) else Fp8Conv2d
        after += stored.numel() * stored.element_size() + scale.numel() * module.weight_scale.element_size()
        layers += 1
    return Fp8Summary(layers=layers, bytes_before=before, bytes_after=after)


def fp8_layer_count(model: nn.Module) -> int:
    """How many layers of ``model`` hold float8 weights (0 for a model never converted)."""
    return sum(isinstance(m, (Fp8Linear, Fp8Conv2d)) for m in model.modules())
