"""Resolve user-facing target names (``to_q``, ``q_proj``, ``attn2.to_k``) to module paths.

A name matches every module whose dotted path equals it or ends with ``.<name>``. We resolve to
the full list of module paths ourselves, rather than handing peft the short names, so that a name
that matches nothing is a config error naming the valid choices, and so the exported kohya keys
are exactly the modules that were trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from lorad.errors import ConfigError, ConfigProblem

# People write the names they know from LLMs and from lora-scripts configs; diffusers' UNet calls
# its attention projections to_q/to_k/to_v/to_out.0.
UNET_ALIASES: Mapping[str, str] = {
    "q_proj": "to_q",
    "k_proj": "to_k",
    "v_proj": "to_v",
    "out_proj": "to_out.0",
    "o_proj": "to_out.0",
    "to_out": "to_out.0",
}

# Names worth suggesting, in the order we list them; only those present in the model are shown.
UNET_SUGGESTIONS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
)
TEXT_ENCODER_SUGGESTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

# Layer types peft's LoRA adapts and kohya's format can express.
ADAPTABLE = (nn.Linear, nn.Conv2d)


def _matches(path: str, name: str) -> bool:
    return path == name or path.endswith("." + name)


def resolve_targets(
    model: nn.Module,
    names: Iterable[str],
    *,
    key: str,
    aliases: Mapping[str, str] | None = None,
    suggestions: Iterable[str] = (),
) -> list[str]:
    """Return the sorted module paths of ``model`` that the target ``names`` select.

    ``key`` is the config key the names came from, used in errors. Aliases are applied first.
    Raises :class:`ConfigError` listing every name that matches no module, or matches only layers
    LoRA cannot adapt, together with the valid names for this model.
    """
    modules = dict(model.named_modules())
    adaptable = {p for p, m in modules.items() if isinstance(m, ADAPTABLE)}
    valid = [s for s in suggestions if any(_matches(p, s) for p in adaptable)]
    if aliases:
        valid += [a for a, target in aliases.items() if target in valid]
    problems: list[ConfigProblem] = []
    selected: set[str] = set()
    for raw in names:
        name = (aliases or {}).get(raw, raw)
        hits = [p for p in modules if p and _matches(p, name)]
        usable = [p for p in hits if p in adaptable]
        if usable:
            selected.update(usable)
            continue
        if hits:
            kinds = sorted({type(modules[p]).__name__ for p in hits})
            message = f"{raw!r} matches only {', '.join(kinds)} layers, which LoRA cannot adapt"
        else:
            message = f"{raw!r} matches no layer of this model"
        problems.append(ConfigProblem(key, message, "valid names: " + ", ".join(valid)))
    if problems:
        raise ConfigError(problems, "target modules")
    return sorted(selected)


# The UNet blocks whose layers kohya's LoCon (conv_dim) adapts: every linear and conv child of a ResNet
# block and of the down/up-samplers (diffusers' class names; SD 1.x/2.x and SDXL UNets share them).
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


def resnet_layer_paths(unet: nn.Module) -> list[str]:
    """The paths of the layers LoCon adds: conv1, conv2, conv_shortcut and time_emb_proj of every ResNet
    block, and the down/up-sampler convolutions, sorted."""
    found: set[str] = set()
    for path, module in unet.named_modules():
        if type(module).__name__ in CONV_BLOCKS:
            for child, layer in module.named_modules():
                if child and isinstance(layer, ADAPTABLE):
                    found.add(f"{path}.{child}")
    return sorted(found)
