"""Putting a model folder into a Hugging Face cache the way the hub client lays it out (offline)."""

from __future__ import annotations

import shutil
from pathlib import Path


def put_in_hf_cache(cache: Path, repo_id: str, source: Path, subfolder: str = "") -> Path:
    """Lay ``source``'s files out as a cached snapshot of ``repo_id`` (the layout huggingface_hub reads)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot / subfolder, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
