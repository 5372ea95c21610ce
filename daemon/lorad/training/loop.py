"""The one training loop: every model family's run, top to bottom, in :func:`train`.

What differs between families (data, model, targets, the loss of a micro-batch, export) comes from
the family's plug-in (:mod:`lorad.training.family`); everything else is here, once.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass

import torch

from lorad.config.schema import TrainingKeys
from lorad.errors import TrainingDiverged, TrainingInterrupted
from lorad.events import (
    CheckpointSaved,
    DataReported,
    EventSink,
    LogLine,
    ModelLoaded,
    StepDone,
    TrainingFinished,
    TrainingStarted,
    ignore_events,
)
from lorad.families.registry import load_plugin
from lorad.lora.adapters import load_lora_state_dict, lora_state_dict
from lorad.training.checkpoints import (
    check_signature,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from lorad.training.family import ADAPTER, CaptionFiller, ModelFamily, ProvidedModel, RunFacts, RunHooks
from lorad.training.optimizers import build_optimizer, build_scheduler
from lorad.training.placement import Placement, pick_placement
from lorad.training.run_folder import prepare_output_dir, write_summary

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


def fresh_model_provider(family: ModelFamily) -> ModelProvider:
    """The default ModelProvider: load the config's base model for this run only."""

    @contextmanager
    def provide(config: TrainingKeys, placement: Placement) -> Iterator[ProvidedModel]:
        start = time.monotonic()
        model = family.load(family.model_key(config, placement))
        yield ProvidedModel(model=model, resident=False, seconds=time.monotonic() - start)

    return provide


def train(
    config: TrainingKeys,
    *,
    on_event: EventSink = ignore_events,
    stop: threading.Event | None = None,
    models: ModelProvider | None = None,
    caption_missing: CaptionFiller | None = None,
) -> TrainResult:
    """Train ``config``'s adapter and write its outputs into ``config.output_dir``.

    ``models`` provides the base model (the daemon passes its resident-model registry; the model is
    left bit-identical: the adapter is removed afterwards); by default it is loaded for this run.
    Setting ``stop`` makes the run save a checkpoint after the current step and raise
    TrainingInterrupted. Raises DataError before any model is loaded when no data is usable;
    TrainingDiverged on a NaN/inf loss (earlier checkpoints are kept); ConfigError for settings only
    the model can check.
    """
    family = load_plugin(config.model_family)
    run_start, started_at = time.monotonic(), time.time()
    timings: dict[str, float] = {}
    prepare_output_dir(config.output_dir)

    # Data first: unusable data fails in seconds, before gigabytes of weights load.
    data = family.scan(config, on_event=on_event, hooks=RunHooks(caption_missing=caption_missing, stop=stop))
    on_event(DataReported(report=data.report, text=data.text))
    for note in data.notes:
        on_event(LogLine(message=note))

    placement = pick_placement(config.device, config.mixed_precision)
    device = placement.device
    hold = ExitStack()  # releases, in reverse order, everything this run reserved or changed
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
        run = family.start(config, provided.model, data, placement, on_event)
        timings["prepare"] = time.monotonic() - t0
        params = [p for group in run.param_groups for p in group["params"]]
        optimizer = build_optimizer(run.param_groups, config)
        accum = config.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(run.plan(0)) / accum)
        total_steps = config.max_train_steps or config.epochs * steps_per_epoch
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        scheduler = build_scheduler(optimizer, config, total_steps=total_steps)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler(device.type) if placement.autocast_dtype == torch.float16 else None
        signature = family.signature(config)

        step = 0
        if config.resume_from:
            checkpoint = load_checkpoint(resolve_checkpoint(config.resume_from, config.output_dir))
            check_signature(checkpoint.signature, signature)
            for part, module in run.parts.items():
                load_lora_state_dict(module, ADAPTER, checkpoint.lora[part])
            optimizer.load_state_dict(checkpoint.state["optimizer"])
            scheduler.load_state_dict(checkpoint.state["scheduler"])
            if scaler is not None and checkpoint.state.get("scaler"):
                scaler.load_state_dict(checkpoint.state["scaler"])
            restore_rng(checkpoint.state)
            step = checkpoint.step

        def save(at_step: int, epoch: int) -> str:
            path = save_checkpoint(
                config.output_dir,
                step=at_step,
                epoch=epoch,
                lora={part: lora_state_dict(module, ADAPTER) for part, module in run.parts.items()},
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                signature=signature,
                keep=config.keep_checkpoints,
            )
            on_event(CheckpointSaved(step=at_step, path=str(path)))
            return str(path)

        from torch.utils.tensorboard import SummaryWriter  # slow import; only when training

        writer = SummaryWriter(log_dir=str(config.output_dir / "logs"))
        hold.callback(writer.close)

        def flush_scalars(at_step: int) -> None:
            for name, value in run.scalars.by_step.items():
                writer.add_scalar(name, value, at_step)
            run.scalars.by_step.clear()

        run.train_mode(config.gradient_checkpointing)  # family.restore turns it off again
        on_event(
            TrainingStarted(
                total_steps=total_steps,
                start_step=step,
                epochs=num_epochs,
                trainable_params=sum(p.numel() for p in params),
                device=str(device),
                precision=placement.precision,
            )
        )

        t_train, steps_this_run = time.monotonic(), 0
        loss_sum, micro_in_step, last_loss = 0.0, 0, float("nan")
        last_saved: tuple[int, str] | None = None  # (step, path) of this run's newest checkpoint
        autocast = torch.autocast(
            device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None
        )
        epoch = step // steps_per_epoch
        while step < total_steps:
            plan = run.plan(epoch)
            first = (step - epoch * steps_per_epoch) * accum  # micro-batches done before a resume
            for micro in range(first, len(plan)):
                # Every random draw is a function of (seed, epoch, position), so an interrupted run
                # resumed from a checkpoint draws exactly what the uninterrupted run drew.
                generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 10_007 + micro)
                with autocast:
                    loss = run.loss(plan[micro], generator)
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
                loss_sum, micro_in_step = loss_sum + loss.detach(), micro_in_step + 1
                if (micro + 1) % accum and micro + 1 < len(plan):
                    continue

                # One optimizer step. The float() is the only host sync per step.
                step_loss = float(loss_sum) / micro_in_step
                if not math.isfinite(step_loss):
                    kept = sorted(config.output_dir.glob("checkpoints/step-*"))
                    raise TrainingDiverged(
                        f"the loss became {step_loss} at step {step + 1}",
                        "lower learning_rate (e.g. by 10x), keep max_grad_norm at 1, or use bf16 instead of fp16"
                        + (f"; the last good checkpoint is {kept[-1]}" if kept else ""),
                    )
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
                step, steps_this_run, last_loss = step + 1, steps_this_run + 1, step_loss
                loss_sum, micro_in_step = 0.0, 0

                rate = steps_this_run / max(time.monotonic() - t_train, 1e-9)
                lr = scheduler.get_last_lr()[0]
                on_event(
                    StepDone(
                        step=step,
                        total_steps=total_steps,
                        epoch=epoch + 1,
                        loss=step_loss,
                        lr=lr,
                        steps_per_second=rate,
                        eta_seconds=(total_steps - step) / rate,
                    )
                )
                writer.add_scalar("loss", step_loss, step)
                writer.add_scalar("lr", lr, step)
                writer.add_scalar("steps_per_second", rate, step)
                run.after_step(step, total_steps)
                flush_scalars(step)
                if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                    last_saved = (step, save(step, epoch))
                if stop is not None and stop.is_set():
                    if last_saved is None or last_saved[0] != step:
                        last_saved = (step, save(step, epoch))
                    raise TrainingInterrupted(
                        f"training stopped at step {step}/{total_steps}",
                        "resume with `resume_from: latest` in the config and the same command",
                        checkpoint=last_saved[1],
                    )
                if step >= total_steps:
                    break
            epoch += 1
            if (
                config.save_every_n_epochs
                and epoch % config.save_every_n_epochs == 0
                and step < total_steps
                and (last_saved is None or last_saved[0] != step)
            ):
                last_saved = (step, save(step, epoch))
        timings["train"] = time.monotonic() - t_train
        run.finish(step)
        flush_scalars(step)

        t0 = time.monotonic()
        facts = RunFacts(
            started_at=started_at, steps=step, epoch=epoch, final_loss=last_loss, precision=placement.precision
        )
        outputs = run.export(facts)
        timings["export"] = time.monotonic() - t0
        seconds = time.monotonic() - run_start
        outputs["summary"] = write_summary(
            config,
            {
                "data_report": data.report,
                "steps": step,
                "epochs": epoch,
                "final_loss": last_loss,
                "timings_seconds": timings | {"total": seconds},
                "outputs": outputs,
                "device": str(device),
                "precision": placement.precision,
                **run.scalars.summary,
            },
        )
        outputs["logs"] = str(config.output_dir / "logs")
        on_event(TrainingFinished(outputs=outputs, steps=step, final_loss=last_loss, seconds=seconds))
        return TrainResult(outputs=outputs, steps=step, final_loss=last_loss, seconds=seconds)
    finally:
        hold.close()
