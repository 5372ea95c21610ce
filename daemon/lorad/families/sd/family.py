"""Stable Diffusion 1.x/2.x on the one training loop: LoRA on the UNet and optionally the CLIP text encoder.

The scan reads images and captions and assigns buckets; the run encodes each (image, bucket) once
through the VAE (cached on disk by content), attaches the LoRA, and computes the DDPM loss of one
micro-batch (epsilon or v-prediction, noise offset, min-SNR); the export writes kohya's file
(A1111, Forge, ComfyUI) and diffusers' file.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorad.config import TrainConfig
from lorad.config.pickle_policy import needs_pickle
from lorad.data.buckets import assign_bucket, bucket_counts, make_buckets, plan_epoch, plan_flips
from lorad.data.captions import prepare_caption
from lorad.data.dataset import TrainImage, scan_dataset
from lorad.data.latent_cache import LatentCache
from lorad.data.masks import latent_mask, mask_source
from lorad.data.regularization import balanced_reg_repeats, class_captions
from lorad.data.report import DataReport
from lorad.diffusion.captions import caption_conditioning, move_off_device, run_epochs
from lorad.diffusion.ddpm import per_sample_mse, sample_noise, snr_weights, training_target
from lorad.diffusion.latents import CleanLatents, LatentSample, draw_latents, encode_latents, latent_views, view_key
from lorad.diffusion.noise import input_perturbation, multires_noise, sample_timesteps
from lorad.errors import ConfigError, ConfigProblem
from lorad.events import Event, EventSink, LatentsCached, LogLine
from lorad.families.sd.init_lora import apply_init_lora
from lorad.families.sd.outputs import SdRunFacts, write_epoch_lora, write_lora_files, write_partial_lora
from lorad.families.sd.sampling import SdSampler
from lorad.families.sd.traits import SD_TRAITS, ModelTraits, SampleView
from lorad.lora.adapters import detach_lora, lora_state_dict
from lorad.lora.lycoris_adapter import set_lycoris_training
from lorad.lora.networks import attach_network, network_spec
from lorad.lora.targets import (
    ADAPTABLE,
    TEXT_ENCODER_SUGGESTIONS,
    UNET_ALIASES,
    UNET_SUGGESTIONS,
    resnet_layer_paths,
    resolve_targets,
)
from lorad.models.registry import ModelKey
from lorad.models.sd_components import SDComponents
from lorad.paths import default_cache_dir
from lorad.training.activation_checkpointing import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    is_activation_checkpointing,
)
from lorad.training.family import ADAPTER, RunFacts, RunHooks, Scalars, ScannedData, split_rows
from lorad.training.placement import Placement
from lorad.training.transfer import to_device


@dataclass(frozen=True)
class SdData:
    """The scan's result: the usable images, each one's bucket, and the report; and the regularization
    images (``reg_data_dir``) with their buckets, when there are any."""

    images: list[TrainImage]
    buckets: list[tuple[int, int]]
    report: DataReport
    reg_images: list[TrainImage] = field(default_factory=list)
    reg_buckets: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of an epoch's plan: positions in the epoch's sample list, and whether each sample is
    trained mirrored (``flip_aug``). A piece of it (after an out-of-memory split) trains only
    ``samples[start:stop]`` but draws the whole micro-batch's random numbers."""

    epoch: int
    samples: tuple[int, ...]
    flips: tuple[bool, ...] = ()
    start: int = 0
    stop: int | None = None

    @property
    def trained(self) -> slice:
        """The rows of the micro-batch this (piece of a) micro-batch trains on."""
        return slice(self.start, self.stop)


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


class SdRun:
    """A run on one SD model: see :class:`lorad.training.family.FamilyRun` for the contract."""

    def __init__(
        self,
        config: TrainConfig,
        components: SDComponents,
        data: SdData,
        placement: Placement,
        on_event: EventSink,
        traits: ModelTraits = SD_TRAITS,
    ) -> None:
        self.config, self.components, self.data, self.on_event = config, components, data, on_event
        self.traits = traits
        # The files name layers as this model's traits do (kohya's SD or SGM names).
        self.layout = replace(traits.layout, kohya_name=lambda part, path: traits.kohya_name(components, part, path))
        self.device = placement.device
        # The UNet computes in the weight dtype (not ``unet.dtype``: with fp8_base its first weight is float8).
        self.dtype = placement.weight_dtype
        self.scalars = Scalars()
        unet = components.unet
        encoders = {part: getattr(components, part) for part in traits.text_parts}
        self.spec = spec = network_spec(config)

        # Resolve targets before encoding anything, so a typo costs nothing.
        unet_paths = resolve_targets(
            unet,
            config.unet_target_modules,
            key="unet_target_modules",
            aliases=UNET_ALIASES,
            suggestions=UNET_SUGGESTIONS,
        )
        if spec.conv_rank:  # LoCon, or another LyCORIS type given conv_dim: the ResNet layers too
            unet_paths = sorted(set(unet_paths) | set(resnet_layer_paths(unet)))
        te_paths = {
            part: resolve_targets(
                encoder,
                config.text_encoder_target_modules,
                key="text_encoder_target_modules",
                suggestions=TEXT_ENCODER_SUGGESTIONS,
            )
            for part, encoder in encoders.items()
            if config.train_text_encoder
        }
        for encoder in encoders.values():
            layers = getattr(encoder.config, "num_hidden_layers", 0)
            if config.clip_skip and layers and config.clip_skip > layers:
                raise ConfigError(
                    [ConfigProblem("clip_skip", f"is {config.clip_skip}", f"this text encoder has {layers} layers")]
                )

        # Layer paths an init_lora file may name, read before the adapter wraps them.
        adaptable = {
            part: [p for p, m in module.named_modules() if isinstance(m, ADAPTABLE)]
            for part, module in {"unet": unet, **encoders}.items()
        }

        # Each training image appears `repeats` times per epoch; regularization images as many times as
        # balance them against those (kohya's rule), each sample weighted by prior_loss_weight.
        self.images = data.images + data.reg_images
        self.buckets = data.buckets + data.reg_buckets
        reg_counts = balanced_reg_repeats(
            sum(image.repeats for image in data.images), [image.repeats for image in data.reg_images]
        )
        counts = [image.repeats for image in data.images] + reg_counts
        self.samples = [i for i, count in enumerate(counts) for _ in range(count)]
        self.sample_buckets = [self.buckets[i] for i in self.samples]
        first_reg = len(data.images)
        self.sample_weights = torch.tensor(
            [config.prior_loss_weight if i >= first_reg else 1.0 for i in self.samples], dtype=torch.float32
        )
        if data.reg_images:
            on_event(
                LogLine(
                    f"regularization: {len(data.reg_images)} images, {sum(reg_counts)} samples per epoch "
                    f"beside {sum(counts[:first_reg])} training samples"
                )
            )

        # Latents are encoded once per (image content, bucket, view, VAE) and reused across runs.
        t0 = time.monotonic()
        used = sorted(set(self.samples))
        cache = LatentCache(config.cache_dir or default_cache_dir() / "latents", components.vae_identity())
        self.views = latent_views(flip=config.flip_aug, random_crop=config.random_crop)
        self.latents, stats = encode_latents(
            [self.images[i] for i in used],
            [self.buckets[i] for i in used],
            vae=components.vae,
            cache=cache,
            device=self.device,
            views=self.views,
        )
        seconds = time.monotonic() - t0
        on_event(LatentsCached(cached=stats.cached, encoded=stats.encoded, seconds=seconds))
        self.scalars.summary["latents"] = {"cached": stats.cached, "encoded": stats.encoded, "seconds": seconds}
        self.vae_factor = 2 ** (len(components.vae.config.block_out_channels) - 1)
        self.masks = self._load_masks(used, on_event) if config.masked_loss else {}

        def lora_name(part: str) -> Callable[[str], str]:
            return lambda path: traits.kohya_name(components, part, path)

        unet_params = attach_network(
            unet, adapter_name=ADAPTER, target_paths=unet_paths, spec=spec, lora_name=lora_name("unet")
        )
        te_params = [
            param
            for part, paths in te_paths.items()
            if paths
            for param in attach_network(
                encoders[part], adapter_name=ADAPTER, target_paths=paths, spec=spec, lora_name=lora_name(part)
            )
        ]
        if config.init_lora:
            apply_init_lora(
                config,
                {"unet": unet, **encoders},
                ADAPTER,
                targeted={"unet": unet_paths, **te_paths},
                adaptable=adaptable,
                on_event=on_event,
                name_for=lambda part, path: traits.kohya_name(components, part, path),
            )
        self.parts: dict[str, nn.Module] = {"unet": unet} | {part: encoders[part] for part in te_paths if te_params}
        self.param_groups: list[dict[str, Any]] = [{"params": unet_params, "lr": config.learning_rate}]
        if te_params:
            self.param_groups.append({"params": te_params, "lr": config.effective_text_encoder_lr})
        # Sample prompts are checked, and with frozen text encoders encoded, now: before training, and before
        # the encoders may leave the device (a step and a sample then run no text encoder at all).
        self.sampler = (
            SdSampler(config, components, traits, placement, on_event, trainable=bool(te_params))
            if config.sample_prompts
            else None
        )

        # Frozen text encoders run once per distinct caption the run will use, before the first step.
        self.text = caption_conditioning(
            config,
            planned=self.planned_captions(),
            encode=lambda captions: traits.encode(components, captions, self.device, config),
            identity=lambda: components.text_encoder_identity(traits.text_settings(config)),
            trainable=bool(te_params),
            device=self.device,
            on_event=on_event,
            scalars=self.scalars,
        )
        if not te_params and config.cache_text_encoder_outputs:
            move_off_device(list(encoders.values()), self.device)
        # A compiled wrapper, not the resident UNet itself, so the next job finds the model as it was.
        self.denoiser = torch.compile(unet) if config.torch_compile else unet

    def planned_captions(self) -> Iterator[str]:
        """Every caption the run's steps will see: each epoch's when shuffle or dropout make them differ by
        epoch (they follow from the seed), else the first epoch's, which every epoch repeats."""
        config = self.config
        varies = config.shuffle_caption or config.caption_dropout > 0 or config.caption_tag_dropout_rate > 0
        epochs = run_epochs(config, len(self.plan(0))) if varies else 1
        everyone = tuple(range(len(self.samples)))
        for epoch in range(epochs):
            yield from self.captions(MicroBatch(epoch, everyone))

    def _load_masks(self, used: Sequence[int], on_event: EventSink) -> dict[tuple[str, tuple[int, int]], torch.Tensor]:
        """Each used image's mask per latent view, at latent size (images without a mask have none)."""
        masks: dict[tuple[str, tuple[int, int]], torch.Tensor] = {}
        found = 0
        for i in used:
            image, bucket = self.images[i], self.buckets[i]
            source = mask_source(image, self.config.mask_dir)
            if source is None:
                continue
            found += 1
            for view in self.views:
                masks[(view_key(image.content_hash, view), bucket)] = latent_mask(
                    source, bucket, view, factor=self.vae_factor
                )
        where = f"in {self.config.mask_dir}" if self.config.mask_dir else "as alpha channels"
        on_event(LogLine(f"masked_loss: {found} of {len(used)} images have a mask {where}; the rest train everywhere"))
        return masks

    def plan(self, epoch: int) -> Sequence[MicroBatch]:
        config = self.config
        flips = plan_flips(len(self.samples), seed=config.seed, epoch=epoch) if config.flip_aug else None
        return [
            MicroBatch(epoch, tuple(batch), tuple(flips[i] for i in batch) if flips else ())
            for batch in plan_epoch(self.sample_buckets, config.batch_size, seed=config.seed, epoch=epoch)
        ]

    def clean_latents(self, micro_batch: MicroBatch, generator: torch.Generator) -> CleanLatents:
        """The micro-batch's latents: each sample's planned view (mirrored or not), a fresh draw from its cached
        VAE posterior, cropped at a random latent offset with ``random_crop``; and its masks with masked_loss."""
        samples = [
            LatentSample(
                self.images[self.samples[i]].content_hash,
                self.sample_buckets[i],
                flipped=bool(micro_batch.flips) and micro_batch.flips[position],
            )
            for position, i in enumerate(micro_batch.samples)
        ]
        return draw_latents(
            samples,
            self.latents,
            self.masks,
            random_crop=self.config.random_crop,
            factor=self.vae_factor,
            scaling_factor=self.components.vae_scaling_factor,
            generator=generator,
        )

    def captions(self, micro_batch: MicroBatch) -> list[str]:
        """The captions the micro-batch's samples see (shuffled, dropped, ... as configured)."""
        config = self.config
        return [
            prepare_caption(
                self.images[self.samples[i]].caption,
                rng=random.Random(f"{config.seed}:{micro_batch.epoch}:{i}"),
                shuffle=config.shuffle_caption,
                keep_tokens=config.keep_tokens,
                dropout=config.caption_dropout,
                trigger_word=config.trigger_word if self.samples[i] < len(self.data.images) else None,
                tag_dropout=config.caption_tag_dropout_rate,
                keep_tokens_separator=config.keep_tokens_separator,
            )
            for i in micro_batch.samples
        ]

    def sample_losses(self, micro_batch: MicroBatch, generator: torch.Generator) -> torch.Tensor:
        """The unweighted loss of each trained sample of the micro-batch (masked, min-SNR weighted as
        configured). Every random number is drawn on the device for the whole micro-batch, and a piece
        keeps its own rows of it: a step redone in smaller pieces trains on exactly the same draws."""
        config, scheduler = self.config, self.components.noise_scheduler
        rows = micro_batch.trained
        batch = self.clean_latents(micro_batch, generator)
        clean = batch.latents
        noise = sample_noise(clean, offset=config.noise_offset, generator=generator)
        noise = multires_noise(
            noise,
            iterations=config.multires_noise_iterations,
            discount=config.multires_noise_discount,
            generator=generator,
        )
        high = min(config.max_timestep, scheduler.config.num_train_timesteps)
        timesteps = sample_timesteps(len(clean), low=config.min_timestep, high=high, generator=generator)
        model_noise = input_perturbation(noise, gamma=config.ip_noise_gamma, generator=generator)
        clean, noise, model_noise, timesteps = clean[rows], noise[rows], model_noise[rows], timesteps[rows]
        noisy = scheduler.add_noise(clean, model_noise, timesteps)
        target = training_target(scheduler, clean, noise, timesteps)
        text = self.text(self.captions(micro_batch)[rows])
        views = [
            SampleView(
                self.images[self.samples[i]].width,
                self.images[self.samples[i]].height,
                self.sample_buckets[i],
                bool(micro_batch.flips) and micro_batch.flips[position],
                batch.crops[position] if batch.crops else None,
            )
            for position, i in enumerate(micro_batch.samples)
        ][rows]
        pred = self.traits.denoise(self.denoiser, noisy.to(self.dtype), timesteps, text, views)
        masks = batch.masks[rows] if batch.masks is not None else None
        loss = per_sample_mse(pred, target, masks)
        if config.min_snr_gamma:
            loss = loss * snr_weights(scheduler, timesteps, config.min_snr_gamma)
        return loss

    def split(self, micro_batch: MicroBatch, size: int) -> list[tuple[MicroBatch, float]]:
        # A piece (a rank's rows) splits into smaller pieces of its own rows, with shares of its loss.
        return split_rows(micro_batch, size)

    def loss(self, micro_batch: MicroBatch, generator: torch.Generator) -> torch.Tensor:
        trained = list(micro_batch.samples[micro_batch.trained])
        weights = to_device(self.sample_weights[trained], self.device)
        return (self.sample_losses(micro_batch, generator) * weights).mean()

    def train_mode(self, gradient_checkpointing: bool) -> None:
        for part in self.parts.values():
            part.train()
            set_lycoris_training(part, ADAPTER, True)
            if gradient_checkpointing:
                enable_activation_checkpointing(part)

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def finish(self, step: int) -> None:
        pass

    def sample(self, step: int, *, baseline: bool = False) -> list[Event]:
        return self.sampler.sample(step, baseline=baseline) if self.sampler is not None else []

    def _lora_parts(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: lora_state_dict(module, ADAPTER) for name, module in self.parts.items()}

    def _facts(self, facts: RunFacts) -> SdRunFacts:
        return SdRunFacts(
            model_version=self.components.model_version,
            num_train_images=sum(image.repeats for image in self.data.images),
            tag_frequency=self.data.report.to_dict()["tag_frequency"],
            run=facts,
        )

    def export(self, facts: RunFacts) -> dict[str, str]:
        lora_configs = {
            name: module.peft_config[ADAPTER] for name, module in self.parts.items() if not self.spec.is_lycoris
        }
        return write_lora_files(
            self.config, self._lora_parts(), lora_configs, self._facts(facts), self.spec, layout=self.layout
        )

    def export_epoch(self, facts: RunFacts) -> None:
        write_epoch_lora(self.config, self._lora_parts(), self._facts(facts), layout=self.layout)

    def export_partial(self, facts: RunFacts) -> Path | None:
        return write_partial_lora(
            self.config, self._lora_parts(), self._facts(facts), self.on_event, layout=self.layout
        )


class SdFamily:
    """Stable Diffusion 1.x/2.x: see :class:`lorad.training.family.ModelFamily` for the contract."""

    name = "sd"

    def scan(self, config: TrainConfig, *, on_event: EventSink, hooks: RunHooks) -> ScannedData:
        images, report = scan_dataset(
            config.train_data_dir,
            metadata_path=config.metadata_path,
            caption_extension=config.caption_extension,
            repeats=config.repeats.for_folder,
            caption_missing=hooks.caption_missing,
        )
        bucket_list = make_buckets(
            config.resolution, config.min_bucket_reso, config.max_bucket_reso, config.bucket_reso_steps
        )

        def bucket_of(image: TrainImage) -> tuple[int, int]:
            if not config.enable_bucket:
                return (config.resolution, config.resolution)
            return assign_bucket(
                image.width,
                image.height,
                buckets=bucket_list,
                resolution=config.resolution,
                step=config.bucket_reso_steps,
                no_upscale=config.bucket_no_upscale,
            )

        buckets = [bucket_of(image) for image in images]
        reg_images: list[TrainImage] = []
        notes: tuple[str, ...] = ()
        if config.reg_data_dir is not None:
            root = config.reg_data_dir
            reg_images, reg_report = scan_dataset(
                root,
                metadata_path=None,
                caption_extension=config.caption_extension,
                caption_missing=lambda paths: class_captions(paths, root),
            )
            notes = (f"regularization images: {reg_report.images_used} of {reg_report.images_found} usable in {root}",)
        reg_buckets = [bucket_of(image) for image in reg_images]
        report = report.with_buckets(bucket_counts(buckets))
        data = SdData(images, buckets, report, reg_images, reg_buckets)
        summary = report.to_dict() | ({"reg_images": len(reg_images)} if config.reg_data_dir else {})
        return ScannedData(report=summary, text=report.render(), payload=data, notes=notes)

    def model_key(self, config: TrainConfig, placement: Placement) -> ModelKey:
        return sd_model_key(
            base_model=config.base_model,
            placement=placement,
            model_config_dir=config.model_config_dir,
            tokenizer_path=config.tokenizer_path,
            prediction_type=config.prediction_type,
            allow_pickle=config.allow_pickle,
        )

    def load(self, key: ModelKey) -> SDComponents:
        # Loading needs only the device and the weight dtype, both part of the key.
        placement = Placement(
            device=torch.device(key.device), autocast_dtype=None, weight_dtype=getattr(torch, key.dtype)
        )
        return load_for_training(
            key.base_model,
            placement,
            allow_pickle=key.allow_pickle,  # the job's (or the model load's) own permission, never implied
            model_config_dir=Path(key.model_config_dir) if key.model_config_dir else None,
            tokenizer_path=Path(key.tokenizer_path) if key.tokenizer_path else None,
            prediction_type=key.prediction_type,
        )

    def start(
        self, config: TrainConfig, model: SDComponents, data: ScannedData, placement: Placement, on_event: EventSink
    ) -> SdRun:
        return SdRun(config, model, data.payload, placement, on_event)

    def restore(self, model: SDComponents) -> None:
        restore_model(model, SD_TRAITS.text_parts)

    def signature(self, config: TrainConfig) -> dict[str, Any]:
        keys = (
            "lora_rank",
            "unet_target_modules",
            "train_text_encoder",
            "text_encoder_target_modules",
            "batch_size",
            "gradient_accumulation_steps",
            "seed",
            "base_model",
            "network_type",
            "flip_aug",
            "random_crop",
            "reg_data_dir",
            "optimizer",
            "ema_decay",
        )
        values = config.to_dict()
        return {k: values[k] for k in keys} | {
            "lora_alpha": config.effective_lora_alpha,
            "conv_dim": config.effective_conv_dim,
        }


def restore_model(model: Any, text_parts: Sequence[str]) -> None:
    """Leave an SD-style base model as a run found it: adapters removed, checkpointing off, eval mode, and
    text encoders a run moved off the device (cached outputs) back beside the UNet for the next job."""
    for module in (model.unet, *(getattr(model, part) for part in text_parts)):
        if is_activation_checkpointing(module):
            disable_activation_checkpointing(module)
        module.eval()
        detach_lora(module, ADAPTER)
    device = next(model.unet.parameters()).device
    for part in text_parts:
        getattr(model, part).to(device)


def sd_model_key(
    *,
    base_model: str,
    placement: Placement,
    model_config_dir: Path | None = None,
    tokenizer_path: Path | None = None,
    prediction_type: str = "auto",
    allow_pickle: bool = False,
    kind: str = "sd",
) -> ModelKey:
    """The registry key of an SD-style base model loaded on ``placement``'s device in its weight dtype."""
    return ModelKey(
        base_model=base_model,
        device=str(placement.device),
        dtype=str(placement.weight_dtype).removeprefix("torch."),
        model_config_dir=str(model_config_dir or ""),
        tokenizer_path=str(tokenizer_path or ""),
        prediction_type=prediction_type,
        kind=kind,
        # Only a pickle model's key depends on the opt-in: a .safetensors model is one resident model either way.
        allow_pickle=needs_pickle(base_model, allow_pickle),
    )


FAMILY = SdFamily()
