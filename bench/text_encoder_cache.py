"""Text-encoder cache: SD 1.x and SDXL step time with cached text-encoder outputs vs without.

With ``cache_text_encoder_outputs: true`` (the default) a run encodes every caption once before
its first step and a step runs no text encoder; with ``false`` the frozen encoder(s) run at every
step. Both variants are the same engine run on the same resident model (``bench.engine_vs_bare``'s
harness: untimed warm-up steps, timed steps, alternating order, medians over repeats); the ratio
uncached/cached is what the cache saves per step. SDXL has two encoders (CLIP-L and the much larger
OpenCLIP bigG), so it gains more.

Cases: ``sd1`` and ``sdxl`` (lorad's tiny random models, 64 px); with ``--real``, ``sd15`` and
``sdxl-real`` (real-size architectures with random weights; SDXL in bf16 on a CPU, as in
``bench.sdxl_vs_bare``). Run ``python -m bench.text_encoder_cache --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import engine_vs_bare, sdxl_vs_bare
from bench.engine_vs_bare import (
    SEED,
    CaseSettings,
    LoopRun,
    environment,
    make_dataset,
    quiet_offline,
    release_memory,
    run_engine,
    with_flags,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CASES = ("sd1", "sdxl")
REAL_CASES = ("sd15", "sdxl-real")
VARIANTS = {"cached": True, "uncached": False}


def load_case(name: str, tmp: Path, placement) -> Any:
    """The resident model of a case."""
    from lorad.models.tiny import build_tiny_sd
    from lorad.models.tiny_sdxl import build_tiny_sdxl

    if name in ("sd1", "sd15"):
        tiny = build_tiny_sd(tmp / "tiny-sd1", version="sd1", seed=SEED)
        if name == "sd1":
            return engine_vs_bare.load_tiny(tiny, placement)
        return engine_vs_bare.build_sd15(tiny / "tokenizer", placement)
    tiny = build_tiny_sdxl(tmp / "tiny-sdxl", seed=SEED)
    if name == "sdxl":
        return sdxl_vs_bare.load_tiny(tiny, placement)
    return sdxl_vs_bare.build_sdxl(tiny / "tokenizer", placement)


def bench_case(name: str, settings: CaseSettings, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Both variants ``repeats`` times, alternating; median s/step of each and their ratio."""
    precision = "bf16" if name == "sdxl-real" else args.precision
    placement = sdxl_vs_bare.pick_bench_placement(args.device, precision)
    work = tmp / name
    work.mkdir()
    t0 = time.perf_counter()
    model = load_case(name, work, placement)
    make_dataset(work / "data", settings.images, settings.resolution)
    print(f"[{name}] setup {time.perf_counter() - t0:.1f}s", flush=True)
    family = {"model_family": "sdxl"} if name.startswith("sdxl") else {}
    runs: dict[str, list[LoopRun]] = {variant: [] for variant in VARIANTS}
    with sdxl_vs_bare.engine_placement(placement):
        for repeat in range(settings.repeats):
            order = list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]
            for variant in order:
                release_memory(placement.device)
                extra = family | {"cache_text_encoder_outputs": VARIANTS[variant]}
                run = run_engine(
                    model,
                    settings,
                    work / "data",
                    work,
                    placement,
                    args.device,
                    placement.precision,
                    repeat,
                    extra=extra,
                )
                runs[variant].append(run)
                print(
                    f"[{name}] repeat {repeat + 1}/{settings.repeats} {variant:8s} {run.s_per_step * 1e3:9.2f} ms/step"
                )
    model = None
    release_memory(placement.device)
    cached = statistics.median(r.s_per_step for r in runs["cached"])
    uncached = statistics.median(r.s_per_step for r in runs["uncached"])
    # Process CPU time: steadier than wall time where other programs share the CPU.
    cpu = {v: statistics.median(r.cpu_s_per_step for r in rs) for v, rs in runs.items()}
    return {
        "case": name,
        "device": str(placement.device),
        "precision": placement.precision,
        "settings": {"resolution": settings.resolution, "batch_size": settings.batch_size, "steps": settings.steps},
        "cached_s_per_step": cached,
        "uncached_s_per_step": uncached,
        "uncached_over_cached": uncached / cached,
        "cpu_time_ratio": cpu["uncached"] / cpu["cached"],
        "runs": {variant: [r.s_per_step for r in rs] for variant, rs in runs.items()},
    }


def case_settings(name: str, args: argparse.Namespace) -> CaseSettings:
    if name in CASES:
        settings = CaseSettings(name, 64, batch_size=4, steps=20, warmup_steps=5, repeats=5, rank=8)
    else:
        settings = CaseSettings(name, 128, batch_size=1, steps=3, warmup_steps=1, repeats=3, rank=8)
    return with_flags(settings, args, ("steps", "warmup_steps", "repeats"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.text_encoder_cache", description="Step time with vs without cached text-encoder outputs."
    )
    parser.add_argument("--only", choices=CASES + REAL_CASES, help="run one case")
    parser.add_argument("--real", action="store_true", help="also the real-size cases (minutes on a CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, help="runs per variant; the median is reported")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadiest on a shared machine)")
    args = parser.parse_args(argv)
    quiet_offline(args.threads)
    names = [args.only] if args.only else list(CASES) + (list(REAL_CASES) if args.real else [])
    with tempfile.TemporaryDirectory(prefix="lorad-bench-text-") as tmp:
        results = [bench_case(name, case_settings(name, args), args, Path(tmp)) for name in names]
    print()
    print(
        f"{'case':10s} {'device':6s} {'precision':9s} {'cached s/step':>14s} {'uncached s/step':>16s} "
        f"{'ratio':>7s} {'CPU-time ratio':>15s}"
    )
    for r in results:
        print(
            f"{r['case']:10s} {r['device']:6s} {r['precision']:9s} {r['cached_s_per_step']:14.4f} "
            f"{r['uncached_s_per_step']:16.4f} {r['uncached_over_cached']:7.3f} {r['cpu_time_ratio']:15.3f}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    device = results[0]["device"].split(":")[0] if results else "cpu"
    path = RESULTS_DIR / f"text_encoder_cache-{device}.json"
    placement = sdxl_vs_bare.pick_bench_placement(args.device, "auto")
    path.write_text(json.dumps({"environment": environment(placement), "results": results}, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
