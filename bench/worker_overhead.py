"""Worker processes vs jobs in the daemon's own process: what the process boundary costs a warm job.

Since issue 20 the daemon runs each device's jobs in a worker process (crash isolation, several devices);
``lorad serve --in-process`` runs them in a thread of the daemon, as every daemon did before. This
benchmark starts one daemon of each kind in this process, on lorad's tiny random SD1 model (64 px), and
after a cold job on each (the worker starts, the model loads, latents are cached) times warm jobs,
alternating between the two daemons to spread machine noise:

1. **submit → first step**: from SubmitTraining returning to the job's first ``step`` event (the
   daemon's clock), as a warm job's user waits for it. The worker adds the job's hand-over over a pipe
   and each event's way back (pickled, a few microseconds), but no import and no model load: the worker
   and its resident model are already there.
2. **step time**: the median gap between consecutive ``step`` events after the first, as a user sees
   steps arrive; and the loop's own steps/s (its StepDone events), which leaves the channel out.

Target: worker / in-process ≤ 1.05 for both. The same comparison on real-size SD1.5 on one GPU is a row
of the GPU suite (``bench.gpu_suite``, "worker"), which calls :func:`measure`.

    python -m bench.worker_overhead [--repeats 5] [--steps 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET = 1.05
MODES = ("in-process", "worker")


@dataclass(frozen=True)
class WarmJob:
    """One warm job's times (seconds)."""

    mode: str
    to_first_step: float  # SubmitTraining returned → first step event
    step_gap: float  # median gap between consecutive step events after the first
    engine_step: float  # 1 / the loop's own steps/s at its last step (no channel in it)
    resident: bool


def job_config(*, model: Path, data: Path, out: Path, cache: Path, device: str, resolution: int, steps: int) -> str:
    """A small LoRA on the UNet's attention projections, batch 2, every latent from the shared cache."""
    import yaml

    return yaml.safe_dump(
        {
            "train_data_dir": str(data),
            "metadata_path": str(data / "metadata.csv"),
            "base_model": str(model),
            "lora_rank": 4,
            "unet_target_modules": ["to_q", "to_v"],
            "batch_size": 2,
            "max_train_steps": steps,
            "learning_rate": "1e-4",
            "output_dir": str(out),
            "resolution": resolution,
            "enable_bucket": False,
            "min_bucket_reso": min(256, resolution),
            "device": device,
            "cache_dir": str(cache),
        },
        sort_keys=False,
    )


def warm_job(client: Any, mode: str, config: str, base_dir: Path) -> WarmJob:
    """Run one job to its end and read its times from its history."""
    from bench.daemon_latency import run_watched_job

    timeline, _ = run_watched_job(client, config, base_dir, mode)
    gaps = [b - a for a, b in zip(timeline.steps[1:], timeline.steps[2:], strict=False)]
    rate = 0.0
    for message in client.watch_job(timeline.job_id, history_only=True):
        if message.WhichOneof("item") == "event" and message.event.HasField("step"):
            rate = message.event.step.progress.steps_per_second
    return WarmJob(
        mode=mode,
        to_first_step=timeline.to_first_step,
        step_gap=statistics.median(gaps) if gaps else float("nan"),
        engine_step=1 / rate if rate else float("nan"),
        resident=bool(timeline.model_resident),
    )


def measure(
    model: Path, data: Path, work: Path, *, device: str, resolution: int, steps: int, repeats: int
) -> dict[str, Any]:
    """Warm jobs on a daemon with worker processes and on one with its jobs in this process, alternating;
    medians per mode and their ratios (worker / in-process)."""
    from bench.daemon_latency import run_watched_job, start_daemon_in_process
    from lorad_client import LoradClient

    cache = work / "latents"

    def config(name: str, job_steps: int) -> str:
        return job_config(
            model=model, data=data, out=work / name, cache=cache, device=device, resolution=resolution, steps=job_steps
        )

    daemons, clients, jobs = {}, {}, {mode: [] for mode in MODES}
    homes = {mode: Path(tempfile.mkdtemp(prefix="lorad-wo-")) for mode in MODES}  # short: the socket lives there
    try:
        for mode in MODES:
            daemons[mode] = start_daemon_in_process(homes[mode], in_process=mode == "in-process")
            clients[mode] = LoradClient.connect(daemons[mode].addresses[0], home=homes[mode])
            # The cold job starts the worker, loads the model and caches the latents.
            run_watched_job(clients[mode], config(f"cold-{mode}", 2), work, f"cold {mode}")
        for repeat in range(repeats):
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                jobs[mode].append(warm_job(clients[mode], mode, config(f"{mode}-{repeat}", steps), work))
    finally:
        for client in clients.values():
            client.close()
        for daemon in daemons.values():
            daemon.stop(grace=0)
        for home in homes.values():
            shutil.rmtree(home, ignore_errors=True)
    medians = {
        mode: {
            field: statistics.median(getattr(job, field) for job in jobs[mode])
            for field in ("to_first_step", "step_gap", "engine_step")
        }
        for mode in MODES
    }
    ratios = {field: medians["worker"][field] / medians["in-process"][field] for field in medians["worker"]}
    return {
        "medians_seconds": medians,
        "ratios_worker_over_in_process": ratios,
        "all_resident": all(job.resident for mode in MODES for job in jobs[mode]),
        "jobs": {mode: [asdict(job) for job in jobs[mode]] for mode in MODES},
    }


def report(result: dict[str, Any]) -> str:
    """The result as a small table, with the verdict against the target."""
    medians, ratios = result["medians_seconds"], result["ratios_worker_over_in_process"]
    rows = [
        ("submit → first step", "to_first_step"),
        ("step (event gaps)", "step_gap"),
        ("step (the loop's own)", "engine_step"),
    ]
    lines = ["| | in-process s | worker s | worker / in-process |", "| --- | --- | --- | --- |"]
    for label, field in rows:
        verdict = "ok" if ratios[field] <= TARGET else f"over {TARGET}"
        lines.append(
            f"| {label} | {medians['in-process'][field]:.4f} | {medians['worker'][field]:.4f} | "
            f"{ratios[field]:.3f} ({verdict}) |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="warm jobs per mode (default 5)")
    parser.add_argument("--steps", type=int, default=30, help="steps per warm job (default 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, both modes (default 1)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Both modes train with the same number of threads: the worker process reads it from the environment.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch

    from bench.daemon_latency import load_average, make_images
    from lorad.cli.progress import quiet_libraries
    from lorad.models.tiny import build_tiny_sd

    quiet_libraries()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lorad-bench-"))
    os.environ["LORAD_HOME"] = str(root / "home")
    started, load_before = time.monotonic(), load_average()
    try:
        model = build_tiny_sd(root / "tiny-sd1", version="sd1", seed=0)
        data = make_images(root / "data")
        result = measure(model, data, root, device="cpu", resolution=64, steps=args.steps, repeats=args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["settings"] = {
        "repeats": args.repeats,
        "steps": args.steps,
        "torch_threads": args.threads,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print(report(result))
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "worker_overhead.json").write_text(json.dumps(result, indent=2))
    print(f"details: {RESULTS_DIR / 'worker_overhead.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
