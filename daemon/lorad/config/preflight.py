"""``lorad config --check`` beyond the config itself: what would fail in a run's first seconds, found
cheaply — the base model exists and is a model, the data holds something to train on, and every target
layer name matches a layer. Each family says how (its spec's ``preflight``).

The model is never loaded: its configs and file headers are read, and its modules are built on
PyTorch's ``meta`` device (shapes only, no memory, no weights), where the target names are resolved
exactly as a run resolves them.
"""

from __future__ import annotations

import re

from lorad.config.schema import TrainingKeys
from lorad.errors import ConfigProblem, LoradError
from lorad.families.registry import spec_for


def preflight_problems(config: TrainingKeys) -> list[ConfigProblem]:
    """Every problem a run of ``config`` would hit before its first step that reading the files can show."""
    return spec_for(config).preflight(config)


def model_problem(err: LoradError) -> ConfigProblem:
    """A model loader's error as a problem of the key its message starts with, else of ``base_model``."""
    # Loader messages start with "`base_model` 'x'", or with the key of the separate file they could not
    # read (FLUX's `clip_l`, `t5xxl`, `ae`); the problem's key says it.
    found = re.match(r"`(\w+)`\s*(.*)", str(err), re.S)
    if found is None:
        return ConfigProblem("base_model", str(err).strip(), err.hint)
    return ConfigProblem(found[1], found[2].strip().removeprefix(":").strip(), err.hint)
