"""The GPU suite: lorad's engine against bare diffusers/transformers loops on real-size models, in one command.

Each row trains the same LoRA on the same model object twice in one run, with lorad's engine (the
training loop and the family) and with the smallest honest bare loop, and reports seconds per step,
peak allocated device memory and samples per second of each, and their ratio. The models are the
real architectures with random weights, built in memory (nothing is downloaded). One row times a warm
job through a real daemon instead: submit → first step on real-size SD1.5 with the model resident.

    just bench-gpu                                   # on a GPU: full sizes (about 3-5 minutes on an H100)
    timeout 900 just bench-gpu --out table.md        # what to run on a borrowed GPU machine
    just bench-gpu --mode reduced --device cpu       # the same table on a CPU, reduced sizes (CI runs this)

Every row runs in its own try/except: a row that fails says why in its cell and the rest still run.
The table (Markdown) and the details (JSON) are rewritten after every row, so a run cut short by a
timeout keeps the rows it finished.

Rows of families that are not in this build (``lorad.families.registry.family_names()``) say so.
A family's row is a function ``row(suite: Suite) -> Row`` in ``bench/gpu_rows/<family>.py`` (see
that package's docstring); the rows below that use the SD and LLM families are the worked examples.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lorad.training.placement import Placement

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GB = 10**9
TARGET_RATIO = 1.05


@dataclass(frozen=True)
class Side:
    """One side of a row (engine or bare): median seconds per step, peak allocated device memory over
    the timed steps (CUDA only), samples per step."""

    s_per_step: float
    peak_bytes: int | None
    batch: int

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.s_per_step


@dataclass
class Row:
    """What a row measured. ``engine``/``bare`` for a comparison; ``result`` for anything else (the
    daemon row's times); ``goals`` are (goal, met) pairs, judged only at full size."""

    engine: Side | None = None
    bare: Side | None = None
    setup: str = ""  # what ran: model, size, precision (the title names the full-size setup)
    result: str = ""
    goals: list[tuple[str, bool]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.engine.s_per_step / self.bare.s_per_step if self.engine and self.bare else None


@dataclass(frozen=True)
class RowSpec:
    """A row of the table: its title, the family it needs, and its ``row(suite)`` function, or the
    ``"module:function"`` where a family's package of rows defines it (imported only when run)."""

    key: str
    title: str
    family: str
    target: Callable[[Suite], Row] | str


@dataclass
class Suite:
    """What every row shares: where and how to train, at which sizes, and a scratch folder.

    ``full`` is False in the reduced mode (CPU, CI): rows then use tiny models and few steps, and
    goals are not judged. :meth:`pick` chooses a value by mode.
    """

    placement: Placement
    full: bool
    work: Path
    steps: int  # timed steps per run
    warmup: int  # untimed steps at the start of every run (at least 1)
    repeats: int  # runs per side, alternating; medians are reported

    def pick(self, full: Any, reduced: Any) -> Any:
        return full if self.full else reduced

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def device_flag(self) -> str:
        return str(self.placement.device)

    @cached_property
    def tiny_sd(self) -> Path:
        """lorad's tiny random SD1 model on disk (its tokenizer also serves the real-size SD1.5)."""
        from lorad.models.tiny import build_tiny_sd

        return build_tiny_sd(self.work / "tiny-sd1", version="sd1", seed=0)

    def folder(self, name: str) -> Path:
        """A fresh scratch folder for one row."""
        path = self.work / name
        path.mkdir(parents=True, exist_ok=False)
        return path


# ------------------------------------------------------------------------------------------- rows


def sd15_row(batch: int, *, peak_goal_gb: float | None = None) -> Callable[[Suite], Row]:
    """SD1.5 at 512 px (tiny SD1 at 64 px when reduced): bench.engine_vs_bare's engine and bare loop."""

    def row(suite: Suite) -> Row:
        from bench import engine_vs_bare as evb

        settings = evb.CaseSettings(
            suite.pick("sd15", "tiny"),
            resolution=suite.pick(512, 64),
            batch_size=batch,
            steps=suite.steps,
            warmup_steps=suite.warmup,
            repeats=suite.repeats,
            rank=8,
        )
        args = Namespace(device=suite.device_flag, precision="auto")
        result = evb.bench_case(settings, suite.placement, args, suite.folder(f"sd15-b{batch}"), suite.tiny_sd)
        measured = Row(
            engine=Side(result["engine_s_per_step"], result["peak_bytes"]["engine"], batch),
            bare=Side(result["bare_s_per_step"], result["peak_bytes"]["bare"], batch),
            setup=f"{settings.name} {settings.resolution} px, batch {batch}, {precision_name(result['precision'])}",
            details=result,
        )
        if peak_goal_gb is not None and measured.engine.peak_bytes is not None:
            measured.goals.append(
                (f"engine peak ≤ {peak_goal_gb:g} GB", measured.engine.peak_bytes <= peak_goal_gb * GB)
            )
        return measured

    return row


def llm_row(suite: Suite) -> Row:
    """TinyLlama-1.1B's shape, batch 4, 512 tokens (the tiny Llama, 64 tokens, when reduced):
    bench.llm_vs_bare's engine and bare loop."""
    from bench import llm_vs_bare as lvb

    batch = 4
    args = Namespace(
        device=suite.device_flag,
        batch=batch,
        seq_len=suite.pick(512, 64),
        steps=suite.steps,
        warmup_steps=suite.warmup,
        repeats=suite.repeats,
    )
    result = lvb.bench_case(suite.pick("llama1b", "tiny"), args, suite.folder("llm"))
    return Row(
        engine=Side(result["engine_s_per_step"], result["peak_bytes"]["engine"], batch),
        bare=Side(result["bare_s_per_step"], result["peak_bytes"]["bare"], batch),
        setup=f"{result['case']}, batch {batch}, {args.seq_len} tokens, {precision_name(result['precision'])}",
        result=f"{result['engine_tokens_per_s']:,.0f} vs {result['bare_tokens_per_s']:,.0f} tokens/s",
        details=result,
    )


def sd15_on_disk(suite: Suite, work: Path) -> Path:
    """A real-size SD1.5 (random weights) written as a diffusers folder in ``work``; the tiny model when reduced."""
    if not suite.full:
        return suite.tiny_sd
    from bench import engine_vs_bare as evb
    from lorad.models.tiny import write_sd_parts

    model = work / "sd15"
    parts = evb.build_sd15(suite.tiny_sd / "tokenizer", suite.placement)
    write_sd_parts(
        model, unet=parts.unet, vae=parts.vae, text_encoder=parts.text_encoder, scheduler=parts.noise_scheduler
    )
    parts.tokenizer.save_pretrained(model / "tokenizer")
    del parts
    release(suite)
    return model


def worker_row(suite: Suite) -> Row:
    """A warm SD1.5 job on one GPU in a worker process vs in the daemon's process (``--in-process``):
    submit → first step and step time (bench.worker_overhead.measure), alternating the two daemons."""
    from bench import engine_vs_bare as evb
    from bench import worker_overhead as wo

    work = suite.folder("worker")
    resolution = suite.pick(512, 64)
    model = sd15_on_disk(suite, work)
    data = work / "data"
    evb.make_dataset(data, 8, resolution)
    result = wo.measure(
        model,
        data,
        work,
        device=suite.device_flag,
        resolution=resolution,
        steps=suite.pick(20, 4),
        repeats=suite.pick(3, 1),
    )
    if not result["all_resident"]:
        raise RuntimeError("a warm job did not find the model resident")
    medians, ratios = result["medians_seconds"], result["ratios_worker_over_in_process"]
    text = "; ".join(
        f"{label} {medians['worker'][field]:.3f} vs {medians['in-process'][field]:.3f} s ({ratios[field]:.3f}×)"
        for label, field in (("first step", "to_first_step"), ("step", "step_gap"))
    )
    return Row(
        setup=f"{suite.pick('sd15', 'tiny')} {resolution} px, batch 2, {precision_name(suite.placement.precision)}",
        result=f"worker vs in-process: {text}",
        goals=[(f"worker / in-process ≤ {wo.TARGET}", max(ratios["to_first_step"], ratios["step_gap"]) <= wo.TARGET)],
        details=result,
    )


def daemon_row(suite: Suite) -> Row:
    """Submit → first step of a warm job (base model resident) on real-size SD1.5 through a real daemon
    (gRPC, job store, worker, registry), after a cold job that loaded the model from disk."""
    import yaml

    from bench import daemon_latency as dl
    from bench import engine_vs_bare as evb
    from lorad_client import LoradClient

    work = suite.folder("daemon")
    resolution = suite.pick(512, 64)
    model = sd15_on_disk(suite, work)
    data = work / "data"
    evb.make_dataset(data, 8, resolution)

    def job(name: str) -> str:
        values = {
            "train_data_dir": str(data),
            "metadata_path": str(data / "metadata.csv"),
            "base_model": str(model),
            "output_dir": str(work / "out" / name),
            "cache_dir": str(work / "latents"),
            "resolution": resolution,
            "enable_bucket": False,
            "min_bucket_reso": min(256, resolution),
            "batch_size": 1,
            "max_train_steps": 2,
            "device": suite.device_flag,
        }
        return yaml.safe_dump(values)

    home = Path(tempfile.mkdtemp(prefix="lorad-suite-"))  # short: the daemon's Unix socket lives here
    daemon = dl.start_daemon_in_process(home)
    try:
        with LoradClient.connect(daemon.addresses[0], home=home) as client:
            cold, _ = dl.run_watched_job(client, job("cold"), work, "cold")
            warm, _ = dl.run_watched_job(client, job("warm"), work, "warm")
    finally:
        daemon.stop(grace=0)
        shutil.rmtree(home, ignore_errors=True)
    if warm.model_resident is not True:
        raise RuntimeError("the second job did not find the model resident")
    load = cold.model_load_seconds or 0.0
    return Row(
        setup=f"{suite.pick('sd15', 'tiny')} {resolution} px, batch 1, {precision_name(suite.placement.precision)}",
        result=f"warm {warm.to_first_step:.2f} s; cold {cold.to_first_step:.2f} s (model load {load:.2f} s)",
        details={"warm": asdict(warm), "cold": asdict(cold)},
    )


def sd15_samples_row(suite: Suite) -> Row:
    """Seconds per 512 px SD1.5 sample image (20 euler_a steps, CFG; the tiny model at 64 px when reduced),
    drawn as the loop draws them, with the LoRA attached; peak memory after 1 round and after 20."""
    from bench import engine_vs_bare as evb
    from bench.sampling_cost import sample_rounds_case

    components = (
        evb.place(evb.build_sd15(suite.tiny_sd / "tokenizer", suite.placement), suite.placement)
        if suite.full
        else evb.load_tiny(suite.tiny_sd, suite.placement)
    )
    size = suite.pick(512, 64)
    result = sample_rounds_case(
        "sd", components, suite.placement, suite.folder("sd15-samples"), size=size,
        sample_steps=suite.pick(20, 4), rounds=suite.pick(20, 3),
    )  # fmt: skip
    return sampling_result_row(result, f"{suite.pick('sd15', 'tiny')} {size} px, {result['sample_steps']} steps, CFG 7")


def sampling_result_row(result: dict[str, Any], setup: str) -> Row:
    """A sampling row's cells: seconds per image, and peak memory after 1 and after all rounds."""
    after_one, after_all = result["peak_after_1"], result["peak_after_last"]
    row = Row(
        setup=f"{setup}, {precision_name(result['precision'])}",
        result=(
            f"{result['s_per_image']:.2f} s per image; peak after 1 round {after_one / GB:.2f} GB, "
            f"after {result['rounds']} {after_all / GB:.2f} GB"
        ),
        details=result,
    )
    row.goals.append(("no growth over the rounds (≤ 1 %)", result["peak_growth"] <= 0.01))
    return row


ROWS: tuple[RowSpec, ...] = (
    RowSpec("sd15-b4", "SD1.5 512 px, batch 4, bf16", "sd", sd15_row(4)),
    RowSpec("sd15-b1", "SD1.5 512 px, batch 1, bf16", "sd", sd15_row(1, peak_goal_gb=6)),
    RowSpec("sdxl", "SDXL 1024 px, batch 1, bf16 + gradient checkpointing", "sdxl", "bench.gpu_rows.sdxl:row"),
    RowSpec("flux", "Flux 1024 px, fp8", "flux", "bench.gpu_rows.flux:row"),
    RowSpec("llm", "LLM TinyLlama-1.1B shape, batch 4, 512 tokens", "llm", llm_row),
    RowSpec("worker", "Warm job in a worker process vs in the daemon's, SD1.5", "sd", worker_row),
    RowSpec("sd15-samples", "SD1.5 512 px sample image, 20 steps", "sd", sd15_samples_row),
    RowSpec("sdxl-samples", "SDXL 1024 px sample image, 20 steps", "sdxl", "bench.gpu_rows.sdxl_samples:row"),
    RowSpec("daemon", "Warm job submit → first step, SD1.5, through the daemon", "sd", daemon_row),
)


# ------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """A row as it ended: ``status`` is "ok", "not available in this build ...", or "FAILED: ..."."""

    spec: RowSpec
    status: str
    seconds: float
    row: Row | None = None


def release(suite: Suite) -> None:
    """Drop the previous row's garbage (and cached device blocks), so rows do not inherit each other's memory."""
    import torch

    gc.collect()
    if suite.device.type == "cuda":
        torch.cuda.empty_cache()


def find_row(spec: RowSpec) -> Callable[[Suite], Row] | str:
    """The row function, or why this build has none."""
    from lorad.families.registry import family_names

    if spec.family not in family_names():
        return f"not available in this build (no `{spec.family}` family)"
    if callable(spec.target):
        return spec.target
    module_name, _, name = spec.target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        return f"not available in this build (the `{spec.family}` family has no {module_name.replace('.', '/')}.py)"
    return getattr(module, name)


def run_row(spec: RowSpec, suite: Suite) -> Outcome:
    """One row, whatever happens in it."""
    start = time.monotonic()
    try:
        found = find_row(spec)
        if isinstance(found, str):
            return Outcome(spec, found, time.monotonic() - start)
        row = found(suite)
        if not suite.full:
            row.goals = []  # reduced sizes say nothing about the goals
        elif row.ratio is not None:
            row.goals.insert(0, (f"engine/bare ≤ {TARGET_RATIO}", row.ratio <= TARGET_RATIO))
        return Outcome(spec, "ok", time.monotonic() - start, row)
    except Exception as err:  # a failing row must not cost the others
        traceback.print_exc()
        first_line = (str(err).strip().splitlines() or [""])[0]
        return Outcome(spec, f"FAILED: {type(err).__name__}: {first_line}"[:300], time.monotonic() - start)
    finally:
        release(suite)


def precision_name(precision: str) -> str:
    """lorad's mixed_precision value as people say it ("no" autocast is fp32)."""
    return "fp32" if precision == "no" else precision


def gigabytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / GB:.2f} GB"


def table(outcomes: Sequence[Outcome], header: str) -> str:
    """The suite's Markdown table (one line per row), under a header naming the machine and mode."""
    columns = (
        "row",
        "status",
        "ran",
        "engine s/step",
        "bare s/step",
        "engine/bare",
        "engine peak",
        "bare peak",
        "engine samples/s",
        "bare samples/s",
        "result",
        "goals",
    )
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for outcome in outcomes:
        row = outcome.row or Row()
        engine, bare = row.engine, row.bare
        goals = "; ".join(f"{goal}: {'met' if met else 'MISSED'}" for goal, met in row.goals)
        cells = (
            outcome.spec.title,
            outcome.status,
            row.setup,
            f"{engine.s_per_step:.4f}" if engine else "",
            f"{bare.s_per_step:.4f}" if bare else "",
            f"{row.ratio:.3f}" if row.ratio is not None else "",
            gigabytes(engine.peak_bytes) if engine else "",
            gigabytes(bare.peak_bytes) if bare else "",
            f"{engine.samples_per_s:.2f}" if engine else "",
            f"{bare.samples_per_s:.2f}" if bare else "",
            row.result,
            goals,
        )
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def environment(suite: Suite) -> dict[str, Any]:
    import diffusers
    import peft
    import torch
    import transformers

    device = suite.device
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "mode": "full" if suite.full else "reduced",
        "precision": precision_name(suite.placement.precision),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "steps": suite.steps,
        "warmup": suite.warmup,
        "repeats": suite.repeats,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_args(argv: Sequence[str] | None) -> Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N")
    parser.add_argument(
        "--mode", choices=("full", "reduced"), help="full sizes, or reduced (default: full on CUDA, else reduced)"
    )
    parser.add_argument("--only", nargs="+", choices=[spec.key for spec in ROWS], help="run these rows only")
    parser.add_argument("--steps", type=int, help="timed steps per run (default 15 full, 3 reduced)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps per run, at least 1 (default 3 / 1)")
    parser.add_argument("--repeats", type=int, help="runs per side, alternating (default 2 / 1)")
    parser.add_argument("--out", type=Path, help="the table (Markdown); default bench/results/gpu_suite-<mode>.md")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.warmup_steps is not None and args.warmup_steps < 1:
        parser.error("--warmup-steps must be at least 1")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rows, printing and rewriting the table after each; exit 0 (a measurement, not a test)."""
    args = parse_args(argv)
    # Before diffusers/transformers/lorad are imported: never touch the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from lorad.cli.progress import quiet_libraries
    from lorad.training.placement import pick_placement

    quiet_libraries()
    placement = pick_placement(args.device, "auto")
    full = (args.mode or ("full" if placement.device.type == "cuda" else "reduced")) == "full"
    out = args.out or RESULTS_DIR / f"gpu_suite-{'full' if full else 'reduced'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lorad-gpu-suite-"))
    suite = Suite(
        placement=placement,
        full=full,
        work=work,
        steps=args.steps or (15 if full else 3),
        warmup=args.warmup_steps or (3 if full else 1),
        repeats=args.repeats or (2 if full else 1),
    )
    env = environment(suite)
    header = (
        f"lorad GPU suite on {env['device_name'] or env['device']} ({env['device']}, {env['mode']} sizes, "
        f"{env['precision']}; torch {env['torch']}, {suite.warmup} warm-up + {suite.steps} timed steps, "
        f"{suite.repeats} repeats per side; peaks are allocated memory, 1 GB = 10^9 bytes)"
    )
    outcomes: list[Outcome] = []
    started = time.monotonic()
    try:
        for spec in ROWS:
            if args.only and spec.key not in args.only:
                continue
            print(f"== {spec.title}", flush=True)
            outcome = run_row(spec, suite)
            outcomes.append(outcome)
            print(f"   {outcome.status} ({outcome.seconds:.0f} s)", flush=True)
            text = table(outcomes, header)
            out.write_text(text)
            details = [asdict(o) for o in outcomes]
            payload = {"environment": env, "seconds": time.monotonic() - started, "rows": details}
            out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(outcomes, header))
    print(f"table: {out}  details: {out.with_suffix('.json')}  ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
