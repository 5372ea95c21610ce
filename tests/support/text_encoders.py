"""Counting text-encoder forward passes (to show cached encoders are not run again)."""

from __future__ import annotations

import json
from pathlib import Path

from lorad.events import Event, TrainingStarted
from lorad.training.loop import train


def count_text_encoder_forwards(config, model_dir: Path) -> tuple[int, int, dict]:
    """Train ``config`` on a model loaded here, counting text-encoder forwards before and after the
    first step starts."""
    from contextlib import contextmanager

    from lorad.families.sdxl.family import FAMILY
    from lorad.training.family import ProvidedModel
    from lorad.training.placement import pick_placement

    placement = pick_placement("cpu", "no")
    model = FAMILY.load(FAMILY.model_key(config, placement))
    counts = {"before": 0, "during": 0}
    phase = {"now": "before"}
    for encoder in (model.text_encoder, model.text_encoder_2):
        encoder.register_forward_hook(lambda *_: counts.__setitem__(phase["now"], counts[phase["now"]] + 1))

    def on_event(event: Event) -> None:
        if isinstance(event, TrainingStarted):
            phase["now"] = "during"

    @contextmanager
    def provide(_config, _placement):
        yield ProvidedModel(model=model, resident=True, seconds=0.0)

    train(config, on_event=on_event, models=provide)
    summary = json.loads((config.output_dir / "training_summary.json").read_text())
    return counts["before"], counts["during"], summary
