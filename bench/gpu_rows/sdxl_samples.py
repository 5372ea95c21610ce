"""The GPU suite's SDXL sampling row: seconds per 1024 px SDXL sample image (20 steps, CFG 7), drawn as the
loop draws them (``bench.sampling_cost.sample_rounds_case``), and peak memory after 1 round and after 20.

It needs the SDXL family's ``sample`` (issue 16's hook) and its suite row's model builder: the SDXL row
module (``bench/gpu_rows/sdxl.py``) provides ``build_model(suite)``, returning the real-size SDXL
architecture with random weights placed on ``suite.device`` (the tiny SDXL when ``suite.full`` is False),
as its own training row uses it. Until both have landed, the row says which one is missing.
"""

from __future__ import annotations

from bench.gpu_suite import Row, Suite, sampling_result_row


def row(suite: Suite) -> Row:
    from bench.sampling_cost import sample_rounds_case

    try:
        from bench.gpu_rows.sdxl import build_model
    except ImportError as err:
        raise RuntimeError(f"bench/gpu_rows/sdxl.py has no build_model(suite) yet ({err})") from None
    size = suite.pick(1024, 64)
    result = sample_rounds_case(
        "sdxl", build_model(suite), suite.placement, suite.folder("sdxl-samples"), size=size,
        sample_steps=suite.pick(20, 4), rounds=suite.pick(20, 3),
    )  # fmt: skip
    label = f"{suite.pick('sdxl', 'tiny sdxl')} {size} px, {result['sample_steps']} steps, CFG 7"
    return sampling_result_row(result, label)
