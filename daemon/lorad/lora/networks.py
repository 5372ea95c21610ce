"""Network types (``network_type``): what an image family attaches to its target layers, and how the file
describes it.

``lora`` is PEFT's LoRA (the kohya ``networks.lora`` layout, plus diffusers' file). ``locon``, ``loha``,
``lokr`` and ``dora`` are LyCORIS modules (see :mod:`lorad.lora.lycoris_adapter`), written in the layout
A1111, Forge and ComfyUI load, with ``ss_network_module: lycoris.kohya`` and ``ss_network_args``. Families
call :func:`network_spec`, :func:`attach_network`, :func:`network_file_tensors` and
:func:`network_metadata`; SDXL and Flux get every type by calling the same four.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorad.lora.adapters import attach_lora
from lorad.lora.lycoris_adapter import attach_lycoris

if TYPE_CHECKING:
    from lorad.config.schema import TrainConfig

NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")


@dataclass(frozen=True)
class NetworkSpec:
    """One run's network: its type, rank and alpha (linear and 1x1 layers), the rank and alpha of 3x3
    convolutions (None: convolutions get no adapter), and the dropouts."""

    network_type: str
    rank: int
    alpha: float
    conv_rank: int | None = None
    conv_alpha: float | None = None
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    @property
    def is_lycoris(self) -> bool:
        return self.network_type != "lora"

    def rank_of(self, layer: nn.Module) -> tuple[int, float]:
        """(rank, alpha) of ``layer``'s adapter: kohya gives 3x3 convolutions conv_dim/conv_alpha and every
        linear or 1x1 layer the network's rank and alpha."""
        is_spatial = isinstance(layer, nn.Conv2d) and tuple(layer.kernel_size) != (1, 1)
        if is_spatial and self.conv_rank:
            return self.conv_rank, float(self.conv_alpha or self.conv_rank)
        return self.rank, self.alpha


def network_spec(config: TrainConfig) -> NetworkSpec:
    """The network a validated image config asks for."""
    conv = config.effective_conv_dim
    return NetworkSpec(
        network_type=config.network_type,
        rank=config.lora_rank,
        alpha=config.effective_lora_alpha,
        conv_rank=conv,
        conv_alpha=config.effective_conv_alpha if conv else None,
        dropout=config.lora_dropout,
        rank_dropout=config.rank_dropout,
        module_dropout=config.module_dropout,
    )


def attach_network(
    model: nn.Module,
    *,
    adapter_name: str,
    target_paths: Sequence[str],
    spec: NetworkSpec,
    lora_name: Callable[[str], str],
) -> list[nn.Parameter]:
    """Attach ``spec``'s network to the layers at ``target_paths`` as ``adapter_name``; ``lora_name(path)`` is
    the layer's name in the file (e.g. ``lora_unet_down_blocks_0_…``). Returns the trainable parameters.
    Convolutions in ``target_paths`` must only be there when the spec has a conv rank (callers add them)."""
    if not spec.is_lycoris:
        return attach_lora(
            model,
            adapter_name=adapter_name,
            target_paths=target_paths,
            rank=spec.rank,
            alpha=spec.alpha,
            dropout=spec.dropout,
        )
    return attach_lycoris(
        model,
        adapter_name=adapter_name,
        algo=spec.network_type,
        target_paths=target_paths,
        lora_name=lora_name,
        rank_of=spec.rank_of,
        dropout=spec.dropout,
        rank_dropout=spec.rank_dropout,
        module_dropout=spec.module_dropout,
    )


def network_file_tensors(
    parts: Mapping[str, Mapping[str, torch.Tensor]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """A LyCORIS network's weights (:func:`lorad.lora.adapters.lora_state_dict` of each part, already in file
    keys) as the file's tensors in ``dtype``."""
    return {
        key: tensor.detach().to("cpu", dtype).contiguous() for state in parts.values() for key, tensor in state.items()
    }


def network_metadata(spec: NetworkSpec) -> dict[str, Any]:
    """The ``ss_network_*`` metadata kohya writes for this network (A1111 and Civitai show it)."""
    meta: dict[str, Any] = {
        "ss_network_module": "lycoris.kohya" if spec.is_lycoris else "networks.lora",
        "ss_network_dim": spec.rank,
        "ss_network_alpha": spec.alpha,
        "ss_network_dropout": spec.dropout,
    }
    args: dict[str, Any] = {}
    if spec.is_lycoris:
        # LyCORIS' own argument names, as `--network_args` passes them to lycoris.kohya.
        args["algo"] = "lora" if spec.network_type in ("locon", "dora") else spec.network_type
        if spec.network_type == "dora":
            args |= {"dora_wd": True, "wd_on_output": False}
        if spec.rank_dropout:
            args["rank_dropout"] = spec.rank_dropout
        if spec.module_dropout:
            args["module_dropout"] = spec.module_dropout
    if spec.conv_rank:
        args |= {"conv_dim": spec.conv_rank, "conv_alpha": spec.conv_alpha}
    if args:
        # kohya passes `--network_args key=value` on as text and writes them so.
        meta["ss_network_args"] = json.dumps({k: str(v) for k, v in args.items()})
    return meta


@contextlib.contextmanager
def network_off(modules: Sequence[nn.Module], adapter_name: str) -> Iterator[None]:
    """Inside the block, ``modules`` compute as the base model does (a baseline sample before training):
    PEFT layers with their adapters disabled, LyCORIS layers unwrapped; everything back afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lorad.lora.lycoris_adapter import lycoris_network

    layers = [m for module in modules for m in module.modules() if isinstance(m, BaseTunerLayer)]
    wrapped = [w for module in modules if (net := lycoris_network(module, adapter_name)) for w in net.values()]
    enabled = [not layer.disable_adapters for layer in layers]
    for layer in layers:
        layer.enable_adapters(False)
    for wrapper in wrapped:
        wrapper.restore()
    try:
        yield
    finally:
        for wrapper in wrapped:
            wrapper.apply_to()
        for layer, was in zip(layers, enabled, strict=True):
            if was:
                layer.enable_adapters(True)


@contextlib.contextmanager
def evaluating(modules: Sequence[nn.Module], adapter_name: str) -> Iterator[None]:
    """``modules`` and their adapters (LyCORIS' sit beside the model) in eval mode inside the block (no
    dropout), every submodule's own mode restored afterwards."""
    from lorad.lora.lycoris_adapter import lycoris_network

    every = [m for module in modules for m in module.modules()]
    every += [m for module in modules if (net := lycoris_network(module, adapter_name)) for m in net.modules()]
    modes = [m.training for m in every]
    for m in every:
        m.training = False
    try:
        yield
    finally:
        for m, mode in zip(every, modes, strict=True):
            m.training = mode
