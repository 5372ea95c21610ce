"""The GPU suite's SDXL row: real-size SDXL (random weights) at 1024 px, batch 1, bf16, gradient checkpointing,
lorad's SDXL family against a bare diffusers SDXL loop on the same model (``bench.sdxl_vs_bare``); the tiny
SDXL at 64 px in the reduced mode. Goal at full size: the engine's peak allocated memory at most 10 GB
(kohya documents 8 GB as possible and 10 GB as recommended)."""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from bench.gpu_suite import GB, Row, Side, Suite, precision_name

PEAK_GOAL_GB = 10


def row(suite: Suite) -> Row:
    from bench import sdxl_vs_bare as svb
    from bench.engine_vs_bare import CaseSettings

    settings = CaseSettings(
        suite.pick("sdxl", "tiny"),
        resolution=suite.pick(1024, 64),
        batch_size=1,
        steps=suite.steps,
        warmup_steps=suite.warmup,
        repeats=suite.repeats,
        rank=8,
        gradient_checkpointing=True,
    )
    result = svb.bench_case(
        settings, suite.placement, Namespace(device=suite.device_flag, fp8_base=False), suite.folder("sdxl")
    )
    measured = Row(
        engine=Side(result["engine_s_per_step"], result["peak_bytes"]["engine"], 1),
        bare=Side(result["bare_s_per_step"], result["peak_bytes"]["bare"], 1),
        setup=f"{settings.name} {settings.resolution} px, batch 1, {precision_name(result['precision'])}, "
        "gradient checkpointing",
        details=result,
    )
    if measured.engine.peak_bytes is not None:
        measured.goals.append((f"engine peak ≤ {PEAK_GOAL_GB} GB", measured.engine.peak_bytes <= PEAK_GOAL_GB * GB))
    return measured


def build_model(suite: Suite) -> Any:
    """The SDXL model a row runs on, placed as the family keeps a resident one: the real-size SDXL architecture
    with random weights on ``suite.device`` (the tiny SDXL, built once in the suite's folder, when reduced)."""
    from bench import sdxl_vs_bare as svb
    from lorad.models.tiny_sdxl import build_tiny_sdxl

    tiny = suite.work / "tiny-sdxl"
    if not tiny.exists():
        build_tiny_sdxl(tiny, seed=svb.SEED)
    return svb.build_sdxl(tiny / "tokenizer", suite.placement) if suite.full else svb.load_tiny(tiny, suite.placement)
