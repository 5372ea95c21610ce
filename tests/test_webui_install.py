"""`lorad webui install`: the extension linked or copied into a WebUI's extensions/ folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorad.cli import main
from tests.support.webui_env import EXTENSION_DIR


@pytest.fixture
def webui(tmp_path: Path) -> Path:
    root = tmp_path / "stable-diffusion-webui"
    (root / "modules").mkdir(parents=True)
    (root / "launch.py").write_text("# A1111's launcher\n")
    return root


def test_install_links_the_extension_and_is_idempotent(webui: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["webui", "install", "--webui-dir", str(webui)]) == 0
    target = webui / "extensions" / "sd-webui-lorad"
    assert target.is_symlink() and target.resolve() == EXTENSION_DIR
    assert (target / "scripts" / "lorad_training_tab.py").is_file()
    out = capsys.readouterr().out
    assert f"linked: {target}" in out and "`lorad serve`" in out
    assert main(["webui", "install", "--webui-dir", str(webui)]) == 0
    assert "already linked" in capsys.readouterr().out
    assert sorted(p.name for p in (webui / "extensions").iterdir()) == ["sd-webui-lorad"]


def test_copy_makes_an_independent_copy_and_a_rerun_replaces_it(webui: Path) -> None:
    assert main(["webui", "install", "--webui-dir", str(webui), "--copy"]) == 0
    target = webui / "extensions" / "sd-webui-lorad"
    assert target.is_dir() and not target.is_symlink()
    assert (target / "lorad_webui" / "api" / "v1" / "training_pb2_grpc.py").is_file()
    assert not list(target.rglob("__pycache__"))
    (target / "stale.txt").write_text("from an older version")
    assert main(["webui", "install", "--webui-dir", str(webui), "--copy"]) == 0
    assert not (target / "stale.txt").exists() and (target / "install.py").is_file()
    assert sorted(p.name for p in (webui / "extensions").iterdir()) == ["sd-webui-lorad"]
    # Back to a link: the copy is replaced too.
    assert main(["webui", "install", "--webui-dir", str(webui)]) == 0
    assert target.is_symlink()


def test_a_folder_that_is_not_a_webui_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["webui", "install", "--webui-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"`--webui-dir`: {tmp_path} is not an AUTOMATIC1111 WebUI folder (no launch.py or modules)" in err
    assert "launch.py, modules/ and extensions/" in err
    assert main(["webui", "install", "--webui-dir", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_something_else_at_the_target_is_left_alone(webui: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = webui / "extensions" / "sd-webui-lorad"
    other.mkdir(parents=True)
    (other / "mine.txt").write_text("someone else's extension")
    assert main(["webui", "install", "--webui-dir", str(webui), "--copy"]) == 2
    assert "exists and is not the lorad extension" in capsys.readouterr().err
    assert (other / "mine.txt").read_text() == "someone else's extension"
