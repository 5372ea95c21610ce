"""What the tab's buttons do, without gradio: plain functions and generators the UI wires up.

Each takes a :class:`Host` (what differs between A1111 and the standalone page) and returns or
yields the texts to show. Daemon errors become messages (the tab never shows a traceback).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from lorad_webui.api.v1 import caption_pb2, jobs_pb2
from lorad_webui.captions import CaptionFileError, list_images, read_captions, write_captions
from lorad_webui.connection import Daemon, DaemonError
from lorad_webui.form import FormError, TrainForm, config_fields
from lorad_webui.placement import place_lora
from lorad_webui.progress import JobProgress
from lorad_webui.vendored.format import describe_caption, describe_event, format_lora_report, lora_snippet

# The first is the default, as for `lorad caption` and the TUI: BLIP's sentences suit any subject
# (photos and art alike), lora-scripts users caption with it, and it runs on transformers
# alone; WD14's booru tags are the better pick for anime art, one choice down.
CAPTIONERS = {
    "blip (sentences)": caption_pb2.CAPTIONER_KIND_BLIP,
    "wd14 (tags)": caption_pb2.CAPTIONER_KIND_WD14,
    "clip (phrases)": caption_pb2.CAPTIONER_KIND_CLIP,
}
SOURCE_NAME = "webui"


class Host(Protocol):
    """Where the tab runs: A1111 (``lorad_webui.a1111``) or the standalone page."""

    def lora_dir(self) -> Path:
        """The folder the WebUI lists LoRAs from."""

    def work_dir(self) -> Path:
        """Where uploads and training runs are kept."""

    def checkpoints(self) -> dict[str, str]:
        """Base models to offer: display title → path."""

    def refresh_loras(self) -> None:
        """Make the WebUI's LoRA list show files added to ``lora_dir``."""

    def daemon_address(self) -> str:
        """The daemon address setting ("" = find the local daemon)."""

    def snippet_weight(self) -> float:
        """The weight written into the ``<lora:name:weight>`` snippet."""


def connection_status(host: Host) -> str:
    """One line: the daemon's version and address, or why it cannot be reached and how to start it."""
    try:
        with Daemon.connect(host.daemon_address()) as daemon:
            return f"Connected to lorad {daemon.version()} at {daemon.target.target}."
    except DaemonError as err:
        return str(err)


def save_uploads(files: Iterable[Any], work_dir: Path) -> Path:
    """Copy uploaded image files (paths, or gradio 3 temp-file objects with ``.name``) into a new folder
    under ``work_dir/uploads`` and return it. Non-image files are skipped."""
    folder = work_dir / "uploads" / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    for item in files:
        source = Path(item if isinstance(item, (str, os.PathLike)) else item.name)
        # gradio gives uploads random temp names but keeps the original file name last.
        if source.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            shutil.copyfile(source, folder / source.name)
    return folder


def caption_table(folder: str) -> tuple[list[list[str]], str]:
    """(rows of [image, caption], message) for the caption editor."""
    path = Path(folder.strip()).expanduser()
    if not folder.strip() or not path.is_dir():
        return [], f"No folder {folder!r}: pick a folder of images or upload some."
    try:
        captions = read_captions(path)
    except CaptionFileError as err:
        return [], str(err)
    missing = sum(1 for text in captions.values() if not text)
    where = "metadata.csv" if (path / "metadata.csv").is_file() else ".txt files beside the images"
    note = f", {missing} without a caption" if missing else ""
    return [[rel, text] for rel, text in captions.items()], f"{len(captions)} images{note}; captions in {where}."


def save_caption_edits(folder: str, rows: Sequence[Sequence[Any]]) -> str:
    """Write the edited caption table back into ``folder``; says how many captions changed."""
    path = Path(folder.strip()).expanduser()
    edits = {str(row[0]): str(row[1] or "") for row in rows if len(row) >= 2 and row[0]}
    try:
        changed = write_captions(path, edits)
    except (CaptionFileError, OSError) as err:
        return f"Captions not saved: {err}"
    return f"Saved {changed} changed caption{'s' if changed != 1 else ''}."


def caption_images(
    host: Host, folder: str, captioner: str, model: str, trigger_word: str, overwrite: bool
) -> Iterator[str]:
    """Caption the folder's images through the daemon; yields the growing log text."""
    path = Path(folder.strip()).expanduser()
    if not folder.strip() or not path.is_dir() or not list_images(path):
        yield f"No images in {folder!r}: pick a folder of images or upload some."
        return
    lines: list[str] = []
    try:
        with Daemon.connect(host.daemon_address()) as daemon:
            stream = daemon.caption_images(
                path.resolve(),
                captioner=CAPTIONERS.get(captioner, 0),
                model=model.strip(),
                trigger_word=trigger_word.strip(),
                overwrite=overwrite,
            )
            for message in stream:
                line = describe_caption(message)
                if message.WhichOneof("item") == "image":
                    line = line or f"{message.image.done}/{message.image.total} {message.image.path}"
                if line:
                    lines.append(line)
                    yield "\n".join(lines[-12:])
    except DaemonError as err:
        lines.append(str(err))
    yield "\n".join(lines[-12:])


def base_model_path(host: Host, choice: str, path: str) -> str:
    """The base model to train on: a typed path wins over the checkpoint picked from the list."""
    return path.strip() or host.checkpoints().get(choice or "", "")


def train(host: Host, form: TrainForm) -> Iterator[tuple[str, str, str, list[tuple[str, str]]]]:
    """Submit ``form`` and follow the job; yields (progress text, prompt snippet, job id, sample gallery)
    as it runs; the gallery is the sample images so far as (path, caption), newest first.

    On success the kohya file is placed in the host's LoRA folder (atomically), the LoRA list is
    refreshed and the snippet is the ``<lora:name:w>`` tag; on failure the text says why.
    """
    output_dir = host.work_dir() / "runs" / form.name.strip()
    try:
        fields = config_fields(form, output_dir)
    except FormError as err:
        yield "Cannot train yet:\n" + "\n".join(f"- {p}" for p in err.problems), "", "", []
        return
    try:
        with Daemon.connect(host.daemon_address()) as daemon:
            job = daemon.submit_training(fields, base_dir=Path(fields["train_data_dir"]), source_name=SOURCE_NAME)
            tracker = JobProgress(job)
            yield tracker.text(), "", job.job_id, []
            for message in daemon.watch_job(job.job_id):
                tracker.apply(message)
                yield tracker.text(), "", job.job_id, tracker.gallery()
                if tracker.done:
                    break
    except DaemonError as err:
        yield str(err), "", "", []
        return
    if tracker.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        yield tracker.text(), "", job.job_id, tracker.gallery()
        return
    name = fields["output_name"]
    try:
        placed = place_lora(Path(tracker.outputs["kohya"]), host.lora_dir(), name)
    except (KeyError, OSError) as err:
        text = f"{tracker.text()}\n\nThe LoRA could not be put in {host.lora_dir()}: {err}"
        yield text, "", job.job_id, tracker.gallery()
        return
    host.refresh_loras()
    snippet = lora_snippet(name, host.snippet_weight())
    text = f"{tracker.text()}\n\nSaved {placed}; use it in a prompt with {snippet}"
    yield text, snippet, job.job_id, tracker.gallery()


def ask_running(host: Host, job_id: str, what: str) -> str:
    """Ask the running job ``job_id`` to sample now (``what`` "sample") or save now ("save"); the message to
    show (the new images reach the gallery through the job's stream, like the scheduled ones)."""
    if not job_id.strip():
        return "No job is running."
    try:
        with Daemon.connect(host.daemon_address()) as daemon:
            events = daemon.sample_now(job_id.strip()) if what == "sample" else daemon.save_now(job_id.strip())
    except DaemonError as err:
        return str(err)
    lines = [line for event in events if (line := describe_event(event))]
    return "\n".join(lines) or "Done."


def cancel(host: Host, job_id: str) -> str:
    """Ask the daemon to cancel ``job_id``; the message to show."""
    if not job_id.strip():
        return "No job is running."
    try:
        with Daemon.connect(host.daemon_address()) as daemon:
            job = daemon.cancel_job(job_id.strip())
    except DaemonError as err:
        return str(err)
    return f"Cancel requested for job {job.job_id[:8]} (a running job stops after its current step)."


def inspect_lora(host: Host, path: str, job_id: str = "") -> str:
    """The daemon's report on a LoRA file (``lorad lora inspect``'s text): ``path`` (a bare name is looked up
    in the WebUI's LoRA folder), or without one the kohya file of the job ``job_id`` made."""
    try:
        with Daemon.connect(host.daemon_address()) as daemon:
            if path.strip():
                target = Path(path.strip()).expanduser()
                target = target if target.is_absolute() else host.lora_dir() / target
            elif job_id.strip():
                job = daemon.get_job(job_id.strip())
                if "kohya" not in job.outputs:
                    return f"Job {job.job_id[:8]} has no LoRA file yet: inspect it once it has succeeded."
                target = Path(job.outputs["kohya"])
            else:
                return "Enter a LoRA file (a path, or a name in the LoRA folder), or train one first."
            return format_lora_report(daemon.inspect_lora(target))
    except DaemonError as err:
        return str(err)
