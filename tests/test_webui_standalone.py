"""The README's steps for the standalone LoRA Training page, run as written: a fresh venv from the
pinned requirements file the README names, then the page, which must answer. (An unpinned
`pip install gradio==3.41.2 grpcio protobuf` resolves to a Starlette that gradio 3.41 breaks on.)"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from lorad.server.daemon import RunningDaemon
from tests.support.webui_env import EXTENSION_DIR, REPO

pytestmark = pytest.mark.slow

MARKER = "<!-- webui-standalone-steps -->"


def readme_steps() -> list[str]:
    """The command lines of the README's fenced block after the marker."""
    after = (REPO / "README.md").read_text(encoding="utf-8").split(MARKER, 1)[1]
    body = after.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in body.splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_readme_names_the_pinned_requirements() -> None:
    steps = readme_steps()
    assert steps[0] == "cd clients/sd-webui-lorad"
    assert any("pip install -r requirements-standalone.txt" in step for step in steps)
    pinned = (EXTENSION_DIR / "requirements-standalone.txt").read_text().splitlines()
    packages = [line for line in pinned if line and not line.startswith("#")]
    assert packages and all("==" in line for line in packages)  # every package pinned, dependencies too
    assert {"gradio==3.41.2", "starlette==0.26.1", "fastapi==0.94.0"} <= set(packages)


def test_the_readme_standalone_steps_serve_the_page(daemon: RunningDaemon, tmp_path: Path) -> None:
    steps = readme_steps()
    repo = tmp_path / "repo"  # a copy: the steps make a venv inside the extension's folder
    shutil.copytree(
        EXTENSION_DIR, repo / "clients" / "sd-webui-lorad", ignore=shutil.ignore_patterns(".venv-*", "__pycache__")
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LORAD_ADDRESS", "PYTHONPATH", "VIRTUAL_ENV")}
    env |= {
        "PIP_CACHE_DIR": os.path.expanduser("~/.cache/pip"),  # the user's cache, before HOME moves
        "HOME": str(tmp_path / "home"),  # `~` in the steps lands in the test's folder
        "LORAD_HOME": str(daemon.settings.home),  # the page finds the daemon as on a user's machine
    }
    setup = subprocess.run(
        ["bash", "-ec", "\n".join(steps[:-1])], cwd=repo, env=env, capture_output=True, text=True, timeout=1200
    )
    assert setup.returncode == 0, setup.stdout[-2000:] + setup.stderr[-3000:]

    port = free_port()  # the only change to the last line: a port no other test uses
    page = subprocess.Popen(
        ["bash", "-ec", f"{steps[0]}\nexec {steps[-1]} --port {port}"],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert page.stdout is not None
        seen = []
        for line in page.stdout:
            seen.append(line)
            if line.startswith("lorad LoRA Training page: "):
                break
        else:
            pytest.fail("the page exited:\n" + "".join(seen[-40:]))
        url = line.split(": ", 1)[1].strip()
        html = urllib.request.urlopen(url, timeout=60).read().decode()
        assert "lorad-captioner" in html and "lorad-train" in html
    finally:
        page.terminate()
        page.wait(timeout=30)
