"""When the loop samples, and how it keeps sampling from touching training.

A round calls the family's :meth:`~lorad.training.family.FamilyRun.sample` with the optimizer's eval
weights (schedule-free: the averaged ones, as an export holds), without gradients, and with every
global RNG (torch CPU and CUDA, Python's, NumPy's) saved before and put back after, so a run that
samples trains exactly the numbers a run that does not would. A round that fails (out of memory, a
bug in a renderer) is a warning naming the reason; training goes on.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import torch

from lorad.config.schema import TrainingKeys
from lorad.errors import is_out_of_memory
from lorad.events import Event, EventSink, LogLine
from lorad.sampling.contact_sheet import contact_sheet_path, write_contact_sheet
from lorad.sampling.files import list_samples
from lorad.training.family import FamilyRun


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """Every global RNG as it was before the block, after it (whatever the block drew)."""
    import numpy as np

    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    python, numpy = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        np.random.set_state(numpy)


@contextlib.contextmanager
def exact_eval_weights(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """The optimizer's eval weights inside the block (schedule-free: the averaged ones), and afterwards the
    training weights bit for bit: schedule-free's train() recomputes them in floating point, which is
    close but not exact, so they are copied back from a snapshot (a LoRA's weights: megabytes)."""
    switch = getattr(optimizer, "eval", None)
    if not callable(switch):
        yield
        return
    kept = [p.detach().clone() for p in params]
    switch()
    try:
        yield
    finally:
        optimizer.train()  # type: ignore[attr-defined]
        with torch.no_grad():
            for param, value in zip(params, kept, strict=True):
                param.copy_(value)


class SampleRounds:
    """The run's sampling: at the first step (``sample_at_first``: a baseline without the adapter), every
    ``sample_every_n_steps`` steps, every ``sample_every_n_epochs`` epochs, on request, and at the end.
    Inert when the family's run has no ``sample`` method, or when not ``active``."""

    def __init__(
        self,
        config: TrainingKeys,
        run: FamilyRun,
        optimizer: torch.optim.Optimizer,
        params: list[torch.nn.Parameter],
        on_event: EventSink,
        *,
        active: bool = True,
    ) -> None:
        self.config, self.run, self.optimizer, self.params, self.on_event = config, run, optimizer, params, on_event
        # Inactive on every rank of a data-parallel run but the reporting one.
        self.supported = active and callable(getattr(run, "sample", None))
        self.last_step: int | None = None  # the step of the newest round (none twice for one step)

    @property
    def scheduled(self) -> bool:
        """Whether the config asks for samples during training."""
        config = self.config
        return bool(config.sample_every_n_steps or config.sample_every_n_epochs or config.sample_at_first)

    def at_start(self, step: int) -> None:
        """Before the first step of a fresh run: the baseline, when ``sample_at_first``."""
        if self.config.sample_at_first and step == 0:
            self.draw(0, baseline=True)

    def after_step(self, step: int) -> None:
        every = self.config.sample_every_n_steps
        if every and step % every == 0:
            self.draw(step)

    def after_epoch(self, step: int, epoch: int) -> None:
        every = self.config.sample_every_n_epochs
        if every and epoch % every == 0:
            self.draw(step)

    def at_end(self, step: int) -> str | None:
        """After the last step: a final round (unless one just ran) and the contact sheet; its path, if any."""
        if not (self.supported and self.scheduled):
            return None
        self.draw(step)
        config = self.config
        sheet = write_contact_sheet(
            list_samples(config.output_dir, config.output_name),
            contact_sheet_path(config.output_dir, config.output_name),
        )
        return str(sheet) if sheet else None

    def draw(self, step: int, *, baseline: bool = False, force: bool = False) -> list[Event]:
        """One round at ``step`` (skipped when one ran at this step already, unless ``force``); its events."""
        if not self.supported or (self.last_step == step and not force):
            return []
        self.last_step = step
        try:
            with kept_rng(), exact_eval_weights(self.optimizer, self.params), torch.no_grad():
                return list(self.run.sample(step, baseline=baseline))
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if is_out_of_memory(err) and torch.cuda.is_available():
                torch.cuda.empty_cache()  # the round's activations; training's own memory is untouched
            event = LogLine(message=f"samples at step {step} failed: {reason}; training goes on", level="warning")
            self.on_event(event)
            return [event]
