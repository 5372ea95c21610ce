"""The training form as one frozen value, checked at once, turned into the daemon's ``config_fields``.

The daemon validates the config again (it is the authority); the checks here catch what the user
can fix in the form before a round trip, each problem naming the field, the bad value and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorad_webui.captions import METADATA_CSV, uses_csv

LENGTH_UNITS = ("steps", "epochs")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class FormError(ValueError):
    """The form cannot be submitted; ``problems`` lists every reason, ``str(err)`` joins them."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class TrainForm:
    """What the tab's training form holds. ``length`` counts ``length_unit`` (steps or epochs);
    ``extra`` is more config keys as YAML (``key: value`` lines), for anything the form lacks."""

    name: str
    data_dir: str
    base_model: str
    trigger_word: str = ""
    rank: int = 8
    length_unit: str = "steps"
    length: int = 500
    resolution: int = 512
    learning_rate: float = 1e-4
    extra: str = ""
    sample_prompts: str = ""  # one prompt a line, with kohya's --w --h --d --s --l --n options
    sample_every: Any = 0  # steps between samples; 0: only at the end (with prompts)


def _extra_fields(text: str) -> tuple[dict[str, Any], list[str]]:
    if not text.strip():
        return {}, []
    import yaml  # gradio depends on PyYAML, so it is in every venv this UI runs in

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        return {}, [f"`extra settings`: not YAML ({str(err).splitlines()[0]}); write one `key: value` per line"]
    if not isinstance(loaded, dict):
        return {}, [f"`extra settings`: got {text.strip()[:40]!r}; write one `key: value` per line"]
    return {str(k): v for k, v in loaded.items()}, []


def config_fields(form: TrainForm, output_dir: Path) -> dict[str, Any]:
    """The ``config_fields`` to submit for ``form``, writing the run to ``output_dir``.

    Raises FormError listing every problem (name, folder, base model, numbers, extra settings).
    """
    problems = []
    name = form.name.strip()
    if not _NAME.fullmatch(name):
        problems.append(
            f"`name`: got {form.name!r}; use letters, digits, `_`, `-` or `.` (it becomes the file "
            "name and the `<lora:name:0.8>` tag)"
        )
    data_dir = Path(form.data_dir.strip()).expanduser() if form.data_dir.strip() else None
    if data_dir is None or not data_dir.is_dir():
        problems.append(f"`images`: folder {form.data_dir!r} does not exist; pick a folder or upload images")
    if not form.base_model.strip():
        problems.append("`base model`: none chosen; pick a checkpoint or give a path")
    if form.length_unit not in LENGTH_UNITS:
        problems.append(f"`length unit`: got {form.length_unit!r}; use steps or epochs")
    for label, value, low in (
        ("rank", form.rank, 1),
        (form.length_unit, form.length, 1),
        ("resolution", form.resolution, 64),
    ):
        if not isinstance(value, (int, float)) or int(value) != value or value < low:
            problems.append(f"`{label}`: got {value!r}; use a whole number ≥ {low}")
    if not (isinstance(form.learning_rate, (int, float)) and form.learning_rate > 0):
        problems.append(f"`learning rate`: got {form.learning_rate!r}; use a positive number such as 1e-4")
    prompts = [line.strip() for line in form.sample_prompts.splitlines() if line.strip()]
    every = form.sample_every or 0
    if not isinstance(every, (int, float)) or int(every) != every or every < 0:
        problems.append(f"`sample every`: got {every!r}; use a whole number of steps (0: only at the end)")
    extra, extra_problems = _extra_fields(form.extra)
    problems += extra_problems
    if problems:
        raise FormError(problems)
    assert data_dir is not None
    fields: dict[str, Any] = {
        "train_data_dir": str(data_dir.resolve()),
        "base_model": form.base_model.strip(),
        "lora_rank": int(form.rank),
        "resolution": int(form.resolution),
        "learning_rate": float(form.learning_rate),
        "output_dir": str(output_dir),
        "output_name": name,
    }
    if uses_csv(data_dir):
        fields["metadata_path"] = str((data_dir / METADATA_CSV).resolve())
    if form.trigger_word.strip():
        fields["trigger_word"] = form.trigger_word.strip()
    # lorad's max_train_steps overrides epochs, so one of the two is enough.
    fields["max_train_steps" if form.length_unit == "steps" else "epochs"] = int(form.length)
    if prompts:
        fields["sample_prompts"] = prompts
        # Without a period the samples still come once, at the end, beside the contact sheet.
        fields["sample_every_n_steps" if every else "sample_at_first"] = int(every) if every else True
    fields.update(extra)
    return fields
