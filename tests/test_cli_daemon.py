"""The CLI against a running daemon: train submits and follows, the job commands answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorad import __version__
from lorad.server.daemon import RunningDaemon
from tests.support.cli import run_cli
from tests.support.datasets import tiny_train_values, write_config


@pytest.mark.slow
def test_train_submits_to_the_daemon_and_follows(
    use_daemon: RunningDaemon,
    tiny_sd: Path,
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path / "configs" / "a.yaml", **tiny_train_values(tiny_sd, dataset, Path("output/style")))
    code, out, err = run_cli(capsys, "train", "--config", "configs/a.yaml")
    assert code == 0, err
    assert "submitted to the lorad daemon" in err and "<lora:style:0.8>" in out
    assert (tmp_path / "output" / "style" / "style.safetensors").is_file()  # relative to the CLI's cwd

    code, out, _ = run_cli(capsys, "jobs")
    assert code == 0 and "succeeded" in out and "style" in out
    job_id = out.splitlines()[1].split()[0]
    code, out, _ = run_cli(capsys, "logs", job_id[:6])
    assert code == 0 and "step 4/4" in out and "model loaded" in out

    code, out, _ = run_cli(capsys, "train", "--config", str(cfg), "--detach")
    assert code == 0 and len(out.strip()) == 10
    code, out, err = run_cli(capsys, "logs", out.strip(), "--follow")
    assert code == 0 and "<lora:style:0.8>" in out

    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and str(tiny_sd) in out
    model_id = out.splitlines()[1].split()[0]
    code, out, _ = run_cli(capsys, "models", "unload", model_id)
    assert code == 0 and "freed" in out

    code, out, _ = run_cli(capsys, "status")
    assert code == 0 and f"lorad {__version__}" in out and "queue: 0 waiting" in out


def test_bad_config_over_the_daemon_names_every_key(
    use_daemon: RunningDaemon, tiny_sd: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "o") | {"lora_rank": "eight", "epoch": 3}
    cfg = write_config(tmp_path / "bad.yaml", **values)
    code, _, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 2
    assert "`lora_rank`" in err and "did you mean `epochs`" in err


@pytest.mark.slow
def test_cancel_a_queued_job(
    use_daemon: RunningDaemon, tiny_sd: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_cfg = write_config(
        tmp_path / "long.yaml", **tiny_train_values(tiny_sd, dataset, tmp_path / "long", max_train_steps=100_000)
    )
    short_cfg = write_config(tmp_path / "short.yaml", **tiny_train_values(tiny_sd, dataset, tmp_path / "short"))
    _, running, _ = run_cli(capsys, "train", "--config", str(long_cfg), "--detach")
    _, queued, _ = run_cli(capsys, "train", "--config", str(short_cfg), "--detach")
    code, out, _ = run_cli(capsys, "cancel", queued.strip())
    assert code == 0 and "cancelled" in out
    code, out, _ = run_cli(capsys, "cancel", running.strip())
    assert code == 0 and ("stopping" in out or "cancelled" in out)
    code, out, _ = run_cli(capsys, "logs", running.strip(), "--follow")
    assert code == 130


@pytest.mark.slow
def test_without_a_daemon(tmp_path: Path, tiny_sd: Path, dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "jobs")
    assert code == 1 and "lorad serve" in err
    cfg = write_config(tmp_path / "c.yaml", **tiny_train_values(tiny_sd, dataset, tmp_path / "o"))
    code, _out, err = run_cli(capsys, "train", "--config", str(cfg))
    assert code == 0 and "no lorad daemon running: training in this process" in err
    assert (tmp_path / "o" / "o.safetensors").is_file()


def test_client_commands_import_no_torch() -> None:
    probe = (
        "import sys, lorad.cli, lorad.cli.daemon_commands, lorad_client; "
        "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
