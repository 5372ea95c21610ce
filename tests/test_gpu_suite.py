"""The GPU suite's reduced mode runs on the CPU and prints every row; a failing row costs only itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_suite import ROWS, RowSpec, Suite, run_row, table
from lorad.families.registry import family_names

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_reduced_suite_runs_on_the_cpu_and_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    env = os.environ | {"OMP_NUM_THREADS": "1", "LORAD_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", "--device", "cpu", "--mode", "reduced", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = {
        line.split(" | ")[0].removeprefix("| "): line for line in done.stdout.splitlines() if line.startswith("| ")
    }
    for spec in ROWS:
        line = printed[spec.title]
        if spec.family in family_names():
            assert "| ok |" in line, line
        else:
            assert f"not available in this build (no `{spec.family}` family)" in line
    # The comparison rows carry both sides' numbers; the daemon row its start times.
    sd = printed["SD1.5 512 px, batch 4, bf16"].split(" | ")
    engine, bare, ratio = float(sd[3]), float(sd[4]), float(sd[5])
    assert engine > 0 and bare > 0 and ratio == pytest.approx(engine / bare, abs=2e-3)
    assert "warm " in printed[ROWS[-1].title] and "cold " in printed[ROWS[-1].title]
    # The file holds the same table, and the details every row.
    assert all(line in out.read_text() for line in printed.values())
    details = json.loads(out.with_suffix(".json").read_text())
    assert [row["spec"]["key"] for row in details["rows"]] == [spec.key for spec in ROWS]
    assert details["environment"]["mode"] == "reduced"


def test_a_failing_row_reports_its_error_in_its_cell(tmp_path: Path) -> None:
    from lorad.training.placement import pick_placement

    suite = Suite(placement=pick_placement("cpu", "auto"), full=False, work=tmp_path, steps=2, warmup=1, repeats=1)

    def broken(suite: Suite):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")

    failed = run_row(RowSpec("x", "Broken row", "sd", broken), suite)
    missing = run_row(RowSpec("y", "Future row", "sd", "bench.gpu_rows.nothing_here:row"), suite)
    text = table([failed, missing], "header")
    assert "| Broken row | FAILED: RuntimeError: CUDA error: an illegal memory access was encountered |" in text
    assert (
        "| Future row | not available in this build (the `sd` family has no bench/gpu_rows/nothing_here.py) |" in text
    )
