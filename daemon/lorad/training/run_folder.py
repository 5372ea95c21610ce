"""The run's output folder: proving it writable before any work, and the summary written at the end."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorad.atomic import write_text_atomic
from lorad.config.schema import TrainingKeys
from lorad.disk_space import disk_full_as_error
from lorad.errors import OutputError

# What to do when the disk fills while a finished run writes its outputs.
EXPORT_FULL_HINT = (
    "Free space on that disk (or choose an output_dir on another disk), then run the same config again "
    "with `resume_from: latest`: the checkpoint of the last step is kept, and the resumed run only "
    "writes the outputs."
)


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and prove it is writable before any expensive work starts."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise OutputError(
            f"`output_dir`: cannot write to {output_dir} ({err.strerror or err})", "choose a folder you can write to"
        ) from None


def write_summary(config: TrainingKeys, summary: Mapping[str, Any]) -> str:
    """Write ``training_summary.json`` (the family, the resolved config, and what the run reports)
    atomically; return its path."""
    path = config.output_dir / "training_summary.json"
    document = {"model_family": config.model_family, "config": config.to_dict(), **summary}
    text = json.dumps(document, indent=2, default=str)
    with disk_full_as_error(config.output_dir, "training_summary.json", len(text), EXPORT_FULL_HINT):
        write_text_atomic(path, text, user_file=True)
    return str(path)
