"""LLM LoRA training: the whole run, top to bottom, in :func:`train_llm_lora`."""

from __future__ import annotations

import math
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from lorad.config.llm_schema import LlmTrainConfig
from lorad.engines.activation_checkpointing import enable_activation_checkpointing
from lorad.engines.device import Placement, pick_placement
from lorad.engines.llm.adapter import (
    build_lora_config,
    compatibility_report,
    read_adapter_weights,
    write_adapter,
)
from lorad.engines.llm.model import LlmModel, load_llm, prepare_tokenizer, restore_base_llm
from lorad.engines.llm.outputs import generate_samples, write_llm_summary, write_merged, write_partial_adapter
from lorad.engines.optim import build_optimizer, build_scheduler
from lorad.engines.sd.checkpoint import check_signature, open_run, restore_rng
from lorad.errors import OutputError, TrainingDiverged, TrainingInterrupted
from lorad.events import (
    CheckpointSaved,
    DataReported,
    EvalDone,
    EventSink,
    LogLine,
    ModelLoaded,
    SampleGenerated,
    StepDone,
    TrainingFinished,
    TrainingStarted,
    ignore_events,
)
from lorad.lora.adapters import attach_lora_config, load_lora_state_dict, lora_state_dict
from lorad.textdata.batches import Batch, collate, plan_batches
from lorad.textdata.dataset import encode_samples, read_samples, split_eval
from lorad.textdata.encoding import Encoded

# One adapter name per run; a resident base model never carries two runs' adapters at once.
ADAPTER = "lorad_run"


@dataclass(frozen=True)
class LlmTrainResult:
    """What a finished run produced."""

    outputs: dict[str, str]
    steps: int
    final_loss: float
    seconds: float


@dataclass(frozen=True)
class ProvidedLlm:
    """A base model ready on the run's device, and how it got there."""

    llm: LlmModel
    resident: bool  # True when it was already in memory (no load happened for this run)
    seconds: float  # time spent loading for this run


# Gives a run its base model for a `with` block (the daemon's registry reserves a resident one).
LlmModelProvider = Callable[[LlmTrainConfig, Placement], AbstractContextManager[ProvidedLlm]]


@contextmanager
def load_fresh_llm(config: LlmTrainConfig, placement: Placement) -> Iterator[ProvidedLlm]:
    """The default provider: load the config's base model for this run only."""
    start = time.monotonic()
    llm = load_llm(config.base_model, placement, load_in_4bit=config.load_in_4bit)
    yield ProvidedLlm(llm=llm, resident=False, seconds=time.monotonic() - start)


def run_signature(config: LlmTrainConfig) -> dict:
    """Settings a resumed run must share with the run that wrote the checkpoint."""
    keys = (
        "base_model",
        "lora_rank",
        "target_modules",
        "use_dora",
        "use_rslora",
        "batch_size",
        "gradient_accumulation_steps",
        "seed",
        "max_seq_len",
        "packing",
        "chat_template",
        "data_format",
    )
    values = config.to_dict()
    return {k: values[k] for k in keys} | {"lora_alpha": config.effective_lora_alpha}


def _check_output_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise OutputError(
            f"`output_dir`: cannot write to {output_dir} ({err.strerror or err})", "choose a folder you can write to"
        ) from None


def _forward_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's labelled tokens (the model shifts labels itself)."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        labels=batch.labels,
        use_cache=False,
    ).loss


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    samples: tuple[Encoded, ...],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: AbstractContextManager,
    mask_dtype: torch.dtype,
) -> float:
    """Token-weighted mean loss over ``samples`` (eval mode: no dropout); NaN when there are none."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        rows = [[i] for i in range(start, min(start + batch_size, len(samples)))]
        batch = collate(samples, rows, pad_id=pad_id, packed=False, mask_dtype=mask_dtype).to(device)
        count = int((batch.labels[:, 1:] != -100).sum())
        with autocast:
            total += float(_forward_loss(model, batch)) * count
        tokens += count
    model.train(was_training)
    return total / tokens if tokens else float("nan")


def train_llm_lora(
    config: LlmTrainConfig,
    *,
    on_event: EventSink = ignore_events,
    stop: threading.Event | None = None,
    models: LlmModelProvider | None = None,
) -> LlmTrainResult:
    """Train a LoRA on a causal LM as ``config`` says; write the adapter and summary into ``output_dir``.

    ``models`` provides the base model (the daemon passes its registry; the model is left
    bit-identical: the adapter is deleted afterwards); by default it is loaded for this run. Setting
    ``stop`` makes the run save a checkpoint after the current step and raise TrainingInterrupted.
    Raises DataError before any model is loaded when no record is usable; TrainingDiverged on a
    NaN/inf loss; ConfigError for settings only the model or tokenizer can check.
    """
    run_start = time.monotonic()
    timings: dict[str, float] = {}
    _check_output_dir(config.output_dir)

    # Data first: unusable files fail in milliseconds, before any weights load.
    options = {"data_format": config.data_format, "columns": dict(config.columns), "roles": dict(config.roles)}
    train_set = read_samples(config.train_data, **options)
    eval_set = read_samples(config.eval_data, key="eval_data", **options) if config.eval_data else None
    train_samples, eval_samples = (
        split_eval(train_set.samples, config.eval_fraction, config.seed)
        if not eval_set
        else (list(train_set.samples), list(eval_set.samples))
    )
    run_tokenizer = prepare_tokenizer(config)
    tokenizer, pad_id = run_tokenizer.tokenizer, run_tokenizer.pad_id
    data = encode_samples(
        train_set, eval_samples, train_samples, tokenizer, max_seq_len=config.max_seq_len, eval_set=eval_set
    )
    on_event(DataReported(report=data.report, text=data.render()))
    for note in run_tokenizer.notes:
        on_event(LogLine(message=note))

    placement = pick_placement(config.device, config.mixed_precision)
    device = placement.device
    hold = ExitStack()  # releases, in reverse order, everything this run reserved or changed
    try:
        provided = hold.enter_context((models or load_fresh_llm)(config, placement))
        model = provided.llm.model
        hold.callback(restore_base_llm, model, ADAPTER, use_cache=model.config.use_cache)
        timings["load_model"] = provided.seconds
        on_event(
            ModelLoaded(
                source=provided.llm.source,
                model_version=provided.llm.model_version,
                seconds=provided.seconds,
                resident=provided.resident,
            )
        )

        lora_config = build_lora_config(config, model)
        # LoRA A is drawn from the global RNG; seeding it makes a run repeatable on the CPU.
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        params = attach_lora_config(model, adapter_name=ADAPTER, config=lora_config)
        if config.init_adapter:
            load_lora_state_dict(model, ADAPTER, read_adapter_weights(config.init_adapter))
            on_event(
                LogLine(
                    message=f"starting from the adapter in {config.init_adapter} "
                    f"(rank {lora_config.r}, layers {sorted(lora_config.target_modules)})"
                )
            )
        optimizer = build_optimizer(
            [{"params": params, "lr": config.learning_rate}],
            name=config.optimizer,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=config.weight_decay,
        )
        accum = config.gradient_accumulation_steps
        plan_options = {
            "batch_size": config.batch_size,
            "seed": config.seed,
            "packing": config.packing,
            "max_seq_len": config.max_seq_len,
        }
        micro_per_epoch = len(plan_batches(data.train, epoch=0, **plan_options))
        steps_per_epoch = math.ceil(micro_per_epoch / accum)
        total_steps = config.max_train_steps or config.epochs * steps_per_epoch
        num_epochs = math.ceil(total_steps / steps_per_epoch)
        scheduler = build_scheduler(
            optimizer, name=config.lr_scheduler, warmup_steps=config.lr_warmup_steps, total_steps=total_steps
        )
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        scaler = torch.amp.GradScaler(device.type) if placement.autocast_dtype == torch.float16 else None
        signature = run_signature(config)

        run = open_run(config.output_dir, config.resume_from, on_event=on_event)  # lock, clean, resume, set aside
        hold.callback(run.close)
        step = 0
        if run.resumed is not None:
            checkpoint = run.resumed
            check_signature(checkpoint.signature, signature)
            load_lora_state_dict(model, ADAPTER, checkpoint.lora["model"])
            optimizer.load_state_dict(checkpoint.state["optimizer"])
            scheduler.load_state_dict(checkpoint.state["scheduler"])
            if scaler is not None and checkpoint.state.get("scaler"):
                scaler.load_state_dict(checkpoint.state["scaler"])
            restore_rng(checkpoint.state)
            step = checkpoint.step

        def save(at_step: int, epoch: int, prune: bool = True) -> str:
            path = run.save(
                step=at_step,
                epoch=epoch,
                lora={"model": lora_state_dict(model, ADAPTER)},
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                signature=signature,
            )
            on_event(CheckpointSaved(step=at_step, path=str(path)))
            if prune:  # only now: the sink has recorded the new checkpoint (the daemon's job store)
                run.prune(config.keep_checkpoints)
            return str(path)

        from torch.utils.tensorboard import SummaryWriter  # slow import; only when training

        writer = SummaryWriter(log_dir=str(config.output_dir / "logs"))
        hold.callback(writer.close)
        autocast = torch.autocast(
            device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None
        )
        # Packed rows carry a 4-D additive mask; SDPA wants it in the dtype the attention computes in.
        mask_dtype = placement.autocast_dtype or placement.weight_dtype
        eval_history: list[dict[str, float]] = []

        def run_eval(at_step: int) -> None:
            if not data.eval:
                return
            loss = evaluate(
                model,
                data.eval,
                pad_id=pad_id,
                batch_size=config.batch_size,
                device=device,
                autocast=autocast,
                mask_dtype=mask_dtype,
            )
            eval_history.append({"step": at_step, "loss": loss})
            writer.add_scalar("eval_loss", loss, at_step)
            on_event(EvalDone(step=at_step, loss=loss, samples=len(data.eval)))

        model.train()
        model.config.use_cache = False  # the KV cache only costs memory in training; restored after
        if config.gradient_checkpointing:  # restore_base_llm turns it off again
            enable_activation_checkpointing(model)
        on_event(
            TrainingStarted(
                total_steps=total_steps,
                start_step=step,
                epochs=num_epochs,
                trainable_params=sum(p.numel() for p in params),
                device=str(device),
                precision=placement.precision,
                resumed_from=str(run.resumed.path) if run.resumed is not None else "",
            )
        )

        t_train, steps_this_run, tokens_this_run = time.monotonic(), 0, 0
        loss_sum, micro_in_step, tokens_in_step, last_loss = 0.0, 0, 0, float("nan")
        last_saved: tuple[int, str] | None = None  # (step, path) of this run's newest checkpoint
        epoch = step // steps_per_epoch
        while step < total_steps:
            plan = plan_batches(data.train, epoch=epoch, **plan_options)
            first = (step - epoch * steps_per_epoch) * accum  # micro-batches done before a resume
            for micro in range(first, len(plan)):
                batch = collate(
                    data.train, plan[micro], pad_id=pad_id, packed=config.packing, mask_dtype=mask_dtype
                ).to(device)
                with autocast:
                    loss = _forward_loss(model, batch)
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
                loss_sum, micro_in_step = loss_sum + loss.detach(), micro_in_step + 1
                tokens_in_step += batch.tokens
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
                tokens_this_run += tokens_in_step
                loss_sum, micro_in_step, tokens_in_step = 0.0, 0, 0

                elapsed = max(time.monotonic() - t_train, 1e-9)
                rate, lr = steps_this_run / elapsed, scheduler.get_last_lr()[0]
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
                writer.add_scalar("tokens_per_second", tokens_this_run / elapsed, step)
                if config.eval_steps and step % config.eval_steps == 0 and step < total_steps:
                    run_eval(step)
                if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                    last_saved = (step, save(step, epoch))
                if stop is not None and stop.is_set():
                    if last_saved is None or last_saved[0] != step:
                        last_saved = (step, save(step, epoch))
                    state = lora_state_dict(model, ADAPTER)
                    partial = write_partial_adapter(config, state, lora_config, tokenizer, step, on_event)
                    raise TrainingInterrupted(
                        f"training stopped at step {step}/{total_steps}",
                        "resume with `resume_from: latest` in the config and the same command",
                        checkpoint=last_saved[1],
                        partial=str(partial) if partial else None,
                    )
                if step >= total_steps:
                    break
            epoch += 1
        timings["train"] = time.monotonic() - t_train
        run_eval(step)

        # A checkpoint of the last step guards the export: if writing the outputs fails (a full disk),
        # `resume_from: latest` writes them without training again. Removed once they are written.
        guard = save(step, epoch, prune=False) if last_saved is None or last_saved[0] != step else None
        t0 = time.monotonic()
        state = lora_state_dict(model, ADAPTER)
        outputs = {
            "adapter": str(
                write_adapter(
                    config.output_dir / "adapter", state, lora_config, tokenizer, save_precision=config.save_precision
                )
            )
        }
        if config.merge_export:
            outputs["merged"] = str(write_merged(model, ADAPTER, tokenizer, config.output_dir / "merged"))
        timings["export"] = time.monotonic() - t0
        compatibility = compatibility_report(lora_config)
        for warning in compatibility["warnings"]:
            on_event(LogLine(message=f"compatibility: {warning}", level="warning"))

        t0 = time.monotonic()
        model.config.use_cache = True
        samples = generate_samples(
            model, tokenizer, config.sample_prompts, max_new_tokens=config.sample_max_new_tokens, device=device
        )
        for sample in samples:
            on_event(SampleGenerated(prompt=sample["prompt"], output=sample["output"], stopped=sample["stopped"]))
        timings["samples"] = time.monotonic() - t0

        seconds = time.monotonic() - run_start
        outputs["summary"] = write_llm_summary(
            config,
            {
                "data_report": data.report,
                "steps": step,
                "epochs": epoch,
                "final_loss": last_loss,
                "eval_loss": eval_history[-1]["loss"] if eval_history else None,
                "eval_history": eval_history,
                "samples": samples,
                "compatibility": compatibility,
                "tokenizer_notes": list(run_tokenizer.notes),
                "tokens_per_second": tokens_this_run / max(timings["train"], 1e-9),
                "timings_seconds": timings | {"total": seconds},
                "outputs": outputs,
                "device": str(device),
                "precision": placement.precision,
                "lora_config": lora_config.to_dict(),
            },
        )
        outputs["logs"] = str(config.output_dir / "logs")
        if guard is not None:
            run.discard(Path(guard))
        on_event(TrainingFinished(outputs=outputs, steps=step, final_loss=last_loss, seconds=seconds))
        return LlmTrainResult(outputs=outputs, steps=step, final_loss=last_loss, seconds=seconds)
    finally:
        hold.close()
