"""SDXL engine vs bare loop: how much slower per step is lorad's SDXL family than a minimal diffusers loop?

The harness is ``bench.engine_vs_bare``'s (same timing windows, alternating order, median ratio,
target <= 1.10); only the model and the conditioning differ. Both sides train the same LoRA (UNet
attention projections) on the same resident SDXL model; the bare loop feeds the UNet what the
engine computes once before training: both text encoders' penultimate hidden states, the pooled
embedding, and the size/crop time ids.

Cases: ``tiny`` (lorad's tiny random SDXL, 64 px) and ``sdxl`` (the real-size SDXL base
architecture from lorad's shipped configs, random weights, built in memory). On a CPU the real-size
case runs in bf16 (weights and autocast; the engine refuses CPU autocast for training runs, so the
bench hands both sides that placement itself), at 128 px by default. The GPU measurement (real-size
SDXL at 1024 px, batch 1, bf16, gradient checkpointing, s/step and peak VRAM) is the GPU suite's SDXL
row, ``bench/gpu_rows/sdxl.py``, on this module's :func:`bench_case`.

Run ``python -m bench.sdxl_vs_bare --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.engine_vs_bare import (
    SEED,
    BareInputs,
    CaseSettings,
    LoopRun,
    environment,
    format_bytes,
    make_dataset,
    picture_tensor,
    print_table,
    release_memory,
    run_alternating,
    run_bare,
    run_engine,
    summarize,
    tiny_settings,
    with_flags,
)

if TYPE_CHECKING:
    from PIL import Image

    from lorad.models.sdxl_components import SDXLComponents
    from lorad.training.placement import Placement

CASES = ("tiny", "sdxl")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sdxl_config_dir() -> Path:
    """lorad's shipped SDXL base 1.0 diffusers configs."""
    from lorad.models.sdxl_loader import SDXL_CONFIGS

    return SDXL_CONFIGS


def place(components: SDXLComponents, placement: Placement, *, fp8_base: bool = False) -> SDXLComponents:
    """Put the model where the SDXL family keeps a resident model (see ``place_for_training``)."""
    from lorad.families.sdxl.family import place_for_training

    for module in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        module.eval()
        module.requires_grad_(False)
    return place_for_training(components, placement, fp8_base=fp8_base)


def load_tiny(folder: Path, placement: Placement, *, fp8_base: bool = False) -> SDXLComponents:
    """The tiny SDXL, loaded the way the family loads it from disk."""
    from lorad.models.sdxl_loader import load_sdxl_components

    return place(load_sdxl_components(str(folder), dtype=placement.weight_dtype), placement, fp8_base=fp8_base)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (a real-size UNet built in fp32 first would need 10 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_sdxl(tokenizer_dir: Path, placement: Placement, *, fp8_base: bool = False) -> SDXLComponents:
    """A real-size SDXL base model with random weights, in memory only (nothing downloaded or saved)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lorad.models.sdxl_components import SDXLComponents
    from lorad.models.sdxl_loader import training_scheduler

    configs = sdxl_config_dir()
    torch.manual_seed(SEED)
    # On the target device: a GPU does the ~3.5e9 random draws in a blink; a CPU takes a minute.
    with torch.device(placement.device), default_dtype(placement.weight_dtype):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder"))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(configs / "text_encoder_2"))
    # The shipped encoder configs say float16 (as SDXL base's do), which transformers may build some layers in.
    for encoder in (text_encoder, text_encoder_2):
        encoder.to(placement.weight_dtype)
    with torch.device(placement.device):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae"))
    scheduler = json.loads((configs / "scheduler" / "scheduler_config.json").read_text())
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    tokenizer_2 = CLIPTokenizer.from_pretrained(tokenizer_dir, pad_token="!")
    components = SDXLComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        noise_scheduler=training_scheduler(scheduler, "epsilon", False),
        prediction_type="epsilon",
        zero_terminal_snr=False,
        source="random-sdxl",
    )
    return place(components, placement, fp8_base=fp8_base)


def prepare_sdxl_inputs(
    components: SDXLComponents, pictures: Sequence[Image.Image], captions: Sequence[str], placement: Placement
) -> BareInputs:
    """Encode the pictures and captions once, on the device, as the engine does before its first step."""
    from lorad.families.sdxl.conditioning import HIDDEN, POOLED, encode_prompts, time_ids, time_ids_tensor

    device = placement.device
    pixels = torch.stack([picture_tensor(p) for p in pictures])
    means, stds = [], []
    with torch.no_grad():
        for chunk in pixels.split(4):
            dist = components.vae.encode(chunk.to(device, components.vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        text = encode_prompts(
            list(captions),
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            device=device,
        )
    ids = [time_ids(p.width, p.height, (p.width, p.height)) for p in pictures]
    dtype = text[HIDDEN].dtype
    return BareInputs(
        mean=torch.cat(means),
        std=torch.cat(stds),
        hidden=text[HIDDEN],
        scaling=components.vae_scaling_factor,
        added={"text_embeds": text[POOLED], "time_ids": time_ids_tensor(ids, device=device, dtype=dtype)},
    )


@contextmanager
def engine_placement(placement: Placement) -> Iterator[None]:
    """Have the training loop use ``placement`` (CPU bf16, which its own config check refuses)."""
    import lorad.training.loop as loop

    original = loop.pick_placement
    loop.pick_placement = lambda device, precision: placement
    try:
        yield
    finally:
        loop.pick_placement = original


def bench_case(settings: CaseSettings, placement: Placement, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Set up one case, run both sides ``repeats`` times alternately, and summarise."""
    from lorad.diffusion.captions import move_off_device
    from lorad.models.tiny_sdxl import build_tiny_sdxl

    work = tmp / settings.name
    work.mkdir()
    t0 = time.perf_counter()
    tiny_dir = build_tiny_sdxl(tmp / "tiny-sdxl", seed=SEED) if not (tmp / "tiny-sdxl").exists() else tmp / "tiny-sdxl"
    if settings.name == "tiny":
        components = load_tiny(tiny_dir, placement, fp8_base=args.fp8_base)
    else:
        components = build_sdxl(tiny_dir / "tokenizer", placement, fp8_base=args.fp8_base)
    pictures, captions = make_dataset(work / "data", settings.images, settings.resolution)
    inputs = prepare_sdxl_inputs(components, pictures, captions, placement)
    print(
        f"[{settings.name}] setup {time.perf_counter() - t0:.1f}s: {settings.images} images at "
        f"{settings.resolution}px, batch {settings.batch_size}, {settings.warmup_steps} warm-up + "
        f"{settings.steps} timed steps per run, {settings.repeats} repeats",
        flush=True,
    )
    # The engine detects SDXL from a model's files; this one lives in memory only.
    extra = {"model_family": "sdxl", "fp8_base": args.fp8_base}

    def engine(repeat: int) -> LoopRun:
        return run_engine(
            components, settings, work / "data", work, placement, args.device, placement.precision, repeat, extra=extra
        )

    def bare(repeat: int) -> LoopRun:
        # The engine moves the frozen text encoders off the device for its steps; so does the bare loop.
        encoders = (components.text_encoder, components.text_encoder_2)
        move_off_device(encoders, placement.device)
        try:
            return run_bare(components, inputs, settings, placement, repeat)
        finally:
            for encoder in encoders:
                encoder.to(placement.device)

    with engine_placement(placement):
        runs = run_alternating(settings, placement, engine=engine, bare=bare)
    components = inputs = None  # free the model before the next case builds its own
    release_memory(placement.device)
    return summarize(settings, placement, runs)


def case_settings(name: str, device: torch.device, args: argparse.Namespace) -> CaseSettings:
    """Per-case defaults for this device, overridden by the flags that were given."""
    gpu = device.type != "cpu"
    if name == "tiny":
        settings = tiny_settings(gpu)
    elif gpu:
        settings = CaseSettings("sdxl", 1024, batch_size=1, steps=20, warmup_steps=3, repeats=3, rank=8)
    else:
        settings = CaseSettings("sdxl", 128, batch_size=1, steps=3, warmup_steps=1, repeats=3, rank=8)
    keys = ["steps", "warmup_steps", "batch_size", "repeats", "rank", "gradient_checkpointing"]
    return with_flags(settings, args, keys + (["resolution"] if name == "sdxl" else []))


def pick_bench_placement(device_name: str, precision: str) -> Placement:
    """The engine's placement, except that bf16 is allowed on a CPU (weights and autocast)."""
    from lorad.training.placement import Placement, pick_device, pick_placement

    device = pick_device(device_name)
    if device.type == "cpu" and precision == "bf16":
        return Placement(device=device, autocast_dtype=torch.bfloat16, weight_dtype=torch.bfloat16)
    return pick_placement(device_name, precision)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sdxl_vs_bare",
        description="Steps/s of lorad's SDXL family vs a bare diffusers SDXL loop, side by side in one run.",
    )
    parser.add_argument("--only", choices=CASES, help="run one case (default: all)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N")
    parser.add_argument(
        "--precision",
        default=None,
        choices=("auto", "no", "bf16", "fp16"),
        help="autocast and weight precision (default: bf16 for the real-size case, auto for tiny)",
    )
    parser.add_argument("--steps", type=int, help="timed steps per run (default per case and device)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps at the start of every run")
    parser.add_argument("--resolution", type=int, help="sdxl image size in px (default 1024 on GPU, 128 on CPU)")
    parser.add_argument("--batch-size", type=int, help="images per step")
    parser.add_argument("--repeats", type=int, help="runs per side; the median is reported")
    parser.add_argument("--rank", type=int, help="LoRA rank (alpha = rank)")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="both sides recompute activations"
    )
    parser.add_argument("--fp8-base", action="store_true", help="store the frozen UNet in float8 (fp8_base)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadiest on a shared machine)")
    args = parser.parse_args(argv)
    if args.resolution is not None and (args.resolution < 64 or args.resolution % 32):
        parser.error("--resolution must be a multiple of 32")
    return args


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every requested case; returns their results."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library_logging in (diffusers_logging, transformers_logging):
        library_logging.set_verbosity_error()
        library_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="lorad-bench-sdxl-") as tmp_name:
        for name in [args.only] if args.only else list(CASES):
            precision = args.precision or ("bf16" if name == "sdxl" else "auto")
            placement = pick_bench_placement(args.device, precision)
            settings = case_settings(name, placement.device, args)
            results.append(bench_case(settings, placement, args, Path(tmp_name)))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the cases, print the table, write bench/results/sdxl_vs_bare-<device>.json; exit 0."""
    args = parse_args(argv)
    # Before huggingface_hub is imported (by diffusers/transformers/lorad): never touch the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    results = run(args)
    print_table(results)
    device = results[0]["device"] if results else "cpu"
    if not device.startswith("cuda"):
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(f"peak memory per loop needs CUDA; this process's peak RSS (everything) was {format_bytes(rss)}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"sdxl_vs_bare-{device.split(':')[0]}.json"
    placement = pick_bench_placement(args.device, "auto")
    payload = {"environment": environment(placement), "argv": sys.argv[1:], "results": results}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
