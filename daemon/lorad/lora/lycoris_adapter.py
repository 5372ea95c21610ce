"""LyCORIS adapters (LoCon, LoHa, LoKr, DoRA) attached by name to a frozen, possibly resident model.

The modules are the ``lycoris-lora`` package's own (``LoConModule``, ``LohaModule``, ``LokrModule``):
each wraps one layer's ``forward`` and never writes to the layer's weights. lorad keeps them in a
registry beside the model (nothing is added to the model's module tree, so its ``state_dict`` is
unchanged), keyed by the model and the adapter name; :func:`detach_lycoris` unwraps every layer and
forgets them. A module's ``state_dict`` is already the key layout A1111, Forge and ComfyUI load
(``<lora name>.hada_w1_a`` ...), so checkpoints and exports use it as it is.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from lorad.models.construction import MODULE_CONSTRUCTION

_ATTACHED: weakref.WeakKeyDictionary[nn.Module, dict[str, nn.ModuleDict]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _module_class(algo: str) -> type[nn.Module]:
    from lycoris.modules import LoConModule, LohaModule, LokrModule

    return {"locon": LoConModule, "dora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[algo]


def attach_lycoris(
    model: nn.Module,
    *,
    adapter_name: str,
    algo: str,
    target_paths: Sequence[str],
    lora_name: Callable[[str], str],
    rank_of: Callable[[nn.Module], tuple[int, float]],
    dropout: float = 0.0,
    rank_dropout: float = 0.0,
    module_dropout: float = 0.0,
) -> list[nn.Parameter]:
    """Wrap each layer in ``target_paths`` with a LyCORIS ``algo`` module ("locon", "loha", "lokr", "dora")
    named ``lora_name(path)`` (the file's key prefix); ``rank_of(layer)`` gives its (rank, alpha).

    DoRA is LoCon with weight decomposition per *input* channel, the axis A1111 applies ``dora_scale``
    on. Every other algo runs in LyCORIS' bypass mode (base output plus the adapter's, never a rebuilt
    weight), which keeps low-precision base weights exact. Returns the new trainable parameters (fp32,
    on the layers' devices); their first values come from the global RNG.
    """
    cls = _module_class(algo)
    dora = algo == "dora"
    modules: dict[str, nn.Module] = {}
    with MODULE_CONSTRUCTION:
        for path in target_paths:
            layer = model.get_submodule(path)
            rank, alpha = rank_of(layer)
            name = lora_name(path)
            module = cls(
                name,
                layer,
                multiplier=1.0,
                lora_dim=rank,
                alpha=alpha,
                dropout=dropout,
                rank_dropout=rank_dropout,
                module_dropout=module_dropout,
                weight_decompose=dora,
                wd_on_out=False,
                bypass_mode=not dora,
            )
            modules[name] = module.to(device=layer.weight.device, dtype=torch.float32)
    network = nn.ModuleDict(modules)
    with _LOCK:
        held = _ATTACHED.setdefault(model, {})
        if adapter_name in held:
            raise ValueError(f"adapter {adapter_name!r} is already attached")  # a bug in the caller
        held[adapter_name] = network
    for module in network.values():
        module.apply_to()
    params = list(network.parameters())
    for param in params:
        param.requires_grad_(True)
    return params


def lycoris_network(model: nn.Module, adapter_name: str) -> nn.ModuleDict | None:
    """The LyCORIS modules attached to ``model`` as ``adapter_name``, by lora name; None when there are none."""
    with _LOCK:
        return _ATTACHED.get(model, {}).get(adapter_name)


def detach_lycoris(model: nn.Module, adapter_name: str) -> None:
    """Unwrap every layer ``adapter_name`` wrapped, leaving each with its class's own ``forward``."""
    with _LOCK:
        held = _ATTACHED.get(model, {})
        network = held.pop(adapter_name, None)
        if not held:
            _ATTACHED.pop(model, None)
    if network is None:
        return
    for module in reversed(list(network.values())):
        module.restore()
        layer = module.org_module[0]
        if not getattr(layer, "_lycoris_wrappers", None):
            # restore() leaves the original bound method as an instance attribute; drop it.
            layer.__dict__.pop("forward", None)


def set_lycoris_training(model: nn.Module, adapter_name: str, training: bool) -> None:
    """Train or eval mode for the adapter's modules (their dropouts act only in training); they sit beside
    the model, so ``model.train()`` does not reach them."""
    network = lycoris_network(model, adapter_name)
    if network is not None:
        network.train(training)


def lycoris_state_dict(network: nn.ModuleDict) -> dict[str, torch.Tensor]:
    """The modules' weights in the file's keys (``<lora name>.<weight>``), detached copies."""
    return {
        f"{name}.{key}": value.detach().clone()
        for name, module in network.items()
        for key, value in module.state_dict().items()
    }


def load_lycoris_state_dict(network: nn.ModuleDict, state: Mapping[str, torch.Tensor]) -> None:
    """Copy weights keyed like :func:`lycoris_state_dict` into the modules; modules not in ``state`` keep theirs.
    A key naming no module is a bug in the caller (ValueError)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name, _, rest = key.partition(".")
        grouped.setdefault(name, {})[rest] = value
    unknown = sorted(set(grouped) - set(network.keys()))
    if unknown:
        raise ValueError(f"LyCORIS weights for layers that have no adapter: {unknown[:5]}")
    with torch.no_grad():
        for name, sub in grouped.items():
            network[name].load_state_dict(sub)
