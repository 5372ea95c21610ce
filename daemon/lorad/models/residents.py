"""What lorad's model registries hold, and how jobs and requests reserve it.

A registry is generic (:mod:`lorad.models.registry`); this module gives it lorad's models: a model
family's base model (``ModelKey.kind`` = the family's name) or a captioner (its kind). Every device's
worker keeps one registry of base models (and the captioners its jobs use); the daemon process keeps
one for caption requests. The providers here reserve a model for a training run or a captioning pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from lorad.captioning.captioner import CaptionerKey, CaptionerProvider, ProvidedCaptioner
from lorad.config.pickle_policy import needs_pickle, pickle_problem
from lorad.config.schema import TrainingKeys
from lorad.errors import ModelLoadError
from lorad.families.registry import family_names, load_plugin
from lorad.models.registry import ModelKey, ModelRegistry, measure_tensor_bytes


def load_model(key: ModelKey) -> Any:
    """A registry's loader: a family's base model (kind = the family's name), or a captioner."""
    if key.kind in family_names():
        return load_plugin(key.kind).load(key)
    from lorad.captioning.captioner import load_captioner

    return load_captioner(
        CaptionerKey(
            kind=key.kind, model=key.base_model, device=key.device, dtype=key.dtype, allow_pickle=key.allow_pickle
        )
    )


def measure_model(model: Any) -> int:
    """Bytes a resident model holds: its own ``memory_bytes`` when it says (an ONNX tagger holds no
    torch tensors), else its tensors."""
    own = getattr(model, "memory_bytes", None)
    return own if isinstance(own, int) else measure_tensor_bytes(model)


def lorad_registry(*, default_keep_alive: float, memory_budget_bytes: int | None) -> ModelRegistry:
    """A registry of lorad's models with the daemon's keep-alive and memory budget."""
    return ModelRegistry(
        load_model,
        default_keep_alive=default_keep_alive,
        memory_budget_bytes=memory_budget_bytes,
        measure=measure_model,
    )


def base_model_provider(
    registry: ModelRegistry, keep_alive: float | None
) -> Callable[[TrainingKeys, Any], AbstractContextManager[Any]]:
    """The training loop's ModelProvider: reserve the config's base model in ``registry`` (loading it
    the first time), keeping it ``keep_alive`` seconds after the run (None: the registry's default)."""

    @contextmanager
    def provide(config: TrainingKeys, placement: Any) -> Iterator[Any]:
        from lorad.training.family import ProvidedModel

        if (problem := pickle_problem("base_model", config.base_model, config.allow_pickle)) is not None:
            raise ModelLoadError(f"`base_model`: {problem.message}", problem.fix)
        key = load_plugin(config.model_family).model_key(config, placement)
        with registry.use(key, keep_alive=keep_alive) as acquired:
            yield ProvidedModel(model=acquired.model, resident=acquired.resident, seconds=acquired.load_seconds)

    return provide


def captioner_provider(registry: ModelRegistry, keep_alive: float | None) -> CaptionerProvider:
    """A CaptionerProvider that reserves captioners in ``registry`` (loading each once)."""

    @contextmanager
    def provide(key: CaptionerKey) -> Iterator[ProvidedCaptioner]:
        registry_key = ModelKey(
            base_model=key.model,
            device=key.device,
            dtype=key.dtype,
            kind=key.kind,
            allow_pickle=needs_pickle(key.model, key.allow_pickle),
        )
        with registry.use(registry_key, keep_alive=keep_alive) as acquired:
            yield ProvidedCaptioner(
                captioner=acquired.model,
                resident=acquired.resident,
                seconds=acquired.load_seconds,
                model_id=acquired.model_id,
            )

    return provide


def preload_key(
    *,
    base_model: str,
    base_dir: Path,
    device: str,
    mixed_precision: str = "",
    model_config_dir: str = "",
    tokenizer_path: str = "",
    prediction_type: str = "",
    allow_pickle: bool = False,
) -> ModelKey:
    """The registry key a job with these settings would use on ``device`` (its family detected from the
    model's files; settings its family has no key for are ignored). ConfigError for bad settings,
    pickle weights without ``allow_pickle`` included."""
    from lorad.config.dispatch import choose_family
    from lorad.training.placement import pick_placement

    spec = choose_family({"base_model": base_model}, base_dir=base_dir, source="model load")
    raw: dict[str, Any] = {
        spec.data_key: str(base_dir),
        "base_model": base_model,
        "output_dir": str(base_dir),
        "device": device or "auto",
        "mixed_precision": mixed_precision or "auto",
    }
    optional = {
        "model_config_dir": model_config_dir,
        "tokenizer_path": tokenizer_path,
        "prediction_type": prediction_type,
        "allow_pickle": allow_pickle,
    }
    known = {f.name for f in fields(spec.config_class)}
    raw |= {key: value for key, value in optional.items() if value and key in known}
    config = spec.parse(raw, base_dir, "model load")  # pickle refused here
    placement = pick_placement(config.device, config.mixed_precision)
    return load_plugin(spec.name).model_key(config, placement)


def resident_set_bytes() -> int:
    """This process's current resident memory (Linux); 0 where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def total_memory_bytes() -> int:
    """The machine's physical memory; 0 where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 0
