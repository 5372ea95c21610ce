"""Text for the screens: job table cells, model rows, the status lines. Pure functions of the view.

Every time shown is computed from the caller's ``now`` (the App's clock), never read here, so a
test with a fixed clock draws the same screen every run.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp
from rich.text import Text

from lorad_api.v1.models_pb2 import ResidentModel
from lorad_api.v1.system_pb2 import GetStatusResponse
from lorad_client import (
    JOB_STATE_CANCELLED,
    JOB_STATE_FAILED,
    JOB_STATE_INTERRUPTED,
    JOB_STATE_QUEUED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
    Job,
)
from lorad_client.format import format_bytes, format_duration, job_state_name
from lorad_tui.state import JobView

JOB_COLUMNS = ("NAME", "STATE", "PROGRESS", "LOSS", "ETA", "STARTED")
MODEL_COLUMNS = ("MODEL", "VERSION", "DEVICE", "DTYPE", "MEMORY", "KEEP-ALIVE")

# Rich styles per state; the theme-independent colours read on dark and light terminals alike.
STATE_STYLES = {
    JOB_STATE_QUEUED: "yellow",
    JOB_STATE_RUNNING: "bold cyan",
    JOB_STATE_SUCCEEDED: "green",
    JOB_STATE_FAILED: "bold red",
    JOB_STATE_CANCELLED: "magenta",
    JOB_STATE_INTERRUPTED: "yellow",
}


def state_text(job: Job) -> Text:
    """The job's state as a coloured word ("queued #2" while waiting in line)."""
    label = job_state_name(job.state)
    if job.state == JOB_STATE_QUEUED and job.queue_position:
        label += f" #{job.queue_position}"
    return Text(label, style=STATE_STYLES.get(job.state, ""))


def ago(stamp: Timestamp, now: float) -> str:
    """"3m05s ago" for a set timestamp, "-" for an unset one."""
    if not stamp.seconds:
        return "-"
    return f"{format_duration(max(0.0, now - stamp.seconds))} ago"


def job_cells(view: JobView, now: float) -> tuple[str | Text, ...]:
    """The job table's cells for one job, in ``JOB_COLUMNS`` order."""
    job, progress = view.job, view.job.progress
    if progress.total_steps:
        percent = 100 * progress.step // progress.total_steps
        steps = f"{progress.step}/{progress.total_steps} {percent:>3}%"
    else:
        steps = "-"
    loss = f"{progress.loss:.4f}" if progress.step else "-"
    running = job.state == JOB_STATE_RUNNING and progress.steps_per_second > 0
    eta = format_duration(progress.eta_seconds) if running else "-"
    return (job.name or job.job_id, state_text(job), steps, loss, eta, ago(job.started_at, now))


def model_cells(model: ResidentModel, keep_alive_left: float) -> tuple[str | Text, ...]:
    """The models table's cells for one resident model, in ``MODEL_COLUMNS`` order."""
    keep = Text("in use", style="bold cyan") if model.in_use else Text(format_duration(keep_alive_left))
    return (Path(model.source).name or model.source, model.model_version, model.device, model.dtype,
            format_bytes(model.memory_bytes), keep)


def status_text(status: GetStatusResponse, uptime: float, running_name: str) -> Text:
    """Two or three lines about the daemon: version, pid, uptime, address; devices; queue."""
    text = Text()
    text.append(f"lorad {status.version}", style="bold")
    text.append(f" · pid {status.pid} · up {format_duration(uptime)}")
    if status.addresses:
        text.append(f" · {status.addresses[0]}")
    if status.token_required:
        text.append(" · token required")
    for device in status.devices:
        used = format_bytes(device.memory_used_bytes)
        total = f" of {format_bytes(device.memory_total_bytes)}" if device.memory_total_bytes else ""
        text.append("\n")
        text.append(device.name, style="bold")
        text.append(f": {used}{total} in use" + (f" · {device.description}" if device.description else ""))
    text.append("\n")
    text.append(f"queue: {status.queue_length} waiting · running: ")
    text.append(running_name or "nothing", style="bold cyan" if running_name else "")
    return text
