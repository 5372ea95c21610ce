"""FLUX.1 on the one training loop: LoRA on the flow-matching transformer (and optionally CLIP-L).

What stays resident between jobs is the transformer alone (quantized and/or with swapped blocks
when the config asks: those are part of its registry key). A run then:

1. encodes each (image, bucket) through FLUX's VAE once, cached on disk by content; the VAE is
   loaded only if some latent is missing;
2. encodes every caption string the run will use (shuffles and dropouts follow from the seed)
   with CLIP-L and T5, cached on disk; the encoders are loaded only if some caption is missing,
   the transformer steps off the GPU while they run, and they are freed before training, so T5
   is never in memory while the transformer trains and a warm cache runs no text encoder at all;
3. trains with the rectified-flow loss of :mod:`lorad.diffusion.flow_matching` on packed latents;
4. exports kohya/BFL, diffusers and/or ComfyUI files (:mod:`lorad.families.flux.lora_files`);
5. draws sample images with the resident transformer and the live LoRA (:mod:`lorad.families.flux.sampling`):
   the prompts' text is encoded with the captions in step 2, and the VAE waits in CPU memory to decode.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from lorad.data.buckets import plan_epoch
from lorad.data.captions import prepare_caption
from lorad.data.latent_cache import LatentCache
from lorad.diffusion.captions import run_epochs, text_cache_dir
from lorad.diffusion.flow_matching import (
    TimestepSampling,
    flow_matching_loss,
    image_position_ids,
    noisy_latents,
    pack_latents,
    sample_sigmas,
    scale_latents,
    text_position_ids,
    unpack_latents,
)
from lorad.diffusion.latents import LatentSample, draw_latents, encode_latents
from lorad.diffusion.text_cache import TextEncoderCache, tokenizer_digest
from lorad.disk_space import disk_full_as_error, ensure_room
from lorad.errors import DiskFull
from lorad.events import Event, EventSink, LatentsCached, LogLine
from lorad.families.flux.config import FluxTrainConfig, flux_sources
from lorad.families.flux.key_map import FluxShape
from lorad.families.flux.lora_files import (
    ModuleLora,
    bfl_loras,
    clip_loras,
    comfyui_tensors,
    flux_metadata,
    kohya_tensors,
    read_flux_lora,
    save_flux_kohya,
)
from lorad.families.flux.sampling import FluxSampler, flux_prompts, warn_long_prompts
from lorad.families.flux.targets import CLIP_MODULES, transformer_target_paths
from lorad.families.sd.family import FAMILY as SD_FAMILY
from lorad.families.sd.family import SdData
from lorad.families.sd.init_lora import apply_init_lora
from lorad.families.sd.outputs import EPOCH_FILE_NAME, PARTIAL_FILE_NAME, SAVE_DTYPES, SdRunFacts, kohya_metadata
from lorad.lora.adapters import attach_lora, detach_lora, lora_state_dict
from lorad.lora.diffusers_format import save_diffusers_lora
from lorad.lora.targets import TEXT_ENCODER_SUGGESTIONS, resolve_targets
from lorad.models.block_swap import BlockSwap, flux_blocks
from lorad.models.flux_loader import (
    TransformerSource,
    component_fingerprint,
    load_clip_l,
    load_t5xxl,
    load_transformer,
    load_vae,
    open_tokenizers,
    resolve_flux_transformer,
)
from lorad.models.fp8 import store_in_fp8
from lorad.models.quantization import check_quantization, in_blocks, quantize_linears
from lorad.models.registry import ModelKey, free_memory
from lorad.paths import default_cache_dir
from lorad.sampling.prompts import ResolvedPrompt
from lorad.training.activation_checkpointing import (
    disable_activation_checkpointing,
    enable_activation_checkpointing,
    is_activation_checkpointing,
)
from lorad.training.family import ADAPTER, RunFacts, RunHooks, Scalars, ScannedData, split_rows
from lorad.training.placement import Placement
from lorad.training.run_folder import EXPORT_FULL_HINT

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
# Text-encoder entries kept in memory at once; the rest are read back from disk. A FLUX.1-dev entry is
# T5's 512 x 4096 hidden states (4 MB in bf16), so this bounds the cache at about 1 GB of host memory.
ENTRIES_IN_MEMORY = 256
T5, POOLED = "t5", "pooled"


@dataclass
class FluxModel:
    """A FLUX.1 base model as the registry keeps it: the transformer only, placed for training.

    ``swap`` holds the blocks kept in CPU memory (None without ``blocks_to_swap``); ``found`` is
    where the transformer came from, so a run finds the text encoders and VAE next to it;
    ``fp8_layers`` counts the layers ``fp8_base`` stores in float8 (0 without it).
    """

    transformer: FluxTransformer2DModel
    found: TransformerSource
    device: torch.device
    swap: BlockSwap | None = None
    fp8_layers: int = 0

    @property
    def source(self) -> str:
        return self.found.source

    @property
    def model_version(self) -> str:
        return f"flux1-{self.found.variant}"

    def place(self, device: torch.device | str) -> None:
        """Move the transformer to ``device`` (swapped blocks stay in CPU memory)."""
        if self.swap is not None:
            self.swap.place(self.transformer, device)
        else:
            self.transformer.to(device)


def load_flux_model(key: ModelKey) -> FluxModel:
    """Load the transformer the key names: weights in ``key.dtype``, quantized (``base_quantization``)
    or stored in float8 (``fp8_base``) and block-swapped as its options say, then placed on
    ``key.device``. Both conversions run on the CPU, before the weights reach the GPU, so the GPU
    never holds the full-precision model. They touch the blocks only (where nearly all weights are):
    the embedders and the output projection, where the stream enters and leaves, stay as loaded."""
    device, dtype = torch.device(key.device), getattr(torch, key.dtype)
    quantization = key.option("base_quantization", "none")
    check_quantization(quantization, device)
    found = resolve_flux_transformer(
        key.base_model, model_config_dir=Path(key.model_config_dir) if key.model_config_dir else None
    )
    transformer = load_transformer(found, dtype)
    quantize_linears(transformer, quantization, where=in_blocks(BLOCK_LISTS))
    fp8_layers = 0
    if key.option("fp8_base") == "true":
        fp8_layers = sum(store_in_fp8(block, compute_dtype=dtype).layers for block in flux_blocks(transformer))
    count = int(key.option("blocks_to_swap", "0"))
    swap = BlockSwap(flux_blocks(transformer), count, device) if count else None
    model = FluxModel(transformer=transformer, found=found, device=device, swap=swap, fp8_layers=fp8_layers)
    model.place(device)
    return model


@contextlib.contextmanager
def off_the_device(model: FluxModel) -> Iterator[None]:
    """Move the transformer to the CPU for the duration (on an accelerator), so the text encoders
    fit beside nothing; the weights come back unchanged."""
    if model.device.type == "cpu":
        yield
        return
    model.place("cpu")
    free_memory()
    try:
        yield
    finally:
        model.place(model.device)


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of an epoch's plan: positions in the epoch's sample list. A piece of it (a rank's
    rows of a data-parallel step, or an out-of-memory split) trains only ``samples[start:stop]`` but
    draws the whole micro-batch's random numbers."""

    epoch: int
    samples: tuple[int, ...]
    start: int = 0
    stop: int | None = None


class FluxRun:
    """A run on one FLUX.1 model: see :class:`lorad.training.family.FamilyRun` for the contract."""

    def __init__(
        self, config: FluxTrainConfig, model: FluxModel, data: SdData, placement: Placement, on_event: EventSink
    ) -> None:
        self.config, self.model, self.data, self.on_event = config, model, data, on_event
        self.device, self.dtype = placement.device, placement.weight_dtype
        self.scalars = Scalars()
        transformer = model.transformer
        sources = flux_sources(config, transformer_source=model.found)
        self.sources = sources
        self.shape: FluxShape = sources.shape
        self.guidance = config.guidance_scale if transformer.config.guidance_embeds else None
        self.sampling = TimestepSampling(config.timestep_sampling, config.sigmoid_scale, config.discrete_flow_shift)
        self.clip_tokenizer, self.t5_tokenizer = open_tokenizers(sources)

        # Targets first, so a typo costs nothing.
        paths = transformer_target_paths(
            transformer, config.transformer_target_modules, key="transformer_target_modules"
        )
        # Sample prompts are checked and their settings decided now; their text is encoded with the captions.
        self.sample_prompts: list[ResolvedPrompt] = []
        if config.sample_prompts:
            self.sample_prompts = flux_prompts(
                config, variant=sources.variant, guidance_embeds=self.guidance is not None, on_event=on_event
            )
            warn_long_prompts(
                self.sample_prompts, self.clip_tokenizer, self.t5_tokenizer, sources.t5_max_length, on_event
            )
        self.samples = [i for i, image in enumerate(data.images) for _ in range(image.repeats)]
        self.sample_buckets = [data.buckets[i] for i in self.samples]
        cache_root = config.cache_dir or default_cache_dir()
        self._vae: nn.Module | None = None
        self._encode_latents(cache_root / "latents", on_event)
        self.clip: nn.Module | None = None
        clip_paths: list[str] = []
        if config.train_text_encoder:
            # A trained CLIP-L runs every step (its pooled output changes); T5 is still cached.
            self.clip = load_clip_l(sources, self.dtype).to(self.device)
        self._encode_captions(text_cache_dir(config), on_event)

        params = attach_lora(
            transformer,
            adapter_name=ADAPTER,
            target_paths=paths,
            rank=config.lora_rank,
            alpha=config.effective_lora_alpha,
            dropout=config.lora_dropout,
        )
        for param in params:  # LoRA layers of swapped blocks were created beside their CPU weights
            param.data = param.data.to(self.device)
        self.parts: dict[str, nn.Module] = {"transformer": transformer}
        # A compiled wrapper, not the resident transformer itself, so the next job (and sampling) finds it as it was.
        self.denoiser = torch.compile(transformer) if config.torch_compile else transformer
        self.param_groups: list[dict[str, Any]] = [{"params": params, "lr": config.learning_rate}]
        if self.clip is not None:
            clip_paths = resolve_targets(
                self.clip,
                config.text_encoder_target_modules,
                key="text_encoder_target_modules",
                suggestions=TEXT_ENCODER_SUGGESTIONS,
            )
            clip_params = attach_lora(
                self.clip,
                adapter_name=ADAPTER,
                target_paths=clip_paths,
                rank=config.lora_rank,
                alpha=config.effective_lora_alpha,
                dropout=config.lora_dropout,
            )
            self.parts["text_encoder"] = self.clip
            self.param_groups.append({"params": clip_params, "lr": config.effective_text_encoder_lr})
        if config.init_lora:
            self._start_from(config.init_lora, paths, clip_paths if self.clip is not None else [], on_event)
        if model.swap is not None and not config.gradient_checkpointing:
            on_event(
                LogLine(
                    message="blocks_to_swap saves memory only with gradient_checkpointing: true "
                    "(without it, backward holds every block's weights on the device)"
                )
            )
        self.sampler = FluxSampler(
            self.sample_prompts,
            config=config,
            transformer=transformer,  # the resident module itself, never the torch.compile wrapper
            swap=model.swap,
            placement=placement,
            scheduler_config=sources.scheduler_config,
            conditioning=self._conditioning,
            adapted=list(self.parts.values()),
            vae=self.vae,
            on_event=on_event,
        )

    def _start_from(self, path: Path, paths: list[str], clip_paths: list[str], on_event: EventSink) -> None:
        """Load ``init_lora`` (any FLUX.1 LoRA layout) into the attached adapters (incremental training)."""
        if self.clip is not None:
            clip_names = [p for p, m in self.clip.named_modules() if isinstance(m, nn.Linear)]
        else:  # CLIP-L's layer names, for telling a file with text-encoder layers to train them
            layers = int(self.sources.clip_l.config["num_hidden_layers"])
            clip_names = [f"text_model.encoder.layers.{i}.{m}" for i in range(layers) for m in CLIP_MODULES]
        loaded = read_flux_lora(
            path, self.shape, rank=self.config.lora_rank, transformer_targets=paths, clip_paths=clip_names
        )
        apply_init_lora(
            self.config,
            {"transformer": self.model.transformer, "text_encoder": self.clip},
            ADAPTER,
            targeted={"transformer": paths, "text_encoder": clip_paths},
            adaptable={},
            on_event=on_event,
            loaded=loaded,
            target_keys={"transformer": "transformer_target_modules"},
        )

    # --- caches -------------------------------------------------------------------------------

    def _encode_latents(self, folder: Path, on_event: EventSink) -> None:
        t0 = time.monotonic()
        cache = LatentCache(folder, "flux-vae:" + component_fingerprint(self.sources.vae))

        self.latents, stats = encode_latents(
            self.data.images, self.data.buckets, vae=lambda: self.vae().to(self.device), cache=cache, device=self.device
        )
        if self._vae is not None:  # kept in CPU memory to decode samples; freed when the run draws none
            self._vae = self._vae.to("cpu") if self.sample_prompts else None
        free_memory()
        seconds = time.monotonic() - t0
        on_event(LatentsCached(cached=stats.cached, encoded=stats.encoded, seconds=seconds))
        self.scalars.summary["latents"] = {"cached": stats.cached, "encoded": stats.encoded, "seconds": seconds}
        vae_config = self.sources.vae.config
        self.shift, self.scale = float(vae_config.get("shift_factor") or 0.0), float(vae_config["scaling_factor"])

    def vae(self) -> nn.Module:
        """FLUX's VAE in fp32 (fp16 VAEs overflow on some images), loaded once for the run when first needed
        (latents missing from the cache, a sample to decode); in CPU memory unless the caller moves it."""
        if self._vae is None:
            self._vae = load_vae(self.sources, torch.float32)
        return self._vae

    def _caption(self, epoch: int, position: int) -> str:
        """The caption sample ``position`` sees in ``epoch`` (shuffle and dropout follow from the seed)."""
        config = self.config
        return prepare_caption(
            self.data.images[self.samples[position]].caption,
            rng=random.Random(f"{config.seed}:{epoch}:{position}"),
            shuffle=config.shuffle_caption,
            keep_tokens=config.keep_tokens,
            dropout=config.caption_dropout,
            trigger_word=config.trigger_word,
            tag_dropout=config.caption_tag_dropout_rate,
            keep_tokens_separator=config.keep_tokens_separator,
        )

    def _all_captions(self) -> list[str]:
        """Every caption string this run will train on, over all its epochs."""
        config = self.config
        varies = config.shuffle_caption or config.caption_dropout > 0 or config.caption_tag_dropout_rate > 0
        epochs = run_epochs(config, len(self.plan(0))) if varies else 1
        return [self._caption(e, i) for e in range(epochs) for i in range(len(self.samples))]

    def _encode_captions(self, folder: Path, on_event: EventSink) -> None:
        t0 = time.monotonic()
        sources = self.sources
        identity = hashlib.sha256(
            "\n".join(
                [
                    "flux-text:1",
                    component_fingerprint(sources.clip_l),
                    component_fingerprint(sources.t5xxl),
                    tokenizer_digest(self.clip_tokenizer),
                    tokenizer_digest(self.t5_tokenizer),
                    f"{sources.t5_max_length}|{self.dtype}",
                ]
            ).encode()
        ).hexdigest()
        self.text = TextEncoderCache(folder, identity, max_in_memory=ENTRIES_IN_MEMORY)
        encoders: dict[str, nn.Module] = {}

        def encode(captions: list[str]) -> dict[str, torch.Tensor]:
            if not encoders:  # loaded on the first missing caption only
                encoders["clip"] = load_clip_l(sources, self.dtype).to(self.device)
                encoders["t5"] = load_t5xxl(sources, self.dtype).to(self.device)
            return self._encode(encoders["clip"], encoders["t5"], captions)

        with off_the_device(self.model) if self._any_missing() else contextlib.nullcontext():
            stats = self.text.pre_encode(self._all_captions(), encode, batch_size=8)
            # The sample prompts too, so sampling never needs a text encoder that training has freed.
            prompts = self.text.pre_encode(self._sample_texts(), encode, batch_size=8)
            encoders.clear()
            free_memory()
        seconds = time.monotonic() - t0
        distinct = stats.encoded + stats.cached
        # SD's and SDXL's wording (lorad.diffusion.captions), with the sample prompts beside it.
        message = (
            f"text encoder outputs: {distinct} distinct captions, {stats.encoded} encoded now, "
            f"{stats.cached} from the cache ({seconds:.1f} s)"
        )
        if self.sample_prompts:
            message += f"; sample prompts: {prompts.encoded} encoded now, {prompts.cached} from the cache"
        on_event(LogLine(message=message))
        self.scalars.summary["text_encoder_outputs"] = {
            "distinct_captions": distinct,
            "encoded": stats.encoded,
            "cached": stats.cached,
            "seconds": seconds,
        }

    def _sample_texts(self) -> list[str]:
        """The sample prompts' texts, and their negative prompts where CFG uses them."""
        return [text for p in self.sample_prompts for text in (p.prompt, p.negative)[: 2 if p.cfg_scale > 1 else 1]]

    def _any_missing(self) -> bool:
        texts = dict.fromkeys(self._all_captions() + self._sample_texts())
        return any(text not in self.text for text in texts)

    def _conditioning(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5's hidden states (cached) and CLIP-L's pooled output of ``captions`` on the device: the cached one,
        or the trained CLIP-L's as it is now (its adapter changes every step)."""
        text = self.text.batch(captions, device=self.device)
        pooled = self._pooled(self.clip, captions) if self.clip is not None else text[POOLED]
        return text[T5], pooled

    def _encode(self, clip: nn.Module, t5: nn.Module, captions: list[str]) -> dict[str, torch.Tensor]:
        """CLIP-L's pooled output and T5's last hidden states for ``captions`` (padded to the max length)."""
        t5_ids = self.t5_tokenizer(
            captions, padding="max_length", max_length=self.sources.t5_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return {T5: t5(t5_ids.to(self.device)).last_hidden_state, POOLED: self._pooled(clip, captions)}

    def _pooled(self, clip: nn.Module, captions: list[str]) -> torch.Tensor:
        ids = self.clip_tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        return clip(ids.to(self.device)).pooler_output

    # --- the FamilyRun protocol ---------------------------------------------------------------

    def plan(self, epoch: int) -> Sequence[MicroBatch]:
        return [
            MicroBatch(epoch, tuple(batch))
            for batch in plan_epoch(self.sample_buckets, self.config.batch_size, seed=self.config.seed, epoch=epoch)
        ]

    def split(self, micro_batch: MicroBatch, size: int) -> list[tuple[MicroBatch, float]]:
        return split_rows(micro_batch, size)

    def loss(self, micro_batch: MicroBatch, generator: torch.Generator) -> torch.Tensor:
        if self.model.swap is not None:
            self.model.swap.settle()  # the previous backward's last block back to rest; forward order again
        batch, images = micro_batch.samples, self.data.images
        rows = slice(micro_batch.start, micro_batch.stop)
        t5, pooled = self._conditioning([self._caption(micro_batch.epoch, i) for i in batch[rows]])

        # Every random number is drawn on the run's device (the generator lives there): no host round trip.
        samples = [LatentSample(images[self.samples[i]].content_hash, self.sample_buckets[i]) for i in batch]
        raw = draw_latents(
            samples, self.latents, {}, random_crop=False, factor=8, scaling_factor=1.0, generator=generator
        ).latents
        clean = scale_latents(raw, self.shift, self.scale)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=generator.device)
        height, width = clean.shape[-2:]
        sigmas = sample_sigmas(
            self.sampling, len(batch), image_seq_len=(height // 2) * (width // 2), generator=generator
        )
        # Drawn for the whole micro-batch above, so a piece trains on exactly the numbers the whole would.
        clean, noise, sigmas = clean[rows], noise[rows], sigmas[rows]
        dtype = self.dtype
        prediction = self.denoiser(
            hidden_states=pack_latents(noisy_latents(clean, noise, sigmas)).to(dtype),
            encoder_hidden_states=t5.to(dtype),
            pooled_projections=pooled.to(dtype),
            timestep=sigmas.to(dtype),
            img_ids=image_position_ids(height, width, device=self.device),
            txt_ids=text_position_ids(t5.shape[1], device=self.device),
            guidance=None if self.guidance is None else torch.full((len(clean),), self.guidance, device=self.device),
        ).sample
        return flow_matching_loss(unpack_latents(prediction, height, width), clean, noise).mean()

    def train_mode(self, gradient_checkpointing: bool) -> None:
        for part in self.parts.values():
            part.train()
            if gradient_checkpointing:
                enable_activation_checkpointing(part)

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def finish(self, step: int) -> None:
        if self.model.swap is not None:
            self.model.swap.settle()

    def sample(self, step: int, *, baseline: bool = False) -> list[Event]:
        return self.sampler.sample(step, baseline=baseline)

    def _files(self, facts: RunFacts) -> tuple[dict[str, ModuleLora], dict[str, ModuleLora], dict[str, str]]:
        """The run's LoRA in BFL modules (transformer) and CLIP-L modules, and the files' metadata."""
        config = self.config
        alpha = config.effective_lora_alpha
        bfl = bfl_loras(lora_state_dict(self.model.transformer, ADAPTER), self.shape, alpha)
        clip = clip_loras(lora_state_dict(self.clip, ADAPTER), alpha) if self.clip is not None else {}
        report = self.data.report.to_dict()
        sd_facts = SdRunFacts(
            model_version="flux1", num_train_images=len(self.samples), tag_frequency=report["tag_frequency"], run=facts
        )
        extra = {
            "ss_guidance_scale": config.guidance_scale,
            "ss_timestep_sampling": config.timestep_sampling,
            "ss_sigmoid_scale": config.sigmoid_scale,
            "ss_discrete_flow_shift": config.discrete_flow_shift,
            "ss_model_prediction_type": "raw",
        }
        metadata = kohya_metadata(config, sd_facts) | flux_metadata(
            self.sources.variant, rank=config.lora_rank, alpha=alpha, extra=extra
        )
        return bfl, clip, metadata

    def _kohya_file(self, name: str, facts: RunFacts) -> Path:
        """One kohya-layout file ``name`` in ``output_dir`` (epoch and partial files). DiskFull when it does not fit."""
        dtype = SAVE_DTYPES[self.config.save_precision]
        bfl, clip, metadata = self._files(facts)
        tensors = kohya_tensors(bfl, clip, dtype)
        path, needed = self.config.output_dir / name, _bytes(tensors)
        ensure_room(self.config.output_dir, needed, f"the LoRA file {name}")
        with disk_full_as_error(self.config.output_dir, f"the LoRA file {name}", needed):
            return save_flux_kohya(path, tensors, metadata)

    def export(self, facts: RunFacts) -> dict[str, str]:
        """The output formats' files; the EMA variant (``facts.variant == "ema"``) as ``NAME-ema...`` beside them
        (roles ``kohya_ema``, ...; diffusers' file in ``output_dir/ema/``), as SD names it."""
        config = self.config
        dtype = SAVE_DTYPES[config.save_precision]
        bfl, clip, metadata = self._files(facts)
        variant = facts.variant
        suffix, role = (f"-{variant}", f"_{variant}") if variant else ("", "")
        files: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}
        if "kohya" in config.output_format:
            path = config.output_dir / f"{config.output_name}{suffix}.safetensors"
            files["kohya"] = (path, kohya_tensors(bfl, clip, dtype))
        if "comfyui" in config.output_format:
            path = config.output_dir / f"{config.output_name}{suffix}_comfyui.safetensors"
            files["comfyui"] = (path, comfyui_tensors(bfl, clip, dtype))
        transformer_lora = lora_state_dict(self.model.transformer, ADAPTER)
        clip_lora = lora_state_dict(self.clip, ADAPTER) if self.clip is not None else {}
        diffusers_bytes = _bytes({**transformer_lora, **clip_lora}) if "diffusers" in config.output_format else 0
        needed = sum(_bytes(t) for _, t in files.values()) + diffusers_bytes
        what = f"the LoRA files of `{config.output_name}`"
        ensure_room(config.output_dir, needed, what, EXPORT_FULL_HINT)
        outputs: dict[str, str] = {}
        with disk_full_as_error(config.output_dir, what, needed, EXPORT_FULL_HINT):
            for kind, (path, tensors) in files.items():
                outputs[kind + role] = str(save_flux_kohya(path, tensors, metadata))
            if "diffusers" in config.output_format:
                path = save_diffusers_lora(
                    config.output_dir / variant if variant else config.output_dir,
                    {"transformer": transformer_lora, "text_encoder": clip_lora},
                    {name: part.peft_config[ADAPTER] for name, part in self.parts.items()},
                    dtype,
                    pipeline="flux",
                )
                outputs["diffusers" + role] = str(path)
        return outputs

    def export_epoch(self, facts: RunFacts) -> None:
        self._kohya_file(EPOCH_FILE_NAME.format(name=self.config.output_name, epoch=facts.epoch), facts)

    def export_partial(self, facts: RunFacts) -> Path | None:
        name = PARTIAL_FILE_NAME.format(name=self.config.output_name, step=facts.steps)
        try:
            return self._kohya_file(name, facts)
        except DiskFull as err:  # the checkpoint matters more than the partial LoRA
            self.on_event(LogLine(message=f"no partial LoRA written: {err}", level="warning"))
            return None


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    """About how many bytes a safetensors file of ``tensors`` takes (with room for header and metadata)."""
    return sum(t.numel() * t.element_size() for t in tensors.values()) + 256 * 1024


class FluxFamily:
    """FLUX.1: see :class:`lorad.training.family.ModelFamily` for the contract."""

    name = "flux"

    def scan(self, config: FluxTrainConfig, *, on_event: EventSink, hooks: RunHooks) -> ScannedData:
        # Images, captions and buckets exactly as SD scans them (the buckets' sides are multiples of
        # 16 because the config requires it: 8 pixels per latent, 2x2 latents per token).
        return SD_FAMILY.scan(config, on_event=on_event, hooks=hooks)

    def model_key(self, config: FluxTrainConfig, placement: Placement) -> ModelKey:
        options = []
        if config.base_quantization != "none":
            options.append(("base_quantization", config.base_quantization))
        if config.fp8_base:  # changes the resident weights (lossily): resident apart from the full-precision model
            options.append(("fp8_base", "true"))
        if config.blocks_to_swap:
            options.append(("blocks_to_swap", str(config.blocks_to_swap)))
        return ModelKey(
            base_model=config.base_model,
            device=str(placement.device),
            dtype=str(placement.weight_dtype).removeprefix("torch."),
            model_config_dir=str(config.model_config_dir or ""),
            kind="flux",
            options=tuple(sorted(options)),
        )

    def load(self, key: ModelKey) -> FluxModel:
        return load_flux_model(key)

    def start(
        self, config: FluxTrainConfig, model: FluxModel, data: ScannedData, placement: Placement, on_event: EventSink
    ) -> FluxRun:
        if model.fp8_layers:
            on_event(LogLine(f"fp8_base: {model.fp8_layers} transformer layers hold float8 weights"))
        return FluxRun(config, model, data.payload, placement, on_event)

    def restore(self, model: FluxModel) -> None:
        transformer = model.transformer
        if is_activation_checkpointing(transformer):
            disable_activation_checkpointing(transformer)
        transformer.eval()
        detach_lora(transformer, ADAPTER)
        if model.swap is not None:
            model.swap.settle()

    def signature(self, config: FluxTrainConfig) -> dict[str, Any]:
        keys = (
            "lora_rank",
            "transformer_target_modules",
            "train_text_encoder",
            "text_encoder_target_modules",
            "batch_size",
            "gradient_accumulation_steps",
            "seed",
            "base_model",
            "timestep_sampling",
            "sigmoid_scale",
            "discrete_flow_shift",
            "guidance_scale",
        )
        values = config.to_dict()
        return {k: values[k] for k in keys} | {"lora_alpha": config.effective_lora_alpha}


FAMILY = FluxFamily()
