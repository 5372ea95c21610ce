"""``base_quantization`` with torchao on the tiny FLUX transformer: accuracy, LoRA training, clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

from lorad.errors import ModelLoadError
from lorad.lora.adapters import attach_lora
from lorad.models.quantization import check_quantization, in_blocks, quantize_linears
from lorad.models.tiny_flux import tiny_flux_transformer
from tests.support.flux import flux_transformer_inputs

BLOCKS = in_blocks(["transformer_blocks", "single_transformer_blocks"])
# Relative L2 error of the transformer's output against the same model unquantized in bf16.
TOLERANCE = {"fp8": 0.03, "int8": 0.02, "nf4": 0.08}


def _bf16_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_flux_transformer("dev")
    model.requires_grad_(False)
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("method", ["fp8", "int8", "nf4"])
def test_quantized_base_matches_bf16_and_trains_lora(method: str) -> None:
    reference = _bf16_model()
    with torch.no_grad():
        expected = reference(**flux_transformer_inputs(torch.bfloat16)).sample.float()
    model = _bf16_model()
    quantized = quantize_linears(model, method, where=BLOCKS)
    assert len(quantized) == 40 and all(
        p.startswith(("transformer_blocks.", "single_transformer_blocks.")) for p in quantized
    )
    weight = model.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__module__.startswith("torchao"), type(weight)
    assert model.x_embedder.weight.dtype == torch.bfloat16  # outside the blocks: untouched
    with torch.no_grad():
        out = model(**flux_transformer_inputs(torch.bfloat16)).sample.float()
    error = ((out - expected).norm() / expected.norm()).item()
    assert 0 < error < TOLERANCE[method], error
    # LoRA on top: trainable fp32 adapters, gradients reach them through the quantized base.
    paths = [n for n, _ in model.named_modules() if n.endswith(("attn.to_q", "proj_mlp"))]
    params = attach_lora(model, adapter_name="job", target_paths=paths, rank=4, alpha=4)
    model(**flux_transformer_inputs(torch.bfloat16)).sample.float().square().mean().backward()
    assert params and all(p.dtype == torch.float32 and p.grad is not None for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)  # B starts at zero, so only B's gradient is non-zero yet


def test_none_leaves_the_model_alone() -> None:
    model = _bf16_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_linears(model, "none") == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_missing_torchao_and_bad_values_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ModelLoadError, match="`base_quantization` is 'int4'") as err:
        check_quantization("int4", "cpu")
    assert "none, fp8, int8, nf4" in err.value.hint
    with pytest.raises(ModelLoadError, match="MPS"):
        check_quantization("fp8", "mps")
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ModelLoadError, match="needs the torchao package") as err:
        check_quantization("nf4", "cpu")
    assert "pip install 'lorad[quant]'" in err.value.hint
    check_quantization("none", "cpu")  # needs nothing
