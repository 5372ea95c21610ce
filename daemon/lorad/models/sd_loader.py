"""Load a Stable Diffusion 1.x/2.x base model into :class:`SDComponents`, strictly offline.

``base_model`` may be a diffusers folder, a single-file checkpoint in the original LDM /
AUTOMATIC1111 layout, or a Hugging Face id already in the local cache. Nothing is ever downloaded:
every library call gets ``local_files_only=True``, and the configs a single file lacks come from
``model_config_dir`` or from the SD 1.5 / SD 2.1 configs shipped in ``sd_configs/``.

Loading runs in two phases: first every cheap check (file kind, architecture, configs, pickle
policy, tokenizer location), then the weights. A mistake therefore fails in milliseconds, not
after gigabytes have been read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from transformers import CLIPTextModel

from lorad.errors import ConfigError, ConfigProblem, ModelLoadError
from lorad.models.sd_components import PREDICTION_TYPES, SDComponents
from lorad.models.sd_folder import COMPONENTS, inspect_folder, load_folder_models, read_json_object
from lorad.models.sd_tokenizer import find_tokenizer_dir, open_tokenizer
from lorad.models.single_file import (
    PICKLE_HINT,
    PICKLE_SUFFIXES,
    check_config_fits,
    convert_components,
    is_pickle_path,
    normalize_keys,
    probe_checkpoint,
    read_pickle_checkpoint,
    read_safetensors,
    read_safetensors_shapes,
)

log = logging.getLogger(__name__)

#: Diffusers-layout configs of SD 1.5 ("sd1") and SD 2.1 768-v ("sd2"), used for single files.
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "sd_configs"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)

_Modules = tuple[UNet2DConditionModel, AutoencoderKL, CLIPTextModel]


@dataclass
class _Plan:
    """The outcome of the cheap phase: what the model is, and how to load its weights."""

    version: str
    scheduler_config: dict[str, Any]
    default_prediction: str  # used when the scheduler config names none
    tokenizer_dirs: list[Path]  # local tokenizer/ folders to try, in order
    load: Callable[[torch.dtype], _Modules]
    configs: Path  # a diffusers-layout folder whose unet/ and text_encoder/ configs describe the model


def load_sd_components(
    base_model: str,
    *,
    base_dir: Path | None = None,
    allow_pickle: bool = False,
    model_config_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    prediction_type: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> SDComponents:
    """Load the UNet, VAE, text encoder, tokenizer and a training DDPM scheduler of an SD 1.x/2.x model.

    - ``base_model``: diffusers folder, single-file checkpoint (``.safetensors``; ``.ckpt``/``.pt``/
      ``.pth``/``.bin`` only with ``allow_pickle``, read with ``torch.load(weights_only=True)``), or
      a Hub id present in the local Hugging Face cache. Relative paths (this one, ``model_config_dir``
      and ``tokenizer_path``) resolve against ``base_dir`` (the config file's folder), else the cwd.
    - ``model_config_dir``: diffusers-layout folder with the configs for a single file (and maybe a
      ``tokenizer/``); default: the shipped SD 1.5 or SD 2.1 configs, by detected architecture.
    - ``tokenizer_path``: a CLIP tokenizer folder; it wins over every other tokenizer source.
    - ``prediction_type``: "auto" takes it from the scheduler config (folder: its scheduler, else
      epsilon; single file: ``model_config_dir``'s scheduler if it names one, else v_prediction for
      SD 2.x and epsilon for SD 1.x); "epsilon"/"v_prediction" override.

    The result follows the contract in :class:`SDComponents`. Raises ModelLoadError (message names
    the config key and value, ``hint`` the fix) when the model cannot be found, recognised or
    loaded, and ConfigError for an unknown ``prediction_type``.
    """
    check_prediction_type(prediction_type)
    where = f"`base_model` {base_model!r}"
    source, plan = _plan(base_model, base_dir, allow_pickle=allow_pickle, model_config_dir=model_config_dir)
    prediction_type = resolve_prediction_type(prediction_type, plan.scheduler_config, plan.default_prediction, where)
    tokenizer_dir, tokenizer_source = find_tokenizer_dir(
        plan.version,
        where,
        tokenizer_path=resolve_optional_path(tokenizer_path, base_dir),
        local_dirs=plan.tokenizer_dirs,
    )

    unet, vae, text_encoder = plan.load(dtype)
    freeze(unet, vae, text_encoder, dtype=dtype)
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=open_tokenizer(tokenizer_dir, text_encoder, tokenizer_source),
        noise_scheduler=DDPMScheduler.from_config(plan.scheduler_config, prediction_type=prediction_type),
        model_version=plan.version,
        prediction_type=prediction_type,
        source=str(source),
    )


def check_prediction_type(prediction_type: str) -> None:
    """Raise ConfigError unless ``prediction_type`` is auto, epsilon or v_prediction."""
    if prediction_type not in ("auto", *PREDICTION_TYPES):
        problem = ConfigProblem(
            "prediction_type", f"unknown value {prediction_type!r}", "use auto, epsilon or v_prediction"
        )
        raise ConfigError([problem])


def resolve_prediction_type(prediction_type: str, scheduler_config: dict[str, Any], default: str, where: str) -> str:
    """``prediction_type`` itself, or for "auto" the scheduler config's (else ``default``); refuses
    a config naming one lorad cannot train (such as "sample")."""
    if prediction_type != "auto":
        return prediction_type
    found = scheduler_config.get("prediction_type") or default
    if found not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"{where}: its scheduler config has prediction_type {found!r}, which lorad cannot train",
            "Set `prediction_type` to epsilon or v_prediction.",
        )
    return found


def freeze(*modules: torch.nn.Module, dtype: torch.dtype) -> None:
    """Put loaded modules in ``dtype``, eval mode, and ``requires_grad`` False everywhere."""
    for module in modules:
        # Normally loaded in `dtype` already; diffusers warns on every `.to(dtype)`, so cast only if needed.
        if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
            module.to(dtype=dtype)
        module.eval()
        module.requires_grad_(False)


def inspect_sd_model(
    base_model: str,
    *,
    base_dir: Path | None = None,
    allow_pickle: bool = False,
    model_config_dir: Path | None = None,
) -> tuple[str, Path]:
    """The cheap phase of :func:`load_sd_components` alone: the model's version ("sd1"/"sd2") and a
    diffusers-layout folder whose ``unet/config.json`` and ``text_encoder/config.json`` describe it.

    Reads file headers and configs, never weights (a pickle checkpoint, which has no header, is read
    whole: only with ``allow_pickle``). Raises ModelLoadError as loading would.
    """
    _, plan = _plan(base_model, base_dir, allow_pickle=allow_pickle, model_config_dir=model_config_dir)
    return plan.version, plan.configs


def _plan(
    base_model: str, base_dir: Path | None, *, allow_pickle: bool, model_config_dir: Path | None
) -> tuple[Path, _Plan]:
    """The cheap phase: where ``base_model`` is, and what it is and how to load it."""
    where = f"`base_model` {base_model!r}"
    source = resolve_base_model(base_model, base_dir=base_dir)
    config_dir = resolve_optional_path(model_config_dir, base_dir)
    if source.is_dir():
        return source, _plan_folder(source, where, allow_pickle=allow_pickle, config_dir=config_dir)
    return source, _plan_single_file(source, where, allow_pickle=allow_pickle, config_dir=config_dir)


def resolve_base_model(base_model: str, *, base_dir: Path | None = None) -> Path:
    """The absolute path ``base_model`` names: an existing file or folder, or a cached Hub snapshot.

    A value that exists on disk is always taken as a path, even if it also looks like a Hub id.
    """
    if not base_model or not base_model.strip():
        raise ModelLoadError("`base_model` is empty", "Set it to a model folder, checkpoint file or Hub id.")
    path = _absolute(Path(base_model), base_dir)
    if path.exists():
        return path.resolve()
    anchor = base_dir if base_dir is not None else "the current folder"
    # "org/name" may be a Hub id; "dir/model.safetensors" is a file name, never an id.
    if _HUB_ID.fullmatch(base_model) and not base_model.lower().endswith(_WEIGHT_SUFFIXES):
        snapshot = _cached_snapshot(base_model)
        if snapshot is not None:
            log.info("base_model %s: using the cached snapshot %s", base_model, snapshot)
            return snapshot
        raise ModelLoadError(
            f"`base_model` {base_model!r} is neither an existing path ({path}) nor a model in the "
            "local Hugging Face cache",
            f"lorad never downloads models. If it is a path, check it (relative paths are resolved "
            f"against {anchor}); if it is a Hub id, download it once (`hf download {base_model}`) so "
            "it is in the cache.",
        )
    raise ModelLoadError(
        f"`base_model` {base_model!r} does not exist (looked for {path})",
        f"Check the path; relative paths are resolved against {anchor}.",
    )


def _absolute(path: Path, base_dir: Path | None) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (Path(base_dir) if base_dir else Path.cwd()) / path


def resolve_optional_path(path: Path | None, base_dir: Path | None) -> Path | None:
    """``path`` made absolute against ``base_dir`` (else the cwd) and resolved; None stays None."""
    return None if path is None else _absolute(Path(path), base_dir).resolve()


def _cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of ``repo_id`` if the Hugging Face cache has it, else None."""
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        return None


def _shipped_scheduler(version: str, where: str) -> dict[str, Any]:
    return read_json_object(SHIPPED_CONFIGS / version / "scheduler" / "scheduler_config.json", where)


def _plan_folder(folder: Path, where: str, *, allow_pickle: bool, config_dir: Path | None) -> _Plan:
    info = inspect_folder(folder, where, allow_pickle=allow_pickle)
    scheduler_config = info.scheduler_config
    if scheduler_config is None:
        log.warning("%s has no scheduler/; using the shipped %s scheduler config", where, info.version)
        scheduler_config = _shipped_scheduler(info.version, where)
    tokenizer_dirs = [folder / "tokenizer", *([config_dir / "tokenizer"] if config_dir else [])]
    return _Plan(
        version=info.version,
        scheduler_config=scheduler_config,
        # diffusers' own default when a scheduler config names no prediction type.
        default_prediction="epsilon",
        tokenizer_dirs=tokenizer_dirs,
        load=lambda dtype: load_folder_models(folder, info, dtype, where),
        configs=folder,
    )


def _plan_single_file(path: Path, where: str, *, allow_pickle: bool, config_dir: Path | None) -> _Plan:
    state: dict[str, torch.Tensor] | None = None
    if is_pickle_path(path):
        if not allow_pickle:
            raise ModelLoadError(
                f"{where} is a pickle-based checkpoint ({path.suffix}); pickle files can run code when loaded",
                PICKLE_HINT,
            )
        # Pickles have no header to peek at: the whole file is read to see what it is.
        state = normalize_keys(read_pickle_checkpoint(path, where))
        info = probe_checkpoint({k: tuple(v.shape) for k, v in state.items()}, where)
    else:
        info = probe_checkpoint(normalize_keys(read_safetensors_shapes(path, where)), where)

    if config_dir is not None:
        check_model_config_dir(config_dir)
        configs, config_where = config_dir, f"`model_config_dir` {str(config_dir)!r}"
    else:
        configs = SHIPPED_CONFIGS / info.version
        config_where = f"the shipped {'SD 1.5' if info.version == 'sd1' else 'SD 2.1'} configs"
    unet_config = read_json_object(configs / "unet" / "config.json", config_where)
    text_config = read_json_object(configs / "text_encoder" / "config.json", config_where)
    check_config_fits(info, unet_config, text_config, where, config_where)
    scheduler_path = configs / "scheduler" / "scheduler_config.json"
    if scheduler_path.is_file():
        scheduler_config = read_json_object(scheduler_path, config_where)
    else:
        scheduler_config = _shipped_scheduler(info.version, where)

    def load(dtype: torch.dtype) -> _Modules:
        tensors = state if state is not None else normalize_keys(read_safetensors(path, where))
        log.info("%s: %s checkpoint, converting with %s", where, info.version, config_where)
        return convert_components(tensors, configs, dtype, where)

    return _Plan(
        version=info.version,
        scheduler_config=scheduler_config,
        default_prediction="v_prediction" if info.version == "sd2" else "epsilon",
        tokenizer_dirs=[config_dir / "tokenizer"] if config_dir else [],
        load=load,
        configs=configs,
    )


def check_model_config_dir(config_dir: Path, components: tuple[str, ...] = COMPONENTS) -> None:
    """Refuse a ``model_config_dir`` that is not a folder or lacks a config of ``components``."""
    where = f"`model_config_dir` {str(config_dir)!r}"
    if not config_dir.is_dir():
        raise ModelLoadError(
            f"{where} is not a folder", "Set it to a diffusers-layout folder with the model's configs."
        )
    missing = [f"{c}/config.json" for c in components if not (config_dir / c / "config.json").is_file()]
    if missing:
        configs = ", ".join(f"{c}/config.json" for c in components)
        raise ModelLoadError(
            f"{where} lacks {', '.join(missing)}",
            f"It must be a diffusers-layout folder: model_index.json, {configs}, "
            "scheduler/scheduler_config.json (and optionally tokenizer/).",
        )
