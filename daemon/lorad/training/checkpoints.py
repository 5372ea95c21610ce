"""Resumable checkpoints: LoRA weights + optimizer + scheduler + step + RNG state, owned by one run.

Layout: ``<output_dir>/checkpoints/step-000100/`` holding ``lora.safetensors`` (fp32, peft keys
prefixed by part), ``state.pt`` (optimizer, scheduler, grad scaler, RNG) and ``meta.json`` (step,
epoch, the run id, the config values that must not change across a resume, the memory settings
out-of-memory recovery reached, and each file's size and SHA-256). Each folder is written
atomically, so a crash mid-save never leaves a checkpoint that looks complete but is not; one
damaged later (a bad disk, a copy cut short) is recognised by its checksums.

Runs. Every training run has a run id, stored in its checkpoints; a resumed run keeps the id of
the checkpoint it resumed from. A run prunes only its own checkpoints, and ``resume_from: latest``
means the newest checkpoint of the run found in ``checkpoints/``. A run starting in an
``output_dir`` that holds another run's checkpoints moves them aside, whole, to
``checkpoints/earlier-runs/<when>-<run id>/`` (and says so), so two runs never overwrite or prune
each other's checkpoints and the earlier run stays resumable from there.

A run holds a lock on its ``output_dir`` (``.lorad-run.lock``) while it trains: a second run into the
same folder is refused, and temporary files a killed run left behind are safe to remove.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lorad.atomic import atomic_directory, remove_stale_temps, user_file_mode
from lorad.disk_space import disk_full_as_error, ensure_room, mount_point
from lorad.errors import ConfigError, ConfigProblem, LoradError, OutputError
from lorad.events import EventSink, LogLine, ignore_events

_STEP_DIR = re.compile(r"^step-(\d+)$")
LORA_FILE = "lora.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
EARLIER_RUNS = "earlier-runs"
LOCK_FILE = ".lorad-run.lock"
FORMAT_VERSION = 2  # 2: run id and per-file checksums in meta.json (1 had neither)
_STATE_KEYS = ("optimizer", "scheduler", "torch_rng", "python_rng")
# What a run writes into output_dir through lorad.atomic (their temporary files are cleaned up).
_OUTPUT_TEMP_NAMES = r"[^/]+\.safetensors|training_summary\.json|diffusers-lora|adapter(?:-partial-step\d+)?|merged"
# Room for the folder entries and file-system overhead beyond the bytes of the files themselves.
_SLACK_BYTES = 64 * 1024


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back: where it is, the LoRA weights per part, and the training state.

    ``run_id`` is the run that wrote it ("" for checkpoints from before run ids)."""

    path: Path
    step: int
    epoch: int
    lora: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    signature: dict[str, Any]
    run_id: str = ""
    memory: dict[str, Any] = field(default_factory=dict)  # MemoryRecovery.state() when it was saved


class DamagedCheckpoint(LoradError):
    """A checkpoint folder that cannot be resumed from; ``reason`` says which file and what is wrong."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path} is damaged: {reason}", "resume from an earlier checkpoint")
        self.path = path
        self.reason = reason


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def step_of(path: Path) -> int | None:
    """The step a ``step-NNNNNN`` folder name holds, or None for any other name."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders in ``output_dir/checkpoints`` (every run's), oldest (lowest step) first."""
    return _step_folders(checkpoint_root(output_dir))


def _step_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if (step := step_of(p)) is not None and p.is_dir()]
    return [p for _, p in sorted(found)]


def read_run_id(path: Path) -> str:
    """The run id of the checkpoint at ``path``, from its meta.json or, when that is damaged, from the
    header of its LoRA file; "" when neither says (a checkpoint from before run ids, or unreadable)."""
    with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
        run_id = json.loads((path / META_FILE).read_text()).get("run_id")
        if isinstance(run_id, str) and run_id:
            return run_id
    with contextlib.suppress(Exception):  # safetensors raises its own error type for a bad header
        from safetensors import safe_open

        with safe_open(str(path / LORA_FILE), framework="pt") as fh:
            return (fh.metadata() or {}).get("run_id", "")
    return ""


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _file_entry(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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
    run_id: str,
    full_disk_hint: str = "",
    memory: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``checkpoints/step-NNNNNN`` of run ``run_id`` atomically and return it. Prunes nothing:
    see :func:`prune_checkpoints`, called once the new checkpoint is recorded.

    Everything is serialised in memory first, so the exact size is known: a disk without room for
    it raises :class:`~lorad.errors.DiskFull` before anything is written, and one that fills up
    during the write raises it after the partial folder is removed (``full_disk_hint`` is its hint).
    ``extra`` (tensors, numbers, lists and dicts of them: e.g. the EMA weights) is kept in the state as
    ``state["extra"]``.
    """
    root = checkpoint_root(output_dir)
    dest = root / f"step-{step:06d}"
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
        "extra": extra or {},
    }
    lora_bytes = save_safetensors(flat, metadata={"run_id": run_id, "step": str(step)})
    buffer = io.BytesIO()
    torch.save(state, buffer)
    state_bytes = buffer.getvalue()
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "epoch": epoch,
        "run_id": run_id,
        "signature": signature,
        "memory": memory or {},
        "files": {LORA_FILE: _file_entry(lora_bytes), STATE_FILE: _file_entry(state_bytes)},
    }
    meta_bytes = json.dumps(meta, indent=2).encode()
    needed = len(lora_bytes) + len(state_bytes) + len(meta_bytes) + _SLACK_BYTES
    what = f"checkpoint {dest.name}"
    root.mkdir(parents=True, exist_ok=True)
    ensure_room(root, needed, what, full_disk_hint)
    with disk_full_as_error(root, what, needed, full_disk_hint), atomic_directory(dest, user_file=True) as tmp:
        _write_file(tmp / LORA_FILE, lora_bytes)
        _write_file(tmp / STATE_FILE, state_bytes)
        _write_file(tmp / META_FILE, meta_bytes)
    return dest


def prune_checkpoints(output_dir: Path, *, keep: int, owns: Iterable[str]) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints of the run whose ids are ``owns``; return them.

    Call it only after the newest checkpoint is recorded where a resume will look for it (the job
    store): until then the previous one is the only safe place to resume from.
    """
    owned = set(owns)
    mine = [p for p in list_checkpoints(output_dir) if read_run_id(p) in owned]
    doomed = mine[:-keep] if keep > 0 else []
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)
    return doomed


def _damaged_reason(path: Path, name: str, data: bytes, files: Any) -> str | None:
    entry = files.get(name) if isinstance(files, dict) else None
    if not isinstance(entry, dict):
        return None
    if len(data) != entry.get("bytes"):
        return f"{name} is incomplete ({len(data)} of {entry.get('bytes')} bytes)"
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        return f"{name} does not match its checksum (changed or damaged on disk)"
    return None


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (tensors only, no pickle code).

    Raises :class:`DamagedCheckpoint` naming the file at fault when a file is missing, cut short,
    fails its checksum or cannot be parsed.
    """
    if not path.is_dir():
        raise DamagedCheckpoint(path, "it is not a folder" if path.exists() else "it does not exist")
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(path, f"{META_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError):
        raise DamagedCheckpoint(path, f"{META_FILE} cannot be read as JSON") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("step", "epoch")):
        raise DamagedCheckpoint(path, f"{META_FILE} lacks the step or epoch")
    blobs: dict[str, bytes] = {}
    for name in (LORA_FILE, STATE_FILE):
        try:
            blobs[name] = (path / name).read_bytes()
        except FileNotFoundError:
            raise DamagedCheckpoint(path, f"{name} is missing") from None
        except OSError as err:
            raise DamagedCheckpoint(path, f"{name} cannot be read ({err.strerror or err})") from None
        if reason := _damaged_reason(path, name, blobs[name], meta.get("files")):
            raise DamagedCheckpoint(path, reason)
    try:
        flat = load_safetensors(blobs[LORA_FILE])
    except Exception:  # safetensors' own error type; its text adds nothing for a person
        raise DamagedCheckpoint(path, f"{LORA_FILE} is not a readable safetensors file") from None
    try:
        state = torch.load(io.BytesIO(blobs[STATE_FILE]), map_location="cpu", weights_only=True)
    except Exception:  # torch's message would suggest turning weights_only off: never do that here
        raise DamagedCheckpoint(path, f"{STATE_FILE} is not a readable checkpoint state") from None
    if not isinstance(state, dict) or any(key not in state for key in _STATE_KEYS):
        raise DamagedCheckpoint(path, f"{STATE_FILE} lacks part of the training state")
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
        run_id=str(meta.get("run_id") or ""),
        memory=meta.get("memory") or {},
    )


def _is_latest(resume_from: Path) -> bool:
    return resume_from.name == "latest" and not resume_from.exists()


def find_resume_checkpoint(resume_from: Path, output_dir: Path) -> tuple[Checkpoint, list[DamagedCheckpoint]]:
    """The checkpoint ``resume_from`` names (``…/checkpoints/latest``: the newest in ``output_dir``),
    read back, and the damaged ones passed over on the way.

    A damaged checkpoint is not the end: the newest complete earlier checkpoint of the same run in
    the same folder is used instead (the caller says so). ConfigError (naming ``resume_from``) when
    there is no checkpoint, or every candidate is damaged.
    """
    if _is_latest(resume_from):
        candidates = list_checkpoints(output_dir)[::-1]
        if not candidates:
            raise ConfigError(
                [
                    ConfigProblem(
                        "resume_from",
                        f"no checkpoint in {checkpoint_root(output_dir)}",
                        "train with save_steps set first, or remove resume_from",
                    )
                ]
            )
    else:
        candidates = [resume_from]
    damaged: list[DamagedCheckpoint] = []
    while candidates:
        path = candidates.pop(0)
        try:
            return load_checkpoint(path), damaged
        except DamagedCheckpoint as err:
            damaged.append(err)
        if len(damaged) == 1:
            candidates = _earlier_of_same_run(path)
    raise ConfigError(
        [ConfigProblem("resume_from", str(err), "") for err in damaged]
        + [
            ConfigProblem(
                "resume_from",
                "no complete checkpoint is left to resume from",
                "remove resume_from to train from the start",
            )
        ]
    )


def _earlier_of_same_run(damaged: Path) -> list[Path]:
    """Checkpoints beside ``damaged`` with a lower step and the same run id (when it is known), newest first."""
    step = step_of(damaged)
    if step is None:
        return []
    run_id = read_run_id(damaged)
    earlier = [p for p in _step_folders(damaged.parent) if (step_of(p) or 0) < step]
    return [p for p in earlier[::-1] if not run_id or read_run_id(p) in (run_id, "")]


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


# --- a run and its output folder ------------------------------------------------------------------
class OutputFolderBusy(OutputError):
    """Another run holds the lock on the same ``output_dir``."""


def _lock_output_dir(output_dir: Path) -> Any:
    """An open lock file holding an exclusive lock on ``output_dir``; OutputFolderBusy if another run has it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    handle = open(path, "a+")  # noqa: SIM115 - held open for the whole run, closed by TrainingRun.close
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks; runs are not guarded there
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise OutputFolderBusy(
            f"`output_dir`: another lorad run ({holder}) is training into {output_dir} right now",
            "wait for it to finish, or choose another output_dir",
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


class TrainingRun:
    """One run's hold on its ``output_dir``: its run id, the checkpoint it resumed from (if any), and
    saving and pruning its own checkpoints. Made by :func:`open_run`; :meth:`close` releases the lock."""

    def __init__(self, output_dir: Path, run_id: str, resumed: Checkpoint | None, lock: Any) -> None:
        self.output_dir = output_dir
        self.run_id = run_id
        self.resumed = resumed
        self._lock = lock
        # A run resumed from a checkpoint written before run ids continues that unmarked run.
        self._owns = {run_id} | ({""} if resumed is not None and not resumed.run_id else set())

    def owns(self, path: Path) -> bool:
        """Whether the checkpoint at ``path`` belongs to this run."""
        return read_run_id(path) in self._owns

    def checkpoints(self) -> list[Path]:
        """This run's checkpoints in ``checkpoints/``, oldest first."""
        return [p for p in list_checkpoints(self.output_dir) if self.owns(p)]

    def save(
        self,
        *,
        step: int,
        epoch: int,
        lora: dict[str, dict[str, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        scaler: torch.amp.GradScaler | None,
        signature: dict[str, Any],
        memory: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write this run's checkpoint for ``step`` (see :func:`save_checkpoint`); prunes nothing."""
        kept = self.checkpoints()
        disk = mount_point(checkpoint_root(self.output_dir))
        hint = (
            f"Free space on {disk} (or choose an output_dir on another disk), then resume with "
            "`resume_from: latest`"
            + (f": the previous checkpoint {kept[-1]} is kept." if kept else "; no checkpoint was written yet.")
        )
        return save_checkpoint(
            self.output_dir,
            step=step,
            epoch=epoch,
            lora=lora,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            signature=signature,
            run_id=self.run_id,
            full_disk_hint=hint,
            memory=memory,
            extra=extra,
        )

    def prune(self, keep: int) -> list[Path]:
        """Delete all but this run's newest ``keep`` checkpoints (never another run's); return them.
        Call it after the newest checkpoint is recorded (the event sink returned)."""
        return prune_checkpoints(self.output_dir, keep=keep, owns=self._owns)

    def discard(self, path: Path) -> None:
        """Delete one of this run's checkpoints (the one saved to guard the export, once it is done)."""
        if path.parent == checkpoint_root(self.output_dir) and self.owns(path):
            shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        """Release the lock on ``output_dir`` (idempotent)."""
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.close()


def _move_aside(run: TrainingRun, on_event: EventSink) -> None:
    """Move every other run's checkpoints out of ``checkpoints/`` into ``earlier-runs/<when>-<run id>/``."""
    others: dict[str, list[Path]] = {}
    for path in list_checkpoints(run.output_dir):
        if not run.owns(path):
            others.setdefault(read_run_id(path), []).append(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for run_id, paths in others.items():
        dest = checkpoint_root(run.output_dir) / EARLIER_RUNS / f"{stamp}-{run_id or 'unmarked'}"
        dest.mkdir(parents=True, exist_ok=True)
        for path in paths:
            os.replace(path, dest / path.name)
        os.chmod(dest, user_file_mode(folder=True))
        newest = dest / paths[-1].name
        span = paths[0].name if len(paths) == 1 else f"{paths[0].name} … {paths[-1].name}"
        on_event(
            LogLine(
                message=f"`output_dir` held checkpoints of another run ({span}): moved to {dest}, so this "
                f"run cannot overwrite or prune them. To continue that run instead, train with "
                f"`resume_from: {newest}`.",
                level="warning",
            )
        )


def open_run(output_dir: Path, resume_from: Path | None, *, on_event: EventSink = ignore_events) -> TrainingRun:
    """Start a run in ``output_dir``: lock it (OutputFolderBusy when another run has it), remove the
    temporary files a killed run left there, read the checkpoint ``resume_from`` names (falling back
    past damaged ones, and saying so), and move other runs' checkpoints aside (saying so).

    The returned run keeps the lock until :meth:`TrainingRun.close`. ConfigError when ``resume_from``
    has nothing usable; the lock is released then.
    """
    lock = _lock_output_dir(output_dir)
    try:
        # Under the lock no other lorad writer is in this folder: every temporary file of ours is stale.
        remove_stale_temps(checkpoint_root(output_dir), r"step-\d+", owned=True)
        remove_stale_temps(output_dir, _OUTPUT_TEMP_NAMES, owned=True)
        resumed = None
        if resume_from is not None:
            resumed, damaged = find_resume_checkpoint(resume_from, output_dir)
            for err in damaged:
                on_event(
                    LogLine(
                        message=f"{err}; resuming from {resumed.path.name} (step {resumed.step}), "
                        "the newest complete checkpoint of this run, instead",
                        level="warning",
                    )
                )
        run_id = resumed.run_id if resumed is not None and resumed.run_id else secrets.token_hex(6)
        run = TrainingRun(output_dir, run_id, resumed, lock)
        _move_aside(run, on_event)
        return run
    except BaseException:
        lock.close()
        raise
