"""Which FLUX.1 layers get LoRA adapters: named sets, or module names.

The sets, as names inside each double block (``transformer_blocks.i``) and single block
(``single_transformer_blocks.i``) of diffusers' transformer:

- ``attention``: the attention projections (double: ``attn.to_q/to_k/to_v/to_out.0`` and the text
  stream's ``attn.add_q_proj/add_k_proj/add_v_proj/to_add_out``; single: ``attn.to_q/to_k/to_v``);
- ``attention+mlp``: also the MLPs (``ff.*``, ``ff_context.*``; single: ``proj_mlp`` and
  ``proj_out``, which mixes attention and MLP outputs);
- ``all-linear`` (the default): every linear layer in the blocks, modulations included. This is
  what kohya (``networks.lora_flux``: every Linear of DoubleStreamBlock/SingleStreamBlock) and
  ai-toolkit (every Linear under ``transformer_blocks``) train by default.

Any other name is a module name resolved like SD's targets (``to_q``, ``ff.net.2``,
``single_transformer_blocks.3.proj_out``...). CLIP-L, when trained, gets kohya's text-encoder
targets (attention and MLP projections), the layers ComfyUI and Forge map for ``lora_te1_`` keys.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lorad.errors import ConfigError, ConfigProblem
from lorad.lora.targets import UNET_ALIASES, resolve_targets

_DOUBLE_ATTENTION = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
_DOUBLE_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_DOUBLE_MODULATION = ("norm1.linear", "norm1_context.linear")
_SINGLE_ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v")
_SINGLE_MLP = ("proj_mlp", "proj_out")
_SINGLE_MODULATION = ("norm.linear",)

# set name -> (names inside a double block, names inside a single block)
TARGET_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "attention": (_DOUBLE_ATTENTION, _SINGLE_ATTENTION),
    "attention+mlp": (_DOUBLE_ATTENTION + _DOUBLE_MLP, _SINGLE_ATTENTION + _SINGLE_MLP),
    "all-linear": (
        _DOUBLE_ATTENTION + _DOUBLE_MLP + _DOUBLE_MODULATION,
        _SINGLE_ATTENTION + _SINGLE_MLP + _SINGLE_MODULATION,
    ),
}
DEFAULT_TARGETS = ("all-linear",)
# The same layers as paths inside one CLIP encoder layer (kohya's CLIPAttention and CLIPMLP linears).
CLIP_MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
_SUGGESTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out", "proj_mlp", "proj_out", "ff.net.2")


def transformer_target_paths(transformer: nn.Module, names: Iterable[str], *, key: str) -> list[str]:
    """The sorted module paths of a diffusers ``FluxTransformer2DModel`` that ``names`` select.

    ``names`` mixes set names (:data:`TARGET_SETS`) and module names; ``key`` is the config key
    they came from. Raises ConfigError naming ``key``, the bad name and the valid choices.
    """
    names = list(names)
    if not names:
        raise ConfigError([ConfigProblem(key, "is empty", f"use one of {', '.join(TARGET_SETS)} or module names")])
    modules = dict(transformer.named_modules())
    selected: set[str] = set()
    others = []
    for name in names:
        if name not in TARGET_SETS:
            others.append(name)
            continue
        double, single = TARGET_SETS[name]
        for path in modules:
            block, _, rest = path.partition(".")
            index, _, inner = rest.partition(".")
            if index.isdigit() and (
                (block == "transformer_blocks" and inner in double)
                or (block == "single_transformer_blocks" and inner in single)
            ):
                selected.add(path)
    if others:
        try:
            selected.update(
                resolve_targets(transformer, others, key=key, aliases=UNET_ALIASES, suggestions=_SUGGESTIONS)
            )
        except ConfigError as err:
            sets = ", ".join(TARGET_SETS)
            raise ConfigError(
                [
                    ConfigProblem(p.key, p.message, f"{p.fix}; or a set: {sets}" if p.fix else f"use a set: {sets}")
                    for p in err.problems
                ]
            ) from None
    return sorted(selected)
