"""FLUX.1 configs for fast CPU runs on the tiny FLUX models (see lorad.models.tiny_flux)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorad.config.dispatch import parse_any_config
from lorad.families.flux.config import FluxTrainConfig
from lorad.models.tiny_flux import FluxFiles
from tests.support.datasets import tiny_train_values


def flux_values(base: Path, data: Path, out: Path, **overrides: object) -> dict[str, object]:
    """Config keys for a fast CPU run on the tiny FLUX model: the tiny SD run's (64 px images, a few steps)
    without UNet targets, with its caches beside ``out``; paths as strings."""
    values = tiny_train_values(base, data, out, cache_dir=out.parent / "cache")
    del values["unet_target_modules"]  # FLUX names its layers in transformer_target_modules
    values.update(overrides)
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def flux_file_values(
    files: FluxFiles, tiny: dict[str, Path], data: Path, out: Path, **overrides: object
) -> dict[str, object]:
    """Config keys for the tiny dev model kept as ComfyUI users keep FLUX: one transformer file and separate
    ``clip_l``/``t5xxl``/``ae`` files, with the diffusers folder for configs and tokenizers."""
    return flux_values(
        files.transformer,
        data,
        out,
        clip_l=files.clip_l,
        t5xxl=files.t5xxl,
        ae=files.ae,
        model_config_dir=tiny["dev"],
        **overrides,
    )


def parse_flux(values: dict, tmp_path: Path) -> FluxTrainConfig:
    """``values`` parsed as a config found in ``tmp_path``, which must come out a FLUX config."""
    config = parse_any_config(values, base_dir=tmp_path)
    assert isinstance(config, FluxTrainConfig) and config.model_family == "flux"
    return config


def flux_transformer_inputs(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A batch of 2 for :func:`lorad.models.tiny_flux.tiny_flux_transformer` (16 image and 8 text tokens, dev's
    guidance), the same every call; floating inputs in ``dtype``, position ids in fp32 as FLUX takes them."""
    generator = torch.Generator().manual_seed(2)
    floats = {
        "hidden_states": torch.randn(2, 16, 64, generator=generator),
        "encoder_hidden_states": torch.randn(2, 8, 32, generator=generator),
        "pooled_projections": torch.randn(2, 32, generator=generator),
        "timestep": torch.tensor([0.3, 0.7]),
        "guidance": torch.tensor([1.0, 1.0]),
    }
    return {**{k: v.to(dtype) for k, v in floats.items()}, "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(8, 3)}
