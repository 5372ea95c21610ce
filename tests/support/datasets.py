"""Training data, configs and tiny-model settings the tests build."""

from __future__ import annotations

import random
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

# The config from the lora-scripts article, verbatim but for base_model.
SEED_YAML = """\
train_data_dir: "./data/style_train"
metadata_path: "./data/style_train/metadata.csv"
base_model: "{base_model}"
lora_rank: 8
unet_target_modules: ["q_proj", "v_proj"]
batch_size: 4
epochs: 10
learning_rate: 2e-4
output_dir: "./output/my_style_lora"
save_steps: 100
"""


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


SHAPES = ("circle", "square")


def draw_image(path: Path, colour: str, shape: str, size: tuple[int, int] = (64, 64), seed: int = 0) -> None:
    """A small synthetic picture: a coloured shape on a noisy background."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    img.save(path)


def make_dataset(root: Path, count: int = 8, *, csv: bool = True, size: tuple[int, int] = (64, 64)) -> Path:
    """``count`` images in ``root`` with captions in metadata.csv (or .txt sidecars)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i % len(SHAPES)]
        name = f"img_{i:02d}.png"
        draw_image(root / name, colour, shape, size, seed=i)
        caption = f"mystyle, a {colour} {shape}, simple background"
        if csv:
            rows.append(f"{name},{caption}")
        else:
            (root / f"img_{i:02d}.txt").write_text(caption)
    if csv:
        (root / "metadata.csv").write_text("file,caption\n" + "\n".join(rows) + "\n")
    return root


def write_config(path: Path, **values: object) -> Path:
    """Write a YAML config file with the given keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in values.items()}, sort_keys=False)
    )
    return path


def tiny_train_values(tiny_sd: Path, data: Path, out: Path, **overrides: object) -> dict[str, object]:
    """Config keys for a fast CPU run on the tiny model (64 px images, a few steps)."""
    values: dict[str, object] = {
        "train_data_dir": data,
        "metadata_path": data / "metadata.csv",
        "base_model": tiny_sd,
        "lora_rank": 4,
        "unet_target_modules": ["q_proj", "v_proj"],
        "batch_size": 2,
        "epochs": 1,
        "learning_rate": "1e-3",
        "output_dir": out,
        "resolution": 64,
        "min_bucket_reso": 64,
        "max_bucket_reso": 128,
        "bucket_reso_steps": 16,
        "device": "cpu",
    }
    values.update(overrides)
    return values


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON Lines."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_llm_values(tiny_llm: Path, data: Path, out: Path, **overrides: object) -> dict[str, object]:
    """LLM config keys for a fast CPU run on the tiny Llama (a few dozen steps at a high rate)."""
    values: dict[str, object] = {
        "train_data": data,
        "base_model": tiny_llm,
        "output_dir": out,
        "device": "cpu",
        "max_train_steps": 30,
        "learning_rate": "1e-2",
        "lora_dropout": 0.0,
        "batch_size": 4,
        "lr_scheduler": "constant",
        "max_seq_len": 64,
    }
    values.update(overrides)
    return values


def tiny_sdxl_values(tiny_sdxl: Path, data: Path, out: Path, **overrides: object) -> dict[str, object]:
    """SDXL config keys for a fast CPU run on the tiny SDXL (64 px images, a few steps)."""
    values = tiny_train_values(tiny_sdxl, data, out, min_bucket_reso=64, max_bucket_reso=128, bucket_reso_steps=32)
    values.update(overrides)
    return values
