"""`lorad config --check` says OK only for a config that can start training: the base model, the data
folder and the target layers are checked (cheaply: configs and headers, never the weights), and
bucket settings are checked together with the resolution."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.datasets import make_dataset, tiny_llm_values, tiny_train_values, write_config, write_jsonl


def check(capsys: pytest.CaptureFixture[str], config: Path) -> tuple[int, str]:
    code, out, err = run_cli(capsys, "config", "--check", str(config))
    return code, out + err


def test_a_good_config_is_ok_without_reading_the_weights(
    tmp_path: Path, tiny_sd: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd, model)
    for weights in model.rglob("*.safetensors"):
        weights.write_bytes(b"the weights are never read by the check")
    cfg = write_config(
        tmp_path / "c.yaml", **tiny_train_values(model, dataset, tmp_path / "out", train_text_encoder=True)
    )
    code, text = check(capsys, cfg)
    assert code == 0 and "OK" in text, text


@pytest.mark.parametrize("case", ["missing", "text file", "hub id not cached"])
def test_a_base_model_that_is_not_there_or_not_a_model_is_named(
    tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    if case == "missing":
        base = tmp_path / "models" / "v1-5-pruned.safetensors"
    elif case == "text file":
        base = tmp_path / "models" / "v1-5-pruned.safetensors"
        base.parent.mkdir()
        base.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265146304\n")
    else:
        base = "some-org/not-in-the-cache"
    cfg = write_config(tmp_path / "c.yaml", **tiny_train_values(base, dataset, tmp_path / "out"))  # type: ignore[arg-type]
    code, text = check(capsys, cfg)
    assert code == 2 and "`base_model`" in text and "OK" not in text, text
    assert "Traceback" not in text


def test_an_empty_data_folder_is_named(tmp_path: Path, tiny_sd: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "data" / "nothing_yet"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("images go here")
    values = tiny_train_values(tiny_sd, empty, tmp_path / "out")
    values.pop("metadata_path")
    code, text = check(capsys, write_config(tmp_path / "c.yaml", **values))
    assert code == 2 and "`train_data_dir`" in text and "holds no images" in text, text


def test_a_target_module_that_matches_nothing_is_named(
    tmp_path: Path, tiny_sd: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml",
        **tiny_train_values(
            tiny_sd,
            dataset,
            tmp_path / "out",
            unet_target_modules=["to_q", "qkv"],
            train_text_encoder=True,
            text_encoder_target_modules=["q_proj", "mlp.fc3"],
        ),
    )
    code, text = check(capsys, cfg)
    assert code == 2 and "'qkv' matches no layer" in text and "'mlp.fc3' matches no layer" in text, text
    assert "`unet_target_modules`" in text and "`text_encoder_target_modules`" in text


def test_an_llm_target_module_and_data_are_checked_too(
    tmp_path: Path, tiny_llm: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    good = write_config(tmp_path / "good.yaml", task="llm", **tiny_llm_values(tiny_llm, data, tmp_path / "out"))
    assert check(capsys, good)[0] == 0
    bad = write_config(
        tmp_path / "bad.yaml",
        task="llm",
        **tiny_llm_values(tiny_llm, data, tmp_path / "out", target_modules=["q_proj", "qkv_proj"]),
    )
    code, text = check(capsys, bad)
    assert code == 2 and "`target_modules`" in text and "qkv_proj not found" in text, text


@pytest.mark.slow
def test_a_small_resolution_trains_with_the_default_buckets(
    tmp_path: Path, tiny_sd: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`resolution: 64` with kohya's default min_bucket_reso (256) used to fail as "a bug in lorad"."""
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out", max_train_steps=1)
    for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        values.pop(key)
    cfg = write_config(tmp_path / "c.yaml", **values)
    assert check(capsys, cfg)[0] == 0
    code, _, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 0 and "bug" not in err, err


def test_bucket_settings_that_leave_no_bucket_are_named_at_check(
    tmp_path: Path, tiny_sd: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out", min_bucket_reso=256, max_bucket_reso=1024)
    values["bucket_reso_steps"] = 64
    code, text = check(capsys, write_config(tmp_path / "c.yaml", **values))
    assert code == 2 and "`min_bucket_reso`: 256 leaves no bucket for resolution 64" in text, text
    values["min_bucket_reso"] = 100
    code, text = check(capsys, write_config(tmp_path / "c.yaml", **values))
    assert code == 2 and "100 is not a multiple of bucket_reso_steps 64" in text, text


def test_the_data_folder_check_counts_images_in_subfolders(
    tmp_path: Path, tiny_sd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    make_dataset(data / "10_style", count=2, csv=False)
    values = tiny_train_values(tiny_sd, data, tmp_path / "out")
    values.pop("metadata_path")
    assert check(capsys, write_config(tmp_path / "c.yaml", **values))[0] == 0
