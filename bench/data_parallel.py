"""One job on two ranks (gloo, one CPU process each) vs one rank: step time and scaling efficiency.

Each case is a whole ``train`` run of lorad's tiny random SD1 model (64 px), the ranks started as the daemon's
workers start them (``spawn``) and joined the way its jobs join them (a FileStore, gloo over loopback):

- **1 rank, batch B** and **2 ranks, batch B each** (global batch 2B): seconds per step and samples
  per second; scaling efficiency = samples/s of 2 ranks / (2 × samples/s of 1 rank). 1.0 is perfect.
- **1 rank, batch 2B**: the same global batch on one device; speed-up = its s/step / 2 ranks' s/step.
- **the all-reduce alone**: one flat gloo all-reduce of the adapter's gradients (what a step adds).

Seconds per step come from the run's own summary: its training time less the first step, over the
steps after the first. Every process uses one torch thread.

What a 2-core CPU can show: that the all-reduce and the ranks' bookkeeping cost little beside a step,
and that two ranks on two free cores train about twice the samples per second. What it cannot show:
GPU scaling (NCCL over NVLink or PCIe, kernels that keep a GPU busy, host-side overheads that a GPU
exposes); and on a machine shared with other work the second core is often not free, which the
efficiency then reflects. See bench/README.md for measuring several GPUs.

    python -m bench.data_parallel [--batch 2] [--steps 30] [--repeats 3]
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
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _rank(rank: int, world: int, values: dict[str, Any], store: str, base_dir: str, reduce_out: str) -> None:
    """One rank: train, then time the all-reduce of the adapter's gradients on its own."""
    import torch

    torch.set_num_threads(1)
    from lorad.cli.progress import quiet_libraries
    from lorad.config import parse_config
    from lorad.training.distributed import join_local_group, leave_group

    quiet_libraries()  # a spawned process: the parent's settings do not reach it
    from lorad.training.loop import train

    ranks = join_local_group(rank=rank, world=world, device=torch.device("cpu"), store_path=store)
    try:
        train(parse_config(values, base_dir=Path(base_dir)), ranks=ranks)
        if reduce_out:
            count = 0
            if rank == 0:  # the adapter's size, from the LoRA file rank 0 wrote (alphas are not trained)
                from safetensors.torch import load_file

                out = Path(values["output_dir"])
                lora = load_file(out / f"{out.name}.safetensors")
                count = sum(t.numel() for key, t in lora.items() if not key.endswith(".alpha"))
            box = [count]
            torch.distributed.broadcast_object_list(box, src=0)
            params = [torch.zeros(box[0] or 1, requires_grad=True)]
            params[0].grad = torch.ones_like(params[0])
            times = []
            for _ in range(50):
                start = time.perf_counter()
                ranks.reduce(params, torch.zeros(2))
                times.append(time.perf_counter() - start)
            if rank == 0:
                Path(reduce_out).write_text(json.dumps({"floats": box[0], "seconds": statistics.median(times)}))
    finally:
        leave_group()


def run(world: int, values: dict[str, Any], root: Path, *, time_reduce: bool = False) -> dict[str, Any]:
    """One training run on ``world`` ranks; its seconds per step (and the all-reduce's)."""
    import torch.multiprocessing as mp

    from lorad.config import parse_config
    from lorad.training.loop import train

    out = Path(values["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    reduce_out = root / "reduce.json"
    if world == 1:
        import torch

        torch.set_num_threads(1)
        train(parse_config(values, base_dir=root))
    else:
        store = root / f"store-{time.monotonic_ns()}"
        mp.spawn(
            _rank, args=(world, values, str(store), str(root), str(reduce_out) if time_reduce else ""), nprocs=world
        )
    summary = json.loads((out / "training_summary.json").read_text())
    timings = summary["timings_seconds"]
    result = {"s_per_step": (timings["train"] - timings["first_step"]) / (summary["steps"] - 1)}
    if time_reduce:
        result["all_reduce"] = json.loads(reduce_out.read_text())
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="per-device batch B (default 2)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case, alternating (default 3)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch

    from bench.daemon_latency import IMAGE_SIZE, load_average, make_images
    from lorad.cli.progress import quiet_libraries
    from lorad.models.tiny import build_tiny_sd

    quiet_libraries()
    root = Path(tempfile.mkdtemp(prefix="lorad-dp-"))
    os.environ["LORAD_HOME"] = str(root / "home")
    started, load_before = time.monotonic(), load_average()
    try:
        model = build_tiny_sd(root / "tiny-sd1", version="sd1", seed=0)
        data = make_images(root / "data", count=16)

        def values(name: str, batch: int) -> dict[str, Any]:
            return {
                "train_data_dir": str(data),
                "metadata_path": str(data / "metadata.csv"),
                "base_model": str(model),
                "lora_rank": 8,
                "unet_target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
                "batch_size": batch,
                "max_train_steps": args.steps,
                "output_dir": str(root / name),
                "resolution": IMAGE_SIZE,
                "enable_bucket": False,
                "min_bucket_reso": IMAGE_SIZE,
                "device": "cpu",
                "cache_dir": str(root / "cache"),
            }

        b = args.batch
        cases = {"1 rank, batch B": (1, b), "2 ranks, batch B each": (2, b), "1 rank, batch 2B": (1, 2 * b)}
        run(1, values("warm", b), root)  # encodes the latents into the shared cache
        times: dict[str, list[float]] = {name: [] for name in cases}
        reduce = None
        for repeat in range(args.repeats):
            for name, (world, batch) in cases.items() if repeat % 2 == 0 else reversed(cases.items()):
                result = run(world, values(f"r{repeat}-{world}-{batch}", batch), root, time_reduce=world > 1)
                times[name].append(result["s_per_step"])
                reduce = result.get("all_reduce", reduce)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    s = {name: statistics.median(values) for name, values in times.items()}
    one, two, same = s["1 rank, batch B"], s["2 ranks, batch B each"], s["1 rank, batch 2B"]
    efficiency = (2 * b / two) / (2 * (b / one))
    result = {
        "s_per_step": s,
        "samples_per_s": {name: cases[name][0] * cases[name][1] / s[name] for name in s},
        "scaling_efficiency": efficiency,
        "speedup_same_global_batch": same / two,
        "all_reduce": reduce,
        "runs": times,
        "settings": vars(args)
        | {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": load_average(),
            "wall_seconds": round(time.monotonic() - started, 1),
        },
    }
    print("| case | s/step | samples/s |\n| --- | --- | --- |")
    for name in cases:
        print(f"| {name} | {s[name]:.4f} | {result['samples_per_s'][name]:.1f} |")
    print(f"scaling efficiency (2 ranks vs 1, batch {b} per device): {efficiency:.2f}")
    print(f"speed-up at the same global batch {2 * b} (1 rank → 2 ranks): {same / two:.2f}×")
    if reduce:
        print(f"one all-reduce of {reduce['floats']:,} gradient floats (gloo): {reduce['seconds'] * 1000:.2f} ms")
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "data_parallel.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
