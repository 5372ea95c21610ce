"""The model families lorad knows, found by their ``spec`` modules, and which one a base model is.

Each family package (``lorad/families/<name>/``) has a light ``spec.py`` defining ``SPEC``, a
:class:`FamilySpec`: its name, config class and parser, how to recognise its base models, and where
its training plug-in lives. Importing the registry never imports torch: the CLI, the TUI and the
daemon's config checks use it to parse configs; the plug-in (``family.py``, a
:class:`lorad.training.family.ModelFamily`) is imported only when a run or a model load needs it.

Adding a family is adding its package: nothing here lists them.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorad.config.schema import TrainingKeys
    from lorad.training.family import ModelFamily


@dataclass(frozen=True)
class FamilySpec:
    """What the rest of lorad needs to know about a model family without loading any model code.

    - ``name``: the ``model_family`` value, the registry kind of its resident models, the
      ``lorad config --example NAME`` argument.
    - ``parse(raw, base_dir, source)``: validates a raw mapping into ``config_class`` (every problem at once).
    - ``detect(base_model)``: True when a resolved base model (absolute path or hub id) is of this family;
      reads only file names, headers and small JSON files, never downloads. Families are asked in
      ``priority`` order (lower first); the first that says yes wins. When none does, the config's keys
      decide (:func:`lorad.config.dispatch.choose_family`).
    - ``preflight(config)``: the problems a run would hit in its first seconds that reading files cheaply
      shows (``lorad config --check``): the model is a model, there is data, target names match layers.
    - ``plugin``: ``"module:attribute"`` of its :class:`~lorad.training.family.ModelFamily`.
    - ``data_key``: the config key naming its training data (what clients show as the data).
    - ``output_kind``: "image_lora" (a kohya file used as ``<lora:NAME:w>``) or "peft_adapter".
    - ``uses_captioner``: its runs can caption images that have no caption first.
    - ``out_of_memory_hint(config)``: the settings to lower after an out-of-memory failure.
    """

    name: str
    title: str
    config_class: type
    parse: Callable[[Mapping[str, Any], Path, str], Any]
    render_example: Callable[[], str]
    detect: Callable[[str], bool]
    plugin: str
    data_key: str
    output_kind: str
    out_of_memory_hint: Callable[[Any], str]
    preflight: Callable[[Any], list[Any]] = lambda config: []
    priority: int = 100
    uses_captioner: bool = False


@cache
def _specs() -> tuple[FamilySpec, ...]:
    import lorad.families as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            try:
                module = importlib.import_module(f"{package.__name__}.{info.name}.spec")
            except ModuleNotFoundError as err:
                if err.name != f"{package.__name__}.{info.name}.spec":
                    raise
                continue
            found.append(module.SPEC)
    return tuple(sorted(found, key=lambda spec: (spec.priority, spec.name)))


def family_specs() -> tuple[FamilySpec, ...]:
    """Every known family, in detection order."""
    return _specs()


def family_names() -> tuple[str, ...]:
    """The ``model_family`` values, in detection order."""
    return tuple(spec.name for spec in _specs())


def get_spec(name: str) -> FamilySpec:
    """The family called ``name``; KeyError for an unknown name (configs are validated before this)."""
    for spec in _specs():
        if spec.name == name:
            return spec
    raise KeyError(name)


def spec_for(config: TrainingKeys) -> FamilySpec:
    """The family a parsed config is for (its ``model_family``, set by its parser)."""
    return get_spec(config.model_family)


def detect_family(base_model: str) -> FamilySpec | None:
    """The first family (by priority) whose ``detect`` recognises ``base_model``, or None."""
    for spec in _specs():
        if spec.detect(base_model):
            return spec
    return None


def load_plugin(name: str) -> ModelFamily:
    """The training plug-in of family ``name`` (imports its model code: torch, diffusers, ...)."""
    module_name, _, attribute = get_spec(name).plugin.partition(":")
    return getattr(importlib.import_module(module_name), attribute)
