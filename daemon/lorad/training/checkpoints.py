"""Resumable checkpoints: LoRA weights + optimizer + scheduler + step + RNG state.

Layout: ``<output_dir>/checkpoints/step-000100/`` holding ``lora.safetensors`` (fp32, peft keys
prefixed by part), ``state.pt`` (optimizer, scheduler, grad scaler, RNG) and ``meta.json`` (step,
epoch, and the config values that must not change across a resume). Each folder is written
atomically, so a crash mid-save never leaves a checkpoint that looks complete but is not.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorad.atomic import atomic_directory
from lorad.errors import ConfigError, ConfigProblem

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: where it is, the LoRA weights per part, and the training state."""

    path: Path
    step: int
    epoch: int
    lora: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    signature: dict[str, Any]


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    output_dir: Path,
    *,
    step: int,
    epoch: int,
    lora: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    signature: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``step-NNNNNN`` atomically, then delete all but the newest ``keep`` checkpoints."""
    dest = checkpoint_root(output_dir) / f"step-{step:06d}"
    flat = {
        f"{part}.{key}": t.detach().to("cpu", torch.float32).contiguous()
        for part, state in lora.items()
        for key, t in state.items()
    }
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python_rng": random.getstate(),
    }
    with atomic_directory(dest) as tmp:
        save_file(flat, str(tmp / "lora.safetensors"))
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "epoch": epoch, "signature": signature}, indent=2))
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def resolve_checkpoint(path: Path, output_dir: Path) -> Path:
    """``…/checkpoints/latest`` → the newest checkpoint folder; a config error when there is none."""
    if path.name == "latest" and not path.exists():
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(
                [
                    ConfigProblem(
                        "resume_from",
                        f"no checkpoint in {checkpoint_root(output_dir)}",
                        "train with save_steps set first, or remove resume_from",
                    )
                ]
            )
        return found[-1]
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors only, no pickle code)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        flat = load_file(str(path / "lora.safetensors"))
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(
            [
                ConfigProblem(
                    "resume_from",
                    f"{path} is not a complete lorad checkpoint ({err})",
                    "choose another folder under output_dir/checkpoints/",
                )
            ]
        ) from None
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        part, _, rest = key.partition(".")
        lora.setdefault(part, {})[rest] = tensor
    return Checkpoint(
        path=path,
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        lora=lora,
        state=state,
        signature=meta.get("signature", {}),
    )


def check_signature(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """A resume must keep the settings that shape the run; list every one that changed."""
    problems = [
        ConfigProblem(
            key,
            f"is {current.get(key)!r} but the checkpoint was trained with {value!r}",
            f"set it back to {value!r} to resume, or start a new run without resume_from",
        )
        for key, value in saved.items()
        if current.get(key) != value
    ]
    if problems:
        raise ConfigError(problems, "resume_from")


def restore_rng(state: dict[str, Any]) -> None:
    """Put the global RNGs back as they were when the checkpoint was saved (LoRA dropout uses them)."""
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    py = state["python_rng"]
    random.setstate((py[0], tuple(py[1]), py[2]))
