"""Block swap on the CPU: the same code path as on CUDA (minus the side stream), bit-identical results."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from lorad.lora.adapters import attach_lora
from lorad.models.block_swap import BlockSwap, flux_blocks
from lorad.models.fp8 import store_in_fp8
from lorad.models.tiny_flux import tiny_flux_transformer


def _model(checkpointing: bool) -> tuple[FluxTransformer2DModel, list[torch.nn.Parameter]]:
    torch.manual_seed(0)
    model = tiny_flux_transformer("dev", num_layers=2, num_single_layers=3)
    model.requires_grad_(False)
    paths = [n for n, m in model.named_modules() if n.endswith(("attn.to_q", "attn.to_v", "proj_mlp"))]
    params = attach_lora(model, adapter_name="job", target_paths=paths, rank=4, alpha=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model, params


def _step(model: FluxTransformer2DModel, params: list[torch.nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    out = model(
        hidden_states=torch.randn(2, 16, 64, generator=generator),
        encoder_hidden_states=torch.randn(2, 8, 32, generator=generator),
        pooled_projections=torch.randn(2, 32, generator=generator),
        timestep=torch.tensor([0.3, 0.7]),
        guidance=torch.tensor([1.0, 1.0]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
    ).sample
    out.square().mean().backward()
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("count", [2, 5])
def test_swapped_training_step_is_bit_identical(checkpointing: bool, count: int) -> None:
    reference, reference_params = _model(checkpointing)
    expected_out, expected_grads = _step(reference, reference_params)
    model, params = _model(checkpointing)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swap = BlockSwap(flux_blocks(model), count, "cpu")
    assert swap.swapped == list(range(5 - count, 5))
    for _ in range(2):  # the second step runs with the first step's prefetch state
        out, grads = _step(model, params)
        swap.settle()
        assert torch.equal(out, expected_out)
        assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))
    swap.remove()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not block._forward_pre_hooks and not block._forward_hooks for block in flux_blocks(model))
    assert all(p.requires_grad for p in params) and all(
        p is q for p, q in zip(params, _lora_params(model), strict=True)
    )


def _lora_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def test_weights_rest_in_cpu_copies_and_run_from_fresh_device_copies() -> None:
    model, params = _model(checkpointing=True)
    block = flux_blocks(model)[-1]
    weight_owner = block.attn.to_k
    swap = BlockSwap(flux_blocks(model), 1, "cpu")
    resting = weight_owner.weight
    seen: list[torch.Tensor] = []
    weight_owner.register_forward_pre_hook(lambda module, args: seen.append(module.weight))
    _step(model, params)
    swap.settle()
    assert weight_owner.weight is resting  # back at rest after the step
    assert seen and all(w is not resting and w.data_ptr() != resting.data_ptr() for w in seen)
    assert len(seen) == 2  # forward, and the recomputation in backward (checkpointing)
    swap.remove()


class _RecordingSwap(BlockSwap):
    """Records, for each block run, whether its weights were already prefetched."""

    def __init__(self, *args: object) -> None:
        self.found: list[tuple[int, bool]] = []
        super().__init__(*args)

    def _pre_hook(self, index: int):
        inner = super()._pre_hook(index)

        def hook(module: torch.nn.Module, args: object) -> None:
            self.found.append((index, index in self._prefetched))
            inner(module, args)

        return hook


def test_next_block_is_prefetched_forward_and_backward() -> None:
    model, params = _model(checkpointing=True)
    swap = _RecordingSwap(flux_blocks(model), 3, "cpu")
    _step(model, params)
    # Forward 2, 3, 4: the first is copied on demand, the next two were prefetched. Backward recomputes
    # 4, 3, 2: 4 on demand, then each earlier block was prefetched while the later one ran.
    assert swap.found == [(2, False), (3, True), (4, True), (4, False), (3, True), (2, True)]
    swap.remove()


def test_count_is_checked() -> None:
    model, _ = _model(checkpointing=False)
    with pytest.raises(ValueError, match="between 0 and 5"):
        BlockSwap(flux_blocks(model), 6, "cpu")


def _converted(method: str) -> tuple[FluxTransformer2DModel, list[torch.nn.Parameter]]:
    """The small model with its blocks' frozen weights quantized (torchao) or in float8 (fp8_base), LoRA on top."""
    from lorad.models.quantization import in_blocks, quantize_linears

    torch.manual_seed(0)
    model = tiny_flux_transformer("dev", num_layers=2, num_single_layers=3)
    model.requires_grad_(False)
    if method == "fp8_base":
        for block in flux_blocks(model):
            store_in_fp8(block, compute_dtype=torch.float32)
    else:
        quantize_linears(model, method, where=in_blocks(["transformer_blocks", "single_transformer_blocks"]))
    paths = [n for n, _ in model.named_modules() if n.endswith(("attn.to_q", "proj_mlp"))]
    params = attach_lora(model, adapter_name="job", target_paths=paths, rank=4, alpha=4)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    model.enable_gradient_checkpointing()
    return model, params


@pytest.mark.parametrize("method", ["int8", "nf4", "fp8_base"])
def test_quantized_blocks_swap_too(method: str) -> None:
    expected_out, expected_grads = _step(*_converted(method))
    model, params = _converted(method)
    swap = BlockSwap(flux_blocks(model), 3, "cpu")
    out, grads = _step(model, params)
    swap.settle()
    assert torch.equal(out, expected_out)
    assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads, strict=True))
    swap.remove()


def test_fp8_scales_travel_with_their_weights() -> None:
    """An fp8_base layer's per-channel scale is a buffer: it rests in CPU memory and runs from a fresh device
    copy like the weight beside it (on CUDA a scale left behind would meet its weight on another device)."""
    model, params = _converted("fp8_base")
    layer = flux_blocks(model)[-1].attn.to_k
    swap = BlockSwap(flux_blocks(model), 1, "cpu")
    resting = layer.weight_scale
    seen: list[torch.Tensor] = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.weight_scale))
    _step(model, params)
    swap.settle()
    assert layer.weight_scale is resting
    assert len(seen) == 2 and all(s is not resting and s.data_ptr() != resting.data_ptr() for s in seen)
    assert all(torch.equal(s, resting) for s in seen)
    swap.remove()
    assert "weight_scale" in layer._buffers and torch.equal(layer.weight_scale, resting)
