"""Attach a *named* LoRA adapter to a frozen model, read/write its weights, and remove it.

The base model may be resident and shared between jobs, so detaching must leave it exactly as it
was: every wrapped layer is unwrapped again and the base weights are never written to. Plain LoRA is
PEFT's; the LyCORIS network types live in :mod:`lorad.lora.lycoris_adapter`, and the state-dict and
detach functions here serve both, so callers (the loop's checkpoints, a family's restore) need not know
which an adapter is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from lorad.lora.lycoris_adapter import detach_lycoris, load_lycoris_state_dict, lycoris_network, lycoris_state_dict
from lorad.models.construction import MODULE_CONSTRUCTION


def attach_lora(
    model: nn.Module,
    *,
    adapter_name: str,
    target_paths: Sequence[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
) -> list[nn.Parameter]:
    """Wrap each module in ``target_paths`` with a LoRA adapter named ``adapter_name``.

    The adapter's A is initialised like kohya (Kaiming-uniform) and B to zeros, so the model's
    output is unchanged until training moves B. Returns the new trainable parameters, in fp32
    whatever the base dtype (low-precision LoRA weights lose small updates).
    """
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_paths), init_lora_weights=True
    )
    return attach_lora_config(model, adapter_name=adapter_name, config=config)


def attach_lora_config(model: nn.Module, *, adapter_name: str, config: LoraConfig) -> list[nn.Parameter]:
    """Attach an adapter described by a full peft ``config`` (rsLoRA, DoRA, ...) as ``adapter_name``.

    Returns its trainable parameters (LoRA A/B, and DoRA's magnitude vectors), in fp32.
    """
    with MODULE_CONSTRUCTION:  # another thread's model load must not turn these new layers into meta tensors
        inject_adapter_in_model(config, model, adapter_name=adapter_name)
    params: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        if any(f".{part}.{adapter_name}" in name for part in ("lora_A", "lora_B", "lora_magnitude_vector")):
            param.data = param.data.float()
            param.requires_grad_(True)
            params.append(param)
    return params


def detach_lora(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` (PEFT or LyCORIS) from ``model``; layers left without adapters are unwrapped."""
    detach_lycoris(model, adapter_name)
    for path, module in list(model.named_modules()):
        if not isinstance(module, BaseTunerLayer) or adapter_name not in module.lora_A:
            continue
        module.delete_adapter(adapter_name)
        if not module.lora_A:
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, module.get_base_layer())
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        peft_config.pop(adapter_name, None)
        if not peft_config:
            del model.peft_config


def lora_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's weights (detached copies): PEFT's keyed ``<module path>.lora_A.weight`` / ``.lora_B.weight``,
    a LyCORIS network's in its file keys (``<lora name>.hada_w1_a`` ...)."""
    network = lycoris_network(model, adapter_name)
    if network is not None:
        return lycoris_state_dict(network)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().clone() for k, v in state.items()}


def load_lora_state_dict(model: nn.Module, adapter_name: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy weights keyed like :func:`lora_state_dict` into the attached adapter.

    Keys must all exist in the adapter (a mismatch is a bug in the caller, raised as ValueError);
    adapter layers missing from ``state`` keep their current values.
    """
    network = lycoris_network(model, adapter_name)
    if network is not None:
        load_lycoris_state_dict(network, state)
        return
    result = set_peft_model_state_dict(model, dict(state), adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA weights for layers that have no adapter: {unexpected[:5]}")
