"""What a dataset scan found: used images, skipped files with their reasons, caption sources.

The report is shown to the user before training (``render``) and stored with the run
(``to_dict``), so a user can see at a glance why an image was not trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

# Long lists are cut so a folder with thousands of broken files still gives a readable report.
RENDER_LIMIT = 20


@dataclass(frozen=True)
class SkippedImage:
    """An image file that will not be trained on.

    ``path`` is relative to ``train_data_dir`` (posix separators); ``reason`` is a short phrase
    a user can act on, e.g. "truncated image" or "no caption (add a metadata.csv row or <stem>.txt)".
    """

    path: str
    reason: str


def _frozen_mapping(value: Mapping[str, Any]) -> Mapping[str, Any]:
    # Read-only views keep the frozen report actually immutable; nested mappings too.
    return MappingProxyType({k: _frozen_mapping(v) if isinstance(v, Mapping) else v for k, v in value.items()})


@dataclass(frozen=True)
class DataReport:
    """The result of scanning ``train_data_dir``.

    ``images_found`` counts every image file seen, including types lorad does not read (they
    are skipped with a reason); the invariant is ``images_found == images_used + len(skipped)``.

    ``repeats_total`` is the sum of every used image's repeats: the number of samples per epoch.
    ``buckets`` maps "WxH" to the number of *images* (not samples) in that bucket; the scan
    does not know the bucket settings, so it is empty until the caller adds it with
    :meth:`with_buckets`. ``tag_frequency`` has kohya's ``ss_tag_frequency`` shape:
    folder → tag → number of images whose caption has that tag.
    """

    train_data_dir: str
    images_found: int
    images_used: int
    skipped: tuple[SkippedImage, ...] = ()
    csv_problems: tuple[str, ...] = ()
    captions_from_csv: int = 0
    captions_from_sidecars: int = 0
    captions_generated: int = 0
    repeats_total: int = 0
    buckets: Mapping[str, int] = field(default_factory=dict)
    tag_frequency: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "skipped", tuple(self.skipped))
        object.__setattr__(self, "csv_problems", tuple(self.csv_problems))
        object.__setattr__(self, "buckets", _frozen_mapping(self.buckets))
        object.__setattr__(self, "tag_frequency", _frozen_mapping(self.tag_frequency))

    def with_buckets(self, buckets: Mapping[str, int]) -> DataReport:
        """A copy of this report with ``buckets`` ("WxH" → image count) filled in."""
        return dataclasses.replace(self, buckets=buckets)

    def render(self) -> str:
        """A compact multi-line report for humans; every skip is listed with its reason.

        At most ``RENDER_LIMIT`` skips and CSV problems are listed, then "... and N more".
        """
        lines = [f"Training data: {self.train_data_dir}"]
        lines.append(
            f"  {self.images_found} image file{_s(self.images_found)} found, "
            f"{self.images_used} used, {len(self.skipped)} skipped"
        )
        lines.append(
            f"  captions: {self.captions_from_csv} from the metadata CSV, "
            f"{self.captions_from_sidecars} from sidecar files, {self.captions_generated} generated"
        )
        lines.append(f"  samples per epoch (images × repeats): {self.repeats_total}")
        if self.buckets:
            ordered = sorted(self.buckets.items(), key=lambda kv: (-kv[1], kv[0]))
            lines.append("  buckets: " + ", ".join(f"{name} ({count})" for name, count in ordered))
        if self.skipped:
            lines.append(f"  skipped ({len(self.skipped)}):")
            lines += _limited([f"{s.path}: {s.reason}" for s in self.skipped])
        if self.csv_problems:
            lines.append(f"  metadata CSV problems ({len(self.csv_problems)}):")
            lines += _limited(list(self.csv_problems))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and ints only: safe for ``json.dumps``."""
        return {
            "train_data_dir": self.train_data_dir,
            "images_found": self.images_found,
            "images_used": self.images_used,
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "csv_problems": list(self.csv_problems),
            "captions_from_csv": self.captions_from_csv,
            "captions_from_sidecars": self.captions_from_sidecars,
            "captions_generated": self.captions_generated,
            "repeats_total": self.repeats_total,
            "buckets": dict(self.buckets),
            "tag_frequency": {folder: dict(tags) for folder, tags in self.tag_frequency.items()},
        }


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def _limited(items: list[str]) -> list[str]:
    shown = [f"    - {item}" for item in items[:RENDER_LIMIT]]
    if len(items) > RENDER_LIMIT:
        shown.append(f"    ... and {len(items) - RENDER_LIMIT} more")
    return shown
