"""The contact sheet written at the end of a run: one row per prompt, one column per sampled step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lorad.atomic import write_with_atomic
from lorad.sampling.files import SampleFile, samples_dir

# Each cell is scaled to fit this many pixels on its longer side, so a sheet of many steps stays small.
CELL = 256
LABEL_HEIGHT = 16
MAX_COLUMNS = 64  # the newest steps when more were sampled (a 10k-step run sampled every 50 steps)


def contact_sheet_path(output_dir: Path, output_name: str) -> Path:
    """Where the sheet goes: ``output_dir/samples/<output_name>_contact_sheet.png``."""
    return samples_dir(output_dir) / f"{output_name}_contact_sheet.png"


def write_contact_sheet(samples: Sequence[SampleFile], dest: Path) -> Path | None:
    """Lay ``samples`` out as a grid (rows: prompt index, columns: step, each labelled with its step) and
    write it to ``dest`` atomically; None when there are no samples. Unreadable images leave a grey cell."""
    from PIL import Image, ImageDraw

    if not samples:
        return None
    steps = sorted({s.step for s in samples})[-MAX_COLUMNS:]
    rows = sorted({s.index for s in samples})
    by_cell = {(s.index, s.step): s.path for s in samples}
    sheet = Image.new("RGB", (CELL * len(steps), (CELL + LABEL_HEIGHT) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, index in enumerate(rows):
        top = r * (CELL + LABEL_HEIGHT)
        for c, step in enumerate(steps):
            left = c * CELL
            label = f"prompt {index} · step {step}" if step else f"prompt {index} · base"
            draw.text((left + 4, top + 2), label, fill="black")
            path = by_cell.get((index, step))
            if path is None:
                continue
            try:
                with Image.open(path) as image:
                    cell = image.convert("RGB")
            except OSError:
                draw.rectangle((left, top + LABEL_HEIGHT, left + CELL - 1, top + LABEL_HEIGHT + CELL - 1), fill="grey")
                continue
            cell.thumbnail((CELL, CELL))
            sheet.paste(cell, (left + (CELL - cell.width) // 2, top + LABEL_HEIGHT + (CELL - cell.height) // 2))
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_with_atomic(dest, lambda tmp: sheet.save(tmp, format="PNG"), user_file=True)
    return dest
