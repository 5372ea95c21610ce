"""SIGKILL at chosen moments of a daemon job, then a restarted daemon: nothing is lost.

A child process runs the daemon's own job pieces (SQLite job store, event hub, dispatcher and its
worker in that process, the SD engine) on a tiny model and kills itself (SIGKILL, no cleanup) at
one chosen moment. A real daemon started on the same state directory then resumes the job. Each
case checks that the job resumes from the checkpoint its record names (never from step 0), finishes
with the LoRA of an uninterrupted run, and leaves no temporary files.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorad.config import parse_config
from lorad.jobs.records import JobState
from lorad.jobs.store import JobStore
from lorad.paths import jobs_db_path
from lorad.training.loop import train as train_sd_lora
from tests.support.daemons import run_daemon
from tests.support.datasets import tiny_train_values

pytestmark = pytest.mark.slow

SETTINGS = {"save_steps": 1, "max_train_steps": 4, "keep_checkpoints": 1, "save_precision": "fp32"}

# The child: the daemon's job pieces, with one function patched to SIGKILL the process at the moment named.
CHILD = r"""
import os, signal, sys, time
from pathlib import Path

point, home, config_path, base_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

from lorad.families.sd import family as sd_family
from lorad.training import checkpoints as checkpoint
from lorad.training.loop import train
from lorad.jobs.store import JobStore

if point == "checkpoint written, not yet recorded":
    real_update = JobStore.update
    def update(self, job_id, /, **changes):
        if changes.get("checkpoint", "").endswith("step-000002"):
            die()
        return real_update(self, job_id, **changes)
    JobStore.update = update
elif point == "mid checkpoint write":
    real_write = checkpoint._write_file
    def write(path, data):
        if path.parent.name.startswith(".step-000003.") and path.name == "state.pt":
            path.write_bytes(data[: len(data) // 2])
            die()
        real_write(path, data)
    checkpoint._write_file = write
elif point == "recorded, before pruning":
    real_prune = checkpoint.TrainingRun.prune
    def prune(self, keep):
        if [p.name for p in self.checkpoints()][-1] == "step-000003":
            die()
        return real_prune(self, keep)
    checkpoint.TrainingRun.prune = prune
elif point == "mid export":
    real_export = sd_family.write_lora_files
    def export(*args, **kwargs):
        real_export(*args, **kwargs)  # the files are written, the summary is not
        die()
    sd_family.write_lora_files = export

from lorad.jobs.dispatcher import Dispatcher
from lorad.jobs.hub import EventHub
from lorad.jobs.scheduling import Slot
from lorad.paths import jobs_db_path
from lorad.workers.host import WorkerSpec

store = JobStore(jobs_db_path(home))
# The daemon's dispatcher with its worker in this process, so the patches above apply to the run.
dispatcher = Dispatcher(
    store,
    EventHub(store),
    [Slot(0, "cpu")],
    lambda slot: WorkerSpec(slot.index, slot.device, str(home), default_keep_alive=0.0, memory_budget_bytes=None),
    in_process=True,
    train=train,
)
store.create_job(name="out", config_yaml=config_path.read_text(), base_dir=base_dir, source_name=str(config_path),
                 base_model="tiny", output_dir=str(Path(base_dir) / "out"))
dispatcher.start()
dispatcher.wake()
time.sleep(120)
sys.exit(3)  # never killed: the moment was not reached
"""


def start_step_of_each_attempt(store: JobStore, job_id: str) -> list[int]:
    return [e.payload["start_step"] for e in store.events(job_id) if e.kind == "training_started"]


def no_temp_files(out: Path) -> list[str]:
    return [
        str(p.relative_to(out))
        for p in out.rglob(".*")
        if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name.split(".")[-2:]
    ]


@pytest.mark.parametrize(
    ("point", "recorded_step"),
    [
        ("checkpoint written, not yet recorded", 1),
        ("mid checkpoint write", 2),
        ("recorded, before pruning", 3),
        ("mid export", 4),
    ],
)
def test_sigkill_then_restart_loses_nothing(
    tmp_path: Path, short_dir: Path, tiny_sd: Path, dataset: Path, point: str, recorded_step: int
) -> None:
    values = tiny_train_values(tiny_sd, dataset, tmp_path / "out", **SETTINGS)
    reference = train_sd_lora(
        parse_config(tiny_train_values(tiny_sd, dataset, tmp_path / "ref", **SETTINGS), base_dir=tmp_path)
    )
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    child = subprocess.run(
        [sys.executable, "-c", CHILD, point, str(short_dir), str(config_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stderr[-2000:]

    with JobStore(jobs_db_path(short_dir)) as store:
        (job,) = store.list()
        assert job.state == JobState.RUNNING  # what a SIGKILL leaves: the daemon died mid-job
        assert job.checkpoint.endswith(f"step-{recorded_step:06d}") and Path(job.checkpoint).is_dir()

    daemon = run_daemon(short_dir)  # resumes the interrupted job
    try:
        store = daemon.service.store
        deadline = time.monotonic() + 120
        while store.get(job.job_id).state != JobState.SUCCEEDED and time.monotonic() < deadline:
            assert store.get(job.job_id).state not in (JobState.FAILED, JobState.CANCELLED), store.get(job.job_id)
            time.sleep(0.2)
        done = store.get(job.job_id)
        assert done.state == JobState.SUCCEEDED
        assert start_step_of_each_attempt(store, job.job_id)[-1] == recorded_step  # never from step 0
    finally:
        daemon.stop(grace=0)
    ta, tb = load_file(done.outputs["kohya"]), load_file(reference.outputs["kohya"])
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert no_temp_files(tmp_path / "out") == []


def test_sigkill_while_writing_metadata_csv_keeps_it_and_the_next_scan_cleans_up(tmp_path: Path, dataset: Path) -> None:
    csv = dataset / "metadata.csv"
    before = csv.read_text()
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, signal, sys\n"
            "from pathlib import Path\n"
            "import lorad.atomic as atomic\n"
            "atomic.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "from lorad.captioning.user_files import write_user_text\n"
            "write_user_text(Path(sys.argv[1]), 'file,caption\\nimg_00.png,rewritten\\n')\n",
            str(csv),
        ],
        timeout=120,
    )
    assert child.returncode == -9
    left = [p.name for p in dataset.iterdir() if p.name.startswith(".metadata.csv.")]
    assert len(left) == 1 and csv.read_text() == before  # the person's file is intact

    from lorad.data.dataset import scan_dataset

    images, _ = scan_dataset(dataset, metadata_path=csv)
    assert len(images) == 8
    assert [p.name for p in dataset.iterdir() if p.name.startswith(".metadata.csv.")] == []
