"""fp8_base (lorad.models.fp8): frozen weights stored as float8 e4m3, checked numerically on the CPU
against bf16, with LoRA (PEFT) on top.

Tolerances, measured on these seeded inputs and stated with margin:
- one Linear/Conv2d with trained-size weights (std 0.02): relative L2 error of the output vs bf16
  below 4% (e4m3 keeps 3 mantissa bits: about 2.6% here);
- the whole tiny SDXL UNet with LoRA: output within 12% of bf16 (about 8%), and the LoRA gradients
  pointing the same way (cosine similarity above 0.9; about 0.95). bf16 itself is 1.4% from fp32.
- the tiny FLUX.1-dev transformer as the family loads it with fp8_base (its blocks in fp8): output
  within 2% of bf16 (FLUX_TOLERANCE; about 0.7%, where bf16 itself is 0.6% from fp32).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorad.families.flux.family import FluxModel, load_flux_model
from lorad.lora.adapters import attach_lora, detach_lora
from lorad.models.block_swap import flux_blocks
from lorad.models.fp8 import FP8_DTYPE, Fp8Conv2d, Fp8Linear, fp8_layer_count, store_in_fp8
from lorad.models.registry import ModelKey
from lorad.models.sdxl_loader import load_sdxl_components
from lorad.models.tiny_sdxl import build_tiny_sdxl
from tests.support.flux import flux_transformer_inputs

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
FLUX_TOLERANCE = 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _layer(kind: str, std: float) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(256, 128) if kind == "linear" else nn.Conv2d(64, 32, 3, padding=1)
    nn.init.normal_(layer.weight, std=std)
    return layer.requires_grad_(False)


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 256, generator=g) if kind == "linear" else torch.randn(4, 64, 16, 16, generator=g)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_matches_bf16_within_tolerance_at_half_the_memory(kind: str) -> None:
    layer = _layer(kind, std=0.02)
    bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    fp8 = copy.deepcopy(bf16)
    summary = store_in_fp8(fp8, compute_dtype=torch.bfloat16)
    assert summary.layers == 1 and isinstance(fp8, (Fp8Linear, Fp8Conv2d))
    assert fp8.weight.dtype == FP8_DTYPE and not fp8.weight.requires_grad
    assert summary.bytes_after < 0.55 * summary.bytes_before  # 1 byte a weight instead of 2, plus scales
    x = _input(kind).to(torch.bfloat16)
    with torch.no_grad():
        error = _rel(fp8(x), bf16(x))
        # Casting to e4m3 without a per-channel scale (kohya's plain cast) is no better.
        plain = copy.deepcopy(bf16)
        plain.weight.data = plain.weight.data.to(FP8_DTYPE).to(torch.bfloat16)
        plain_error = _rel(plain(x), bf16(x))
    assert 0 < error < 0.04
    assert error <= plain_error


def test_scale_rescues_small_weights() -> None:
    # Weights this small sit in e4m3's subnormal range when cast as they are.
    layer = _layer("linear", std=0.004).to(torch.bfloat16)
    fp8 = copy.deepcopy(layer)
    store_in_fp8(fp8)
    plain = copy.deepcopy(layer)
    plain.weight.data = plain.weight.data.to(FP8_DTYPE).to(torch.bfloat16)
    x = _input("linear").to(torch.bfloat16)
    with torch.no_grad():
        assert _rel(fp8(x), layer(x)) < 0.04 < _rel(plain(x), layer(x))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_forward_and_backward_equal_the_dequantized_layer(kind: str) -> None:
    """The fp8 layer computes exactly what the layer with its dequantized weight computes; its
    backward re-upcasts the weight instead of keeping a copy, with the same input gradient."""
    fp8 = _layer(kind, std=0.02)
    store_in_fp8(fp8, compute_dtype=torch.float32)
    weight = fp8.weight.float() * fp8.weight_scale.view((-1,) + (1,) * (fp8.weight.ndim - 1))
    x1 = _input(kind).requires_grad_()
    x2 = _input(kind).requires_grad_()
    y1 = fp8(x1)
    y2 = F.linear(x2, weight, fp8.bias) if kind == "linear" else F.conv2d(x2, weight, fp8.bias, padding=1)
    assert torch.equal(y1, y2)
    grad = torch.randn(y1.shape, generator=torch.Generator().manual_seed(2))
    y1.backward(grad)
    y2.backward(grad)
    assert torch.equal(x1.grad, x2.grad)
    assert fp8.weight.grad is None


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    folder = build_tiny_sdxl(tmp_path_factory.mktemp("fp8") / "sdxl")
    return load_sdxl_components(str(folder)).unet


def _with_lora(unet: nn.Module, dtype: torch.dtype, *, fp8: bool) -> nn.Module:
    model = copy.deepcopy(unet).to(dtype)
    targets = [p for p, _ in model.named_modules() if p.endswith(ATTENTION)]
    if fp8:
        store_in_fp8(model, compute_dtype=dtype)
    torch.manual_seed(1)
    attach_lora(model, adapter_name="run", target_paths=targets, rank=4, alpha=4)
    with torch.no_grad():
        for i, (name, param) in enumerate(model.named_parameters()):
            if ".lora_B." in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    return model


def _loss_and_grads(model: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sample, hidden = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(2, 40, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    out = model(
        sample.to(dtype),
        torch.tensor([10, 700]),
        hidden.to(dtype),
        added_cond_kwargs={k: v.to(dtype) for k, v in added.items()},
    ).sample
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out.float() - target).pow(2).mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return out.detach(), grads


def test_unet_with_lora_trains_in_fp8_like_bf16(unet: nn.Module) -> None:
    bf16 = _with_lora(unet, torch.bfloat16, fp8=False)
    fp8 = _with_lora(unet, torch.bfloat16, fp8=True)
    assert fp8_layer_count(fp8) > 200 and fp8_layer_count(bf16) == 0
    # LoRA's own layers stay trainable fp32; only the frozen base layers they wrap are fp8.
    trainable = [p for p in fp8.parameters() if p.requires_grad]
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    wrapped = fp8.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert isinstance(wrapped.base_layer, Fp8Linear)
    before = wrapped.base_layer.weight.view(torch.uint8).clone()
    out_bf16, grads_bf16 = _loss_and_grads(bf16, torch.bfloat16)
    out_fp8, grads_fp8 = _loss_and_grads(fp8, torch.bfloat16)
    assert _rel(out_fp8, out_bf16) < 0.12
    assert float(F.cosine_similarity(grads_fp8, grads_bf16, dim=0)) > 0.9
    assert wrapped.base_layer.weight.grad is None
    assert torch.equal(wrapped.base_layer.weight.view(torch.uint8), before)
    # Removing the adapter leaves the fp8 base layer in place, still working.
    detach_lora(fp8, "run")
    assert isinstance(fp8.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q, Fp8Linear)


def test_adapters_attached_before_conversion_keep_working(unet: nn.Module) -> None:
    model = copy.deepcopy(unet).to(torch.bfloat16)
    targets = [p for p, _ in model.named_modules() if p.endswith(ATTENTION)]
    attach_lora(model, adapter_name="run", target_paths=targets, rank=4, alpha=4)
    summary = store_in_fp8(model)
    assert summary.layers == fp8_layer_count(model) and store_in_fp8(model).layers == 0
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    _, grads = _loss_and_grads(model, torch.bfloat16)
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0


# --- FLUX.1: the transformer as the family loads it ---------------------------------------------------------


def _flux(tiny_flux: dict[str, Path], *, fp8: bool) -> FluxModel:
    options = (("fp8_base", "true"),) if fp8 else ()
    return load_flux_model(
        ModelKey(base_model=str(tiny_flux["dev"]), device="cpu", dtype="bfloat16", kind="flux", options=options)
    )


def test_flux_transformer_in_fp8_matches_bf16_and_trains_lora(tiny_flux: dict[str, Path]) -> None:
    reference, model = _flux(tiny_flux, fp8=False).transformer, _flux(tiny_flux, fp8=True)
    transformer = model.transformer
    blocks = flux_blocks(transformer)
    # Every Linear of every block, nothing outside them: the embedders and the output projection stay bf16.
    assert (
        model.fp8_layers
        == fp8_layer_count(transformer)
        == sum(isinstance(m, nn.Linear) for b in blocks for m in b.modules())
    )
    assert transformer.x_embedder.weight.dtype == transformer.proj_out.weight.dtype == torch.bfloat16
    assert transformer.transformer_blocks[0].attn.to_q.weight.dtype == FP8_DTYPE
    inputs = flux_transformer_inputs(torch.bfloat16)
    with torch.no_grad():
        expected = reference(**inputs).sample.float()
        out = transformer(**inputs).sample.float()
    assert 0 < _rel(out, expected) < FLUX_TOLERANCE
    # LoRA on top: trainable fp32 adapters beside the fp8 base layers, gradients reach them.
    paths = [n for n, _ in transformer.named_modules() if n.endswith(("attn.to_q", "proj_mlp"))]
    params = attach_lora(transformer, adapter_name="job", target_paths=paths, rank=4, alpha=4)
    transformer(**inputs).sample.float().square().mean().backward()
    assert params and all(p.dtype == torch.float32 and p.grad is not None for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    assert isinstance(transformer.transformer_blocks[0].attn.to_q.base_layer, Fp8Linear)
