"""Which of a watched folder's new files would train, and whether two watches' versions collide.

A new version is worth training only when something it would train on is new: a file that training
skips (corrupt, truncated, an unsupported type, or without a caption when no captioner writes one)
changes nothing, so dropping only such files into the folder queues no job.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lorad.data.captions import read_metadata_csv, read_sidecar
from lorad.data.dataset import image_problem
from lorad.errors import ConfigError, ConfigProblem, DataError


def unusable_reasons(root: Path, rels: Iterable[str], fields: Mapping[str, Any]) -> dict[str, str]:
    """For each of ``rels`` (image paths relative to ``root``) that a job with config ``fields`` would
    skip, why. Captions are looked up as the job looks them up: the folder's metadata.csv row when
    ``fields`` names a metadata_path, else the sidecar file; none is needed when it names a captioner."""
    extension = str(fields.get("caption_extension") or ".txt")
    csv_captions: Mapping[str, str] = {}
    metadata = fields.get("metadata_path")
    if metadata and Path(str(metadata)).is_file():
        try:
            csv_captions = read_metadata_csv(Path(str(metadata))).captions
        except DataError:
            return {}  # the job itself reports a broken metadata.csv; nothing is filtered here
    reasons: dict[str, str] = {}
    for rel in rels:
        path = root / rel
        problem = image_problem(path)
        if problem is None and not fields.get("captioner") and rel not in csv_captions:
            try:
                has_caption = read_sidecar(path, extension) is not None
            except ValueError:  # SidecarError: the caption file exists but cannot be used
                has_caption = False
            problem = None if has_caption else "no caption (and the template names no captioner)"
        if problem is not None:
            reasons[rel] = problem
    return reasons


def versions_target(fields: Mapping[str, Any]) -> tuple[Path, str]:
    """Where a watch's versions go: (the folder its ``NAME_vN`` folders are made in, NAME)."""
    output_dir = Path(str(fields["output_dir"]))
    return output_dir.parent, str(fields["output_name"]).rpartition("_v")[0]


def version_clash(
    folder: str, fields: Mapping[str, Any], others: Iterable[tuple[str, Mapping[str, Any]]]
) -> ConfigError | None:
    """The error for a watch of ``folder`` whose versions would land where another watch's do (both
    would write ``NAME_v1``, ``NAME_v2``, ... into the same folder and overwrite each other), or None.
    ``others`` are (folder, job fields) of the other watches."""
    root, name = versions_target(fields)
    for other_folder, other_fields in others:
        if other_folder != folder and versions_target(other_fields) == (root, name):
            return ConfigError(
                [
                    ConfigProblem(
                        "config_path",
                        f"the watch of {other_folder} already writes its versions {name}_v1, {name}_v2, ... "
                        f"into {root} with the same output_name and output_dir; the two would overwrite "
                        "each other's LoRAs",
                        f"give this watch a template of its own with another output_name (e.g. "
                        f"`output_name: {name}_{Path(folder).name}`) or output_dir",
                    )
                ],
                "watch",
            )
    return None
