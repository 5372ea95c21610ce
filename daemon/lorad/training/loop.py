"""The one training loop: every model family's run, top to bottom, in :func:`train`.

What differs between families (data, model, targets, the loss of a micro-batch, export) comes from
the family's plug-in (:mod:`lorad.training.family`); everything else is here, once.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lorad.config.schema import TrainingKeys
from lorad.errors import TrainingDiverged, TrainingInterrupted, is_out_of_memory
from lorad.events import (
    CheckpointSaved,
    DataReported,
    Event,
    EventSink,
    LogLine,
    ModelLoaded,
    StepDone,
    TrainingFinished,
    TrainingStarted,
    ignore_events,
)
from lorad.families import registry
from lorad.lora.adapters import load_lora_state_dict, lora_state_dict
from lorad.training.checkpoints import Checkpoint, check_signature, open_run, restore_rng
from lorad.training.distributed import SINGLE, Ranks, resume_batch_problem
from lorad.training.ema import ParameterEma
from lorad.training.family import (
    ADAPTER,
    CaptionFiller,
    FamilyRun,
    ModelFamily,
    ProvidedModel,
    RunFacts,
    RunHooks,
    ScannedData,
)
from lorad.training.lagged import LaggedValues, all_finite, wait_for_device
from lorad.training.memory_recovery import MemoryRecovery
from lorad.training.optimizers import (
    build_optimizer,
    build_scheduler,
    eval_weights,
    optimizer_hints,
    set_optimizer_mode,
)
from lorad.training.placement import Placement, allow_tf32, pick_placement
from lorad.training.run_folder import prepare_output_dir, write_summary
from lorad.training.run_requests import SAVE_NOW, RequestNotDone, RunRequests, answer_requests
from lorad.training.sample_rounds import SampleRounds, exact_eval_weights
from lorad.training.scalar_log import ScalarLog

# Gives a run its base model for the duration of a `with` block (the daemon's registry reserves a
# resident model this way; the default loads a private copy).
ModelProvider = Callable[[TrainingKeys, Placement], AbstractContextManager[ProvidedModel]]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    outputs: dict[str, str]
    steps: int
    final_loss: float
    seconds: float


@dataclass(frozen=True)
class StepNote:
    """What the host knows of a step when it is queued; its loss joins it one step later."""

    step: int
    epoch: int  # counted from 1
    lr: float
    steps_per_second: float


def fresh_model_provider(family: ModelFamily) -> ModelProvider:
    """The default ModelProvider: load the config's base model for this run only."""

    @contextmanager
    def provide(config: TrainingKeys, placement: Placement) -> Iterator[ProvidedModel]:
        start = time.monotonic()
        model = family.load(family.model_key(config, placement))
        yield ProvidedModel(model=model, resident=False, seconds=time.monotonic() - start)

    return provide


def batch_report(config: TrainingKeys, devices: int) -> dict[str, int]:
    """The batch a step trains on: per-device batch × devices × accumulation = the global batch."""
    accum = config.gradient_accumulation_steps
    return {
        "per_device": config.batch_size,
        "devices": devices,
        "gradient_accumulation_steps": accum,
        "global": config.batch_size * devices * accum,
    }


def batch_line(batch: dict[str, int]) -> str:
    """The data report's line about the batch."""
    return (
        f"batch: {batch['per_device']} per device × {batch['devices']} device{'s' if batch['devices'] != 1 else ''}"
        f" × {batch['gradient_accumulation_steps']} accumulation = {batch['global']} samples per step"
    )


def train(
    config: TrainingKeys,
    *,
    on_event: EventSink = ignore_events,
    stop: threading.Event | None = None,
    models: ModelProvider | None = None,
    caption_missing: CaptionFiller | None = None,
    requests: RunRequests | None = None,
    ranks: Ranks = SINGLE,
) -> TrainResult:
    """Train ``config``'s adapter and write its outputs into ``config.output_dir``.

    ``models`` provides the base model (the daemon passes its resident-model registry; the model is
    left bit-identical: the adapter is removed afterwards); by default it is loaded for this run.
    Setting ``stop`` makes the run save a checkpoint after the current step and raise
    TrainingInterrupted. ``requests`` ("sample now", "save now" from another thread) are answered after
    the step they arrive in; the run closes the channel when it ends. Raises DataError before any model
    is loaded when no data is usable; TrainingDiverged on a NaN/inf loss (earlier checkpoints are kept);
    ConfigError for settings only the model can check.

    ``ranks`` makes this process one rank of a data-parallel run (:mod:`lorad.training.distributed`):
    ``config.batch_size`` is then the per-device batch, the epoch plan is made at the global micro-batch
    (batch_size × ranks), and only rank 0 sends events, samples, answers ``requests`` and writes into
    ``output_dir``.
    """
    family = registry.load_plugin(config.model_family)
    run_start, started_at = time.monotonic(), time.time()
    timings: dict[str, float] = {}
    if not ranks.is_main:
        on_event = ignore_events  # rank 0 tells the story; every rank computes the same numbers
    # What the family sees: the global micro-batch, so the plan (and a checkpoint's signature) is the same
    # whatever the number of devices that share it.
    family_config = replace(config, batch_size=config.batch_size * ranks.world) if ranks.world > 1 else config

    def scan() -> ScannedData:
        prepare_output_dir(config.output_dir)
        hooks = RunHooks(caption_missing=caption_missing, stop=stop)
        return family.scan(family_config, on_event=on_event, hooks=hooks)

    # Data first: unusable data fails in seconds, before gigabytes of weights load. Rank 0 scans (and
    # captions) once; every rank trains on what it found.
    data = ranks.share(scan)
    batch = batch_report(config, ranks.world)
    data_report = data.report | {"batch": batch}
    on_event(DataReported(report=data_report, text=f"{data.text}\n{batch_line(batch)}"))
    for note in data.notes:
        on_event(LogLine(message=note))

    placement = pick_placement(config.device, config.mixed_precision)
    device = placement.device
    allow_tf32(device)
    hold = ExitStack()  # releases, in reverse order, everything this run reserved or changed
    if requests is not None:
        hold.callback(requests.close, "the job is no longer training")
    try:
        provided = hold.enter_context((models or fresh_model_provider(family))(config, placement))
        hold.callback(family.restore, provided.model)
        timings["load_model"] = provided.seconds
        on_event(
            ModelLoaded(
                source=provided.model.source,
                model_version=provided.model.model_version,
                seconds=provided.seconds,
                resident=provided.resident,
            )
        )

        # The adapter's first weights come from the global RNG; seeding it makes a run repeatable on the CPU.
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        t0 = time.monotonic()
        run = family.start(family_config, provided.model, data, placement, on_event)
        timings["prepare"] = time.monotonic() - t0
        ranks.check_family(run, family.name)
        params = [p for group in run.param_groups for p in group["params"]]
        ranks.broadcast_(params)  # the same first weights everywhere, whatever each rank's RNG did
        optimizer = build_optimizer(run.param_groups, config)
        for hint in optimizer_hints(config, [group["lr"] for group in run.param_groups]):
            on_event(LogLine(message=f"optimizer: {hint}", level="warning"))
        # ema_decay: an average of the weights, updated after every optimizer step and exported at the end.
        ema = ParameterEma(params, config.ema_decay) if config.ema_decay else None
        accum = config.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(run.plan(0)) / accum)
        total_steps = config.max_train_steps or config.epochs * steps_per_epoch
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        scheduler = build_scheduler(optimizer, config, total_steps=total_steps)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler(device.type) if placement.autocast_dtype == torch.float16 else None
        signature = family.signature(family_config)
        run.train_mode(config.gradient_checkpointing)  # family.restore turns it off again
        # Shrinks this rank's part of a step when it runs out of memory (config: the per-device batch).
        memory = MemoryRecovery(config, run, device)
        # Never changes what is trained; rank 0's alone (the others go on to the next all-reduce and wait).
        samples = SampleRounds(config, run, optimizer, params, on_event, active=ranks.is_main)

        # Locks output_dir, clears our stale temp files, reads the resume checkpoint, sets other runs' aside.
        # Rank 0 alone opens the folder; the checkpoint it read is handed to every rank.
        checkpoints = None

        def open_checkpoints() -> Checkpoint | None:
            nonlocal checkpoints
            checkpoints = open_run(config.output_dir, config.resume_from, on_event=on_event)
            hold.callback(checkpoints.close)
            return checkpoints.resumed

        resumed = ranks.share(open_checkpoints)
        step = 0
        if resumed is not None:
            checkpoint = resumed
            # Another number of devices is fine where batch_size × devices is the same (the plan is).
            if problem := resume_batch_problem(checkpoint.signature.get("batch_size"), config.batch_size, ranks.world):
                raise problem
            check_signature(checkpoint.signature, signature)
            for part, module in run.parts.items():
                load_lora_state_dict(module, ADAPTER, checkpoint.lora[part])
            optimizer.load_state_dict(checkpoint.state["optimizer"])
            scheduler.load_state_dict(checkpoint.state["scheduler"])
            if scaler is not None and checkpoint.state.get("scaler"):
                scaler.load_state_dict(checkpoint.state["scaler"])
            restore_rng(checkpoint.state)
            memory.restore(checkpoint.memory)  # the smaller pieces (or checkpointing) an OOM led to
            if ema is not None and checkpoint.state.get("extra", {}).get("ema"):
                ema.load_state_dict(checkpoint.state["extra"]["ema"])
            step = checkpoint.step

        writer = None
        if ranks.is_main:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when training

            writer = SummaryWriter(log_dir=str(config.output_dir / "logs"))
            hold.callback(writer.close)
        scalars = ScalarLog(writer)
        # A step's loss is read on the host one step later, so the device never idles waiting for it.
        lagged: LaggedValues[StepNote] = LaggedValues(device)
        last_loss = float("nan")
        # Ranks stop at the same step: each one's stop request is a vote summed in the step's all-reduce.
        stop_voted = False

        def diverged(what: str) -> TrainingDiverged:
            kept = sorted(config.output_dir.glob("checkpoints/step-*"))
            return TrainingDiverged(
                what,
                "lower learning_rate (e.g. by 10x), keep max_grad_norm at 1, or use bf16 instead of fp16"
                + (f"; the last good checkpoint is {kept[-1]}" if kept else ""),
            )

        def report(note: StepNote, values: list[float]) -> None:
            """A step's loss (and stop votes) reached the host: stop on NaN/inf, else tell everyone about the step."""
            nonlocal last_loss, stop_voted
            loss, votes = values[0], values[1] if len(values) > 1 else 0.0
            stop_voted = stop_voted or votes > 0
            if not math.isfinite(loss):
                raise diverged(f"the loss became {loss} at step {note.step}")
            last_loss = loss
            rate = note.steps_per_second
            on_event(
                StepDone(
                    step=note.step,
                    total_steps=total_steps,
                    epoch=note.epoch,
                    loss=loss,
                    lr=note.lr,
                    steps_per_second=rate,
                    eta_seconds=(total_steps - note.step) / rate,
                )
            )
            scalars.add(note.step, {"loss": loss, "lr": note.lr, "steps_per_second": rate})

        def settle() -> None:
            """Report every step still in flight and check the adapter's weights: before a checkpoint, a
            stop or the export, so that none of them ever holds a NaN."""
            for note, values in lagged.drain():
                report(note, values)
            if not all_finite(params):
                raise diverged(f"the LoRA weights became NaN or infinite by step {step}")
            scalars.flush()

        def save(at_step: int, epoch: int, prune: bool = True) -> str:
            settle()
            if checkpoints is None:  # not the reporting rank
                return ""
            path = checkpoints.save(
                step=at_step,
                epoch=epoch,
                lora={part: lora_state_dict(module, ADAPTER) for part, module in run.parts.items()},
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                signature=signature,
                memory=memory.state(),
                extra={"ema": ema.state_dict()} if ema is not None else None,
            )
            on_event(CheckpointSaved(step=at_step, path=str(path)))
            if prune:  # only now: the sink has recorded the new checkpoint (the daemon's job store)
                checkpoints.prune(config.keep_checkpoints)
            return str(path)

        def facts(at_step: int, epoch: int) -> RunFacts:
            return RunFacts(
                started_at=started_at, steps=at_step, epoch=epoch, final_loss=last_loss, precision=placement.precision
            )

        def act(kind: str) -> list[Event]:
            """Answer a request after the step: sample now, or save a checkpoint and the step's LoRA now."""
            nonlocal last_saved
            if kind == SAVE_NOW:
                last_saved = (step, save(step, epoch))
                with exact_eval_weights(optimizer, params):  # training goes on from exactly these weights
                    lora = run.export_partial(facts(step, epoch + 1))
                saved: list[Event] = [CheckpointSaved(step=step, path=last_saved[1])]
                if lora is not None:
                    saved.append(LogLine(message=f"saved on request: the LoRA of step {step} is {lora}"))
                    on_event(saved[-1])
                return saved
            drawn = samples.draw(step, force=True)
            if not drawn:
                raise RequestNotDone("this job draws no samples", "add sample_prompts to its config")
            return drawn

        on_event(
            TrainingStarted(
                total_steps=total_steps,
                start_step=step,
                epochs=num_epochs,
                trainable_params=sum(p.numel() for p in params),
                device=str(device),
                precision=placement.precision,
                resumed_from=str(resumed.path) if resumed is not None else "",
                devices=ranks.world,
            )
        )

        t_train, t_rate, steps_this_run = time.monotonic(), 0.0, 0
        last_saved: tuple[int, str] | None = None  # (step, path) of this run's newest checkpoint
        samples.at_start(step)  # sample_at_first: the base model's images, before any step
        autocast = torch.autocast(
            device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None
        )
        epoch = step // steps_per_epoch
        while step < total_steps:
            plan = run.plan(epoch)
            first = (step - epoch * steps_per_epoch) * accum  # micro-batches done before a resume
            for start in range(first, len(plan), accum):
                # Forward and backward of this step's micro-batches. Out of memory, the recovery makes the
                # pieces smaller (or the model leaner) and the step starts over, its gradients dropped.
                while True:
                    try:
                        step_loss = backward_step(
                            run, plan, start, accum, memory, seed=config.seed, epoch=epoch, autocast=autocast,
                            scaler=scaler, device=device, ranks=ranks, per_device=config.batch_size,
                        )  # fmt: skip
                        break
                    except Exception as err:
                        if not is_out_of_memory(err):
                            raise
                        error = str(err)  # the message only: the traceback holds the failed step's tensors
                    optimizer.zero_grad(set_to_none=True)
                    on_event(memory.recover(error, at_step=step + 1))  # TrainingOutOfMemory when nothing is left

                # Every rank's gradients (and loss, and stop vote) summed: one all-reduce, queued, no host wait.
                step_values = step_loss.reshape(1)
                if ranks.world > 1:
                    vote = torch.full((1,), 1.0 if stop is not None and stop.is_set() else 0.0, device=device)
                    step_values = ranks.reduce(params, torch.cat([step_values, vote]))
                # One optimizer step, queued without waiting for the device (no host sync).
                if scaler:
                    scaler.unscale_(optimizer)
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update()
                lr = scheduler.get_last_lr()[0]
                step, steps_this_run = step + 1, steps_this_run + 1
                if steps_this_run == 1:
                    # The first step pays one-time costs (torch.compile, allocator growth, kernel choice):
                    # the run's one deliberate wait times it apart, and the speed leaves it out.
                    wait_for_device(device)
                    t_rate = time.monotonic()
                    timings["first_step"] = t_rate - t_train
                    rate = 1 / max(timings["first_step"], 1e-9)
                    if config.torch_compile:
                        on_event(LogLine(message=f"first step {timings['first_step']:.1f}s (torch.compile included)"))
                else:
                    rate = (steps_this_run - 1) / max(time.monotonic() - t_rate, 1e-9)
                for done, values in lagged.push(step_values, StepNote(step, epoch + 1, lr, rate)):
                    report(done, values)  # the previous step's; TrainingDiverged on NaN/inf
                if ranks.is_main:  # evaluation and samples: the reporting rank's (they change no weights)
                    run.after_step(step, total_steps)
                scalars.add(step, run.scalars.by_step)
                run.scalars.by_step.clear()
                if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                    last_saved = (step, save(step, epoch))
                samples.after_step(step)
                answer_requests(requests if ranks.is_main else None, act)  # "sample now" / "save now" asked
                asked = stop is not None and stop.is_set()
                if stop_voted if ranks.world > 1 else asked:
                    if last_saved is None or last_saved[0] != step:
                        last_saved = (step, save(step, epoch))
                    partial = None
                    if ranks.is_main:
                        with eval_weights(optimizer):  # schedule-free: the averaged weights, as an export holds
                            partial = run.export_partial(facts(step, epoch + 1))  # a usable LoRA of the last step
                    raise TrainingInterrupted(
                        f"training stopped at step {step}/{total_steps}",
                        "resume with `resume_from: latest` in the config and the same command",
                        checkpoint=last_saved[1] or None,
                        partial=str(partial) if partial else None,
                    )
                if step >= total_steps:
                    break
            epoch += 1
            samples.after_epoch(step, epoch)
            if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0 and step < total_steps:
                settle()
                if ranks.is_main:
                    with eval_weights(optimizer):
                        run.export_epoch(facts(step, epoch))  # kohya's NAME-00000N.safetensors
                if last_saved is None or last_saved[0] != step:
                    last_saved = (step, save(step, epoch))
        settle()
        timings["train"] = time.monotonic() - t_train
        # A checkpoint of the last step guards the export: if writing the outputs fails (a full disk),
        # `resume_from: latest` writes them without training again. Removed once they are written.
        guard = save(step, epoch, prune=False) if last_saved is None or last_saved[0] != step else None
        sheet = samples.at_end(step)  # a last round, and the contact sheet of every round
        # Schedule-free optimizers: the final evaluation and the export use the averaged (eval-mode) weights.
        set_optimizer_mode(optimizer, train=False)
        if not ranks.is_main:  # the others' work ends here: rank 0 evaluates and writes the outputs
            timings["train"] = time.monotonic() - t_train
            return TrainResult(outputs={}, steps=step, final_loss=last_loss, seconds=time.monotonic() - run_start)
        run.finish(step)
        scalars.add(step, run.scalars.by_step)
        scalars.flush()

        t0 = time.monotonic()
        final = facts(step, epoch)
        if ema is None:
            outputs = run.export(final)
        elif config.ema_export == "instead":
            with ema.applied():
                outputs = run.export(final)
        else:
            outputs = run.export(final)
            with ema.applied():
                outputs |= run.export(replace(final, variant="ema"))
        timings["export"] = time.monotonic() - t0
        seconds = time.monotonic() - run_start
        outputs["summary"] = write_summary(
            config,
            {
                "data_report": data_report,
                "steps": step,
                "epochs": epoch,
                "final_loss": last_loss,
                "timings_seconds": timings | {"total": seconds},
                "outputs": outputs,
                "device": str(device),
                "devices": ranks.world,
                "precision": placement.precision,
                "memory_recovery": memory.changes,
                **run.scalars.summary,
            },
        )
        outputs["logs"] = str(config.output_dir / "logs")
        if sheet:
            outputs["samples"] = sheet
        if guard and checkpoints is not None:
            checkpoints.discard(Path(guard))
        on_event(TrainingFinished(outputs=outputs, steps=step, final_loss=last_loss, seconds=seconds))
        return TrainResult(outputs=outputs, steps=step, final_loss=last_loss, seconds=seconds)
    finally:
        hold.close()


def backward_step(
    run: FamilyRun,
    plan: Sequence[Any],
    start: int,
    accum: int,
    memory: MemoryRecovery,
    *,
    seed: int,
    epoch: int,
    autocast: AbstractContextManager,
    scaler: torch.amp.GradScaler | None,
    device: torch.device,
    ranks: Ranks = SINGLE,
    per_device: int = 0,
) -> torch.Tensor:
    """Forward and backward of the micro-batches ``plan[start:start + accum]`` (one optimizer step),
    each in the pieces ``memory`` says; gradients add up in ``.grad``. Returns the step's loss (the
    mean of its micro-batches' losses) on the device, unread. With several ``ranks`` this rank does
    only its rows of each micro-batch (at most ``per_device``), weighted by their share: the ranks'
    gradients and losses then add up to the whole step's."""
    micro_batches = plan[start : start + accum]
    total = torch.zeros((), device=device)
    for index, micro_batch in enumerate(micro_batches, start):
        shard = ranks.shard(run, micro_batch, per_device)
        if shard is None:
            continue  # the micro-batch has no rows for this rank
        mine, part = shard
        for piece, share in memory.pieces(mine):
            # Every random draw is a function of (seed, epoch, planned micro-batch), drawn on the device:
            # a resumed run, and a step redone in smaller pieces, draw exactly what the first run drew.
            generator = torch.Generator(device).manual_seed(seed * 1_000_003 + epoch * 10_007 + index)
            with autocast:
                loss = run.loss(piece, generator) * (share * part)
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
            total += loss.detach()
    return total / len(micro_batches)
