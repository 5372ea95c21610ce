"""Start a run from an existing LoRA file (incremental training) instead of zero-initialised B."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import nn

from lorad.config import TrainConfig
from lorad.errors import ConfigError, ConfigProblem
from lorad.events import EventSink, LogLine
from lorad.lora.adapters import load_lora_state_dict
from lorad.lora.kohya_format import LoadedLora, read_lora_file


def apply_init_lora(
    config: TrainConfig,
    models: Mapping[str, nn.Module],
    adapter_name: str,
    *,
    targeted: Mapping[str, Sequence[str]],
    adaptable: Mapping[str, Sequence[str]],
    on_event: EventSink,
    name_for: Callable[[str, str], str] | None = None,
    loaded: LoadedLora | None = None,
    target_keys: Mapping[str, str] | None = None,
) -> None:
    """Load ``config.init_lora`` into the attached adapters.

    The file's rank must equal ``lora_rank`` and its layers must be among the targeted ones (both
    are config errors naming the fix). When the file's alpha differs from ``lora_alpha`` the up
    weights are rescaled so the LoRA's effect is exactly the file's at step 0. ``name_for(part, path)``
    names modules as the family's kohya files do (default: SD 1.x/2.x). A family whose files SD's
    reader cannot read (FLUX's fused BFL layers) passes the file already ``loaded``, and the config
    key naming each part's targets in ``target_keys``.
    """
    assert config.init_lora is not None
    if loaded is None:
        loaded = read_lora_file(config.init_lora, {part: list(paths) for part, paths in adaptable.items()}, name_for)
    problems: list[ConfigProblem] = []
    if loaded.rank and loaded.rank != config.lora_rank:
        problems.append(
            ConfigProblem(
                "lora_rank",
                f"is {config.lora_rank} but init_lora has rank {loaded.rank}",
                f"set lora_rank: {loaded.rank} to continue that LoRA",
            )
        )
    for part, state in loaded.parts.items():
        modules = {key.rpartition(".lora_")[0] for key in state}
        extra = sorted(modules - set(targeted.get(part, ())))
        if extra:
            key = (target_keys or {}).get(part) or (
                "unet_target_modules" if part == "unet" else "text_encoder_target_modules"
            )
            fix = f"add names that select them to {key}" if targeted.get(part) else "set train_text_encoder: true"
            problems.append(
                ConfigProblem(key, f"init_lora has {len(extra)} {part} layers it does not select, e.g. {extra[0]}", fix)
            )
    if problems:
        raise ConfigError(problems, f"init_lora {config.init_lora}")

    alpha = config.effective_lora_alpha
    for part, state in loaded.parts.items():
        scaled = dict(state)
        rescaled = 0
        for key in state:
            if key.endswith(".lora_B.weight"):
                module = key.rpartition(".lora_")[0]
                file_alpha = loaded.alphas.get(f"{part}:{module}", float(loaded.rank))
                if file_alpha != alpha:
                    scaled[key] = state[key] * (file_alpha / alpha)
                    rescaled += 1
        load_lora_state_dict(models[part], adapter_name, scaled)
        if rescaled:
            on_event(
                LogLine(
                    f"init_lora: {rescaled} {part} layers had a different alpha; their weights "
                    f"were rescaled to lora_alpha {alpha:g}",
                    level="warning",
                )
            )
    count = sum(len(s) // 2 for s in loaded.parts.values())
    on_event(LogLine(f"init_lora: started from {config.init_lora.name} ({count} layers)"))
