"""Caption throughput: images per second batched vs one by one, for each captioner, in one run.

Each captioner kind runs on lorad's tiny model (random BLIP and CLIP, the hand-made WD14 tagger; all
built locally, see ``lorad.models.tiny_captioners``), loaded once. The same ``--images`` pictures of
mixed sizes go through lorad's captioning path (``lorad.captioning.runner.caption_images``: header
read, grouping by size, decoding, the captioner) with ``--batch-size`` and with batch size 1, in
alternating order over ``--repeats`` rounds so machine noise hits both; the medians give images/s
and the ratio batched / one-by-one. Nothing is written to the image folder: only the runner is timed.

The tiny models make the captioner's own compute small, so the ratio here mostly measures per-call
overhead that batching removes (Python, generate() set-up, onnxruntime calls); on real-size models
the model's compute dominates and batching pays off on GPUs far more than on CPUs.

Run ``python -m bench.caption_throughput --help`` for the flags. Results go to
``bench/results/caption_throughput-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
KINDS = ("blip", "wd14", "clip")


@dataclass(frozen=True)
class KindResult:
    """One captioner's medians: images/s batched and one by one, their ratio, and every round."""

    kind: str
    model_version: str
    images: int
    batch_size: int
    batched_images_per_second: float
    single_images_per_second: float
    ratio: float
    batched_rounds: list[float]
    single_rounds: list[float]


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` pictures of mixed sizes and shapes (squares, portraits, landscapes) in ``folder``."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    sizes = [(64, 64), (96, 64), (64, 96), (128, 128), (80, 48), (48, 80)]
    paths = []
    for index in range(count):
        size = sizes[index % len(sizes)]
        image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
        ImageDraw.Draw(image).ellipse(
            (8, 8, size[0] - 8, size[1] - 8), fill=tuple(rng.randint(0, 255) for _ in range(3))
        )
        path = folder / f"{index:03d}.png"
        image.save(path)
        paths.append(path)
    return paths


def time_round(captioner: object, paths: list[Path], options: object, batch_size: int) -> float:
    """Images per second of one pass over ``paths``."""
    from lorad.captioning.runner import caption_images

    start = time.perf_counter()
    done = sum(len(batch) for batch in caption_images(captioner, paths, options, batch_size=batch_size))
    elapsed = time.perf_counter() - start
    assert done == len(paths)
    return len(paths) / elapsed


def bench_kind(kind: str, model: Path, paths: list[Path], args: argparse.Namespace) -> KindResult:
    from lorad.captioning.captioner import CaptionerKey, captioner_placement, load_captioner
    from lorad.captioning.options import CaptionOptions

    device, dtype = captioner_placement(kind, args.device)
    captioner = load_captioner(CaptionerKey(kind, str(model), device, dtype))
    # min_length keeps every BLIP caption equally long (a random model may stop at any token), so
    # both sides generate the same number of tokens per image.
    options = CaptionOptions(max_length=args.max_length)
    if kind == "blip":
        captioner.model.generation_config.min_new_tokens = args.max_length
    time_round(captioner, paths[: args.batch_size], options, args.batch_size)  # warm-up: allocators, caches
    batched, single = [], []
    for _ in range(args.repeats):
        batched.append(time_round(captioner, paths, options, args.batch_size))
        single.append(time_round(captioner, paths, options, 1))
    b, s = statistics.median(batched), statistics.median(single)
    return KindResult(
        kind=kind,
        model_version=captioner.model_version,
        images=len(paths),
        batch_size=args.batch_size,
        batched_images_per_second=b,
        single_images_per_second=s,
        ratio=b / s,
        batched_rounds=batched,
        single_rounds=single,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=KINDS, action="append", help="run only this captioner (repeatable)")
    parser.add_argument("--images", type=int, default=48, help="pictures captioned per round (default 48)")
    parser.add_argument("--batch-size", type=int, default=8, help="the batched side's batch size (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per side; the median is reported (default 3)")
    parser.add_argument("--max-length", type=int, default=16, help="blip: tokens per caption (default 16)")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers.utils import logging as transformers_logging

    from lorad.models.tiny_captioners import build_tiny_blip, build_tiny_clip, build_tiny_wd14

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    builders = {"blip": build_tiny_blip, "wd14": build_tiny_wd14, "clip": build_tiny_clip}
    results = []
    with tempfile.TemporaryDirectory(prefix="lorad-caption-bench-") as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        paths = make_images(folder, args.images)
        for kind in args.only or KINDS:
            model = builders[kind](Path(tmp) / kind)
            result = bench_kind(kind, model, paths, args)
            results.append(result)
            print(
                f"{kind:5s} {result.model_version:16s} batched (x{result.batch_size}) "
                f"{result.batched_images_per_second:8.1f} images/s   one by one "
                f"{result.single_images_per_second:8.1f} images/s   ratio {result.ratio:5.2f}x",
                flush=True,
            )

    from lorad.captioning.captioner import captioner_placement

    device = captioner_placement("blip", args.device)[0]
    device_type = device.split(":")[0]
    name = torch.cuda.get_device_name(0) if device_type == "cuda" else platform.processor() or platform.machine()
    payload = {
        "environment": {
            "device": device,
            "device_name": name,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # Other processes share the machine: numbers taken under load are noisier.
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "argv": list(argv if argv is not None else sys.argv[1:]),
        "results": [asdict(r) for r in results],
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"caption_throughput-{device_type}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
