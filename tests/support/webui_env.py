"""Shared by the WebUI extension's tests: the A1111-like venv and the extension's folder."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
EXTENSION_DIR = REPO / "clients" / "sd-webui-lorad"


def load_script(name: str) -> ModuleType:
    """A module from scripts/ (not a package), loaded by path."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def a1111_python() -> Path:
    """The python of .venv-a1111 (gradio 3.41.2, protobuf 3.20.x, grpcio), built on first use."""
    return load_script("webui_test_envs").ensure_a1111_venv_locked()


def run_python(
    python: Path, code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (``sys.argv[1:]`` = ``args``) with ``python``, in the extension's folder (so it is on
    the path) and nothing of lorad's."""
    return subprocess.run(
        [str(python), "-c", code, *args],
        cwd=EXTENSION_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def current_python() -> Path:
    """The interpreter running the tests (.venv: current protobuf and grpcio)."""
    return Path(sys.executable)
