"""`lorad` as a user runs it: exit codes, messages that name the problem, nothing half-written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.cli import run_cli
from tests.support.datasets import make_dataset, tiny_train_values, write_config


def outputs_in(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors")) if folder.exists() else []


def test_config_example_prints_a_valid_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "config", "--example")
    assert code == 0
    assert yaml.safe_load(out)["lora_rank"] == 8
    assert "# gradient_checkpointing: false" in out


@pytest.mark.slow
def test_train_writes_lora_and_says_how_to_use_it(
    tmp_path: Path, tiny_sd: Path, dataset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(
        tmp_path / "configs" / "my.yaml", **tiny_train_values(tiny_sd, dataset, tmp_path / "output" / "my_style_lora")
    )
    code, out, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 0, err
    assert "<lora:my_style_lora:0.8>" in out
    assert (tmp_path / "output" / "my_style_lora" / "my_style_lora.safetensors").is_file()


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda text, v: "lora_rank: [8\n" + text, "YAML syntax error at line 2"),
        (lambda text, v: text + "lora_rnak: 8\n", "did you mean `lora_rank`"),
        (lambda text, v: text + "batch_size: many\n", "`batch_size`: got 'many'"),
        (
            lambda text, v: text.replace(str(v["train_data_dir"]), str(v["train_data_dir"]) + "_missing"),
            "`train_data_dir`:",
        ),
        (lambda text, v: text + "unet_target_modules: [to_qq]\n", "'to_qq' matches no layer"),
        (
            lambda text, v: text.replace(str(v["output_dir"]), str(v["train_data_dir"] / "img_00.png" / "out")),
            "`output_dir`:",
        ),
    ],
    ids=["yaml-syntax", "unknown-key", "wrong-type", "missing-data-dir", "bad-target", "unwritable-output"],
)
@pytest.mark.slow
def test_bad_config_is_named_and_nothing_written(
    tmp_path: Path, tiny_sd: Path, dataset: Path, mutate, expect, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out")
    values.pop("unet_target_modules")  # so a case can add its own
    text = yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(mutate(text, values))
    code, _, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 2
    assert expect in err
    assert "Traceback" not in err
    assert outputs_in(tmp_path / "out") == []


@pytest.mark.slow
def test_corrupt_and_missing_images_reported_training_goes_on(
    tmp_path: Path, tiny_sd: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset(tmp_path / "data", count=6)
    (data / "img_01.png").write_bytes(b"not a png at all")
    with (data / "metadata.csv").open("a") as fh:
        fh.write("ghost.png,a missing picture\n")
    cfg = write_config(tmp_path / "c.yaml", **tiny_train_values(tiny_sd, data, tmp_path / "out"))
    code, _, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 0, err
    assert "img_01.png" in err and "unreadable" in err.lower()
    assert "ghost.png" in err and "does not exist" in err


def test_nothing_usable_fails_before_loading_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_dataset(tmp_path / "data", count=2)
    for png in data.glob("*.png"):
        png.write_bytes(b"")
    # base_model points nowhere: the data check must fail first, so the model is never needed.
    cfg = write_config(tmp_path / "c.yaml", **tiny_train_values(tmp_path / "no-model", data, tmp_path / "out"))
    code, _, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 1
    assert "zero-size" in err and "img_00.png" in err
    assert "base model" not in err.lower()
    assert outputs_in(tmp_path / "out") == []


def test_missing_base_model_names_the_key(tmp_path: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", **tiny_train_values(tmp_path / "models" / "v1-5.safetensors", dataset, tmp_path / "out")
    )
    code, _, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 1
    assert "`base_model`" in err and "v1-5.safetensors" in err
    assert outputs_in(tmp_path / "out") == []


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reuses_latents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "demo", "--dir", str(tmp_path / "demo"), "--steps", "4")
    assert code == 0, err
    lora = tmp_path / "demo" / "output" / "demo_lora" / "demo_lora.safetensors"
    assert lora.is_file() and "<lora:demo_lora:0.8>" in out
    code, _, err = run_cli(capsys, "demo", "--dir", str(tmp_path / "demo"), "--steps", "4")
    assert code == 0 and "0 encoded, 12 from cache" in err


@pytest.mark.slow
def test_ctrl_c_saves_checkpoint_and_resume_finishes(tmp_path: Path, tiny_sd: Path, dataset: Path) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out", max_train_steps=100_000)
    cfg = write_config(tmp_path / "c.yaml", **values)
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorad.cli", "train", "--config", str(cfg)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until the loop runs, then press Ctrl-C
        if line.startswith("training "):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "resume_from: latest" in err
    checkpoints = sorted((tmp_path / "out" / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    assert not (tmp_path / "out" / "out.safetensors").exists()

    stopped_at = int(checkpoints[0].name.split("-")[1])
    write_config(cfg, **(values | {"resume_from": "latest", "max_train_steps": stopped_at + 2}))
    done = subprocess.run(
        [sys.executable, "-m", "lorad.cli", "train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "out.safetensors").is_file()
