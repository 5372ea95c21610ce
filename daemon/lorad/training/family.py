"""What a model family plugs into the one training loop (:func:`lorad.training.loop.train`).

The loop owns everything every family does the same way: the output folder, the model provider and
putting the base model back afterwards, resume and checkpoints, the optimizer, schedule, loss
scaling, clipping and step, divergence and stop handling, events and TensorBoard, the summary.
A family supplies the parts that differ, in two objects:

- a :class:`ModelFamily` (one per family, stateless): scans the data before any model loads, names
  and loads the base model (the daemon keeps it resident under :meth:`ModelFamily.model_key`), puts
  it back exactly as found, and starts a run on it;
- a :class:`FamilyRun` (one per run): the adapted parts and their parameter groups, the plan of an
  epoch's micro-batches, the loss of one micro-batch, and the export of the trained adapter.

Composition, not inheritance: the loop calls these methods and nothing else, so it reads top to
bottom, and a new family is one package with a ``spec.py`` (see :mod:`lorad.families.registry`)
and a ``family.py`` holding these two objects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lorad.config.schema import TrainingKeys
    from lorad.events import Event, EventSink
    from lorad.models.registry import ModelKey
    from lorad.training.placement import Placement

# One adapter name per run; a resident base model never carries two runs' adapters at once.
ADAPTER = "lorad_run"

# Images without a caption → their generated captions (see lorad.captioning.training.caption_filler).
CaptionFiller = Callable[[list[Path]], Mapping[Path, str]]


@dataclass(frozen=True)
class RunHooks:
    """Services the caller lends a run. ``caption_missing`` captions images that have none (image
    families with a ``captioner`` set); ``stop`` set asks the run to checkpoint and stop after the
    current step."""

    caption_missing: CaptionFiller | None = None
    stop: threading.Event | None = None


@dataclass(frozen=True)
class ScannedData:
    """What a family's data scan found, before any model is loaded.

    ``report`` (JSON-friendly) and ``text`` (for people) go into the ``DataReported`` event and the
    summary; ``notes`` become log lines; ``payload`` is the family's own view of the data, handed
    back to :meth:`ModelFamily.start`.
    """

    report: dict[str, Any]
    text: str
    payload: Any
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProvidedModel:
    """A base model ready on the run's device, and how it got there."""

    model: Any
    resident: bool  # True when it was already in memory (no load happened for this run)
    seconds: float  # time spent loading for this run


@dataclass(frozen=True)
class RunFacts:
    """What happened in a run, for the export's metadata."""

    started_at: float  # unix time
    steps: int
    epoch: int
    final_loss: float
    precision: str
    # "" for the trained weights; "ema" when the loop exports the EMA weights beside them (files get a suffix).
    variant: str = ""


@dataclass
class Scalars:
    """Numbers a family reports beside the loop's own: TensorBoard scalars of a step, and entries of
    training_summary.json. Filled by the family's run; read by the loop."""

    by_step: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


class FamilyRun(Protocol):
    """One run of a family on a provided base model, with its adapter attached.

    Contract: ``parts`` maps a part name ("unet", "text_encoder", "model", ...) to the module carrying
    the adapter :data:`ADAPTER`; the loop checkpoints and restores exactly those adapters.
    ``param_groups`` are the optimizer's groups over their trainable parameters (each with "params"
    and "lr"). :meth:`plan` is deterministic in ``epoch`` (a resumed run replays it), and
    :meth:`loss` draws its randomness only from ``generator`` (on the run's device, seeded by the
    loop from seed, epoch and planned micro-batch) and the global RNGs the loop checkpoints.

    In a run on several devices (:mod:`lorad.training.distributed`) ``plan`` is made at the global
    micro-batch (the family's config says ``batch_size`` × devices), each rank trains its rows of every
    micro-batch (:meth:`split`), and :meth:`after_step`, :meth:`finish` and the exports run on rank 0
    only: they must not change the weights or anything a step computes.

    Out-of-memory recovery uses two more methods, optional (a run without them skips those rungs):
    :meth:`split` cuts a planned micro-batch into smaller pieces, and :meth:`reduce_memory` turns
    on the family's own savings (e.g. ``fp8_base``). See :mod:`lorad.training.memory_recovery`.
    """

    parts: Mapping[str, nn.Module]
    param_groups: list[dict[str, Any]]
    scalars: Scalars

    def plan(self, epoch: int) -> Sequence[Any]:
        """The micro-batches of ``epoch``, in order (the same for the same epoch, always)."""
        ...

    def loss(self, micro_batch: Any, generator: torch.Generator) -> torch.Tensor:
        """The mean loss of one micro-batch, or of a piece :meth:`split` made (a scalar with grad, left
        on the device: never read it on the host); called inside the run's autocast.

        ``generator`` lives on the run's device: draw with ``device=generator.device`` so no random
        number crosses from the host. A piece must draw what its whole micro-batch draws and keep its
        own rows, so a step redone in pieces trains on exactly the same numbers."""
        ...

    def split(self, micro_batch: Any, size: int) -> Sequence[tuple[Any, float]]:
        """Optional. ``micro_batch`` as pieces of at most ``size`` samples, in order, each with its share
        of the micro-batch's loss (shares sum to 1: the pieces' ``share * loss`` add up to the whole's
        mean loss, e.g. samples or labelled tokens in the piece over those in the whole).

        ``micro_batch`` may itself be a piece split made: then its own rows are split, with shares of its
        loss. A data-parallel run gives each rank one piece of every planned micro-batch this way (and
        out-of-memory recovery splits that piece further); a family without ``split`` trains on one
        device only."""
        ...

    def reduce_memory(self) -> str | None:
        """Optional. Turn on the next memory saving the family has beyond micro-batch 1 and gradient
        checkpointing (e.g. ``fp8_base``: frozen weights stored in fp8) and return its name; None when
        there is none left. :meth:`ModelFamily.restore` must undo it."""
        ...

    def train_mode(self, gradient_checkpointing: bool) -> None:
        """Put the adapted parts in training mode (and turn checkpointing on) before the first step;
        out-of-memory recovery calls it again with True to turn checkpointing on mid-run.
        :meth:`ModelFamily.restore` undoes it."""
        ...

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after each optimizer step (an LLM evaluates every ``eval_steps`` here)."""
        ...

    def finish(self, step: int) -> None:
        """Called once after the last step (``step``), before :meth:`export` (an LLM's final evaluation)."""
        ...

    def sample(self, step: int, *, baseline: bool = False) -> Sequence[Event]:
        """Optional (a run without it never samples). Draw the config's sample prompts with the adapter as
        trained after ``step`` and report each result: emit it with the run's ``on_event`` and return the
        same events, in prompt order. ``baseline`` (``sample_at_first``, step 0): draw them without the
        adapter (see :func:`lorad.lora.networks.network_off`). Return [] when the config has no prompts.

        Image families write each image with :class:`lorad.sampling.rounds.ImageRound` (the PNG with A1111's
        metadata in ``output_dir/samples/``, a ``SampleImage`` event; a prompt that fails, e.g. out of
        memory, becomes a warning naming it and the round goes on); an LLM emits ``SampleGenerated``.

        The loop calls it (:mod:`lorad.training.sample_rounds`) between optimizer steps, after gradients
        were freed, inside ``torch.no_grad()`` and the optimizer's eval weights, with every global RNG saved
        before and restored after, and not inside autocast (pick the precision per component: e.g. a VAE
        decodes in fp32). The run itself must: put its adapted parts (and LyCORIS networks) in eval mode and
        back exactly as found (:func:`lorad.lora.networks.evaluating`); use the resident components and the
        live adapter, never a copy of the weights; draw its noise only from generators it seeds from each
        prompt's seed (on the CPU, so a seed draws the same image on every device); not reload a frozen text
        encoder it freed: encode the prompts in ``start`` (before training) when the encoder is frozen, and
        at sample time only when it is trained; and leave no state behind that a later step reads (caches
        it would evict, compiled graphs, scheduler objects shared with training). An exception it raises is
        logged as a warning for the whole round and training goes on."""
        ...

    def export(self, facts: RunFacts) -> dict[str, str]:
        """Write the trained adapter's files into ``output_dir`` (atomically); return role → path."""
        ...

    def export_epoch(self, facts: RunFacts) -> None:
        """At the end of every ``save_every_n_epochs``-th epoch: write that epoch's adapter file where the
        family has one (kohya's ``NAME-00000N.safetensors``); DiskFull when it does not fit."""
        ...

    def export_partial(self, facts: RunFacts) -> Path | None:
        """A stopped run's adapter of its last completed step, named as partial, so a cancelled job still
        leaves one; None when none could be written (a full disk is a warning: the checkpoint matters more)."""
        ...


class ModelFamily(Protocol):
    """A model family's plug-in: see the module docstring for what it owns and what the loop owns."""

    name: str

    def scan(self, config: TrainingKeys, *, on_event: EventSink, hooks: RunHooks) -> ScannedData:
        """Read and check the training data without loading any model; DataError when none is usable."""
        ...

    def model_key(self, config: TrainingKeys, placement: Placement) -> ModelKey:
        """The registry key of the base model this config trains on (equal keys share a resident model)."""
        ...

    def load(self, key: ModelKey) -> Any:
        """Load and place a base model for training, as :meth:`model_key` describes it; the returned object
        has ``source`` and ``model_version`` attributes. ModelLoadError when it cannot be used."""
        ...

    def start(
        self,
        config: TrainingKeys,
        model: Any,
        data: ScannedData,
        placement: Placement,
        on_event: EventSink,
    ) -> FamilyRun:
        """Prepare a run: resolve adapter targets, cache what never changes (latents, frozen encoder
        outputs), attach the adapter (its initial weights drawn from the global RNG the loop seeded)."""
        ...

    def restore(self, model: Any) -> None:
        """Leave a (possibly resident, shared) base model exactly as the run found it: adapter removed,
        checkpointing off, eval mode. Safe to call when nothing was changed."""
        ...

    def signature(self, config: TrainingKeys) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        ...


class RowRange(Protocol):
    """A micro-batch that trains a range of its rows: ``samples[start:stop]`` (``stop`` None: to the end)."""

    samples: tuple[int, ...]
    start: int
    stop: int | None


_Rows = TypeVar("_Rows", bound=RowRange)


def split_rows(micro_batch: _Rows, size: int) -> list[tuple[_Rows, float]]:
    """:meth:`FamilyRun.split` for a micro-batch that is a frozen dataclass :class:`RowRange`: pieces of at
    most ``size`` of its trained rows, each with its share of them. Each piece still names every sample
    of the micro-batch, so its loss draws the whole micro-batch's random numbers and keeps its own rows."""
    first, last = slice(micro_batch.start, micro_batch.stop).indices(len(micro_batch.samples))[:2]
    return [
        (replace(micro_batch, start=at, stop=min(at + size, last)), (min(at + size, last) - at) / (last - first))
        for at in range(first, last, size)
    ]
