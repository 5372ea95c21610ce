"""Rendering training events in a terminal: a progress bar plus one line per notable event."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from lorad.events import Event, StepDone, TrainingFinished, TrainingStarted
from lorad.server.proto_convert import engine_events_to_proto
from lorad_client.format import describe_event


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

    def print_line(self, text: str) -> None:
        """Print a line above the progress bar (or plainly, before the bar exists)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def __call__(self, event: Event) -> None:
        """Draw one event: steps move the bar, the end closes it, every other event prints the line
        lorad_client.format gives its wire form, the same line the TUI and the WebUI show."""
        if isinstance(event, StepDone):
            self._advance(event)
        elif isinstance(event, TrainingFinished):
            self.close()
        elif (line := describe_event(engine_events_to_proto("", [event])[0])) is not None:
            self.print_line(line)
            if isinstance(event, TrainingStarted):
                self._bar = self._new_bar(event.total_steps, event.start_step)

    def _advance(self, event: StepDone) -> None:
        if self._bar is None:  # following a job that started before we looked: the bar starts here
            self._bar = self._new_bar(event.total_steps, event.step - 1)
        self._bar.set_postfix(epoch=event.epoch, loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)
        self._bar.update(event.step - self._bar.n)

    def _new_bar(self, total: int, initial: int) -> Any:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, file=self.stream, unit="step", dynamic_ncols=True, mininterval=0.5)

    def close(self) -> None:
        """Finish the bar so later output starts on a clean line."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
