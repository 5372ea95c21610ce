"""How the TUI reaches the daemon: the client surface it uses, and the default way to connect.

The App never builds a client itself: it calls a ``Connector``. The default one is
``LoradClient.connect`` (the same discovery as the CLI: the address argument, ``$LORAD_ADDRESS``,
then the daemon's discovery file in ``$LORAD_HOME``); tests pass a connector that returns a fake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from lorad_api.v1.caption_pb2 import CaptionImagesResponse, ListCaptionsResponse, SetCaptionsResponse
from lorad_api.v1.lora_tools_pb2 import InspectLoraResponse
from lorad_api.v1.models_pb2 import ResidentModel
from lorad_api.v1.system_pb2 import GetStatusResponse
from lorad_api.v1.watch_pb2 import FollowWatchesResponse, Watch
from lorad_client import Job, JobEvent, LoradClient, WatchJobResponse

# How long one connection attempt waits for the daemon to answer. Short: a missing daemon should
# show the "start one" screen at once, and the retry loop tries again soon anyway.
CONNECT_TIMEOUT = 1.5


class JobStream(Protocol):
    """A WatchJob stream: iterate for messages; ``cancel()`` (from any thread) ends it."""

    def __iter__(self) -> Iterator[WatchJobResponse]: ...

    def cancel(self) -> None: ...


class CaptionStream(Protocol):
    """A CaptionImages stream: iterate for messages; ``cancel()`` (from any thread) ends it."""

    def __iter__(self) -> Iterator[CaptionImagesResponse]: ...

    def cancel(self) -> None: ...


class WatchesStream(Protocol):
    """A FollowWatches stream: iterate for messages; ``cancel()`` (from any thread) ends it."""

    def __iter__(self) -> Iterator[FollowWatchesResponse]: ...

    def cancel(self) -> None: ...


class DaemonClient(Protocol):
    """The part of ``lorad_client.LoradClient`` the TUI uses (a fake in tests implements the same).

    Every method may raise ``lorad_client.LoradRpcError``; ``DaemonUnavailable`` means the daemon
    is gone and the TUI goes back to reconnecting.
    """

    def status(self) -> GetStatusResponse: ...

    def list_models(self) -> list[ResidentModel]: ...

    def list_jobs(self, states: Sequence[int] = (), limit: int = 0) -> list[Job]: ...

    def get_job(self, job_id: str) -> Job: ...

    def submit_training(self, config_yaml: str, *, base_dir: str | Path, source_name: str = "") -> Job: ...

    def cancel_job(self, job_id: str) -> Job: ...

    def sample_now(self, job_id: str) -> list[JobEvent]: ...

    def save_now(self, job_id: str) -> list[JobEvent]: ...

    def watch_job(self, job_id: str, after_seq: int = 0, *, history_only: bool = False) -> JobStream: ...

    def health(self, service: str = "") -> str: ...

    # CaptionService (the captions screen)

    def caption_images(
        self, folder: str | Path, *, base_dir: str | Path, captioner: int = ..., model: str = ""
    ) -> CaptionStream: ...

    def list_captions(self, folder: str | Path, *, base_dir: str | Path) -> ListCaptionsResponse: ...

    def set_captions(
        self, folder: str | Path, edits: Mapping[str, str], *, base_dir: str | Path
    ) -> SetCaptionsResponse: ...

    # WatchService (the watches screen and the dashboard's watched folders), when the daemon serves it

    def add_watch(
        self,
        folder: str,
        config_path: str,
        *,
        base_dir: str | None = None,
        quiet_seconds: float = 0,
        min_new_images: int = 0,
        mode: str = "continue",
        continue_steps: int = 0,
        publish_dir: str = "",
        polling: bool = False,
    ) -> Watch: ...

    def remove_watch(self, watch: str, *, base_dir: str | None = None) -> Watch: ...

    def list_watches(self) -> list[Watch]: ...

    def follow_watches(self) -> WatchesStream: ...

    # LoraToolsService (a finished job's LoRA, inspected from its detail)

    def inspect_lora(self, path: str | Path, *, base_dir: str | Path | None = None) -> InspectLoraResponse: ...

    def close(self) -> None: ...


Connector = Callable[[], DaemonClient]


def daemon_connector(address: str | None = None, home: Path | None = None) -> Connector:
    """A connector that finds the local daemon as the CLI does (``address`` and ``home`` override
    ``$LORAD_ADDRESS`` / ``$LORAD_HOME``). Each call discovers afresh, so a daemon that restarted on
    another port is found. Raises ``DaemonUnavailable`` when nothing answers."""

    def connect() -> DaemonClient:
        return LoradClient.connect(address, home=home, timeout=CONNECT_TIMEOUT)

    return connect
