"""The LLM's ``lorad config --check``: records readable, the model present, target names matching layers."""

from __future__ import annotations

from lorad.config.llm_schema import LlmTrainConfig
from lorad.config.preflight import model_problem
from lorad.errors import ConfigError, ConfigProblem, DataError, ModelLoadError


def llm_preflight(config: LlmTrainConfig) -> list[ConfigProblem]:
    """What a run of ``config`` would hit in its first seconds, read from the files without loading weights."""
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
        return [*problems, model_problem(err)]
    if not config.init_adapter:
        from lorad.families.llm.adapter import build_lora_config

        try:
            build_lora_config(config, model)
        except ConfigError as err:
            problems += err.problems
    return problems
