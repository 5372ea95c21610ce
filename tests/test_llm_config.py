"""The LLM config: task detection, every problem at once, the annotated example, QLoRA's clear error."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorad.config import TrainConfig
from lorad.config.dispatch import parse_any_config, parse_any_config_text
from lorad.config.llm_example import render_llm_example
from lorad.config.llm_schema import LlmTrainConfig
from lorad.errors import ConfigError
from tests.support.datasets import tiny_llm_values, write_jsonl


@pytest.fixture
def records(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "r.jsonl", [{"instruction": "q", "output": "a"}])


def test_the_task_is_detected_from_the_base_models_config(tiny_llm: Path, records: Path, tmp_path: Path) -> None:
    config = parse_any_config(
        {"train_data": records, "base_model": str(tiny_llm), "output_dir": "out"}, base_dir=tmp_path
    )
    assert isinstance(config, LlmTrainConfig) and config.output_dir == tmp_path / "out"
    assert config.target_module_names[:4] == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert config.effective_lora_alpha == 16.0


def test_task_llm_is_explicit_and_sd_configs_still_parse(tmp_path: Path, records: Path) -> None:
    hub_id = parse_any_config(
        {"task": "llm", "train_data": records, "base_model": "org/model", "output_dir": "o"}, base_dir=tmp_path
    )
    assert isinstance(hub_id, LlmTrainConfig) and hub_id.base_model == "org/model"
    (tmp_path / "imgs").mkdir()
    sd = parse_any_config(
        {"task": "sd", "train_data_dir": "imgs", "base_model": "m.safetensors", "output_dir": "o"}, base_dir=tmp_path
    )
    assert isinstance(sd, TrainConfig)
    with pytest.raises(ConfigError, match="`task`: got 'gpt'"):
        parse_any_config({"task": "gpt"}, base_dir=tmp_path)


def test_every_problem_is_reported_at_once(tiny_llm: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_any_config_text(
            yaml.safe_dump(
                {
                    "task": "llm",
                    "train_data": "missing.jsonl",
                    "base_model": str(tiny_llm),
                    "output_dir": "o",
                    "lora_rank": 0,
                    "data_format": "alpacca",
                    "chat_template": "vicuna",
                    "columns": {"question": "q"},
                    "train_data_dir": "x",
                    "target_modules": ["every-linear"],
                    "max_seq_len": "long",
                }
            ),
            base_dir=tmp_path,
        )
    text = str(err.value)
    for expected in (
        "`train_data`: ",
        "missing.jsonl does not exist",
        "`lora_rank`: got 0",
        "did you mean `alpaca`?",
        "`chat_template`: got 'vicuna'",
        "unknown field 'question'",
        "an LLM config calls it `train_data`",
        "unknown preset 'every-linear'",
        "`max_seq_len`: got 'long'",
    ):
        assert expected in text
    assert len(err.value.problems) == 8


def test_qlora_without_bitsandbytes_is_a_clear_config_error(tiny_llm: Path, records: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ConfigError, match=r"`load_in_4bit`: needs the bitsandbytes package[\s\S]*CUDA"):
        parse_any_config(tiny_llm_values(tiny_llm, records, tmp_path / "o", load_in_4bit=True), base_dir=tmp_path)


def test_the_annotated_example_parses_once_its_paths_exist(tiny_llm: Path, tmp_path: Path) -> None:
    text = render_llm_example()
    assert "# lora_dropout: 0.05" in text and 'model_family: "llm"' in text and "sample_prompts:" in text
    raw = yaml.safe_load(text)
    write_jsonl(tmp_path / "data" / "record_summaries.jsonl", [{"text": "x"}])
    raw["base_model"] = str(tiny_llm)
    config = parse_any_config(raw, base_dir=tmp_path)
    assert isinstance(config, LlmTrainConfig) and config.lora_rank == 16 and config.gradient_checkpointing


def test_cli_prints_the_llm_example() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "lorad.cli", "config", "--example", "llm"], capture_output=True, text=True, check=True
    ).stdout
    assert out == render_llm_example()
