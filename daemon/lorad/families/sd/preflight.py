"""SD 1.x/2.x's ``lorad config --check``: images present, the model readable, target names matching layers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lorad.config.preflight import model_problem
from lorad.config.schema import TrainConfig
from lorad.errors import ConfigError, ConfigProblem, ModelLoadError

if TYPE_CHECKING:
    from torch import nn


def sd_preflight(config: TrainConfig) -> list[ConfigProblem]:
    """What a run of ``config`` would hit in its first seconds, read from the files without loading weights."""

    def on_meta() -> tuple[nn.Module, list[nn.Module]]:
        from lorad.models.sd_preflight import sd_modules_on_meta

        unet, text_encoder = sd_modules_on_meta(
            config.base_model, allow_pickle=config.allow_pickle, model_config_dir=config.model_config_dir
        )
        return unet, [text_encoder]

    return image_preflight(config, on_meta)


def image_problems(config: TrainConfig) -> list[ConfigProblem]:
    """The problem of a ``train_data_dir`` without images: every image family's first check (SD, SDXL
    through :func:`image_preflight`; FLUX, whose model files and target keys differ, directly)."""
    from lorad.data.dataset import IMAGE_EXTENSIONS, find_image_files

    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in find_image_files(config.train_data_dir)):
        return []
    kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
    return [
        ConfigProblem(
            "train_data_dir",
            f"{config.train_data_dir} holds no images ({kinds}), in it or its subfolders",
            "put your training images in it, or point train_data_dir at the folder that has them",
        )
    ]


def image_preflight(
    config: TrainConfig, modules_on_meta: Callable[[], tuple[nn.Module, list[nn.Module]]]
) -> list[ConfigProblem]:
    """A UNet image family's ``config --check``: images present (:func:`image_problems`), the model
    readable (``modules_on_meta()`` builds its UNet and text encoders on the meta device, raising
    ModelLoadError as loading would), and every target name matching a layer."""
    problems = image_problems(config)
    if config.allow_pickle and Path(config.base_model).suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        return problems  # a pickle has no header: checking it means reading it all, which is not cheap
    try:
        unet, text_encoders = modules_on_meta()
    except ModelLoadError as err:
        return [*problems, model_problem(err)]
    from lorad.lora.targets import TEXT_ENCODER_SUGGESTIONS, UNET_ALIASES, UNET_SUGGESTIONS, resolve_targets

    checks = [(unet, config.unet_target_modules, "unet_target_modules", UNET_ALIASES, UNET_SUGGESTIONS)]
    if config.train_text_encoder:
        te_names = config.text_encoder_target_modules
        checks += [
            (te, te_names, "text_encoder_target_modules", None, TEXT_ENCODER_SUGGESTIONS) for te in text_encoders
        ]
    for model, names, key, aliases, suggestions in checks:
        try:
            resolve_targets(model, names, key=key, aliases=aliases, suggestions=suggestions)
        except ConfigError as err:
            problems += err.problems
    return problems
