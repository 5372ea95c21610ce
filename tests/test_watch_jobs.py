"""What job a watch asks for: the template read again, with the folder, version and mode applied."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from lorad.errors import ConfigError
from lorad.watching.manager import job_fields, publish, watch_name
from lorad.watching.records import RETRAIN, WatchPolicy, WatchRecord, watch_policy


def record(tmp_path: Path, template: dict[str, object], **changes: object) -> WatchRecord:
    config = tmp_path / "template.yaml"
    config.write_text(yaml.safe_dump(template))
    base = WatchRecord(
        watch_id="w1",
        folder=str(tmp_path / "pics"),
        config_path=str(config),
        base_dir=str(tmp_path / "cwd"),
        policy=WatchPolicy(),
        created_at=0.0,
        updated_at=0.0,
    )
    return replace(base, **changes)


TEMPLATE = {
    "train_data_dir": "./elsewhere",
    "metadata_path": "./elsewhere/metadata.csv",
    "base_model": "m",
    "output_dir": "./output/mystyle",
    "resume_from": "latest",
    "epochs": 5,
}


def test_the_first_job_trains_the_folder_into_its_own_version(tmp_path: Path) -> None:
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "metadata.csv").write_text("file,caption\n")
    fields = job_fields(record(tmp_path, TEMPLATE), version=1)
    assert fields["train_data_dir"] == str(tmp_path / "pics")
    assert fields["metadata_path"] == str(tmp_path / "pics" / "metadata.csv")  # the folder's own captions
    assert fields["output_dir"] == str(tmp_path / "cwd" / "output" / "mystyle" / "mystyle_v1")
    assert fields["output_name"] == "mystyle_v1"
    assert "resume_from" not in fields and "init_lora" not in fields and fields["epochs"] == 5


def test_a_csv_template_reads_the_sidecars_of_a_folder_without_a_csv(tmp_path: Path) -> None:
    """A template written for a metadata.csv (the README's example, `lorad demo`'s config) watching a
    folder of images with `.txt` sidecars: the job reads the sidecars, unless a captioner will write
    the folder's CSV."""
    assert "metadata_path" not in job_fields(record(tmp_path, TEMPLATE), version=1)
    captioned = job_fields(record(tmp_path, {**TEMPLATE, "captioner": "blip"}), version=1)
    assert captioned["metadata_path"] == str(tmp_path / "pics" / "metadata.csv")


def test_continue_starts_from_the_newest_lora_with_its_own_steps(tmp_path: Path) -> None:
    latest = tmp_path / "mystyle_v2.safetensors"
    latest.write_bytes(b"lora")
    watch = record(tmp_path, TEMPLATE, version=2, latest_output=str(latest), policy=watch_policy(continue_steps=40))
    fields = job_fields(watch, version=3)
    assert fields["init_lora"] == str(latest) and fields["max_train_steps"] == 40
    assert fields["output_name"] == "mystyle_v3"
    # The config's own budget when continue_steps is 0; from scratch in retrain mode.
    assert "max_train_steps" not in job_fields(replace(watch, policy=watch_policy()), version=3)
    retrain = job_fields(replace(watch, policy=watch_policy(mode=RETRAIN)), version=3)
    assert "init_lora" not in retrain and "max_train_steps" not in retrain


def test_the_name_comes_from_output_name_then_output_dir_then_the_folder(tmp_path: Path) -> None:
    assert watch_name(record(tmp_path, {**TEMPLATE, "output_name": "Named"})) == "Named"
    assert watch_name(record(tmp_path, TEMPLATE)) == "mystyle"
    assert watch_name(record(tmp_path, {"base_model": "m"})) == "pics"


def test_an_unreadable_template_names_config_path(tmp_path: Path) -> None:
    watch = record(tmp_path, TEMPLATE)
    Path(watch.config_path).write_text("a: [")
    with pytest.raises(ConfigError, match="config_path"):
        job_fields(watch, version=1)
    Path(watch.config_path).unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        job_fields(watch, version=1)


def test_publish_replaces_the_stable_name_atomically(tmp_path: Path) -> None:
    out = tmp_path / "mystyle_v3.safetensors"
    out.write_bytes(b"v3")
    target_dir = tmp_path / "webui" / "models" / "Lora"
    watch = record(tmp_path, TEMPLATE, policy=watch_policy(publish_dir=str(target_dir)))
    (target_dir).mkdir(parents=True)
    (target_dir / "mystyle.safetensors").write_bytes(b"v2")
    assert publish(str(out), watch) == str(target_dir / "mystyle.safetensors")
    assert (target_dir / "mystyle.safetensors").read_bytes() == b"v3"
    assert sorted(p.name for p in target_dir.iterdir()) == ["mystyle.safetensors"]  # no temporary left
    assert publish(str(out), record(tmp_path, TEMPLATE)) == ""  # no publish_dir


def test_policy_defaults_and_problems() -> None:
    policy = watch_policy()
    assert (policy.quiet_seconds, policy.min_new_images, policy.mode) == (10.0, 1, "continue")
    with pytest.raises(ConfigError) as err:
        watch_policy(quiet_seconds=-1, min_new_images=-1, mode="often", continue_steps=-1)
    assert [p.key for p in err.value.problems] == ["quiet_seconds", "min_new_images", "mode", "continue_steps"]
