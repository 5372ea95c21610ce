"""Text for the screens: job table cells, model rows, the status lines. Pure functions of the view.

Every time shown is computed from the caller's ``now`` (the App's clock), never read here, so a
test with a fixed clock draws the same screen every run.
"""

from __future__ import annotations

from pathlib import Path

from rich.text import Text

from lorad_api.v1 import watch_pb2
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
from lorad_client.format import format_bytes, format_duration, job_state_label
from lorad_client.format import job_cells as format_job_cells
from lorad_tui.state import JobView

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
    return Text(job_state_label(job), style=STATE_STYLES.get(job.state, ""))


def job_cells(view: JobView, now: float) -> tuple[str | Text, ...]:
    """The job table's cells for one job, in ``JOB_COLUMNS`` order (lorad_client.format's wording, state coloured)."""
    name, _, *rest = format_job_cells(view.job, now)
    return (name, state_text(view.job), *rest)


def model_cells(model: ResidentModel, keep_alive_left: float) -> tuple[str | Text, ...]:
    """The models table's cells for one resident model, in ``MODEL_COLUMNS`` order."""
    keep = Text("in use", style="bold cyan") if model.in_use else Text(format_duration(keep_alive_left))
    return (
        Path(model.source).name or model.source,
        model.model_version,
        model.device,
        model.dtype,
        format_bytes(model.memory_bytes),
        keep,
    )


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
        if device.worker_state and device.worker >= 0:  # a device's worker process (daemons since issue 20)
            job = f" {device.running_job_id}" if device.running_job_id else ""
            text.append(f" · worker {device.worker} {device.worker_state}{job} · {device.resident_models} resident")
    text.append("\n")
    text.append(f"queue: {status.queue_length} waiting · running: ")
    text.append(running_name or "nothing", style="bold cyan" if running_name else "")
    return text


# -- watched folders ------------------------------------------------------------------------------

WATCH_COLUMNS = ("FOLDER", "STATE", "IMAGES", "NEW", "LORA", "LAST JOB")

WATCH_STATE_NAMES = {
    watch_pb2.WATCH_STATE_IDLE: ("idle", "green"),
    watch_pb2.WATCH_STATE_SETTLING: ("settling", "yellow"),
    watch_pb2.WATCH_STATE_CAPTIONING: ("captioning", "bold cyan"),
    watch_pb2.WATCH_STATE_TRAINING: ("training", "bold cyan"),
    watch_pb2.WATCH_STATE_ERROR: ("error", "bold red"),
}


def watch_state_text(watch: watch_pb2.Watch) -> Text:
    """The watch's state as a coloured word."""
    name, style = WATCH_STATE_NAMES.get(watch.state, ("unknown", ""))
    return Text(name, style=style)


def shorten_folder(folder: str, width: int) -> str:
    """``folder`` in at most ``width`` characters: its home shown as ~, its start cut to "…" (the end
    names the folder, so it is what is kept)."""
    home = str(Path.home())
    if folder == home or folder.startswith(home + "/"):
        folder = "~" + folder[len(home) :]
    return folder if len(folder) <= width else "…" + folder[-(width - 1) :]


def watch_cells(watch: watch_pb2.Watch, folder_width: int = 40) -> tuple[str | Text, ...]:
    """The watch table's cells for one watch, in ``WATCH_COLUMNS`` order."""
    lora = f"v{watch.version}" if watch.version else "-"
    return (
        shorten_folder(watch.folder, folder_width),
        watch_state_text(watch),
        str(watch.images_seen),
        str(watch.new_images),
        lora,
        watch.last_job_id[:10] or "-",
    )


def watch_detail(watch: watch_pb2.Watch) -> Text:
    """Lines about one watch under its table: config, policy, latest LoRA, or the error and its hint."""
    policy = watch.policy
    mode = "retrain" if policy.mode == watch_pb2.WATCH_MODE_RETRAIN else "continue"
    text = Text()
    text.append("config: ", style="bold")
    text.append(f"{watch.config_path}\n")
    text.append("policy: ", style="bold")
    text.append(
        f"{mode}"
        + (f" {policy.continue_steps} steps" if policy.continue_steps else "")
        + f" · after {policy.quiet_seconds:g}s quiet · at least {policy.min_new_images} new"
        + (" · polling" if policy.polling else "")
    )
    if watch.state == watch_pb2.WATCH_STATE_ERROR:
        text.append(f"\n✗ {watch.error}", style="bold red")
        if watch.hint:
            text.append(f"\nhint: {watch.hint}")
    elif watch.latest_output:
        text.append("\nlatest: ", style="bold")
        text.append(watch.latest_output + (f" (published to {watch.published_path})" if watch.published_path else ""))
    return text
