"""`lorad config --example`: a complete, annotated config generated from the schema.

Generated rather than hand-written so it can never drift from what the loader accepts.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from lorad.config.schema import SECTIONS, DeviceRequest, OptimizerArgs, RepeatPolicy, TrainConfig
from lorad.sampling.prompts import SamplePrompts

_TITLES = {
    "data": "Data: images and captions",
    "model": "Base model (read from your disk; nothing is downloaded)",
    "lora": "LoRA network",
    "training": "Training",
    "checkpoints": "Checkpoints and resuming",
    "samples": "Sample images (or answers) while training",
    "output": "Output",
}

# The values a first-time user edits (the README's quick-start config).
_SEED = {
    "train_data_dir": "./data/style_train",
    "metadata_path": "./data/style_train/metadata.csv",
    "base_model": "./models/Stable-diffusion/v1-5-pruned.safetensors",
    "lora_rank": 8,
    "unet_target_modules": ["q_proj", "v_proj"],
    "batch_size": 4,
    "epochs": 10,
    "learning_rate": "2e-4",
    "output_dir": "./output/my_style_lora",
    "save_steps": 100,
}


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (RepeatPolicy, OptimizerArgs, DeviceRequest, SamplePrompts)):
        return _yaml_value(value.to_yaml())
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, str):
        return json.dumps(value) if value else '""'
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _number(value: float) -> str:
    """A bound as people write it: 4096, 0.5, 4,294,967,295."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"


def render_example() -> str:
    """An annotated YAML config listing every key with its help text, default and choices.

    The seed keys carry example values and are active; every other key is commented out at its
    default, so the text parses to a valid config once the paths point at real files.
    """
    return render_annotated(TrainConfig, _SEED, title="lorad training config")


def render_annotated(
    config_class: type, seed: dict[str, Any], *, title: str, titles: dict[str, str] | None = None
) -> str:
    """The annotated YAML of any config dataclass whose fields carry :func:`~lorad.config.schema.spec`
    metadata: ``seed`` keys active with their values, the rest commented out at their defaults."""
    titles = _TITLES | (titles or {})
    lines = [
        f"# {title}. Run: lorad train --config this.yaml",
        "# Relative paths resolve against the folder you run the command in.",
        "# Lines starting with '#' show optional keys at their defaults; uncomment to change.",
    ]
    by_section: dict[str, list] = {s: [] for s in SECTIONS}
    for f in fields(config_class):
        by_section[f.metadata["section"]].append(f)
    for section in SECTIONS:
        if not by_section[section]:
            continue
        lines += ["", f"# ---- {titles[section]} " + "-" * max(0, 70 - len(titles[section]))]
        for f in by_section[section]:
            meta = f.metadata
            help_text = meta["help"]
            if meta.get("choices"):
                help_text += " Choices: " + ", ".join(meta["choices"]) + "."
            if meta.get("minimum") is not None and meta.get("maximum") is not None:
                above = "above " if meta.get("exclusive_minimum") else ""
                help_text += f" Range: {above}{_number(meta['minimum'])} to {_number(meta['maximum'])}."
            for chunk in textwrap.wrap(help_text, 96):
                lines.append(f"# {chunk}")
            if f.name in seed:
                lines.append(f"{f.name}: {_yaml_value(seed[f.name])}")
                continue
            default = (
                f.default
                if f.default is not MISSING
                else f.default_factory()
                if f.default_factory is not MISSING
                else None
            )
            lines.append(f"# {f.name}: {_yaml_value(default)}")
    return "\n".join(lines) + "\n"
