"""The GPU suite's FLUX row: the real-size FLUX.1-dev transformer (19 double + 38 single blocks, random weights
made in memory) at 1024 px, batch 1, rank 16, gradient checkpointing and ``base_quantization: fp8`` (issue 17's
setting; goal: engine peak ≤ 20 GB); the tiny FLUX.1-dev at 64 px, fp8 too, when reduced.

Both sides are ``bench.flux_vs_bare``'s: the FLUX family on the one loop, handed the resident transformer as the
daemon's registry does, and a bare flow-matching loop (peft LoRA, cached latents and text outputs, AdamW) on
the same transformer object. ``python -m bench.flux_vs_bare --only real`` also runs bf16 and fp8 + block swap.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import replace

from bench.gpu_suite import GB, Row, Side, Suite, precision_name

PEAK_GOAL_GB = 20


def row(suite: Suite) -> Row:
    from bench import flux_vs_bare as fvb
    from lorad.models.tiny_flux import build_tiny_flux

    timing = {"steps": suite.steps, "warmup_steps": suite.warmup, "repeats": suite.repeats}
    if suite.full:
        case = replace(next(c for c in fvb.real_size_cases() if c.name == "real-fp8"), **timing)
    else:
        case = fvb.FluxCase("tiny", 64, 32, batch_size=1, rank=8, base_quantization="fp8", **timing)
    work = suite.folder("flux")
    tiny = build_tiny_flux(work / "tiny-flux", variant="dev", seed=fvb.SEED)  # also the tokenizers at real size
    args = Namespace(device=suite.device_flag, precision=suite.placement.precision)
    result = fvb.bench_case(case, suite.placement, args, work, tiny)
    measured = Row(
        engine=Side(result["engine_s_per_step"], result["peak_bytes"]["engine"], case.batch_size),
        bare=Side(result["bare_s_per_step"], result["peak_bytes"]["bare"], case.batch_size),
        setup=(
            f"{suite.pick('FLUX.1-dev', 'tiny FLUX.1-dev')} {case.resolution} px, batch {case.batch_size}, "
            f"rank {case.rank}, {case.base_quantization} base, {precision_name(result['precision'])}"
        ),
        details=result,
    )
    if measured.engine.peak_bytes is not None:
        measured.goals.append((f"engine peak ≤ {PEAK_GOAL_GB} GB", measured.engine.peak_bytes <= PEAK_GOAL_GB * GB))
    return measured
