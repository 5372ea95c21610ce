"""What sampling costs, apart from the training step: seconds per sample image, and whether memory grows.

A round here is exactly what the loop runs every ``sample_every_n_steps``: ``SampleRounds.draw`` (the
RNGs saved and restored, the optimizer's eval weights, no grad) calling the family's ``sample`` on a run
started by the family itself, with its LoRA attached to the resident model, writing the PNGs. Reported:

- seconds per image (the median round over its images), and per denoising step (the part that scales);
- peak memory after 1 round and after ``rounds`` rounds (CUDA: peak allocated; CPU: the process's peak
  RSS): equal within a few percent means a round leaves nothing behind.

Cases: ``tiny`` (lorad's tiny SD1, 64 px) and ``sd15`` (the real-size SD1.5 architecture with random
weights, in memory; on the CPU at 256 px and 4 denoising steps, or what ``--size``/``--sample-steps`` say).
``sample_rounds_case`` is shared with the GPU suite's sampling rows (bench/gpu_suite.py).

Run ``python -m bench.sampling_cost --help``; results go to bench/results/sampling_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from bench.engine_vs_bare import RESULTS_DIR, build_sd15, load_tiny, make_dataset, peak_bytes, sync


def peak_memory(device: torch.device) -> int:
    """Peak allocated device memory (CUDA), else this process's peak resident set (bytes)."""
    cuda = peak_bytes(device)
    return cuda if cuda is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sample_rounds_case(
    family_name: str,
    components: Any,
    placement: Any,
    work: Path,
    *,
    size: int,
    sample_steps: int,
    rounds: int,
    prompts: int = 2,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time ``rounds`` sampling rounds of ``prompts`` images at ``size`` px on a run of ``family_name``
    started on the resident ``components`` (put back exactly afterwards); seconds and peak memory."""
    from lorad.config.dispatch import parse_any_config
    from lorad.events import SampleImage
    from lorad.families.registry import load_plugin
    from lorad.training.family import RunHooks
    from lorad.training.optimizers import build_optimizer
    from lorad.training.sample_rounds import SampleRounds

    data = work / "data"
    make_dataset(data, 2, size)
    values = {
        "model_family": family_name,
        "train_data_dir": str(data),
        "metadata_path": str(data / "metadata.csv"),
        "base_model": str(work / "resident-model"),  # never read: the model is handed over in memory
        "output_dir": str(work / "out"),
        "cache_dir": str(work / "latents"),
        "resolution": size,
        "enable_bucket": False,
        "min_bucket_reso": min(256, size),
        "device": str(placement.device),
        "sample_prompts": [f"a picture number {i} --d {i}" for i in range(prompts)],
        "sample_steps": sample_steps,
        "sample_every_n_steps": 1,
    } | (extra or {})
    config = parse_any_config(values, base_dir=work, source="bench")
    family = load_plugin(family_name)
    events: list[Any] = []
    torch.manual_seed(0)
    scanned = family.scan(config, on_event=events.append, hooks=RunHooks())
    run = family.start(config, components, scanned, placement, events.append)
    try:
        params = [p for group in run.param_groups for p in group["params"]]
        optimizer = build_optimizer(run.param_groups, config)
        run.train_mode(False)
        rounds_runner = SampleRounds(config, run, optimizer, params, events.append)
        seconds: list[float] = []
        peaks: dict[int, int] = {}
        for number in range(1, rounds + 1):
            sync(placement.device)
            start = time.perf_counter()
            drawn = rounds_runner.draw(number, force=True)
            sync(placement.device)
            seconds.append(time.perf_counter() - start)
            if not all(isinstance(e, SampleImage) for e in drawn):
                raise RuntimeError(f"a sample failed: {drawn}")
            peaks[number] = peak_memory(placement.device)
    finally:
        family.restore(components)
    per_image = statistics.median(seconds) / prompts
    return {
        "family": family_name,
        "size": size,
        "sample_steps": sample_steps,
        "prompts": prompts,
        "rounds": rounds,
        "s_per_image": per_image,
        "s_per_denoising_step": per_image / sample_steps,
        "first_round_s": seconds[0],
        "peak_after_1": peaks[1],
        "peak_after_last": peaks[rounds],
        "peak_growth": peaks[rounds] / peaks[1] - 1,
        "device": str(placement.device),
        "precision": placement.precision,
    }


def sd15_case(size: int, sample_steps: int, rounds: int, placement: Any, tiny_dir: Path, work: Path) -> dict:
    """The real-size SD1.5 architecture (random weights, in memory)."""
    from bench.engine_vs_bare import place

    components = place(build_sd15(tiny_dir / "tokenizer", placement), placement)
    return sample_rounds_case("sd", components, placement, work, size=size, sample_steps=sample_steps, rounds=rounds)


def tiny_case(size: int, sample_steps: int, rounds: int, placement: Any, tiny_dir: Path, work: Path) -> dict:
    """lorad's tiny SD1 model."""
    components = load_tiny(tiny_dir, placement)
    return sample_rounds_case("sd", components, placement, work, size=size, sample_steps=sample_steps, rounds=rounds)


CASES: dict[str, tuple[Callable[..., dict], int, int]] = {  # name → (case, CPU size, CPU denoising steps)
    "tiny": (tiny_case, 64, 20),
    "sd15": (sd15_case, 256, 4),
}


def main(argv: list[str] | None = None) -> int:
    from lorad.models.tiny import build_tiny_sd
    from lorad.training.placement import pick_placement

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, help="sample size in px (default: per case, see the docstring)")
    parser.add_argument("--sample-steps", type=int, help="denoising steps per image (default: per case)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds drawn (the leak check compares 1 and this)")
    args = parser.parse_args(argv)
    placement = pick_placement(args.device, "auto")
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    results = []
    with tempfile.TemporaryDirectory(prefix="lorad-bench-sampling-") as scratch:
        root = Path(scratch)
        tiny_dir = build_tiny_sd(root / "tiny-sd1")
        for name in args.cases:
            case, size, steps = CASES[name]
            work = root / name
            work.mkdir()
            result = case(args.size or size, args.sample_steps or steps, args.rounds, placement, tiny_dir, work)
            result["case"] = name
            results.append(result)
            print(
                f"{name}: {result['s_per_image']:.3f} s per {result['size']} px image "
                f"({result['sample_steps']} steps, {result['s_per_denoising_step'] * 1000:.1f} ms per step); "
                f"peak memory after 1 round {result['peak_after_1'] / 2**20:.0f} MiB, after {args.rounds} "
                f"{result['peak_after_last'] / 2**20:.0f} MiB ({result['peak_growth']:+.1%})",
                flush=True,
            )
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / "sampling_cost.json"
    out.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
