#!/usr/bin/env python3
"""Prepare what the WebUI extension's tests need besides ``.venv`` (run by ``.ci/run``; tests call it too).

* ``.venv-a1111``: a venv shaped like AUTOMATIC1111's (gradio 3.41.2, protobuf 3.20.x, grpcio), from
  the lock ``clients/sd-webui-lorad/requirements-standalone.txt`` with ``pip --no-deps`` (no resolver run). Rebuilt
  only when the lock changes (its hash is kept in the venv); pip's wheel cache makes a rebuild cheap.
* ``.venv-protoc-compat``: the old grpcio-tools that ``scripts/gen_webui_api.py`` generates the
  extension's stubs with (see there).
* ``--browser``: Debian's chromium for the Playwright test (``apt-get install chromium``, as root),
  when no chromium is on PATH. Playwright itself is in the ``dev`` extra; ``playwright install``
  cannot download browsers here, so the test launches this one by path.

Safe to run from several processes at once (a file lock serialises the work). Prints what it did.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
A1111_VENV = REPO_ROOT / ".venv-a1111"
A1111_LOCK = REPO_ROOT / "clients" / "sd-webui-lorad" / "requirements-standalone.txt"
CHROMIUM_NAMES = ("chromium", "chromium-browser")


def _venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def ensure_a1111_venv() -> Path:
    """The python of ``.venv-a1111``, created or rebuilt when the lock file changed."""
    digest = hashlib.sha256(A1111_LOCK.read_bytes()).hexdigest()
    marker = A1111_VENV / "lock-sha256"
    python = _venv_python(A1111_VENV)
    if python.exists() and marker.exists() and marker.read_text() == digest:
        return python
    print(f"webui_test_envs: building {A1111_VENV.name} from {A1111_LOCK.relative_to(REPO_ROOT)}", flush=True)
    # The base interpreter, not .venv's: a venv made from inside another venv still works, but this is clearer.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(A1111_VENV)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-compile",
            "-r",
            str(A1111_LOCK),
        ],
        check=True,
    )
    marker.write_text(digest)
    return python


def find_chromium() -> str | None:
    """Path of a chromium executable on PATH, or None."""
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def ensure_chromium() -> str:
    """A chromium executable, installed with apt-get when missing (needs root). Raises RuntimeError."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("no chromium on PATH: install Debian's `chromium` package (apt-get install chromium)")
    print("webui_test_envs: apt-get install chromium", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], check=True, env=env)
    found = find_chromium()
    if not found:
        raise RuntimeError("apt-get installed chromium but it is not on PATH")
    return found


def ensure_compat_protoc() -> Path:
    """The python of ``.venv-protoc-compat`` (made by scripts/gen_webui_api.py)."""
    spec = importlib.util.spec_from_file_location("gen_webui_api", REPO_ROOT / "scripts" / "gen_webui_api.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.compat_python()


def prepare(*, browser: bool = False) -> None:
    """Everything above, under one lock (tests in parallel workers call this at the same time)."""
    with open(REPO_ROOT / ".venv-webui.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_a1111_venv()
        ensure_compat_protoc()
        if browser:
            ensure_chromium()


def ensure_a1111_venv_locked() -> Path:
    """``ensure_a1111_venv`` under the lock (for tests running in parallel workers)."""
    with open(REPO_ROOT / ".venv-webui.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_a1111_venv()


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when everything is ready."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--browser", action="store_true", help="also install chromium with apt-get if missing")
    args = parser.parse_args(argv)
    try:
        prepare(browser=args.browser)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"webui_test_envs: {exc}", file=sys.stderr)
        return 1
    print("webui_test_envs: ready", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
