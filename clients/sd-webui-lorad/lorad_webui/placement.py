"""Putting a finished LoRA into the WebUI's LoRA folder, atomically, and the prompt tag that uses it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def place_lora(source: Path, lora_dir: Path, name: str) -> Path:
    """Copy ``source`` (a kohya .safetensors) to ``lora_dir/<name>.safetensors`` and return that path.

    The copy goes to a hidden temp file in ``lora_dir`` (a suffix the LoRA list ignores), is flushed
    to disk, then renamed over the target: the WebUI never lists or loads a half-written file, and
    an earlier LoRA of the same name is replaced in one step. Raises FileNotFoundError when
    ``source`` is missing.
    """
    if not source.is_file():
        raise FileNotFoundError(f"the trained LoRA {source} is not there (was the output folder moved?)")
    lora_dir.mkdir(parents=True, exist_ok=True)
    target = lora_dir / f"{name}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=lora_dir, prefix=f".{name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other tools and users read LoRA files
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
