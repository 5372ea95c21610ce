"""Engine vs bare loop: how much slower per step is lorad's SD LoRA engine than a minimal loop?

Both sides train the same LoRA (UNet attention projections, same rank and alpha, AdamW, grad
clipping) on the same resident model, batch size, resolution and precision, in one process, in
alternating order, so machine noise hits both. Each run skips its first ``--warmup-steps`` steps
(one-time costs: allocator growth, kernel selection, caption encoding) and times the rest; the
medians over ``--repeats`` runs give the ratio engine/bare, target <= 1.10.

Cases: ``tiny`` (lorad's tiny random SD1 model, 64 px) and ``sd15`` (a real-size SD1.5 UNet, CLIP-L
text encoder and VAE with random weights, built in memory from lorad's shipped configs).

Run ``python -m bench.engine_vs_bare --help`` for the flags; see bench/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    # Annotations only: diffusers/transformers/lorad are imported after HF_HUB_OFFLINE is set.
    from PIL import Image
    from torch import nn

    from lorad.models.sd_components import SDComponents
    from lorad.training.placement import Placement

CASES = ("tiny", "sd15")
TARGET_RATIO = 1.10
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Training settings shared by both sides; they are the engine's defaults for an SD1 LoRA.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LEARNING_RATE = 1e-4
MAX_GRAD_NORM = 1.0
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 1e-2
SEED = 0
# The bare loop's adapter name differs from the engine's, so a leak from either side is visible.
BARE_ADAPTER = "bench_bare"
TINY_RESOLUTION = 64

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


@dataclass(frozen=True)
class CaseSettings:
    """What one case trains: the same for the engine and the bare loop."""

    name: str
    resolution: int
    batch_size: int
    steps: int  # timed steps per run
    warmup_steps: int  # untimed steps at the start of every run
    repeats: int  # runs per side; the median is reported
    rank: int
    gradient_checkpointing: bool = False  # both sides recompute activations in backward

    @property
    def images(self) -> int:
        """Data-set size: at most two batches, so the warm-up covers a whole epoch and every
        caption is encoded (the engine caches text embeddings lazily) before timing starts."""
        return self.batch_size * max(1, min(self.warmup_steps, 2))


@dataclass
class LoopRun:
    """One timed run of one side."""

    side: str
    repeat: int
    seconds: float  # wall time of the timed steps
    steps: int  # number of timed steps
    step_seconds: list[float]  # each timed step's wall time (only meaningful where the device is synchronous)
    peak_bytes: int | None  # CUDA: max allocated during the timed steps; None elsewhere
    trainable_params: int
    final_loss: float
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # process CPU time (all threads) of the timed steps

    @property
    def s_per_step(self) -> float:
        return self.seconds / self.steps

    @property
    def cpu_s_per_step(self) -> float:
        return self.cpu_seconds / self.steps


@dataclass(frozen=True)
class BareInputs:
    """What the bare loop trains on: every per-image tensor pre-computed on the device."""

    mean: torch.Tensor  # (N, 4, h, w) VAE posterior mean, fp32
    std: torch.Tensor  # (N, 4, h, w) VAE posterior std, fp32
    hidden: torch.Tensor  # (N, 77, dim) text-encoder output for each caption
    scaling: float  # VAE scaling factor
    added: dict[str, torch.Tensor] | None = None  # SDXL: (N, ...) "text_embeds" and "time_ids"


# --------------------------------------------------------------------------------------------
# Device helpers


def sync(device: torch.device) -> None:
    """Wait for queued device work, so a wall-clock mark includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak(device: torch.device) -> None:
    """Start a fresh peak-memory window (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak allocated bytes since :func:`reset_peak` (CUDA), else None."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def release_memory(device: torch.device) -> None:
    """Drop the previous run's garbage, so one side does not inherit the other's fragmentation."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_description(device: torch.device) -> str:
    """Human-readable name of the machine part that runs the loops."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads)"


def assert_no_adapters(model: nn.Module) -> None:
    """Both sides share one resident model; a leftover adapter would slow the next run down."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    leftovers = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if leftovers:
        raise RuntimeError(f"model still carries LoRA layers from a previous run: {leftovers[:3]}")


# --------------------------------------------------------------------------------------------
# Models and data


def sd_config_dir() -> Path:
    """lorad's shipped SD1 diffusers configs."""
    import lorad.models

    return Path(lorad.models.__file__).parent / "sd_configs" / "sd1"


def place(components: SDComponents, placement: Placement) -> SDComponents:
    """Put the model where and how the engine expects a resident model on this placement:
    UNet and text encoder in the weight dtype on the device, VAE in fp32 (as the engine keeps it)."""
    device, dtype = placement.device, placement.weight_dtype
    wanted = ((components.unet, dtype), (components.text_encoder, dtype), (components.vae, torch.float32))
    for module, module_dtype in wanted:
        # diffusers warns on every dtype cast, even a no-op one: cast only when needed.
        if any(p.dtype != module_dtype for p in module.parameters() if p.is_floating_point()):
            module.to(dtype=module_dtype)
        module.to(device)
        module.eval()
        module.requires_grad_(False)
    return components


def load_tiny(tiny_dir: Path, placement: Placement) -> SDComponents:
    """The tiny model, loaded the way the engine would load it from disk."""
    from lorad.models.sd_loader import load_sd_components

    return place(load_sd_components(str(tiny_dir), dtype=placement.weight_dtype), placement)


def build_sd15(tokenizer_dir: Path, placement: Placement) -> SDComponents:
    """A real-size SD1.5 model with random weights, in memory only (nothing is downloaded or saved)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lorad.models.sd_components import SDComponents

    configs = sd_config_dir()
    torch.manual_seed(SEED)
    # Initialising on the target device: a GPU does the ~1e9 random draws in a blink; the CPU
    # takes ~10-20 s.
    with torch.device(placement.device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
    scheduler = DDPMScheduler.from_config(DDPMScheduler.load_config(configs / "scheduler"))
    components = SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        noise_scheduler=scheduler,
        model_version="sd1",
        prediction_type="epsilon",
        source="random-sd15",
    )
    return place(components, placement)


def make_dataset(folder: Path, count: int, size: int) -> tuple[list[Image.Image], list[str]]:
    """``count`` distinct square pictures of ``size`` px with captions in metadata.csv.

    Returns the pictures and captions too, so the bare loop encodes exactly what the engine reads.
    """
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    pictures: list[Image.Image] = []
    captions: list[str] = []
    rows = ["file,caption"]
    for i in range(count):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        picture = Image.new("RGB", (size, size), tuple(rng.randint(0, 255) for _ in range(3)))
        draw = ImageDraw.Draw(picture)
        a, b = rng.randint(0, size // 4), rng.randint(size // 2, size - 1)
        if shape == "circle":
            draw.ellipse((a, a, b, b), fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle((a, a, b, b), fill=COLOURS[colour])
        else:
            draw.polygon([(a, b), (b, b), ((a + b) // 2, a)], fill=COLOURS[colour])
        name = f"img_{i:03d}.png"
        picture.save(folder / name)
        caption = f"benchstyle, picture {i}, a {colour} {shape}, plain background"
        pictures.append(picture)
        captions.append(caption)
        rows.append(f"{name},{caption}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    return pictures, captions


def picture_tensor(picture: Image.Image) -> torch.Tensor:
    """(3, H, W) float in [-1, 1], as VAEs expect."""
    raw = torch.frombuffer(bytearray(picture.convert("RGB").tobytes()), dtype=torch.uint8)
    return raw.view(picture.height, picture.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def prepare_bare_inputs(
    components: SDComponents, pictures: Sequence[Image.Image], captions: Sequence[str], placement: Placement
) -> BareInputs:
    """Encode the pictures and captions once, on the device: the bare loop's whole data pipeline."""
    device = placement.device
    vae, text_encoder, tokenizer = components.vae, components.text_encoder, components.tokenizer
    pixels = torch.stack([picture_tensor(p) for p in pictures])
    means, stds = [], []
    autocast = torch.autocast(device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None)
    with torch.no_grad():
        for chunk in pixels.split(4):
            dist = vae.encode(chunk.to(device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        ids = tokenizer(
            list(captions),
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        # Under the same autocast as the engine's prompt encoding, so the hidden states have its dtype.
        with autocast:
            hidden = text_encoder(ids.to(device))[0]
    return BareInputs(
        mean=torch.cat(means), std=torch.cat(stds), hidden=hidden, scaling=float(vae.config.scaling_factor)
    )


# --------------------------------------------------------------------------------------------
# The two sides


def resident_model_kwargs(components: SDComponents, placement: Placement) -> dict[str, Any]:
    """The keyword that hands the training loop a resident model: a provider yielding it for the run."""
    from lorad.training.family import ProvidedModel

    @contextmanager
    def provide(config: Any, run_placement: Placement) -> Iterator[Any]:
        if run_placement.device != placement.device or run_placement.weight_dtype != placement.weight_dtype:
            raise RuntimeError(f"engine placed the run on {run_placement}, the model is on {placement}")
        yield ProvidedModel(model=components, resident=True, seconds=0.0)

    return {"models": provide}


def run_engine(
    components: SDComponents,
    settings: CaseSettings,
    data_dir: Path,
    work: Path,
    placement: Placement,
    device_flag: str,
    precision_flag: str,
    repeat: int,
    *,
    extra: dict[str, Any] | None = None,
) -> LoopRun:
    """One full ``train`` call on the resident model; times steps warmup+1..end from its events.

    ``extra`` adds or overrides config keys (another family's, e.g. ``model_family: sdxl``).
    """
    from lorad.config.dispatch import parse_any_config
    from lorad.events import Event, StepDone, TrainingStarted
    from lorad.training.loop import train

    device = placement.device
    total = settings.warmup_steps + settings.steps
    out = work / f"engine-run-{repeat}"
    config = parse_any_config(
        {
            "train_data_dir": str(data_dir),
            "metadata_path": str(data_dir / "metadata.csv"),
            "base_model": components.source,
            "output_dir": str(out),
            "cache_dir": str(work / "latent-cache"),
            "resolution": settings.resolution,
            "enable_bucket": False,  # every picture is already square at the resolution
            "min_bucket_reso": min(256, settings.resolution),
            "lora_rank": settings.rank,
            "lora_alpha": settings.rank,
            "unet_target_modules": list(UNET_TARGETS),
            "batch_size": settings.batch_size,
            "max_train_steps": total,
            "learning_rate": LEARNING_RATE,
            "max_grad_norm": MAX_GRAD_NORM,
            "adam_beta1": ADAM_BETAS[0],
            "adam_beta2": ADAM_BETAS[1],
            "adam_epsilon": ADAM_EPS,
            "weight_decay": WEIGHT_DECAY,
            "optimizer": "adamw",
            "lr_scheduler": "constant",
            "seed": SEED,
            "device": device_flag,
            "mixed_precision": precision_flag,
            "gradient_checkpointing": settings.gradient_checkpointing,
        }
        | (extra or {}),
        base_dir=work,
        source="bench config",
    )

    marks: dict[str, float] = {}
    seen: dict[str, Any] = {}
    step_marks: list[float] = []

    def start_window() -> None:
        sync(device)
        reset_peak(device)
        marks["start"] = time.perf_counter()
        marks["cpu_start"] = time.process_time()
        step_marks.append(marks["start"])

    def on_event(event: Event) -> None:
        # The marks are taken inside the engine's loop, where it reports a step. It reports step k
        # once step k+1 is queued (it reads each loss one step late), so a mark at the report of step
        # k, with a sync, falls at the end of step k+1: the window from the report of step `warmup`
        # to that of step `total - 1` holds steps warmup+2..total, one step fewer than the bare
        # loop's window (both are compared per step). Syncing only at the two ends keeps the device
        # as busy inside the window as the engine keeps it.
        if isinstance(event, TrainingStarted):
            seen["trainable"] = event.trainable_params
        elif isinstance(event, StepDone):
            if event.step == settings.warmup_steps:
                start_window()
            elif event.step == total - 1:
                sync(device)
                marks["end"] = time.perf_counter()
                marks["cpu_end"] = time.process_time()
                step_marks.append(marks["end"])
                seen["peak"] = peak_bytes(device)
            elif settings.warmup_steps < event.step < total - 1:
                step_marks.append(time.perf_counter())

    assert_no_adapters(components.unet)
    result = train(config, on_event=on_event, **resident_model_kwargs(components, placement))
    summary = json.loads((out / "training_summary.json").read_text())
    if summary["steps"] != total or "start" not in marks or "end" not in marks:
        raise RuntimeError(f"engine ran {summary['steps']} steps, expected {total}")
    if summary.get("precision", placement.precision) != placement.precision:
        raise RuntimeError(f"engine trained in {summary['precision']}, the bare loop in {placement.precision}")
    timings = summary.get("timings_seconds", {})
    return LoopRun(
        side="engine",
        repeat=repeat,
        seconds=marks["end"] - marks["start"],
        cpu_seconds=marks["cpu_end"] - marks["cpu_start"],
        steps=settings.steps - 1,  # see on_event
        step_seconds=[b - a for a, b in itertools.pairwise(step_marks)],
        peak_bytes=seen.get("peak"),
        trainable_params=seen["trainable"],
        final_loss=result.final_loss,
        # The engine's own loop timer covers every step (warm-up included); kept for cross-checking.
        extra={
            "summary_train_s_per_step": timings["train"] / total if "train" in timings else None,
            "summary_timings_seconds": timings,
        },
    )


def run_bare(
    components: SDComponents, inputs: BareInputs, settings: CaseSettings, placement: Placement, repeat: int
) -> LoopRun:
    """The minimal honest loop on the same resident model: peft LoRA, AdamW, pre-encoded inputs."""
    from peft import LoraConfig, inject_adapter_in_model

    from lorad.lora.adapters import detach_lora

    device, unet, scheduler = placement.device, components.unet, components.noise_scheduler
    assert_no_adapters(unet)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.rank,
        lora_dropout=0.0,
        target_modules=list(UNET_TARGETS),
        init_lora_weights=True,
    )
    inject_adapter_in_model(lora, unet, adapter_name=BARE_ADAPTER)
    try:
        params = []
        for name, param in unet.named_parameters():
            if f".{BARE_ADAPTER}." in name:
                # LoRA weights train in fp32 whatever the base dtype, as the engine's do.
                param.data = param.data.float()
                param.requires_grad_(True)
                params.append(param)
        optimizer = torch.optim.AdamW(
            params, lr=LEARNING_RATE, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY, fused=True
        )  # fused, as the engine's
        # fp16 needs loss scaling (the engine uses it too); bf16 and fp32 do not.
        scaler = torch.amp.GradScaler(device.type) if placement.autocast_dtype == torch.float16 else None
        autocast = torch.autocast(
            device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None
        )
        unet.train()
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        batch, total = settings.batch_size, settings.warmup_steps + settings.steps
        batches = inputs.mean.shape[0] // batch
        num_timesteps = scheduler.config.num_train_timesteps
        v_prediction = scheduler.config.prediction_type == "v_prediction"

        step_marks: list[float] = []
        cpu_start = time.process_time()
        if settings.warmup_steps == 0:
            sync(device)
            reset_peak(device)
            step_marks.append(time.perf_counter())
        for step in range(1, total + 1):
            lo = ((step - 1) % batches) * batch
            mean, std = inputs.mean[lo : lo + batch], inputs.std[lo : lo + batch]
            hidden = inputs.hidden[lo : lo + batch]
            conditioning = {}
            if inputs.added is not None:
                conditioning["added_cond_kwargs"] = {k: v[lo : lo + batch] for k, v in inputs.added.items()}
            # Same math as the engine: a fresh latent sample from the VAE posterior, noise,
            # uniform timesteps, the scheduler's noising, MSE to the epsilon (or v) target.
            clean = (mean + std * torch.randn_like(mean)) * inputs.scaling
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, num_timesteps, (batch,), device=device)
            noisy = scheduler.add_noise(clean, noise, timesteps)
            target = scheduler.get_velocity(clean, noise, timesteps) if v_prediction else noise
            with autocast:
                pred = unet(noisy.to(unet.dtype), timesteps, hidden, **conditioning).sample
            loss = F.mse_loss(pred.float(), target)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step == settings.warmup_steps:
                sync(device)
                reset_peak(device)
                step_marks.append(time.perf_counter())
                cpu_start = time.process_time()
            elif settings.warmup_steps < step < total:
                step_marks.append(time.perf_counter())  # no sync: a per-step mark must not slow the loop
        sync(device)
        step_marks.append(time.perf_counter())
        cpu_seconds = time.process_time() - cpu_start
        seconds = step_marks[-1] - step_marks[0]
        peak = peak_bytes(device)
        # Read after the clock stopped: a minimal loop has no reason to sync on the loss every step.
        final_loss = float(loss.detach())
        trainable = sum(p.numel() for p in params)
    finally:
        if settings.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()
        detach_lora(unet, BARE_ADAPTER)  # cleanup only; not part of the timed steps
    return LoopRun(
        side="bare",
        repeat=repeat,
        seconds=seconds,
        steps=settings.steps,
        step_seconds=[b - a for a, b in itertools.pairwise(step_marks)],
        peak_bytes=peak,
        trainable_params=trainable,
        final_loss=final_loss,
        cpu_seconds=cpu_seconds,
    )


# --------------------------------------------------------------------------------------------
# One case, all cases, reporting


def bench_case(
    settings: CaseSettings, placement: Placement, args: argparse.Namespace, tmp: Path, tiny_dir: Path
) -> dict[str, Any]:
    """Set up one case, run both sides ``repeats`` times alternately, and summarise."""
    work = tmp / settings.name
    work.mkdir()
    t0 = time.perf_counter()
    if settings.name == "tiny":
        components = load_tiny(tiny_dir, placement)
    else:
        components = build_sd15(tiny_dir / "tokenizer", placement)
    pictures, captions = make_dataset(work / "data", settings.images, settings.resolution)
    inputs = prepare_bare_inputs(components, pictures, captions, placement)
    print(
        f"[{settings.name}] setup {time.perf_counter() - t0:.1f}s: {settings.images} images at "
        f"{settings.resolution}px, batch {settings.batch_size}, {settings.warmup_steps} warm-up + "
        f"{settings.steps} timed steps per run, {settings.repeats} repeats",
        flush=True,
    )

    runs = run_alternating(
        settings,
        placement,
        engine=lambda repeat: run_engine(
            components, settings, work / "data", work, placement, args.device, args.precision, repeat
        ),
        bare=lambda repeat: run_bare(components, inputs, settings, placement, repeat),
    )
    components = inputs = None  # free the model before the next case builds its own
    release_memory(placement.device)
    return summarize(settings, placement, runs)


def run_alternating(
    settings: CaseSettings,
    placement: Placement,
    *,
    engine: Callable[[int], LoopRun],
    bare: Callable[[int], LoopRun],
) -> dict[str, list[LoopRun]]:
    """Run each side ``settings.repeats`` times, alternating who goes first; print each run's time."""
    runs: dict[str, list[LoopRun]] = {"engine": [], "bare": []}
    for repeat in range(settings.repeats):
        # Alternate who goes first, so a drift in machine speed does not favour one side.
        order = ("engine", "bare") if repeat % 2 == 0 else ("bare", "engine")
        for side in order:
            release_memory(placement.device)
            run = engine(repeat) if side == "engine" else bare(repeat)
            runs[side].append(run)
            print(
                f"[{settings.name}] repeat {repeat + 1}/{settings.repeats} {side:6s} "
                f"{run.s_per_step * 1e3:9.2f} ms/step",
                flush=True,
            )
    return runs


def summarize(settings: CaseSettings, placement: Placement, runs: dict[str, list[LoopRun]]) -> dict[str, Any]:
    """The case's result: median s/step per side, their ratio, cross-checks, peaks and every run."""
    engine = [r.s_per_step for r in runs["engine"]]
    bare = [r.s_per_step for r in runs["bare"]]
    paired = [e / b for e, b in zip(engine, bare, strict=True)]
    ratio = statistics.median(engine) / statistics.median(bare)
    # Contention (another process on the machine) only ever adds time, to whole runs or to single
    # steps. Two more estimates that weigh it differently: when they disagree with the median
    # ratio, the machine was too noisy for the difference to mean anything.
    best_ratio = min(engine) / min(bare)
    # Process CPU time is what the work cost, whatever else ran on the machine: on a busy CPU it is
    # the steadier number (it includes the engine's other threads, e.g. TensorBoard's writer).
    cpu_ratio = statistics.median(r.cpu_s_per_step for r in runs["engine"]) / statistics.median(
        r.cpu_s_per_step for r in runs["bare"]
    )
    step_ratio = None
    if placement.device.type == "cpu":
        # Per-step marks carry no sync, so on an asynchronous device they time the host, not the work.
        def pooled(side: str) -> float:
            return statistics.median(t for r in runs[side] for t in r.step_seconds)

        step_ratio = pooled("engine") / pooled("bare")
    trainable = {side: rs[0].trainable_params for side, rs in runs.items()}
    if trainable["engine"] != trainable["bare"]:
        print(f"[{settings.name}] WARNING: trainable parameters differ: {trainable}", flush=True)

    def peak_of(side: str) -> int | None:
        peaks = [r.peak_bytes for r in runs[side] if r.peak_bytes is not None]
        return max(peaks) if peaks else None

    return {
        "case": settings.name,
        "settings": asdict(settings) | {"images": settings.images},
        "device": str(placement.device),
        "precision": placement.precision,
        "bare_s_per_step": statistics.median(bare),
        "engine_s_per_step": statistics.median(engine),
        "ratio": ratio,
        "paired_ratios": paired,
        "best_run_ratio": best_ratio,
        "cpu_time_ratio": cpu_ratio,
        "median_step_ratio": step_ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "trainable_params": trainable,
        "peak_bytes": {"bare": peak_of("bare"), "engine": peak_of("engine")},
        "runs": [
            asdict(r) | {"s_per_step": r.s_per_step, "cpu_s_per_step": r.cpu_s_per_step}
            for side in ("engine", "bare")
            for r in runs[side]
        ],
    }


def tiny_settings(gpu: bool) -> CaseSettings:
    """The tiny case: steps take milliseconds, so many of them, and per-step overhead is measured well."""
    return CaseSettings(
        "tiny",
        TINY_RESOLUTION,
        batch_size=4,
        steps=100 if gpu else 20,
        warmup_steps=10 if gpu else 5,
        repeats=5 if gpu else 7,
        rank=8,
    )


def with_flags(settings: CaseSettings, args: argparse.Namespace, keys: Sequence[str]) -> CaseSettings:
    """``settings`` with the flags among ``keys`` that were given on the command line."""
    return replace(settings, **{key: getattr(args, key) for key in keys if getattr(args, key, None) is not None})


def case_settings(name: str, device: torch.device, args: argparse.Namespace) -> CaseSettings:
    """Per-case defaults for this device, overridden by the flags that were given."""
    gpu = device.type != "cpu"
    if name == "tiny":
        settings = tiny_settings(gpu)
    elif gpu:
        settings = CaseSettings("sd15", 512, batch_size=2, steps=30, warmup_steps=5, repeats=3, rank=8)
    else:
        # A real-size UNet step is seconds on a CPU (~3 s at 128 px on 2 cores, ~13 s at 256 px).
        settings = CaseSettings("sd15", 128, batch_size=1, steps=3, warmup_steps=1, repeats=3, rank=8)
    keys = ["steps", "warmup_steps", "batch_size", "repeats", "rank"] + (["resolution"] if name == "sd15" else [])
    return with_flags(settings, args, keys)


def format_bytes(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def print_table(results: Sequence[dict[str, Any]]) -> None:
    """The summary table, then one verdict line per case."""
    header = (
        "case",
        "device",
        "precision",
        "res",
        "batch",
        "steps",
        "bare s/step",
        "engine s/step",
        "ratio",
        "paired range",
        "bare peak",
        "engine peak",
    )
    rows = []
    for r in results:
        s = r["settings"]
        rows.append(
            (
                r["case"],
                r["device"],
                r["precision"],
                str(s["resolution"]),
                str(s["batch_size"]),
                f"{s['steps']}x{s['repeats']}",
                f"{r['bare_s_per_step']:.4f}",
                f"{r['engine_s_per_step']:.4f}",
                f"{r['ratio']:.3f}",
                f"{min(r['paired_ratios']):.3f}-{max(r['paired_ratios']):.3f}",
                format_bytes(r["peak_bytes"]["bare"]),
                format_bytes(r["peak_bytes"]["engine"]),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    for line in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    print()
    for r in results:
        if r["meets_target"]:
            print(f"{r['case']}: ratio {r['ratio']:.3f} <= {TARGET_RATIO} (within target)")
        else:
            print(
                f"{r['case']}: ratio {r['ratio']:.3f} is ABOVE TARGET {TARGET_RATIO}: the engine's "
                f"per-step overhead is {(r['ratio'] - 1) * 100:.1f}% of a bare step"
            )
        robust = f"best run {r['best_run_ratio']:.3f}, process CPU time {r['cpu_time_ratio']:.3f}"
        if r["median_step_ratio"] is not None:
            robust += f", median single step {r['median_step_ratio']:.3f}"
        print(f"  cross-checks: {robust}")
        paired = r["paired_ratios"]
        if max(paired) / min(paired) > 1.25:
            print(
                f"  NOISY: back-to-back ratios span {min(paired):.2f}-{max(paired):.2f}; something else was "
                "using the machine. Rerun on a quiet machine (on a small CPU: --threads 1)."
            )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.engine_vs_bare",
        description="Steps/s of lorad's SD LoRA engine vs a bare training loop, side by side in one run.",
    )
    parser.add_argument("--only", choices=CASES, help="run one case (default: all)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N")
    parser.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "no", "bf16", "fp16"),
        help="autocast precision (auto: bf16 on GPUs that support it, fp32 on CPU)",
    )
    parser.add_argument("--steps", type=int, help="timed steps per run (default per case and device)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps at the start of every run")
    parser.add_argument(
        "--resolution",
        type=int,
        help=f"sd15 image size in px (default 512 on GPU, 128 on CPU); tiny always uses {TINY_RESOLUTION}",
    )
    parser.add_argument("--batch-size", type=int, help="images per step")
    parser.add_argument("--repeats", type=int, help="runs per side; the median is reported")
    parser.add_argument("--rank", type=int, help="LoRA rank (alpha = rank)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads for both sides (default: torch's "
        "choice); 1 is far steadier on a small machine that other processes share",
    )
    args = parser.parse_args(argv)
    for key in ("steps", "batch_size", "repeats", "rank", "threads"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.warmup_steps is not None and args.warmup_steps < 1:
        parser.error("--warmup-steps must be at least 1 (the engine reports a step while the next one runs)")
    if args.steps is not None and args.steps < 2:
        parser.error("--steps must be at least 2")
    if args.resolution is not None and (args.resolution < 64 or args.resolution % 64):
        parser.error("--resolution must be a multiple of 64 (the UNet halves the latent side 3 times)")
    return args


def environment(placement: Placement) -> dict[str, Any]:
    """Versions and machine facts that make a result file comparable with another."""
    import diffusers
    import peft
    import transformers

    return {
        "device_name": device_description(placement.device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def quiet_offline(threads: int | None) -> None:
    """What every bench on this harness does first: never touch the network (set before huggingface_hub is
    imported by diffusers/transformers/lorad), silence the libraries' weight-loading bars and notices (they
    would bury the per-run lines), and pin torch's CPU threads when asked."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)


def write_results(name: str, placement: Placement, results: list[dict[str, Any]]) -> Path:
    """``results`` with the run's environment and argv as bench/results/<name>-<device type>.json; its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{placement.device.type}.json"
    payload = {"environment": environment(placement), "argv": sys.argv[1:], "results": results}
    # default=str: the odd non-JSON value a summary carries (a Path) is written as text.
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases, print the table, write bench/results/engine_vs_bare-<device>.json; exit 0."""
    args = parse_args(argv)
    quiet_offline(args.threads)
    from lorad.models.tiny import build_tiny_sd
    from lorad.training.placement import pick_placement

    placement = pick_placement(args.device, args.precision)
    cases = [args.only] if args.only else list(CASES)
    print(
        f"engine vs bare loop on {placement.device} ({device_description(placement.device)}), "
        f"precision {placement.precision}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="lorad-bench-") as tmp_name:
        tmp = Path(tmp_name)
        # The tiny model is always built: the sd15 case borrows its tokenizer.
        tiny_dir = build_tiny_sd(tmp / "tiny-sd1", version="sd1", seed=SEED)
        for name in cases:
            results.append(bench_case(case_settings(name, placement.device, args), placement, args, tmp, tiny_dir))

    print_table(results)
    if placement.device.type != "cuda":
        # ru_maxrss is KiB on Linux; it covers both sides and all cases, so it is only a ceiling.
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"peak memory per loop needs CUDA; this process's peak RSS (everything) was {format_bytes(rss)}")
    write_results("engine_vs_bare", placement, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
