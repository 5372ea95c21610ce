"""Rows of the GPU suite (bench/gpu_suite.py) that belong to one model family: ``<family>.py`` each.

The suite lists every row it knows (``bench.gpu_suite.ROWS``); a family's row names its function as
``"bench.gpu_rows.<family>:row"``, and runs once the family is registered in this build and the module
exists. The contract:

    def row(suite: Suite) -> Row

- Build the real architecture with random weights on ``suite.device`` (no downloads), at full size
  when ``suite.full`` and at a tiny size otherwise (``suite.pick(full, reduced)``); scratch files go in
  ``suite.folder(name)``.
- Time lorad's engine (``lorad.training.loop.train`` with a provider that yields the in-memory model)
  and a bare diffusers/transformers loop on the same model object, alternating them ``suite.repeats``
  times, each with ``suite.warmup`` untimed and ``suite.steps`` timed steps. The engine reports step k
  once step k+1 is queued: sync and mark at the reports of steps ``warmup`` and ``warmup + steps - 1``
  (``steps - 1`` steps between). See ``bench/engine_vs_bare.py`` (SD1.5) and ``bench/llm_vs_bare.py``
  for both sides written out.
- Return ``Row(engine=Side(s_per_step, peak_bytes, batch), bare=Side(...))`` with the medians, and add
  the family's goals as ``row.goals.append((text, met))`` (e.g. SDXL: engine peak ≤ 10 GB). Raise on
  failure: the suite writes the error into the row and goes on with the next.
"""
