"""Sample image files: their names, their A1111 ``parameters`` text chunk, and writing them atomically.

A1111's PNG Info reads the ``parameters`` chunk: the prompt, a ``Negative prompt:`` line, and a last
line of ``Key: value`` pairs (values holding a comma, colon or line break are JSON-quoted, as A1111's
own ``quote`` does). The LoRA is part of the prompt as ``<lora:NAME:1>``, so pasting the text back
into A1111 with the LoRA installed draws the same picture's settings.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lorad.atomic import write_bytes_atomic
from lorad.sampling.prompts import ResolvedPrompt
from lorad.sampling.samplers import sampler_label

SAMPLES_DIR = "samples"
# <output_name>_<step, 8 digits>_<prompt index, 2 digits>_<seed>.png (kohya's order: name, step, index, seed).
_NAME = re.compile(r"^(?P<name>.+)_(?P<step>\d{8})_(?P<index>\d{2,})_(?P<seed>\d+)\.png$")


@dataclass(frozen=True)
class SampleFile:
    """Where a sample image is, and which step, prompt and seed it shows."""

    path: Path
    step: int
    index: int
    seed: int


def samples_dir(output_dir: Path) -> Path:
    """The folder a run's sample images go in: ``output_dir/samples``."""
    return output_dir / SAMPLES_DIR


def sample_path(output_dir: Path, output_name: str, *, step: int, index: int, seed: int) -> Path:
    """The file of prompt ``index`` at ``step`` drawn with ``seed``; step 0 is the baseline before training."""
    return samples_dir(output_dir) / f"{output_name}_{step:08d}_{index:02d}_{seed}.png"


def list_samples(output_dir: Path, output_name: str) -> list[SampleFile]:
    """The run's sample images on disk, by step then prompt index (the contact sheet's order)."""
    found = []
    folder = samples_dir(output_dir)
    for path in folder.glob("*.png") if folder.is_dir() else ():
        match = _NAME.match(path.name)
        if match and match["name"] == output_name:
            found.append(SampleFile(path, int(match["step"]), int(match["index"]), int(match["seed"])))
    return sorted(found, key=lambda f: (f.step, f.index))


def _quote(text: str) -> str:
    """A value as A1111 writes it in the parameters line: JSON-quoted when it holds `,`, `:` or a line break."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def a1111_parameters(
    prompt: ResolvedPrompt, *, lora_name: str | None, lora_weight: float = 1.0, model: str = "", step: int = 0
) -> str:
    """The ``parameters`` text A1111 writes for an image like this one (``lora_name`` None: a baseline
    drawn without the LoRA). Guidance (Flux's distilled CFG) is written as A1111 Forge does."""
    text = prompt.prompt
    if lora_name:
        text = f"{text} <lora:{lora_name}:{lora_weight:g}>".strip()
    lines = [text]
    if prompt.negative:
        lines.append(f"Negative prompt: {prompt.negative}")
    params: list[tuple[str, str]] = [
        ("Steps", str(prompt.steps)),
        ("Sampler", sampler_label(prompt.sampler)),
        ("CFG scale", f"{prompt.cfg_scale:g}"),
    ]
    if prompt.guidance is not None:
        params.append(("Distilled CFG Scale", f"{prompt.guidance:g}"))
    params += [("Seed", str(prompt.seed)), ("Size", f"{prompt.width}x{prompt.height}")]
    if model:
        params.append(("Model", model))
    params.append(("Training step", str(step)))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in params))
    return "\n".join(lines)


def write_sample_png(image: object, path: Path, parameters: str) -> None:
    """Write a PIL image as a PNG with A1111's ``parameters`` chunk, atomically (a watcher never sees half a file)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buffer.getvalue(), user_file=True)
