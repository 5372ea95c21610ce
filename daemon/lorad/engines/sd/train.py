"""Stable Diffusion LoRA training: the whole run, top to bottom, in :func:`train_sd_lora`."""

from __future__ import annotations

import math
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lorad.config import TrainConfig
from lorad.data.buckets import assign_bucket, bucket_counts, make_buckets, plan_epoch
from lorad.data.captions import prepare_caption
from lorad.data.dataset import scan_dataset
from lorad.data.latent_cache import LatentCache
from lorad.engines.activation_checkpointing import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    is_activation_checkpointing,
)
from lorad.engines.device import Placement, pick_placement
from lorad.engines.optim import build_optimizer, build_scheduler
from lorad.engines.sd.checkpoint import check_signature, open_run, restore_rng
from lorad.engines.sd.init_lora import apply_init_lora
from lorad.engines.sd.latents import encode_latents
from lorad.engines.sd.loss import sample_noise, snr_weights, training_target
from lorad.engines.sd.outputs import (
    RunFacts,
    write_epoch_lora,
    write_lora_files,
    write_partial_lora,
    write_summary,
)
from lorad.engines.sd.prompts import PromptEncoder
from lorad.errors import OutputError, TrainingDiverged, TrainingInterrupted
from lorad.events import (
    CheckpointSaved,
    DataReported,
    EventSink,
    LatentsCached,
    ModelLoaded,
    StepDone,
    TrainingFinished,
    TrainingStarted,
    ignore_events,
)
from lorad.lora.adapters import attach_lora, detach_lora, load_lora_state_dict, lora_state_dict
from lorad.lora.targets import (
    ADAPTABLE,
    TEXT_ENCODER_SUGGESTIONS,
    UNET_ALIASES,
    UNET_SUGGESTIONS,
    resolve_targets,
)
from lorad.models.sd_components import SDComponents
from lorad.paths import default_cache_dir

# One adapter name per run; a resident base model never carries two runs' adapters at once.
ADAPTER = "lorad_run"

CaptionFiller = Callable[[list[Path]], Mapping[Path, str]]


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced."""

    outputs: dict[str, str]
    steps: int
    final_loss: float
    seconds: float


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and prove it is writable before any expensive work starts."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise OutputError(
            f"`output_dir`: cannot write to {output_dir} ({err.strerror or err})", "choose a folder you can write to"
        ) from None


@dataclass(frozen=True)
class ProvidedModel:
    """A base model ready on the run's device, and how it got there."""

    components: SDComponents
    resident: bool  # True when it was already in memory (no load happened for this run)
    seconds: float  # time spent loading for this run


# Gives a run its base model for the duration of a `with` block (the daemon's registry reserves a
# resident model this way; the default loads a private copy).
ModelProvider = Callable[[TrainConfig, Placement], AbstractContextManager[ProvidedModel]]


def load_for_training(
    base_model: str,
    placement: Placement,
    *,
    allow_pickle: bool = False,
    model_config_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    prediction_type: str = "auto",
) -> SDComponents:
    """Load a base model and place it for training: UNet and text encoder in the weight dtype on
    the device, the VAE in fp32 (fp16 VAEs overflow to NaN on some images; latents are encoded
    once, so fp32 costs little)."""
    from lorad.models.sd_loader import load_sd_components

    components = load_sd_components(
        base_model,
        allow_pickle=allow_pickle,
        model_config_dir=model_config_dir,
        tokenizer_path=tokenizer_path,
        prediction_type=prediction_type,
        dtype=placement.weight_dtype,
    )
    if components.vae.dtype != torch.float32:
        components.vae.to(dtype=torch.float32)
    for module in (components.vae, components.unet, components.text_encoder):
        module.to(placement.device)
    return components


@contextmanager
def load_fresh_model(config: TrainConfig, placement: Placement) -> Iterator[ProvidedModel]:
    """The default ModelProvider: load the config's base model for this run only."""
    start = time.monotonic()
    components = load_for_training(
        config.base_model,
        placement,
        allow_pickle=config.allow_pickle,
        model_config_dir=config.model_config_dir,
        tokenizer_path=config.tokenizer_path,
        prediction_type=config.prediction_type,
    )
    yield ProvidedModel(components=components, resident=False, seconds=time.monotonic() - start)


def restore_base_model(components: SDComponents) -> None:
    """Leave a (possibly resident, shared) base model exactly as the run found it: adapters
    removed, gradient checkpointing off, eval mode. Safe to call when nothing was changed."""
    for model in (components.unet, components.text_encoder):
        if is_activation_checkpointing(model):
            disable_activation_checkpointing(model)
        model.eval()
        detach_lora(model, ADAPTER)


def run_signature(config: TrainConfig) -> dict:
    """Settings a resumed run must share with the run that wrote the checkpoint."""
    keys = (
        "lora_rank",
        "unet_target_modules",
        "train_text_encoder",
        "text_encoder_target_modules",
        "batch_size",
        "gradient_accumulation_steps",
        "seed",
        "base_model",
    )
    values = config.to_dict()
    return {k: values[k] for k in keys} | {"lora_alpha": config.effective_lora_alpha}


def train_sd_lora(
    config: TrainConfig,
    *,
    on_event: EventSink = ignore_events,
    stop: threading.Event | None = None,
    models: ModelProvider | None = None,
    caption_missing: CaptionFiller | None = None,
) -> TrainResult:
    """Train a LoRA as ``config`` says and write its outputs into ``config.output_dir``.

    ``models`` provides the base model (the daemon passes its resident-model registry; the model is
    left bit-identical: the adapter is removed afterwards); by default it is loaded for this run. Setting
    ``stop`` makes the run save a checkpoint after the current step and raise TrainingInterrupted.
    Raises DataError before any model is loaded when no image is usable; TrainingDiverged on a
    NaN/inf loss (earlier checkpoints are kept); ConfigError for settings only the model can check.
    """
    run_start, started_at = time.monotonic(), time.time()
    timings: dict[str, float] = {}
    prepare_output_dir(config.output_dir)

    # Data first: an unusable dataset fails in seconds, before gigabytes of weights load.
    images, report = scan_dataset(
        config.train_data_dir,
        metadata_path=config.metadata_path,
        caption_extension=config.caption_extension,
        repeats=config.repeats.for_folder,
        caption_missing=caption_missing,
    )
    buckets = make_buckets(config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps)
    image_buckets = [
        assign_bucket(
            i.width,
            i.height,
            buckets=buckets,
            resolution=config.resolution,
            step=config.bucket_reso_steps,
            no_upscale=config.bucket_no_upscale,
        )
        if config.enable_bucket
        else (config.resolution, config.resolution)
        for i in images
    ]
    report = report.with_buckets(bucket_counts(image_buckets))
    on_event(DataReported(report=report.to_dict(), text=report.render()))

    placement = pick_placement(config.device, config.mixed_precision)
    device = placement.device
    hold = ExitStack()  # releases, in reverse order, everything this run reserved or changed
    try:
        provided = hold.enter_context((models or load_fresh_model)(config, placement))
        components = provided.components
        hold.callback(restore_base_model, components)
        timings["load_model"] = provided.seconds
        on_event(
            ModelLoaded(
                source=components.source,
                model_version=components.model_version,
                seconds=provided.seconds,
                resident=provided.resident,
            )
        )
        unet, text_encoder, vae = components.unet, components.text_encoder, components.vae
        noise_scheduler = components.noise_scheduler

        # Resolve targets before encoding anything, so a typo costs nothing.
        unet_paths = resolve_targets(
            unet,
            config.unet_target_modules,
            key="unet_target_modules",
            aliases=UNET_ALIASES,
            suggestions=UNET_SUGGESTIONS,
        )
        te_paths = (
            resolve_targets(
                text_encoder,
                config.text_encoder_target_modules,
                key="text_encoder_target_modules",
                suggestions=TEXT_ENCODER_SUGGESTIONS,
            )
            if config.train_text_encoder
            else []
        )
        adaptable = {
            "unet": [p for p, m in unet.named_modules() if isinstance(m, ADAPTABLE)],
            "text_encoder": [p for p, m in text_encoder.named_modules() if isinstance(m, ADAPTABLE)],
        }

        # Latents are encoded once per (image content, bucket, VAE) and reused across runs.
        t0 = time.monotonic()
        cache = LatentCache(config.cache_dir or default_cache_dir() / "latents", components.vae_identity())
        latents, stats = encode_latents(images, image_buckets, vae=vae, cache=cache, device=device)
        timings["latents"] = time.monotonic() - t0
        on_event(LatentsCached(cached=stats.cached, encoded=stats.encoded, seconds=timings["latents"]))
        samples = [i for i, image in enumerate(images) for _ in range(image.repeats)]
        sample_buckets = [image_buckets[i] for i in samples]
        scaling = vae.config.scaling_factor

        # LoRA A is drawn from the global RNG; seeding it makes a run repeatable on the CPU.
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        unet_params = attach_lora(
            unet,
            adapter_name=ADAPTER,
            target_paths=unet_paths,
            rank=config.lora_rank,
            alpha=config.effective_lora_alpha,
            dropout=config.lora_dropout,
        )
        te_params = (
            attach_lora(
                text_encoder,
                adapter_name=ADAPTER,
                target_paths=te_paths,
                rank=config.lora_rank,
                alpha=config.effective_lora_alpha,
                dropout=config.lora_dropout,
            )
            if te_paths
            else []
        )
        if config.init_lora:
            apply_init_lora(
                config,
                {"unet": unet, "text_encoder": text_encoder},
                ADAPTER,
                targeted={"unet": unet_paths, "text_encoder": te_paths},
                adaptable=adaptable,
                on_event=on_event,
            )
        params = unet_params + te_params
        groups = [{"params": unet_params, "lr": config.learning_rate}]
        if te_params:
            groups.append({"params": te_params, "lr": config.effective_text_encoder_lr})
        optimizer = build_optimizer(
            groups,
            name=config.optimizer,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )

        accum = config.gradient_accumulation_steps
        micro_per_epoch = len(plan_epoch(sample_buckets, config.batch_size, seed=config.seed, epoch=0))
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
            load_lora_state_dict(unet, ADAPTER, checkpoint.lora["unet"])
            if te_params:
                load_lora_state_dict(text_encoder, ADAPTER, checkpoint.lora["text_encoder"])
            optimizer.load_state_dict(checkpoint.state["optimizer"])
            scheduler.load_state_dict(checkpoint.state["scheduler"])
            if scaler is not None and checkpoint.state.get("scaler"):
                scaler.load_state_dict(checkpoint.state["scaler"])
            restore_rng(checkpoint.state)
            step = checkpoint.step

        def lora_parts() -> dict[str, dict[str, torch.Tensor]]:
            parts = {"unet": lora_state_dict(unet, ADAPTER)}
            if te_params:
                parts["text_encoder"] = lora_state_dict(text_encoder, ADAPTER)
            return parts

        def run_facts(at_step: int, epoch: int, loss: float) -> RunFacts:
            return RunFacts(
                model_version=components.model_version,
                num_train_images=len(samples),
                tag_frequency=report.to_dict()["tag_frequency"],
                started_at=started_at,
                steps=at_step,
                epoch=epoch,
                final_loss=loss,
                precision=placement.precision,
            )

        def save(at_step: int, epoch: int, prune: bool = True) -> str:
            path = run.save(
                step=at_step,
                epoch=epoch,
                lora=lora_parts(),
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                signature=signature,
            )
            on_event(CheckpointSaved(step=at_step, path=str(path)))
            if prune:  # only now: the sink has recorded the new checkpoint (the daemon's job store)
                run.prune(config.keep_checkpoints)
            return str(path)

        prompts = PromptEncoder(components.tokenizer, text_encoder, device, trainable=bool(te_params))
        from torch.utils.tensorboard import SummaryWriter  # slow import; only when training

        writer = SummaryWriter(log_dir=str(config.output_dir / "logs"))
        hold.callback(writer.close)
        unet.train()
        text_encoder.train(bool(te_params))
        if config.gradient_checkpointing:  # restore_base_model turns it off again
            enable_activation_checkpointing(unet)
            if te_params:
                enable_activation_checkpointing(text_encoder)
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

        t_train, steps_this_run = time.monotonic(), 0
        loss_sum, micro_in_step, last_loss = 0.0, 0, float("nan")
        last_saved: tuple[int, str] | None = None  # (step, path) of this run's newest checkpoint
        autocast = torch.autocast(
            device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None
        )
        epoch = step // steps_per_epoch
        while step < total_steps:
            plan = plan_epoch(sample_buckets, config.batch_size, seed=config.seed, epoch=epoch)
            first = (step - epoch * steps_per_epoch) * accum  # micro-batches done before a resume
            for micro in range(first, len(plan)):
                batch = plan[micro]
                # Every random draw is a function of (seed, epoch, position), so an interrupted
                # run resumed from a checkpoint draws exactly what the uninterrupted run drew.
                gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 10_007 + micro)
                captions = [
                    prepare_caption(
                        images[samples[i]].caption,
                        rng=random.Random(f"{config.seed}:{epoch}:{i}"),
                        shuffle=config.shuffle_caption,
                        keep_tokens=config.keep_tokens,
                        dropout=config.caption_dropout,
                        trigger_word=config.trigger_word,
                    )
                    for i in batch
                ]
                pairs = [latents[(images[samples[i]].content_hash, sample_buckets[i])] for i in batch]
                mean = torch.stack([m for m, _ in pairs])
                std = torch.stack([s for _, s in pairs])
                clean = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
                noise = sample_noise(clean, offset=config.noise_offset, generator=gen)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=gen)
                clean, noise, timesteps = clean.to(device), noise.to(device), timesteps.to(device)
                noisy = noise_scheduler.add_noise(clean, noise, timesteps)
                target = training_target(noise_scheduler, clean, noise, timesteps)
                with autocast:
                    hidden = prompts(captions)
                    pred = unet(noisy.to(unet.dtype), timesteps, hidden).sample
                loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                if config.min_snr_gamma:
                    loss = loss * snr_weights(noise_scheduler, timesteps, config.min_snr_gamma)
                loss = loss.mean()
                (scaler.scale(loss / accum) if scaler else loss / accum).backward()
                loss_sum, micro_in_step = loss_sum + loss.detach(), micro_in_step + 1
                if (micro + 1) % accum and micro + 1 < len(plan):
                    continue

                # One optimizer step. The .item() is the only host sync per step.
                step_loss = float(loss_sum) / micro_in_step
                if not math.isfinite(step_loss):
                    kept = sorted(config.output_dir.glob("checkpoints/step-*"))
                    raise TrainingDiverged(
                        f"the loss became {step_loss} at step {step + 1}",
                        "lower learning_rate (e.g. by 10x), keep max_grad_norm at 1, or use bf16 instead "
                        "of fp16" + (f"; the last good checkpoint is {kept[-1]}" if kept else ""),
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
                if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                    last_saved = (step, save(step, epoch))
                if stop is not None and stop.is_set():
                    if last_saved is None or last_saved[0] != step:
                        last_saved = (step, save(step, epoch))
                    partial = write_partial_lora(config, lora_parts(), run_facts(step, epoch + 1, step_loss), on_event)
                    raise TrainingInterrupted(
                        f"training stopped at step {step}/{total_steps}",
                        "resume with `resume_from: latest` in the config and the same command",
                        checkpoint=last_saved[1],
                        partial=str(partial) if partial else None,
                    )
                if step >= total_steps:
                    break
            epoch += 1
            if config.save_every_n_epochs and epoch % config.save_every_n_epochs == 0 and step < total_steps:
                write_epoch_lora(config, lora_parts(), run_facts(step, epoch, last_loss))  # kohya's NAME-00000N
                if last_saved is None or last_saved[0] != step:
                    last_saved = (step, save(step, epoch))
        timings["train"] = time.monotonic() - t_train

        # A checkpoint of the last step guards the export: if writing the outputs fails (a full disk),
        # `resume_from: latest` writes them without training again. Removed once they are written.
        guard = save(step, epoch, prune=False) if last_saved is None or last_saved[0] != step else None
        t0 = time.monotonic()
        parts = lora_parts()
        lora_configs = {"unet": unet.peft_config[ADAPTER]}
        if te_params:
            lora_configs["text_encoder"] = text_encoder.peft_config[ADAPTER]
        outputs = write_lora_files(config, parts, lora_configs, run_facts(step, epoch, last_loss))
        timings["export"] = time.monotonic() - t0
        seconds = time.monotonic() - run_start
        outputs["summary"] = write_summary(
            config,
            {
                "data_report": report.to_dict(),
                "steps": step,
                "epochs": epoch,
                "final_loss": last_loss,
                "latents": {"cached": stats.cached, "encoded": stats.encoded},
                "timings_seconds": timings | {"total": seconds},
                "outputs": outputs,
                "device": str(device),
                "precision": placement.precision,
            },
        )
        outputs["logs"] = str(config.output_dir / "logs")
        if guard is not None:
            run.discard(Path(guard))
        on_event(TrainingFinished(outputs=outputs, steps=step, final_loss=last_loss, seconds=seconds))
        return TrainResult(outputs=outputs, steps=step, final_loss=last_loss, seconds=seconds)
    finally:
        hold.close()
