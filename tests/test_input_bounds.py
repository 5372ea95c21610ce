"""Every config value is bounded at the boundary: numbers are finite and within a real run's range,
YAML cannot expand past a fixed size, and errors stay small enough to arrive."""

from __future__ import annotations

import math
import typing
from dataclasses import fields
from pathlib import Path

import pytest

from lorad.config.limits import MAX_SHOWN_CHARS, path_problem, shown
from lorad.config.llm_loader import parse_llm_config
from lorad.config.llm_schema import LlmTrainConfig
from lorad.config.loader import parse_config, parse_config_text
from lorad.config.schema import TrainConfig
from lorad.config.yaml_text import MAX_ALIAS_VALUES, load_yaml_text
from lorad.errors import MAX_LISTED_PROBLEMS, ConfigError, ConfigProblem
from lorad.server.status_codes import MAX_MESSAGE_WIRE_BYTES, fit_trailer
from lorad.watching.records import watch_policy
from tests.support.datasets import make_dataset


def _numeric_keys(config_class: type) -> dict[str, type]:
    hints = typing.get_type_hints(config_class)
    found = {}
    for f in fields(config_class):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if inner[0] in (int, float):
            found[f.name] = inner[0]
    return found


@pytest.mark.parametrize("config_class", [TrainConfig, LlmTrainConfig])
def test_every_numeric_key_has_a_lower_and_an_upper_bound(config_class: type) -> None:
    specs = {f.name: f.metadata for f in fields(config_class)}
    unbounded = [
        name for name in _numeric_keys(config_class) if None in (specs[name]["minimum"], specs[name]["maximum"])
    ]
    assert unbounded == []


def _base(tmp_path: Path, task: str) -> dict[str, object]:
    if task == "sd":
        data = make_dataset(tmp_path / "data", count=1)
        return {"train_data_dir": str(data), "base_model": str(tmp_path / "m.safetensors"), "output_dir": str(tmp_path)}
    records = tmp_path / "r.jsonl"
    records.write_text('{"text": "hi"}\n')
    return {"train_data": str(records), "base_model": str(tmp_path), "output_dir": str(tmp_path / "o")}


@pytest.mark.parametrize(
    ("task", "config_class", "parse"),
    [("sd", TrainConfig, parse_config), ("llm", LlmTrainConfig, parse_llm_config)],
)
def test_nan_inf_and_overflow_are_refused_for_every_numeric_key(task, config_class, parse, tmp_path: Path) -> None:
    base = _base(tmp_path, task)
    specs = {f.name: f.metadata for f in fields(config_class)}
    for name in _numeric_keys(config_class):
        maximum = specs[name]["maximum"]
        bad = [math.nan, math.inf, -math.inf, ".nan", "1e400", maximum * 10 + 1, 2**63, 10**400]
        for value in bad:
            with pytest.raises(ConfigError) as err:
                parse(base | {name: value}, base_dir=tmp_path)
            assert [p.key for p in err.value.problems] == [name], (name, value)
            assert len(str(err.value)) < 1000


def test_a_billion_laughs_is_refused_and_honest_anchors_still_work() -> None:
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    with pytest.raises(ConfigError, match="aliases that expand"):
        load_yaml_text("\n".join(levels) + "\nbatch_size: *i\n", source="bomb.yaml")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_yaml_text("a: &a [1, *a]\n", source="loop.yaml")
    fan_out = (
        "a: &a [" + ",".join(["1"] * 100) + "]\n" + "".join(f"k{i}: *a\n" for i in range(MAX_ALIAS_VALUES // 100 + 5))
    )
    with pytest.raises(ConfigError, match="aliases"):
        load_yaml_text(fan_out, source="wide.yaml")
    shared = "defaults: &d {lora_rank: 4, epochs: 2}\nrun: *d\n"
    assert load_yaml_text(shared, source="ok.yaml") == {
        "defaults": {"lora_rank": 4, "epochs": 2},
        "run": {"lora_rank": 4, "epochs": 2},
    }
    with pytest.raises(ConfigError, match="256 KB"):
        load_yaml_text("a: 1\n" + "#" * 300_000, source="big.yaml")


def test_a_file_that_is_not_a_config_is_not_echoed(tmp_path: Path) -> None:
    shadow = "root:$6$saltsalt$SECRETHASH:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    with pytest.raises(ConfigError) as err:
        parse_config_text(shadow, base_dir=tmp_path)
    assert "SECRETHASH" not in str(err.value) and "not a config key name (not shown)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_config_text("SECRETTOKEN_abcdef\n", base_dir=tmp_path)
    assert "SECRETTOKEN" not in str(err.value) and "got text" in str(err.value)
    # A real config's misspelled key is still named, with its suggestion.
    with pytest.raises(ConfigError, match=r"network_dim.*lora_rank"):
        parse_config_text("network_dim: 8\n", base_dir=tmp_path)


def test_errors_stay_small_enough_to_arrive() -> None:
    problems = [ConfigProblem(f"key{i}", "x" * 10_000, "fix") for i in range(500)]
    text = str(ConfigError(problems, "big.yaml"))
    assert text.count("\n  - ") == MAX_LISTED_PROBLEMS and "… and 480 more" in text
    assert len(text) < 10_000
    assert shown("y" * 1_000_000).endswith("'") and len(shown("y" * 1_000_000)) <= MAX_SHOWN_CHARS + 10
    nested: list = []
    for _ in range(50):
        nested = [nested] * 9
    assert len(shown(nested)) < 200  # aliased structure: repr would be astronomically long
    wire = fit_trailer("é\n" * 10_000)
    assert wire.endswith("…") and sum(3 * len(c.encode()) for c in wire) <= MAX_MESSAGE_WIRE_BYTES + 6


def test_paths_that_cannot_exist_are_named_not_used() -> None:
    assert path_problem("p", "/tmp/a\0b").message == "contains a NUL character"
    assert "4096" in path_problem("p", "/" + "a/" * 3000).message
    assert "255" in path_problem("p", "/tmp/" + "a" * 300).message
    assert path_problem("p", "/tmp/fine/path.png") is None


def test_watch_policy_numbers_are_finite_and_bounded() -> None:
    for bad in ({"quiet_seconds": math.nan}, {"quiet_seconds": math.inf}, {"min_new_images": 10**9}):
        with pytest.raises(ConfigError) as err:
            watch_policy(**bad)
        assert [p.key for p in err.value.problems] == list(bad)
    assert watch_policy(quiet_seconds=2.5).quiet_seconds == 2.5
