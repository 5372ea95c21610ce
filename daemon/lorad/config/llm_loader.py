"""A mapping of config keys → a validated :class:`LlmTrainConfig`, with every problem at once.

Uses the SD loader's value converters (the YAML spellings of numbers, booleans, paths and lists
are the same for both tasks) and adds the checks only an LLM config has.
"""

from __future__ import annotations

import importlib.util
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lorad.config.limits import shown
from lorad.config.llm_schema import LLM_REQUIRED_KEYS, TARGET_PRESETS, TEMPLATE_NAMES, LlmTrainConfig
from lorad.config.loader import (
    _convert,
    _Invalid,
    _resolve_base_model,
    _show,
    _unknown_key_problem,
    parse_family_config,
    run_checks,
    sampling_checks,
)
from lorad.config.option_checks import optimizer_checks
from lorad.config.pickle_policy import pickle_problem
from lorad.errors import ConfigProblem

_HINTS = typing.get_type_hints(LlmTrainConfig)
_PAIR_KEYS = ("columns", "roles")
_COLUMN_NAMES = (
    "instruction",
    "input",
    "output",
    "system",
    "messages",
    "role",
    "content",
    "conversations",
    "from",
    "value",
    "text",
)
# SD keys a user may carry over, with the LLM key that means the same.
_SD_KEYS = {
    "train_data_dir": "train_data",
    "unet_target_modules": "target_modules",
    "init_lora": "init_adapter",
    "metadata_path": "train_data",
    "resolution": "max_seq_len",
}


def _to_pairs(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping) or not all(isinstance(v, str) and v for v in value.values()):
        raise _Invalid(f"got {_show(value)}", f"write a mapping such as {name}: {{instruction: question}}")
    pairs = tuple((str(k), v) for k, v in value.items())
    if name == "columns":
        unknown = [k for k, _ in pairs if k not in _COLUMN_NAMES]
        if unknown:
            raise _Invalid(f"unknown field {shown(unknown[0])}", "map one of: " + ", ".join(_COLUMN_NAMES))
    else:
        wrong = [v for _, v in pairs if v not in ("system", "user", "assistant")]
        if wrong:
            raise _Invalid(f"role {shown(wrong[0])}", "map each speaker to system, user or assistant")
    return pairs


def _convert_llm(name: str, value: Any, base_dir: Path) -> Any:
    if name in _PAIR_KEYS:
        return _to_pairs(name, value)
    if name == "sample_prompts":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise _Invalid(f"got {_show(value)}", 'write a list of prompts, e.g. ["What does COPD stand for?"]')
        return tuple(value)
    return _convert(name, value, base_dir, _HINTS)


def _llm_cross_checks(values: dict[str, Any]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for key in ("train_data", "eval_data"):
        path = values.get(key)
        if isinstance(path, Path) and not path.exists():
            problems.append(
                ConfigProblem(key, f"{path} does not exist", "point it at a .jsonl/.json/.csv file or a folder of them")
            )
    for key in ("init_adapter", "tokenizer_path"):
        path = values.get(key)
        if isinstance(path, Path) and not path.is_dir():
            problems.append(ConfigProblem(key, f"{path} is not a folder", "fix the path, or remove the key"))
    adapter = values.get("init_adapter")
    if isinstance(adapter, Path) and adapter.is_dir() and not (adapter / "adapter_config.json").is_file():
        problems.append(
            ConfigProblem(
                "init_adapter",
                f"{adapter} has no adapter_config.json",
                "name a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)",
            )
        )
    problems += run_checks(values)
    base = values.get("base_model")
    if isinstance(base, str) and (problem := pickle_problem("base_model", base, values.get("allow_pickle", False))):
        problems.append(problem)
    template = values.get("chat_template")
    if isinstance(template, str) and template not in TEMPLATE_NAMES and "{{" not in template:
        problems.append(
            ConfigProblem(
                "chat_template",
                f"got {shown(template)}",
                "use tokenizer, chatml, llama2, alpaca, or Jinja template text",
            )
        )
    targets = values.get("target_modules", ())
    unknown_presets = [t for t in targets if "-" in t and t not in TARGET_PRESETS]
    if unknown_presets:
        problems.append(
            ConfigProblem(
                "target_modules",
                f"unknown preset {shown(unknown_presets[0])}",
                "use layer names, or a preset: " + ", ".join(TARGET_PRESETS),
            )
        )
    if values.get("eval_data") is not None and values.get("eval_fraction"):
        problems.append(
            ConfigProblem(
                "eval_fraction",
                "is set together with eval_data",
                "use one: eval_data (a file) or eval_fraction (held out of train_data)",
            )
        )
    problems += optimizer_checks(values)
    for key in [k for k in ("load_in_4bit",) if values.get(k)]:
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append(
                ConfigProblem(
                    key,
                    "needs the bitsandbytes package, which is not installed",
                    "run `pip install bitsandbytes` on a machine with a CUDA GPU, or turn it off (QLoRA is CUDA-only)",
                )
            )
    if values.get("load_in_4bit") and values.get("merge_export"):
        problems.append(
            ConfigProblem(
                "merge_export",
                "cannot merge into a 4-bit base",
                "train without load_in_4bit to export a merged model, or merge later into the full-precision base",
            )
        )
    return problems


def _sd_key_or_unknown(key: str, known: list[str]) -> ConfigProblem:
    if key in _SD_KEYS:
        return ConfigProblem(key, "is a Stable Diffusion key", f"an LLM config calls it `{_SD_KEYS[key]}`; rename it")
    return _unknown_key_problem(key, known)


def _resolve_llm_base_model(base_dir: Path) -> Callable[[dict[str, Any]], list[ConfigProblem]]:
    def resolve(values: dict[str, Any]) -> list[ConfigProblem]:
        if values.get("base_model"):  # resolved before the checks look at the disk
            values["base_model"] = _resolve_base_model(values["base_model"], base_dir)
        return []

    return resolve


def parse_llm_config(raw: Mapping[str, Any], *, base_dir: Path, source: str = "config") -> LlmTrainConfig:
    """Validate a mapping of LLM config keys into a :class:`LlmTrainConfig`.

    Relative paths resolve against ``base_dir``. Raises :class:`ConfigError` listing every problem.
    """
    return parse_family_config(
        raw,
        config_class=LlmTrainConfig,
        family="llm",
        base_dir=base_dir,
        source=source,
        required=LLM_REQUIRED_KEYS,
        default_name="adapter",
        convert=_convert_llm,
        checks=[_resolve_llm_base_model(base_dir), _llm_cross_checks, sampling_checks],
        unknown=_sd_key_or_unknown,
        # chat_template may be Jinja text as well as one of the named templates.
        free_choice=("chat_template",),
    )
