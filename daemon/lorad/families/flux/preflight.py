"""FLUX.1's ``lorad config --check``: images present, every model file found and what its key says,
tokenizers found, and target names matching layers, from headers and configs (no weights read)."""

from __future__ import annotations

from lorad.config.preflight import model_problem
from lorad.errors import ConfigError, ConfigProblem, ModelLoadError
from lorad.families.flux.config import FluxTrainConfig, flux_sources
from lorad.families.sd.preflight import image_problems


def flux_preflight(config: FluxTrainConfig) -> list[ConfigProblem]:
    """What a run of ``config`` would hit in its first seconds, read from the files without loading weights."""
    import torch
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorad.families.flux.targets import transformer_target_paths
    from lorad.lora.targets import TEXT_ENCODER_SUGGESTIONS, resolve_targets

    problems = image_problems(config)
    try:
        sources = flux_sources(config)
    except ModelLoadError as err:
        return [*problems, model_problem(err)]
    with torch.device("meta"):  # shapes only: resolving names needs the modules, not their weights
        transformer = FluxTransformer2DModel.from_config(sources.transformer.config)
        clip = CLIPTextModel(CLIPTextConfig(**sources.clip_l.config)) if config.train_text_encoder else None
    try:
        transformer_target_paths(transformer, config.transformer_target_modules, key="transformer_target_modules")
        if clip is not None:
            resolve_targets(
                clip,
                config.text_encoder_target_modules,
                key="text_encoder_target_modules",
                suggestions=TEXT_ENCODER_SUGGESTIONS,
            )
    except ConfigError as err:
        problems += err.problems
    return problems
