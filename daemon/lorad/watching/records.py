"""A watch's plain values: its policy, its persisted record, and the live view ListWatches shows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from lorad.config.limits import number_problem, shown
from lorad.config.schema import MAX_STEPS
from lorad.errors import ConfigError, ConfigProblem, LoradError
from lorad.watching.debounce import DEFAULT_QUIET_SECONDS
from lorad.watching.file_rules import FileStat

CONTINUE, RETRAIN = "continue", "retrain"
MODES = (CONTINUE, RETRAIN)
MAX_QUIET_SECONDS = 86_400.0
MAX_NEW_IMAGES = 100_000


class WatchState(str, Enum):
    """What a watch is doing (not stored: worked out again after a restart)."""

    IDLE = "idle"
    SETTLING = "settling"
    CAPTIONING = "captioning"
    TRAINING = "training"
    ERROR = "error"


class WatchExists(LoradError):
    """The folder is watched already."""


class WatchNotFound(LoradError):
    """No watch has that id or folder."""

    def __init__(self, message: str, hint: str = "`lorad watch ls` lists the watches, their ids and folders") -> None:
        super().__init__(message, hint)


@dataclass(frozen=True)
class WatchPolicy:
    """When and how a watch trains; :func:`watch_policy` validates one."""

    quiet_seconds: float = DEFAULT_QUIET_SECONDS
    min_new_images: int = 1
    mode: str = CONTINUE
    continue_steps: int = 0  # 0: the config's own budget
    publish_dir: str = ""
    polling: bool = False

    def to_dict(self) -> dict[str, object]:
        return {
            "quiet_seconds": self.quiet_seconds,
            "min_new_images": self.min_new_images,
            "mode": self.mode,
            "continue_steps": self.continue_steps,
            "publish_dir": self.publish_dir,
            "polling": self.polling,
        }


def watch_policy(
    *,
    quiet_seconds: float = 0,
    min_new_images: int = 0,
    mode: str = "",
    continue_steps: int = 0,
    publish_dir: str = "",
    polling: bool = False,
    source: str = "watch",
) -> WatchPolicy:
    """A policy with defaults for zero values (quiet 10 s, 1 new image, continue). Raises ConfigError
    naming every bad field. ``publish_dir`` must already be absolute."""
    mode = (mode or CONTINUE).strip().lower()
    checks = (
        number_problem("quiet_seconds", quiet_seconds, 0, MAX_QUIET_SECONDS, "use 0 (the default, 10) to 86400"),
        number_problem("min_new_images", min_new_images, 0, MAX_NEW_IMAGES, "use 1 to 100000 (0 = 1)"),
        None if mode in MODES else ConfigProblem("mode", f"got {shown(mode)}", "use continue or retrain"),
        number_problem(
            "continue_steps", continue_steps, 0, MAX_STEPS, "use 1 to 10000000, or 0 for the config's own step budget"
        ),
    )
    problems = [problem for problem in checks if problem is not None]
    if problems:
        raise ConfigError(problems, source)
    return WatchPolicy(
        quiet_seconds=quiet_seconds or DEFAULT_QUIET_SECONDS,
        min_new_images=min_new_images or 1,
        mode=mode,
        continue_steps=continue_steps,
        publish_dir=publish_dir,
        polling=polling,
    )


@dataclass(frozen=True)
class WatchRecord:
    """One watch as stored. ``known`` is the folder's images (relative path -> size, mtime) as of
    the watch's last queued job: images not in it, or changed since, are new. ``queued_version`` is
    the version the newest queued job writes; ``version`` that of the newest finished LoRA."""

    watch_id: str
    folder: str
    config_path: str
    base_dir: str  # relative paths in the config resolve against it (the adding client's directory)
    policy: WatchPolicy
    created_at: float
    updated_at: float
    last_job_id: str = ""
    version: int = 0
    queued_version: int = 0
    latest_output: str = ""
    published_path: str = ""
    known: Mapping[str, FileStat] = field(default_factory=dict)


@dataclass(frozen=True)
class WatchView:
    """A watch as ListWatches shows it: the record plus what it is doing now."""

    record: WatchRecord
    state: WatchState
    error: str = ""
    hint: str = ""
    images_seen: int = 0
    new_images: int = 0
    pending_files: int = 0
    updated_at: float = 0.0
