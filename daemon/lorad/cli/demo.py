"""`lorad demo`: the whole story on a tiny built-in model, offline, in well under a minute.

It builds a tiny random Stable Diffusion model and a small captioned image set in a work folder,
writes the YAML config a user would write, and trains it with the same code path as
``lorad train``. The LoRA it makes is real in format (A1111 and diffusers load it) but was
trained on a random model, so it draws nothing meaningful: it proves the pipeline, not the art.
"""

from __future__ import annotations

import random
import shlex
from pathlib import Path

import yaml

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 60, 220), "orange": (240, 140, 20)}


def write_demo_images(folder: Path, count: int = 12) -> None:
    """Synthetic 64 px pictures (a coloured shape on a tinted background) and their metadata.csv."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    rows = ["file,caption"]
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = ("circle", "square", "triangle")[i % 3]
        img = Image.new("RGB", (64, 64), tuple(rng.randint(150, 255) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        if shape == "circle":
            draw.ellipse((14, 14, 50, 50), fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle((16, 16, 48, 48), fill=COLOURS[colour])
        else:
            draw.polygon([(32, 12), (54, 52), (10, 52)], fill=COLOURS[colour])
        name = f"{i:02d}_{colour}_{shape}.png"
        img.save(folder / name)
        rows.append(f'{name},"demostyle, a {colour} {shape}, flat colours"')
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")


def demo_config(work: Path, steps: int) -> dict[str, object]:
    """The config a user would write for the demo data (paths relative to ``work``)."""
    return {
        "train_data_dir": "./data/demo_style",
        "metadata_path": "./data/demo_style/metadata.csv",
        "base_model": "./models/tiny-sd",
        "lora_rank": 8,
        "lora_alpha": 4,
        "unet_target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"],
        "batch_size": 4,
        "max_train_steps": steps,
        "learning_rate": "2e-4",
        "resolution": 64,
        "min_bucket_reso": 64,
        "bucket_reso_steps": 16,
        "trigger_word": "demostyle",
        "output_dir": "./output/demo_lora",
        "save_steps": max(1, steps // 2),
        "cache_dir": "./cache",
    }


def edit_and_run(work: Path, config_path: Path) -> str:
    """The command that trains the demo config again: from ``work``, which its relative paths resolve
    against (as they do for every config: against the folder the command runs in)."""
    return f"cd {shlex.quote(str(work))} && lorad train --config {config_path.relative_to(work)}"


def run_demo(work: Path, *, steps: int = 30) -> int:
    """Prepare ``work`` (model, data, config) and train through the CLI's code path."""
    from lorad.cli.local_training import run_training
    from lorad.models.tiny import build_tiny_sd

    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "models" / "tiny-sd"
    if not (model_dir / "model_index.json").is_file():
        print(f"building a tiny random Stable Diffusion model in {model_dir}")
        build_tiny_sd(model_dir, version="sd1", seed=0)
    data_dir = work / "data" / "demo_style"
    if not (data_dir / "metadata.csv").is_file():
        write_demo_images(data_dir)
    config_path = work / "configs" / "demo_lora.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(
        f"# written by `lorad demo`; edit and run: {edit_and_run(work, config_path)}\n"
        + yaml.safe_dump(demo_config(work, steps), sort_keys=False)
    )
    print(f"config: {config_path}\nedit and run it: {edit_and_run(work, config_path)}\n")
    code = run_training(config_path, base_dir=work)
    if code == 0:
        print(
            "\nThe demo model is random, so this LoRA draws nothing meaningful. For a real one, "
            "point base_model at your SD 1.5 checkpoint and train_data_dir at your images; "
            "`lorad config --example` lists every setting."
        )
    return code


# A handful of clinical-note records, small enough for the tiny model to memorise in a few dozen steps.
DEMO_RECORDS = (
    {"instruction": "What does COPD stand for?", "output": "Chronic obstructive pulmonary disease."},
    {"instruction": "Expand the abbreviation.", "input": "SOB", "output": "Shortness of breath."},
    {"instruction": "What is lisinopril used for?", "output": "Hypertension."},
    {
        "instruction": "Summarise the note.",
        "input": "Pt denies fever, chills, nausea.",
        "output": "The patient has no fever, chills or nausea.",
    },
)


def run_llm_demo(work: Path, *, steps: int = 40) -> int:
    """`lorad demo --llm`: a tiny random Llama, a few alpaca records, a config, and a run."""
    import json

    from lorad.cli.local_training import run_training
    from lorad.models.tiny_llm import build_tiny_llm

    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "models" / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        print(f"building a tiny random Llama in {model_dir}")
        build_tiny_llm(model_dir, seed=0)
    data = work / "data" / "records.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in DEMO_RECORDS))
    config = {
        "task": "llm",  # said outright: edited into another folder, base_model may not resolve
        "train_data": "./data/records.jsonl",
        "base_model": "./models/tiny-llama",
        "lora_rank": 8,
        "max_train_steps": steps,
        "learning_rate": "1e-2",
        "lora_dropout": 0.0,
        "lr_scheduler": "constant",
        "max_seq_len": 128,
        "output_dir": "./output/demo_adapter",
        "merge_export": True,
        "sample_prompts": ["What does COPD stand for?"],
    }
    config_path = work / "configs" / "demo_llm.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(
        f"# written by `lorad demo --llm`; edit and run: {edit_and_run(work, config_path)}\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    print(f"config: {config_path}\nedit and run it: {edit_and_run(work, config_path)}\n")
    code = run_training(config_path, base_dir=work)
    if code == 0:
        print(
            "\nThe demo model is random and tiny: it memorises the four records, nothing more. For a real run, "
            "point base_model at your model folder and train_data at your records; "
            "`lorad config --example llm` lists every setting."
        )
    return code
