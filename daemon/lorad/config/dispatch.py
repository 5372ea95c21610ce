"""Which model family a config is for, and the one parse call that returns that family's config type.

``model_family: NAME`` says it outright (``task: llm`` / ``task: sd``, the older spelling, still works).
Without it the base model decides: each family's ``detect`` looks at its files (a ``config.json``
naming a ``...ForCausalLM`` architecture is an LLM; a checkpoint's keys tell SDXL from SD 1.x/2.x).
A config whose base model no family recognises is told apart by its keys (SD 1.x/2.x when they fit it). Everything after
this point sees a typed config whose ``model_family`` names its family.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from lorad.config.limits import path_problem, shown
from lorad.config.loader import _resolve_base_model, load_config
from lorad.config.schema import TrainingKeys
from lorad.config.yaml_text import load_yaml_text
from lorad.errors import ConfigError, ConfigProblem
from lorad.families.registry import FamilySpec, detect_family, family_names, family_specs, get_spec

# `task` was the key before there were more than two families.
_LEGACY_KEY = "task"


def _named_family(raw: Mapping[str, Any], source: str) -> FamilySpec | None:
    """The family the config names with ``model_family`` (or ``task``), or None when it names none."""
    for key in ("model_family", _LEGACY_KEY):
        value = raw.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        name = str(value).strip().lower()
        if name in family_names():
            return get_spec(name)
        close = difflib.get_close_matches(name, family_names(), n=1)
        fix = (f"did you mean `{close[0]}`? " if close else "") + "use one of: " + ", ".join(family_names())
        raise ConfigError(
            [ConfigProblem(key, f"got {shown(value)}", fix + f", or remove `{key}` to detect it")], source
        )
    return None


def _family_by_keys(raw: Mapping[str, Any]) -> FamilySpec:
    """The family whose config knows the most of ``raw``'s keys (SD 1.x/2.x on a tie), so a config whose
    base model cannot be read from here is still checked as what it is: an LLM config is never told
    its keys are SD typos."""
    keys = {str(k) for k in raw} - {"model_family", _LEGACY_KEY}
    counts = {spec.name: len(keys & {f.name for f in fields(spec.config_class)}) for spec in family_specs()}
    best = max(counts.values())
    tied = [name for name, count in counts.items() if count == best]
    return get_spec("sd" if "sd" in tied else tied[0])


def choose_family(raw: Mapping[str, Any], *, base_dir: Path, source: str = "config") -> FamilySpec:
    """The family a raw config mapping is for: named, else detected from base_model, else from its keys."""
    named = _named_family(raw, source)
    if named is not None:
        return named
    base = raw.get("base_model")
    if isinstance(base, (str, os.PathLike)) and str(base).strip() and path_problem("", os.fspath(base)) is None:
        detected = detect_family(_resolve_base_model(os.fspath(base), base_dir))
        if detected is not None:
            return detected
    return _family_by_keys(raw)


def parse_any_config(raw: Any, *, base_dir: Path, source: str = "config") -> TrainingKeys:
    """Validate a raw mapping into the config type of the family it is for (every problem at once)."""
    if not isinstance(raw, Mapping):
        return get_spec("sd").parse(raw, base_dir, source)  # reports what a config should look like
    spec = choose_family(raw, base_dir=base_dir, source=source)
    raw = {k: v for k, v in raw.items() if k not in ("model_family", _LEGACY_KEY)}
    return spec.parse(raw, base_dir, source)


def parse_any_config_text(text: str, *, base_dir: Path, source: str = "config") -> TrainingKeys:
    """Parse YAML text into its family's config type (errors as in parse_config_text)."""
    raw = load_yaml_text(text, source=source)
    return parse_any_config(raw if raw is not None else {}, base_dir=base_dir, source=source)


def load_any_config(path: str | os.PathLike[str], *, base_dir: Path | None = None) -> TrainingKeys:
    """Read a YAML config file into its family's config type."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return load_config(path, base_dir=base_dir)  # reports the read error the usual way
    return parse_any_config_text(text, base_dir=(base_dir or Path.cwd()).resolve(), source=str(path))
