"""Which engine a config is for, and the one parse call that returns the right config type.

``task: llm`` (or ``task: sd``) says it outright. Without it the base model decides: a folder (or a
hub id in the local cache) whose ``config.json`` names a ``...ForCausalLM`` architecture is an LLM;
anything else (a .safetensors checkpoint, a diffusers folder) is Stable Diffusion. Everything after
this point sees a typed config and dispatches on its class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorad.config.limits import path_problem, shown
from lorad.config.llm_loader import parse_llm_config
from lorad.config.llm_schema import LlmTrainConfig
from lorad.config.loader import _resolve_base_model, parse_config
from lorad.config.schema import TrainConfig
from lorad.config.yaml_text import load_yaml_text
from lorad.errors import ConfigError, ConfigProblem

TASKS = ("sd", "llm")
AnyTrainConfig = TrainConfig | LlmTrainConfig


def _hub_config(repo_id: str) -> Path | None:
    """The cached config.json of a hub id, never downloading."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id huggingface_hub rejects is simply not an LLM we know
        return None
    return Path(found) if isinstance(found, (str, os.PathLike)) else None


def is_causal_lm(base_model: str) -> bool:
    """Whether ``base_model`` (a resolved path or hub id) is a causal language model."""
    path = Path(base_model)
    config_file = path / "config.json" if path.is_dir() else (None if path.is_absolute() else _hub_config(base_model))
    if config_file is None or not config_file.is_file():
        return False
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = (config.get("architectures") or []) if isinstance(config, dict) else []
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def detect_task(raw: Mapping[str, Any], *, base_dir: Path, source: str = "config") -> str:
    """``sd`` or ``llm`` for a raw config mapping; ConfigError for an unknown ``task``."""
    task = raw.get("task")
    if task is not None:
        name = str(task).strip().lower()
        if name not in TASKS:
            raise ConfigError(
                [
                    ConfigProblem(
                        "task", f"got {shown(task)}", "use llm or sd, or remove it to detect the task from base_model"
                    )
                ],
                source,
            )
        return name
    base = raw.get("base_model")
    if isinstance(base, (str, os.PathLike)) and str(base).strip() and path_problem("", os.fspath(base)) is None:
        return "llm" if is_causal_lm(_resolve_base_model(os.fspath(base), base_dir)) else "sd"
    return "llm" if "train_data" in raw else "sd"


def parse_any_config(raw: Any, *, base_dir: Path, source: str = "config") -> AnyTrainConfig:
    """Validate a raw mapping into a TrainConfig (SD) or an LlmTrainConfig, as its task says."""
    if isinstance(raw, Mapping) and detect_task(raw, base_dir=base_dir, source=source) == "llm":
        return parse_llm_config(raw, base_dir=base_dir, source=source)
    if isinstance(raw, Mapping) and "task" in raw:
        raw = {k: v for k, v in raw.items() if k != "task"}
    return parse_config(raw, base_dir=base_dir, source=source)


def parse_any_config_text(text: str, *, base_dir: Path, source: str = "config") -> AnyTrainConfig:
    """Parse YAML text into the config type its task calls for (errors as in parse_config_text)."""
    raw = load_yaml_text(text, source=source)
    return parse_any_config(raw if raw is not None else {}, base_dir=base_dir, source=source)


def load_any_config(path: str | os.PathLike[str], *, base_dir: Path | None = None) -> AnyTrainConfig:
    """Read a YAML config file into the config type its task calls for."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        from lorad.config.loader import load_config

        return load_config(path, base_dir=base_dir)  # reports the read error the usual way
    return parse_any_config_text(text, base_dir=(base_dir or Path.cwd()).resolve(), source=str(path))
