"""Rendering training events in a terminal: a progress bar plus one line per notable event."""

from __future__ import annotations

import sys
from typing import TextIO

from lorad.events import (
    CheckpointSaved,
    DataReported,
    EvalDone,
    Event,
    LatentsCached,
    LogLine,
    MemoryRecovered,
    ModelLoaded,
    SampleGenerated,
    SampleImage,
    StepDone,
    TrainingFinished,
    TrainingStarted,
)
from lorad_client.format import describe_sample_image


def quiet_libraries() -> None:
    """Silence diffusers'/transformers' own progress bars and info chatter; lorad reports progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


class TerminalProgress:
    """An EventSink that draws a tqdm bar (step/total, loss, lr, it/s, ETA) and prints milestones."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._bar = None

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        from tqdm import tqdm

        if isinstance(event, DataReported):
            self._print(event.text)
        elif isinstance(event, ModelLoaded):
            how = "already resident" if event.resident else f"loaded in {event.seconds:.1f}s"
            self._print(f"base model: {event.source} ({event.model_version}, {how})")
        elif isinstance(event, LatentsCached):
            self._print(f"latents: {event.cached} from cache, {event.encoded} encoded ({event.seconds:.1f}s)")
        elif isinstance(event, TrainingStarted):
            if event.start_step:
                where = f" from {event.resumed_from}" if event.resumed_from else ""
                self._print(f"resuming at step {event.start_step} of {event.total_steps}{where}")
            self._print(
                f"training {event.trainable_params:,} LoRA parameters on {event.device} "
                f"(precision {event.precision}), {event.total_steps} steps"
            )
            self._bar = tqdm(
                total=event.total_steps,
                initial=event.start_step,
                file=self.stream,
                unit="step",
                dynamic_ncols=True,
                mininterval=0.5,
            )
        elif isinstance(event, StepDone):
            if self._bar is None:  # following a job that started before we looked: the bar starts here
                self._bar = tqdm(
                    total=event.total_steps,
                    initial=event.step - 1,
                    file=self.stream,
                    unit="step",
                    dynamic_ncols=True,
                    mininterval=0.5,
                )
            self._bar.set_postfix(epoch=event.epoch, loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
            self._bar.update(event.step - self._bar.n)
        elif isinstance(event, CheckpointSaved):
            self._print(f"checkpoint saved: {event.path}")
        elif isinstance(event, MemoryRecovered):
            self._print(f"warning: {event.change} (the step is redone; the effective batch is unchanged)")
        elif isinstance(event, LogLine):
            self._print(("warning: " if event.level == "warning" else "") + event.message)
        elif isinstance(event, EvalDone):
            self._print(f"eval loss after step {event.step}: {event.loss:.4f} ({event.samples} records)")
        elif isinstance(event, SampleGenerated):
            end = "" if event.stopped == "eos" else " [cut at sample_max_new_tokens]"
            when = f" (step {event.step})" if event.step else ""
            self._print(f"sample{when}: {event.prompt!r} -> {event.output!r}{end}")
        elif isinstance(event, SampleImage):
            self._print(describe_sample_image(event.step, event.prompt_index, event.prompt, event.path))
        elif isinstance(event, TrainingFinished):
            self.close()

    def close(self) -> None:
        """Finish the bar so later output starts on a clean line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
