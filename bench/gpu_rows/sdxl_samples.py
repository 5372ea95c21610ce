"""The GPU suite's SDXL sampling row: seconds per 1024 px SDXL sample image (20 steps, SDXL's default CFG),
drawn as the loop draws them (``bench.sampling_cost.sample_rounds_case``), and peak memory after 1 round and
after 20. The model is the SDXL row's (``bench.gpu_rows.sdxl.build_model``): the real-size SDXL architecture
with random weights on ``suite.device``, the tiny SDXL in the reduced mode.
"""

from __future__ import annotations

from bench.gpu_suite import Row, Suite, sampling_result_row


def row(suite: Suite) -> Row:
    from bench.gpu_rows.sdxl import build_model
    from bench.sampling_cost import sample_rounds_case

    size = suite.pick(1024, 64)
    result = sample_rounds_case(
        "sdxl", build_model(suite), suite.placement, suite.folder("sdxl-samples"), size=size,
        sample_steps=suite.pick(20, 4), rounds=suite.pick(20, 3),
    )  # fmt: skip
    label = f"{suite.pick('sdxl', 'tiny sdxl')} {size} px, {result['sample_steps']} steps, CFG {result['cfg_scale']:g}"
    return sampling_result_row(result, label)
