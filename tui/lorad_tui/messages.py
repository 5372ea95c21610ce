"""The messages the TUI's parts send each other.

Three directions, three groups:

- **worker → App**: results of network calls, posted from worker threads (``post_message`` is
  thread-safe); the App folds them into its ``DaemonView``.
- **screen → App**: what the user asked for (open a job, submit, cancel); they bubble from the
  screen to the App, which owns the connection and runs the call in a worker.
- **App → screens**: "this changed, redraw from the DaemonView"; the App posts one to each screen
  on its stack, so a screen under another one is current when it shows again.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from textual.message import Message

from lorad_api.v1.caption_pb2 import CaptionImagesResponse, ListCaptionsResponse, SetCaptionsResponse
from lorad_api.v1.lora_tools_pb2 import InspectLoraResponse
from lorad_api.v1.models_pb2 import ResidentModel
from lorad_api.v1.system_pb2 import GetStatusResponse
from lorad_api.v1.watch_pb2 import FollowWatchesResponse, Watch
from lorad_client import Job, WatchJobResponse

if TYPE_CHECKING:
    from lorad_tui.connection import DaemonClient


# -- worker → App ---------------------------------------------------------------------------------


class DaemonDown(Message):
    """No daemon answered a connection attempt; ``reason`` is the client's explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason


class Connected(Message):
    """A daemon answered: ``client`` is open, ``status`` its first status, ``services`` what it serves."""

    def __init__(self, client: DaemonClient, status: GetStatusResponse, services: frozenset[str]) -> None:
        super().__init__()
        self.client = client
        self.status = status
        self.services = services


class ConnectionLost(Message):
    """A call through ``client`` found the daemon gone (UNAVAILABLE)."""

    def __init__(self, client: DaemonClient, reason: str) -> None:
        super().__init__()
        self.client = client
        self.reason = reason


class Polled(Message):
    """A status + resident models refresh through ``client``, fetched at App-clock time ``at``."""

    def __init__(self, client: DaemonClient, status: GetStatusResponse, models: list[ResidentModel], at: float) -> None:
        super().__init__()
        self.client = client
        self.status = status
        self.models = models
        self.at = at


class JobsLoaded(Message):
    """The full job list (newest first)."""

    def __init__(self, jobs: list[Job]) -> None:
        super().__init__()
        self.jobs = jobs


class Streamed(Message):
    """One message of a WatchJob stream for ``job_id`` (its state first, then one event each)."""

    def __init__(self, job_id: str, item: WatchJobResponse) -> None:
        super().__init__()
        self.job_id = job_id
        self.item = item


class StreamEnded(Message):
    """A WatchJob stream ended: normally (``error`` empty) or with the daemon's error text."""

    def __init__(self, job_id: str, error: str = "") -> None:
        super().__init__()
        self.job_id = job_id
        self.error = error


class Submitted(Message):
    """The daemon queued ``job``."""

    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job


class Cancelled(Message):
    """The daemon took a cancel request; ``job`` is its state right after (running jobs stop shortly)."""

    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job


class CallFailed(Message):
    """A user-requested call (``what``: "submit", "cancel") was refused; ``error`` is the daemon's text."""

    def __init__(self, what: str, error: str) -> None:
        super().__init__()
        self.what = what
        self.error = error


# -- screen → App ---------------------------------------------------------------------------------


class OpenJob(Message):
    """Show the detail screen of ``job_id``."""

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id


class CloseJob(Message):
    """The detail screen of ``job_id`` went away (its stream may stop if nothing else needs it)."""

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id


class SubmitRequested(Message):
    """Queue the config ``text`` read from ``path`` (already validated locally)."""

    def __init__(self, path: Path, text: str) -> None:
        super().__init__()
        self.path = path
        self.text = text


class RefreshRequested(Message):
    """Fetch the status, models and the whole job list now (the user pressed refresh)."""


class CancelRequested(Message):
    """Cancel ``job_id`` (the user has confirmed)."""

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id


class RunRequested(Message):
    """Ask the running job ``job_id`` to ``what`` ("sample": draw its prompts now; "save": save now)."""

    def __init__(self, job_id: str, what: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.what = what


class RunAnswered(Message):
    """The running job did what was asked (``what``: "sample" or "save"); ``lines`` describe the result."""

    def __init__(self, job_id: str, what: str, lines: list[str]) -> None:
        super().__init__()
        self.job_id = job_id
        self.what = what
        self.lines = lines


# -- App → screens --------------------------------------------------------------------------------


class ViewChanged(Message):
    """The DaemonView changed: ``job_ids`` the jobs that did (empty = status, models or the list)."""

    bubble = False  # for the screen it was sent to only; the App sent it

    def __init__(self, job_ids: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.job_ids = job_ids


class SubmitRejected(Message):
    """The daemon refused a submitted config; ``error`` is its message (every problem, by key)."""

    bubble = False

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


# -- section screens: their own workers → the screen ----------------------------------------------
# Screens of optional services (captions, watches) make their calls in workers of their own, through
# the App's client, and post the results to themselves; none of these bubble to the App.


class CaptionStreamed(Message):
    """One message of a CaptionImages stream."""

    bubble = False

    def __init__(self, item: CaptionImagesResponse) -> None:
        super().__init__()
        self.item = item


class CaptionsListed(Message):
    """A folder's captions (ListCaptions)."""

    bubble = False

    def __init__(self, listing: ListCaptionsResponse) -> None:
        super().__init__()
        self.listing = listing


class CaptionsSaved(Message):
    """SetCaptions wrote the edits; ``saved`` is its answer (the edited rows as they read now)."""

    bubble = False

    def __init__(self, saved: SetCaptionsResponse) -> None:
        super().__init__()
        self.saved = saved


class SectionCallFailed(Message):
    """A call of a section screen (``what``: "caption", "list", "save", "add watch", ...) failed;
    ``error`` is the daemon's text (every problem, with the path or key)."""

    bubble = False

    def __init__(self, what: str, error: str) -> None:
        super().__init__()
        self.what = what
        self.error = error


class LoraInspected(Message):
    """InspectLora's report on a LoRA file."""

    bubble = False

    def __init__(self, report: InspectLoraResponse) -> None:
        super().__init__()
        self.report = report


class WatchAdded(Message):
    """AddWatch took the folder; ``watch`` is its state right after."""

    bubble = False

    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch


class WatchRemoved(Message):
    """RemoveWatch stopped watching; ``watch`` is its last state."""

    bubble = False

    def __init__(self, watch: Watch) -> None:
        super().__init__()
        self.watch = watch


# -- worker → App (watched folders) ---------------------------------------------------------------


class WatchesStreamed(Message):
    """One message of the FollowWatches stream through ``client`` (the snapshot first, then changes)."""

    def __init__(self, client: DaemonClient, item: FollowWatchesResponse) -> None:
        super().__init__()
        self.client = client
        self.item = item
