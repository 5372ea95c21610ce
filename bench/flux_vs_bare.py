"""FLUX engine vs bare loop: how much slower per step is lorad's FLUX family than a minimal flow-matching loop?

Both sides train the same LoRA (every linear layer of the blocks: kohya's default; same rank and
alpha, AdamW, grad clipping) on the same resident transformer, batch, resolution, precision and
memory options, in one process, in alternating order. Each run skips its first warm-up steps and
times the rest; the medians over the repeats give the ratio engine/bare, target <= 1.10.

Cases (CPU and GPU):

- ``tiny``: lorad's tiny random FLUX.1-dev (2 double + 2 single blocks at width 32), 64 px.
- ``width``: FLUX.1 at its real width (hidden 3072, 24 heads, T5 width 4096, CLIP width 768) but
  reduced depth (2 double + 4 single blocks), random weights built in memory; 64 px and 64 T5
  tokens on a CPU, 512 px and 512 tokens on a GPU.

GPU only (``--only real``, prepared for the GPU suite: :func:`real_size_cases`): the real-size
FLUX.1-dev architecture (19 + 38 blocks) with random weights at 1024 px, batch 1, rank 16,
gradient checkpointing, once in bf16, once with ``base_quantization: fp8`` and once with fp8 plus
``blocks_to_swap``; each reports s/step and peak VRAM for both sides.

Run ``python -m bench.flux_vs_bare --help`` for the flags; see bench/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.engine_vs_bare import (
    ADAM_BETAS,
    ADAM_EPS,
    LEARNING_RATE,
    MAX_GRAD_NORM,
    SEED,
    TARGET_RATIO,
    WEIGHT_DECAY,
    LoopRun,
    device_description,
    format_bytes,
    make_dataset,
    peak_bytes,
    picture_tensor,
    quiet_offline,
    release_memory,
    reset_peak,
    sync,
    write_results,
)

if TYPE_CHECKING:
    from lorad.families.flux.family import FluxModel
    from lorad.training.placement import Placement

CASES = ("tiny", "width", "real")
BARE_ADAPTER = "bench_bare"


@dataclass(frozen=True)
class FluxCase:
    """What one case trains: the same for the engine and the bare loop."""

    name: str
    resolution: int
    t5_tokens: int
    batch_size: int
    steps: int
    warmup_steps: int
    repeats: int
    rank: int = 16
    num_layers: int = 2  # double blocks (width and real cases)
    num_single_layers: int = 4
    base_quantization: str = "none"
    blocks_to_swap: int = 0
    gradient_checkpointing: bool = False

    @property
    def images(self) -> int:
        return 2 * self.batch_size


def real_size_cases(steps: int = 10, warmup_steps: int = 3, repeats: int = 2) -> list[FluxCase]:
    """The GPU suite's real-size FLUX.1-dev cases: bf16, fp8, and fp8 with 20 blocks swapped to CPU memory."""
    real = FluxCase(
        "real-bf16",
        1024,
        512,
        batch_size=1,
        steps=steps,
        warmup_steps=warmup_steps,
        repeats=repeats,
        num_layers=19,
        num_single_layers=38,
        gradient_checkpointing=True,
    )
    return [
        real,
        replace(real, name="real-fp8", base_quantization="fp8"),
        replace(real, name="real-fp8-swap20", base_quantization="fp8", blocks_to_swap=20),
    ]


# --------------------------------------------------------------------------------------------
# Models


def build_width_folder(dest: Path, tiny: Path, case: FluxCase) -> Path:
    """A FLUX.1 diffusers folder at real width: transformer config only (its weights are made in
    memory), a 1-layer CLIP at width 768 and a 1-layer T5 at width 4096 (the widths the transformer
    reads), the tiny VAE and tokenizers. The encoders' depth does not change a training step: their
    outputs are cached before it."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lorad.models.flux_loader import SHIPPED_CONFIGS
    from lorad.models.tiny import save_text_encoder

    shutil.copytree(tiny, dest)
    config = json.loads((SHIPPED_CONFIGS / "dev" / "transformer" / "config.json").read_text())
    config |= {"num_layers": case.num_layers, "num_single_layers": case.num_single_layers, "guidance_embeds": True}
    shutil.rmtree(dest / "transformer")
    (dest / "transformer").mkdir()
    (dest / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(SEED)
    clip_config = CLIPTextConfig.from_pretrained(str(tiny / "text_encoder"))
    clip_config.update(
        {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "projection_dim": 768}
    )
    clip_config.num_hidden_layers = 1
    shutil.rmtree(dest / "text_encoder")
    save_text_encoder(CLIPTextModel(clip_config), dest / "text_encoder")
    t5_config = T5Config.from_pretrained(str(tiny / "text_encoder_2"))
    t5_config.update({"d_model": 4096, "d_kv": 64, "num_heads": 64, "d_ff": 1024, "num_layers": 1})
    shutil.rmtree(dest / "text_encoder_2")
    T5EncoderModel(t5_config).save_pretrained(dest / "text_encoder_2", safe_serialization=True)
    return dest


def random_transformer(folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The folder's transformer with N(0, 0.02) weights, made directly on ``device`` (no weights file)."""
    from diffusers import FluxTransformer2DModel

    config = json.loads((folder / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(SEED)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return model.to(dtype).eval().requires_grad_(False)


def resident_model(folder: Path, case: FluxCase, placement: Placement) -> FluxModel:
    """The model both sides train on, as the registry would hold it (quantized, blocks swapped)."""
    from lorad.families.flux.family import BLOCK_LISTS, FluxModel
    from lorad.models.block_swap import BlockSwap, flux_blocks
    from lorad.models.flux_loader import resolve_flux_transformer
    from lorad.models.quantization import in_blocks, quantize_linears

    found = resolve_flux_transformer(str(folder))
    if case.name == "tiny":
        from lorad.models.flux_loader import load_transformer

        transformer = load_transformer(found, placement.weight_dtype).to(placement.device)
    else:
        transformer = random_transformer(folder, placement.device, placement.weight_dtype)
    quantize_linears(transformer, case.base_quantization, where=in_blocks(BLOCK_LISTS))
    swap = BlockSwap(flux_blocks(transformer), case.blocks_to_swap, placement.device) if case.blocks_to_swap else None
    return FluxModel(transformer=transformer, found=found, device=placement.device, swap=swap)


def provider(model: FluxModel) -> Any:
    """The training loop's model provider handing it the resident model (as the daemon's registry does)."""
    from lorad.training.family import ProvidedModel

    @contextmanager
    def provide(config: Any, placement: Placement) -> Iterator[Any]:
        yield ProvidedModel(model=model, resident=True, seconds=0.0)

    return provide


# --------------------------------------------------------------------------------------------
# The two sides


def engine_values(case: FluxCase, folder: Path, data: Path, out: Path, work: Path, args: argparse.Namespace) -> dict:
    return {
        "train_data_dir": str(data),
        "metadata_path": str(data / "metadata.csv"),
        "base_model": str(folder),
        "output_dir": str(out),
        "cache_dir": str(work / "cache"),
        "resolution": case.resolution,
        "enable_bucket": False,
        "min_bucket_reso": min(256, case.resolution),
        "lora_rank": case.rank,
        "lora_alpha": case.rank,
        "batch_size": case.batch_size,
        "max_train_steps": case.warmup_steps + case.steps,
        "learning_rate": LEARNING_RATE,
        "max_grad_norm": MAX_GRAD_NORM,
        "adam_beta1": ADAM_BETAS[0],
        "adam_beta2": ADAM_BETAS[1],
        "adam_epsilon": ADAM_EPS,
        "weight_decay": WEIGHT_DECAY,
        "lr_scheduler": "constant",
        "seed": SEED,
        "device": args.device,
        "mixed_precision": args.precision,
        "t5xxl_max_token_length": case.t5_tokens,
        "gradient_checkpointing": case.gradient_checkpointing,
        "base_quantization": case.base_quantization,
        "blocks_to_swap": case.blocks_to_swap,
        "output_format": ["kohya"],
    }


def run_engine(
    model: FluxModel, case: FluxCase, folder: Path, data: Path, work: Path, args: argparse.Namespace, repeat: int
) -> LoopRun:
    """One full ``train`` call on the resident model; times steps warmup+1..end from its events."""
    from lorad.events import StepDone, TrainingStarted
    from lorad.families.flux.config import parse_flux_config
    from lorad.training.loop import train

    device, total = model.device, case.warmup_steps + case.steps
    config = parse_flux_config(
        engine_values(case, folder, data, work / f"engine-{repeat}", work, args), base_dir=work, source="bench"
    )
    marks: list[float] = []
    seen: dict[str, Any] = {}

    def on_event(event: object) -> None:
        # As in bench.engine_vs_bare: the loop reports step k once step k+1 is queued, so a synced mark at
        # the report of step k falls at the end of step k+1. The window from the report of step `warmup` to
        # that of step `total - 1` holds steps warmup+2..total (steps - 1 of them); syncing only at its two
        # ends keeps the device as busy inside it as the engine keeps it.
        if isinstance(event, TrainingStarted):
            seen["trainable"] = event.trainable_params
        elif isinstance(event, StepDone) and case.warmup_steps <= event.step <= total - 1:
            if event.step in (case.warmup_steps, total - 1):
                sync(device)
            if event.step == case.warmup_steps:
                reset_peak(device)
            marks.append(time.perf_counter())
            if event.step == total - 1:
                seen["peak"] = peak_bytes(device)

    result = train(config, on_event=on_event, models=provider(model))
    if len(marks) != case.steps:
        raise RuntimeError(f"the engine reported {len(marks)} of the {case.steps} steps it was to time")
    return LoopRun(
        side="engine",
        repeat=repeat,
        seconds=marks[-1] - marks[0],
        steps=case.steps - 1,  # see on_event
        step_seconds=[b - a for a, b in itertools.pairwise(marks)],
        peak_bytes=seen.get("peak"),
        trainable_params=seen["trainable"],
        final_loss=result.final_loss,
    )


@dataclass(frozen=True)
class BareInputs:
    mean: torch.Tensor  # (N, 16, h, w) VAE posterior mean
    std: torch.Tensor
    t5: torch.Tensor  # (N, L, 4096)
    pooled: torch.Tensor  # (N, 768)
    shift: float
    scale: float


def bare_inputs(folder: Path, pictures: list, captions: list[str], case: FluxCase, placement: Placement) -> BareInputs:
    """Everything per image, encoded once up front on the device (what the engine caches)."""
    from lorad.models.flux_loader import load_clip_l, load_t5xxl, load_vae, open_tokenizers, resolve_flux_model

    sources = resolve_flux_model(str(folder), t5xxl_max_token_length=case.t5_tokens)
    device, dtype = placement.device, placement.weight_dtype
    with torch.no_grad():
        vae = load_vae(sources, torch.float32).to(device)
        dist = vae.encode(torch.stack([picture_tensor(p) for p in pictures]).to(device)).latent_dist
        clip_tokenizer, t5_tokenizer = open_tokenizers(sources)
        clip, t5 = load_clip_l(sources, dtype).to(device), load_t5xxl(sources, dtype).to(device)
        ids = t5_tokenizer(
            captions, padding="max_length", max_length=case.t5_tokens, truncation=True, return_tensors="pt"
        ).input_ids
        clip_ids = clip_tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        hidden, pooled = t5(ids.to(device)).last_hidden_state, clip(clip_ids.to(device)).pooler_output
    return BareInputs(
        dist.mean.float(),
        dist.std.float(),
        hidden,
        pooled,
        float(vae.config.shift_factor),
        float(vae.config.scaling_factor),
    )


def run_bare(model: FluxModel, inputs: BareInputs, case: FluxCase, placement: Placement, repeat: int) -> LoopRun:
    """The minimal honest loop on the same resident model: peft LoRA, AdamW, pre-encoded inputs."""
    from peft import LoraConfig, inject_adapter_in_model

    from lorad.diffusion.flow_matching import (
        TimestepSampling,
        flow_matching_loss,
        image_position_ids,
        noisy_latents,
        pack_latents,
        sample_sigmas,
        text_position_ids,
        unpack_latents,
    )
    from lorad.families.flux.targets import transformer_target_paths
    from lorad.lora.adapters import detach_lora

    device, dtype, transformer = placement.device, placement.weight_dtype, model.transformer
    paths = transformer_target_paths(transformer, ["all-linear"], key="bench")
    inject_adapter_in_model(
        LoraConfig(r=case.rank, lora_alpha=case.rank, target_modules=paths), transformer, adapter_name=BARE_ADAPTER
    )
    try:
        params = []
        for name, param in transformer.named_parameters():
            if f".{BARE_ADAPTER}." in name:
                param.data = param.data.float().to(device)
                param.requires_grad_(True)
                params.append(param)
        optimizer = torch.optim.AdamW(
            params, lr=LEARNING_RATE, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY, fused=True
        )  # fused, as the engine's
        scaler = torch.amp.GradScaler(device.type) if placement.autocast_dtype == torch.float16 else None
        autocast = torch.autocast(
            device.type, dtype=placement.autocast_dtype, enabled=placement.autocast_dtype is not None
        )
        transformer.train()
        if case.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        # Noise levels drawn on the device, as the engine draws them (no host-to-device copy per step).
        sampling, generator = TimestepSampling(), torch.Generator(device).manual_seed(SEED)
        batch, total = case.batch_size, case.warmup_steps + case.steps
        batches = inputs.mean.shape[0] // batch
        height, width = inputs.mean.shape[-2:]
        img_ids, txt_ids = (
            image_position_ids(height, width, device=device),
            text_position_ids(inputs.t5.shape[1], device=device),
        )
        marks: list[float] = []
        for step in range(1, total + 1):
            if model.swap is not None:
                model.swap.settle()
            lo = ((step - 1) % batches) * batch
            mean, std = inputs.mean[lo : lo + batch], inputs.std[lo : lo + batch]
            clean = (mean + std * torch.randn_like(mean) - inputs.shift) * inputs.scale
            noise = torch.randn_like(clean)
            sigmas = sample_sigmas(sampling, batch, image_seq_len=(height // 2) * (width // 2), generator=generator)
            with autocast:
                pred = transformer(
                    hidden_states=pack_latents(noisy_latents(clean, noise, sigmas)).to(dtype),
                    encoder_hidden_states=inputs.t5[lo : lo + batch],
                    pooled_projections=inputs.pooled[lo : lo + batch],
                    timestep=sigmas.to(dtype),
                    img_ids=img_ids,
                    txt_ids=txt_ids,
                    guidance=torch.ones(batch, device=device),
                ).sample
                loss = flow_matching_loss(unpack_latents(pred, height, width), clean, noise).mean()
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
            if step == case.warmup_steps:
                sync(device)
                reset_peak(device)
                marks.append(time.perf_counter())
            elif case.warmup_steps < step < total:
                marks.append(time.perf_counter())  # no sync: a per-step mark must not slow the loop
        sync(device)
        marks.append(time.perf_counter())
        peak = peak_bytes(device)
        final_loss = float(loss.detach())  # read after the clock stopped, as a minimal loop would
    finally:
        if case.gradient_checkpointing:
            transformer.disable_gradient_checkpointing()
        transformer.eval()
        detach_lora(transformer, BARE_ADAPTER)
        if model.swap is not None:
            model.swap.settle()
    return LoopRun(
        side="bare",
        repeat=repeat,
        seconds=marks[-1] - marks[0],
        steps=case.steps,
        step_seconds=[b - a for a, b in itertools.pairwise(marks)],
        peak_bytes=peak,
        trainable_params=sum(p.numel() for p in params),
        final_loss=final_loss,
    )


# --------------------------------------------------------------------------------------------
# Cases and reporting


def bench_case(case: FluxCase, placement: Placement, args: argparse.Namespace, tmp: Path, tiny: Path) -> dict:
    """Set up one case, run both sides ``repeats`` times alternately, and summarise."""
    work = tmp / case.name
    work.mkdir()
    t0 = time.perf_counter()
    folder = tiny if case.name == "tiny" else build_width_folder(work / "model", tiny, case)
    model = resident_model(folder, case, placement)
    pictures, captions = make_dataset(work / "data", case.images, case.resolution)
    inputs = bare_inputs(folder, pictures, captions, case, placement)
    print(
        f"[{case.name}] setup {time.perf_counter() - t0:.1f}s: {case.images} images at {case.resolution}px, "
        f"{case.t5_tokens} T5 tokens, batch {case.batch_size}, {case.warmup_steps}+{case.steps} steps x "
        f"{case.repeats}",
        flush=True,
    )
    runs: dict[str, list[LoopRun]] = {"engine": [], "bare": []}
    for repeat in range(case.repeats):
        for side in ("engine", "bare") if repeat % 2 == 0 else ("bare", "engine"):
            release_memory(placement.device)
            if side == "engine":
                run = run_engine(model, case, folder, work / "data", work, args, repeat)
            else:
                run = run_bare(model, inputs, case, placement, repeat)
            runs[side].append(run)
            print(
                f"[{case.name}] repeat {repeat + 1}/{case.repeats} {side:6s} {run.s_per_step * 1e3:10.2f} ms/step",
                flush=True,
            )
    engine = [r.s_per_step for r in runs["engine"]]
    bare = [r.s_per_step for r in runs["bare"]]
    ratio = statistics.median(engine) / statistics.median(bare)
    trainable = {side: rs[0].trainable_params for side, rs in runs.items()}
    peaks = {
        side: max((r.peak_bytes for r in rs if r.peak_bytes is not None), default=None) for side, rs in runs.items()
    }
    del model, inputs
    release_memory(placement.device)
    return {
        "case": case.name,
        "settings": asdict(case),
        "device": str(placement.device),
        "precision": placement.precision,
        "bare_s_per_step": statistics.median(bare),
        "engine_s_per_step": statistics.median(engine),
        "ratio": ratio,
        "paired_ratios": [e / b for e, b in zip(engine, bare, strict=True)],
        "best_run_ratio": min(engine) / min(bare),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "trainable_params": trainable,
        "peak_bytes": peaks,
        "runs": [asdict(r) | {"s_per_step": r.s_per_step} for side in ("engine", "bare") for r in runs[side]],
    }


def cases_for(device: torch.device, args: argparse.Namespace) -> list[FluxCase]:
    gpu = device.type == "cuda"
    chosen = {
        "tiny": [FluxCase("tiny", 64, 32, batch_size=2, steps=60 if gpu else 20, warmup_steps=5, repeats=5, rank=8)],
        "width": [
            FluxCase(
                "width",
                512 if gpu else 64,
                512 if gpu else 64,
                batch_size=1,
                steps=10 if gpu else 3,
                warmup_steps=2 if gpu else 1,
                repeats=3 if gpu else 2,
            )
        ],
        "real": real_size_cases() if gpu else [],
    }
    names = [args.only] if args.only else ["tiny", "width", *(["real"] if gpu else [])]
    if args.only == "real" and not gpu:
        raise SystemExit("the real-size cases need a CUDA GPU")
    overrides = {k: getattr(args, k) for k in ("steps", "warmup_steps", "repeats") if getattr(args, k) is not None}
    return [replace(case, **overrides) for name in names for case in chosen[name]]


def print_table(results: Sequence[dict]) -> None:
    header = ("case", "device", "precision", "res", "bare s/step", "engine s/step", "ratio", "bare peak", "engine peak")
    rows = [
        (
            r["case"],
            r["device"],
            r["precision"],
            str(r["settings"]["resolution"]),
            f"{r['bare_s_per_step']:.4f}",
            f"{r['engine_s_per_step']:.4f}",
            f"{r['ratio']:.3f}",
            format_bytes(r["peak_bytes"]["bare"]),
            format_bytes(r["peak_bytes"]["engine"]),
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    for line in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    print()
    for r in results:
        verdict = "within target" if r["meets_target"] else "ABOVE TARGET"
        print(f"{r['case']}: ratio {r['ratio']:.3f} vs {TARGET_RATIO} ({verdict}); best run {r['best_run_ratio']:.3f}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.flux_vs_bare", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=CASES, help="run one case (default: tiny and width; real too on a GPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=("auto", "no", "bf16", "fp16"))
    parser.add_argument("--steps", type=int, help="timed steps per run")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, help="runs per side; the median is reported")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a shared machine)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases, print the table, write bench/results/flux_vs_bare-<device>.json; exit 0."""
    args = parse_args(argv)
    quiet_offline(args.threads)
    from lorad.models.tiny_flux import build_tiny_flux
    from lorad.training.placement import pick_placement

    placement = pick_placement(args.device, args.precision)
    print(
        f"FLUX engine vs bare loop on {placement.device} ({device_description(placement.device)}), "
        f"precision {placement.precision}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="lorad-bench-flux-") as tmp_name:
        tmp = Path(tmp_name)
        tiny = build_tiny_flux(tmp / "tiny-flux", variant="dev", seed=SEED)
        for case in cases_for(placement.device, args):
            results.append(bench_case(case, placement, args, tmp, tiny))
    print_table(results)
    write_results("flux_vs_bare", placement, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
