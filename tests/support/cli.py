"""Running the `lorad` command line in-process."""

from __future__ import annotations

import pytest

from lorad.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err
