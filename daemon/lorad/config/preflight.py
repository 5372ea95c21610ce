"""``lorad config --check`` beyond the config itself: what would fail in a run's first seconds, found
cheaply — the base model exists and is a model, the data folder holds something to train on, and
every target layer name matches a layer.

The model is never loaded: its configs and file headers are read, and its modules are built on
PyTorch's ``meta`` device (shapes only, no memory, no weights), where the target names are resolved
exactly as a run resolves them.
"""

from __future__ import annotations

from pathlib import Path

from lorad.config.llm_schema import LlmTrainConfig
from lorad.config.schema import TrainConfig
from lorad.errors import ConfigError, ConfigProblem, DataError, LoradError, ModelLoadError


def preflight_problems(config: TrainConfig | LlmTrainConfig) -> list[ConfigProblem]:
    """Every problem a run of ``config`` would hit before its first step that reading the files can show."""
    if isinstance(config, LlmTrainConfig):
        return _llm_problems(config)
    return _sd_problems(config)


def _model_problem(err: LoradError) -> ConfigProblem:
    # Loader messages start with "`base_model` 'x'" already; the problem's key says it.
    message = str(err).removeprefix("`base_model`").strip().removeprefix(":").strip()
    return ConfigProblem("base_model", message, err.hint)


def _sd_problems(config: TrainConfig) -> list[ConfigProblem]:
    from lorad.data.dataset import IMAGE_EXTENSIONS, find_image_files

    problems: list[ConfigProblem] = []
    images = [p for p in find_image_files(config.train_data_dir) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        kinds = ", ".join(sorted(IMAGE_EXTENSIONS))
        problems.append(
            ConfigProblem(
                "train_data_dir",
                f"{config.train_data_dir} holds no images ({kinds}), in it or its subfolders",
                "put your training images in it, or point train_data_dir at the folder that has them",
            )
        )
    if config.allow_pickle and Path(config.base_model).suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        return problems  # a pickle has no header: checking it means reading it all, which is not cheap
    try:
        from lorad.models.sd_preflight import sd_modules_on_meta

        unet, text_encoder = sd_modules_on_meta(
            config.base_model, allow_pickle=config.allow_pickle, model_config_dir=config.model_config_dir
        )
    except ModelLoadError as err:
        return [*problems, _model_problem(err)]
    from lorad.lora.targets import TEXT_ENCODER_SUGGESTIONS, UNET_ALIASES, UNET_SUGGESTIONS, resolve_targets

    checks = [(unet, config.unet_target_modules, "unet_target_modules", UNET_ALIASES, UNET_SUGGESTIONS)]
    if config.train_text_encoder:
        te_names = config.text_encoder_target_modules
        checks.append((text_encoder, te_names, "text_encoder_target_modules", None, TEXT_ENCODER_SUGGESTIONS))
    for model, names, key, aliases, suggestions in checks:
        try:
            resolve_targets(model, names, key=key, aliases=aliases, suggestions=suggestions)
        except ConfigError as err:
            problems += err.problems
    return problems


def _llm_problems(config: LlmTrainConfig) -> list[ConfigProblem]:
    from lorad.textdata.dataset import read_samples

    problems: list[ConfigProblem] = []
    options = {"data_format": config.data_format, "columns": dict(config.columns), "roles": dict(config.roles)}
    try:
        read_samples(config.train_data, **options)
    except DataError as err:
        problems.append(ConfigProblem("train_data", str(err).removeprefix("`train_data`:").strip(), err.hint))
    try:
        from lorad.models.llm_preflight import llm_on_meta

        model = llm_on_meta(config.base_model)
    except ModelLoadError as err:
        return [*problems, _model_problem(err)]
    if not config.init_adapter:
        from lorad.engines.llm.adapter import build_lora_config

        try:
            build_lora_config(config, model)
        except ConfigError as err:
            problems += err.problems
    return problems
