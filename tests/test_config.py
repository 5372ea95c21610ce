"""Config validation as a user meets it: the README's config works, every mistake is named at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorad.config import load_config, parse_config, parse_config_text, render_example
from lorad.errors import ConfigError
from tests.conftest import SEED_YAML as SEED_TEMPLATE

SEED_YAML = SEED_TEMPLATE.format(base_model="./models/Stable-diffusion/v1-5-pruned.safetensors")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    data = tmp_path / "data" / "style_train"
    data.mkdir(parents=True)
    (data / "metadata.csv").write_text("file,caption\n")
    return tmp_path


def problems_of(err: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return {p.key: p.render() for p in err.value.problems}


def test_seed_config_parses_verbatim(project: Path) -> None:
    config = parse_config_text(SEED_YAML, base_dir=project)
    assert config.learning_rate == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as text
    assert config.unet_target_modules == ("q_proj", "v_proj")
    assert config.train_data_dir == project / "data" / "style_train"
    assert config.base_model == str(project / "models/Stable-diffusion/v1-5-pruned.safetensors")
    assert config.output_name == "my_style_lora"  # so <lora:my_style_lora:0.8> works
    assert config.effective_lora_alpha == 8.0
    assert config.save_steps == 100


def test_numeric_strings_accepted(project: Path) -> None:
    text = SEED_YAML + 'max_train_steps: "1e3"\nnoise_offset: "5e-2"\n'
    config = parse_config_text(text, base_dir=project)
    assert config.max_train_steps == 1000
    assert config.noise_offset == pytest.approx(0.05)


def test_every_problem_reported_together(project: Path) -> None:
    text = SEED_YAML.replace("lora_rank: 8", "lora_rnak: 8").replace("batch_size: 4", 'batch_size: "four"')
    text += "optimizer: adamx\nnetwork_dim: 16\ncaption_dropout: 1.5\n"
    with pytest.raises(ConfigError) as err:
        parse_config_text(text, base_dir=project, source="my.yaml")
    found = problems_of(err)
    assert "did you mean `lora_rank`" in found["lora_rnak"]
    assert "'four'" in found["batch_size"] and "whole number" in found["batch_size"]
    assert "did you mean `adamw`" in found["optimizer"]
    assert "`lora_rank`" in found["network_dim"]  # kohya's name is taught
    assert "at most 1" in found["caption_dropout"]
    assert str(err.value).startswith("my.yaml: 5 problems")


def test_yaml_syntax_error_names_line(project: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config_text("train_data_dir: [unclosed\nlora_rank: 8\n", base_dir=project)
    assert "YAML syntax error at line" in str(err.value)


def test_missing_required_and_missing_paths(project: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"train_data_dir": "./nope", "metadata_path": "./nope.csv"}, base_dir=project)
    found = problems_of(err)
    assert "does not exist" in found["train_data_dir"]
    assert "does not exist" in found["metadata_path"]
    assert "required" in found["base_model"] and "required" in found["output_dir"]


def test_unwritable_output_dir(project: Path) -> None:
    # A folder under a regular file can never be created, whoever runs the test (root included).
    (project / "afile").write_text("x")
    with pytest.raises(ConfigError) as err:
        parse_config_text(SEED_YAML.replace("./output/my_style_lora", "./afile/out"), base_dir=project)
    assert "cannot be created or written" in problems_of(err)["output_dir"]


def test_output_dir_that_is_a_file(project: Path) -> None:
    (project / "output").write_text("not a folder")
    with pytest.raises(ConfigError) as err:
        parse_config_text(SEED_YAML.replace("./output/my_style_lora", "./output"), base_dir=project)
    assert "is a file" in problems_of(err)["output_dir"]


def test_repeats_forms(project: Path) -> None:
    config = parse_config_text(SEED_YAML + "repeats: {cats: 3, '*': 2}\n", base_dir=project)
    assert config.repeats.for_folder("cats") == 3
    assert config.repeats.for_folder("dogs") == 2
    config = parse_config_text(SEED_YAML + "repeats: 5\n", base_dir=project)
    assert config.repeats.for_folder("anything") == 5


def test_config_is_frozen(project: Path) -> None:
    config = parse_config_text(SEED_YAML, base_dir=project)
    with pytest.raises(AttributeError):
        config.lora_rank = 4  # type: ignore[misc]


def test_example_parses_and_lists_every_key(project: Path, tmp_path: Path) -> None:
    example = render_example()
    path = tmp_path / "example.yaml"
    path.write_text(example)
    config = load_config(path, base_dir=project)
    for key in config.to_dict():
        assert f"{key}:" in example, key


def test_missing_config_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.yaml")
    assert "does not exist" in str(err.value) and "--example" in str(err.value)


def test_hub_id_kept_as_id(project: Path) -> None:
    config = parse_config_text(
        SEED_YAML.replace("./models/Stable-diffusion/v1-5-pruned.safetensors", "runwayml/stable-diffusion-v1-5"),
        base_dir=project,
    )
    assert config.base_model == "runwayml/stable-diffusion-v1-5"
