"""The CLI commands that talk to a running daemon (status, jobs, logs, cancel, models, train, caption).

Nothing here imports torch: these commands answer in a fraction of a second.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lorad.cli.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK
from lorad.cli.progress import TerminalProgress
from lorad.server.proto_convert import engine_event_from_proto
from lorad_api.v1 import caption_pb2, jobs_pb2
from lorad_client import FINAL_STATES, LoradClient
from lorad_client.format import (
    JOB_COLUMNS,
    describe_caption,
    describe_event,
    format_bytes,
    format_duration,
    job_cells,
    job_state_name,
    lora_snippet,
)

STATE_NAMES = {job_state_name(v): v for v in jobs_pb2.JobState.values() if v}


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def print_status(client: LoradClient) -> int:
    s = client.status()
    print(f"lorad {s.version} — pid {s.pid}, up {format_duration(s.uptime_seconds)}")
    print(f"listening: {', '.join(s.addresses)}" + (" (token required)" if s.token_required else ""))
    print(f"state directory: {s.home}")
    if s.in_process:
        print("jobs run in the daemon process (--in-process): no crash isolation, one device per job")
    for d in s.devices:
        print(describe_device(d))
    running = ", ".join(s.running_job_ids) or s.running_job_id or "nothing"
    print(f"queue: {s.queue_length} waiting; running: {running}; resident models: {s.resident_models}")
    return EXIT_OK


def describe_device(d: Any) -> str:
    """One line about a device and its worker: state, job, memory, residents."""
    memory = f"{format_bytes(d.memory_used_bytes)} used" + (
        f" of {format_bytes(d.memory_total_bytes)}" if d.memory_total_bytes else ""
    )
    if d.worker < 0:  # the daemon process itself
        return f"daemon: pid {d.worker_pid}, {memory}, {d.resident_models} caption models"
    worker = f"worker {d.worker} ({d.worker_state or 'unknown'}"
    worker += f", pid {d.worker_pid}" if d.worker_pid else ""
    worker += f", restarted {d.worker_restarts}×" if d.worker_restarts else ""
    worker += f", job {d.running_job_id})" if d.running_job_id else ")"
    residents = f"{d.resident_models} resident model{'s' if d.resident_models != 1 else ''}"
    residents += f" ({format_bytes(d.resident_bytes)})" if d.resident_models else ""
    description = f" {d.description}," if d.description else ""
    return f"device {d.name}:{description} {worker}; {memory}; {residents}"


def print_jobs(client: LoradClient, states: Iterable[str], limit: int) -> int:
    wanted = [STATE_NAMES[s] for s in states]
    jobs = client.list_jobs(wanted, limit)
    if not jobs:
        print(
            "no jobs" + (f" in state {', '.join(states)}" if wanted else "") + " — submit one with "
            "`lorad train --config FILE`"
        )
        return EXIT_OK
    now = time.time()
    print(_table([[job.job_id, *job_cells(job, now)] for job in jobs], ["ID", *JOB_COLUMNS]))
    return EXIT_OK


def print_models(client: LoradClient) -> int:
    models = client.list_models()
    if not models:
        print("no resident models — they load with the first job that uses them, or `lorad models load PATH`")
        return EXIT_OK
    rows = [
        [
            m.model_id,
            m.kind or "sd",
            m.source,
            m.model_version,
            m.device,
            str(m.worker) if m.worker >= 0 else "daemon",
            m.dtype,
            format_bytes(m.memory_bytes),
            "in use" if m.in_use else format_duration(m.keep_alive_seconds_left),
        ]
        for m in models
    ]
    print(_table(rows, ["ID", "KIND", "SOURCE", "VERSION", "DEVICE", "WORKER", "DTYPE", "MEMORY", "KEEP-ALIVE"]))
    return EXIT_OK


def load_model(client: LoradClient, model: str, keep_alive: float) -> int:
    reply = client.load_model(model, base_dir=Path.cwd(), keep_alive_seconds=keep_alive)
    m = reply.model
    how = "already resident" if reply.already_resident else "loaded"
    print(f"{how}: {m.source} as {m.model_id} ({m.model_version}, {m.device}, {format_bytes(m.memory_bytes)})")
    return EXIT_OK


def unload_model(client: LoradClient, model: str) -> int:
    # A path as typed (relative, `~`, a symlink) names the model the daemon keeps by its resolved path.
    typed = Path(model).expanduser()
    freed = client.unload_model(str(typed.resolve()) if typed.exists() else model)
    print(f"unloaded {model} ({format_bytes(freed)} freed)")
    return EXIT_OK


def cancel_job(client: LoradClient, job_id: str) -> int:
    job = client.cancel_job(job_id)
    if job.state == jobs_pb2.JOB_STATE_CANCELLED:
        print(f"job {job.job_id} cancelled")
    else:
        print(
            f"job {job.job_id} is stopping after its current step (it keeps its last checkpoint); "
            f"`lorad logs {job.job_id} --follow` shows when it has stopped"
        )
    return EXIT_OK


def print_samples(client: LoradClient, job_id: str) -> int:
    """The sample images (or LLM answers) a job made so far, oldest first, from its history."""
    rows, answers = [], []
    with client.watch_job(job_id, history_only=True) as watch:
        for item in watch:
            kind = item.event.WhichOneof("kind") if item.WhichOneof("item") == "event" else None
            if kind == "sample_image":
                i = item.event.sample_image
                when = str(i.step) if i.step else "0 (base)"
                rows.append([when, str(i.prompt_index), str(i.seed), f"{i.width}x{i.height}", i.path])
            elif kind == "sample":
                answers.append(describe_event(item.event) or "")
    if not rows and not answers:
        print(f"job {job_id} has no samples yet (set sample_prompts and sample_every_n_steps in its config)")
        return EXIT_OK
    if rows:
        print(_table(rows, ["STEP", "PROMPT", "SEED", "SIZE", "PATH"]))
    for line in answers:
        print(line)
    return EXIT_OK


def ask_running_job(client: LoradClient, job_id: str, what: str) -> int:
    """Ask a running job to sample now (``what`` "sample") or save now ("save"); print what it produced."""
    events = client.sample_now(job_id) if what == "sample" else client.save_now(job_id)
    for event in events:
        line = describe_event(event)
        if line:
            print(line)
    return EXIT_OK


def how_to_use(outputs: dict[str, str], name: str) -> str:
    """The closing message of a successful run: where the files are and how to use them."""
    if "adapter" in outputs:  # an LLM run
        merged = f"  merged model:  {outputs['merged']}\n" if outputs.get("merged") else ""
        return (
            f"\nadapter written:\n  PEFT adapter:  {outputs['adapter']}\n{merged}"
            f"  summary:       {outputs.get('summary', '-')}\n"
            f"Use it: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "
            f'"{outputs["adapter"]}"); its tokenizer (with the chat template it was trained with) is beside it.'
        )
    return (
        f"\nLoRA written:\n"
        f"  kohya / AUTOMATIC1111: {outputs.get('kohya', '-')}\n"
        f"  diffusers:             {outputs.get('diffusers', '-')}\n"
        f"  summary:               {outputs.get('summary', '-')}\n"
        f"Use it: copy the .safetensors into stable-diffusion-webui/models/Lora and prompt with "
        f"{lora_snippet(name)};\n"
        f'or in diffusers: pipe.load_lora_weights("{Path(outputs.get("diffusers", ".")).parent}")'
    )


def follow_job(
    client: LoradClient, job_id: str, *, after_seq: int = 0, live_bar: bool = True, history_only: bool = False
) -> int:
    """Stream a job's events to the terminal until it ends (or, with ``history_only``, until the
    newest event so far); Ctrl-C detaches (the job goes on).

    With ``live_bar`` the history is printed first as a log (a progress bar fed a replay would show
    thousands of steps a second), then the live events draw the bar."""
    if live_bar and not history_only:
        seen = [after_seq]
        code = _follow(client, job_id, after_seq=after_seq, live_bar=False, history_only=True, seen=seen, quiet=True)
        if code is not None:  # the history already holds the job's end
            return code
        after_seq = seen[0]
    return _follow(client, job_id, after_seq=after_seq, live_bar=live_bar, history_only=history_only) or EXIT_OK


class _JobStream:
    """How one WatchJob stream is drawn to the terminal: the live bar (or step lines), one line per
    other event, and the job's end said once."""

    def __init__(self, job_id: str, *, live_bar: bool) -> None:
        self.job_id, self.name, self.live_bar = job_id, job_id, live_bar
        self.progress = TerminalProgress() if live_bar else None
        self.final_state: str | None = None

    def show(self, event: jobs_pb2.JobEvent) -> None:
        """Draw one event; remember the final one."""
        kind = event.WhichOneof("kind")
        engine_event = engine_event_from_proto(event)
        if self.progress is not None and engine_event is not None and kind != "finished":
            self.progress(engine_event)
        elif kind == "step" and not self.live_bar:
            self._step_line(event.step.progress)
        elif kind not in ("finished", "failed") and (line := describe_event(event)) is not None:
            (self.progress.print_line if self.progress else print)(line)
        if kind == "finished":
            self.close()
            print(how_to_use(dict(event.finished.outputs), self.name))
            self.final_state = kind
        elif kind in ("failed", "cancelled"):
            self.close()
            if kind == "failed":  # said once, here: the event's own line would repeat it
                self._failure(event.failed)
            self.final_state = kind

    @staticmethod
    def _step_line(p: jobs_pb2.Progress) -> None:
        if p.step == p.total_steps or p.step % max(1, p.total_steps // 20) == 0:
            print(f"step {p.step}/{p.total_steps}  epoch {p.epoch}  loss {p.loss:.4f}  lr {p.lr:.2e}")

    @staticmethod
    def _failure(failed: jobs_pb2.JobFailed) -> None:
        print(f"error: {failed.error}", file=sys.stderr)
        if failed.hint:
            print(f"hint: {failed.hint}", file=sys.stderr)
        if failed.checkpoint:
            print(f"checkpoint kept: {failed.checkpoint}", file=sys.stderr)

    def close(self) -> None:
        if self.progress:
            self.progress.close()


def _follow(
    client: LoradClient,
    job_id: str,
    *,
    after_seq: int,
    live_bar: bool,
    history_only: bool,
    seen: list[int] | None = None,
    quiet: bool = False,
) -> int | None:
    """One WatchJob stream drawn to the terminal; the exit code, or None when ``quiet`` and the job
    has not ended (the caller goes on following). ``seen[0]`` is set to the last event's seq."""
    stream = _JobStream(job_id, live_bar=live_bar)
    watch = client.watch_job(job_id, after_seq=after_seq, history_only=history_only)
    try:
        for message in watch:
            if message.WhichOneof("item") == "job":
                stream.job_id, stream.name = message.job.job_id, message.job.name
                continue
            if seen is not None:
                seen[0] = message.event.seq
            stream.show(message.event)
    except KeyboardInterrupt:
        watch.cancel()
        stream.close()
        print(
            f"\ndetached; job {stream.job_id} goes on. Follow it: `lorad logs {stream.job_id} --follow`; "
            f"cancel it: `lorad cancel {stream.job_id}`",
            file=sys.stderr,
        )
        return EXIT_OK
    finally:
        stream.close()
    return _exit_code(client, stream, history_only=history_only, quiet=quiet)


def _exit_code(client: LoradClient, stream: _JobStream, *, history_only: bool, quiet: bool) -> int | None:
    """The command's exit status once a stream ended: by the job's final event, or by asking about a
    job still going (None when ``quiet``: the caller goes on following)."""
    if stream.final_state is not None:
        return {"finished": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_INTERRUPTED}[stream.final_state]
    if quiet:
        return None
    job = client.get_job(stream.job_id)
    if history_only:
        print(f"job {job.job_id} is {job_state_name(job.state)}; `lorad logs {job.job_id} --follow` follows it")
        return EXIT_OK
    if job.state not in FINAL_STATES:  # the stream ended without a final event (e.g. the daemon stopped)
        print(
            f"the daemon stopped following job {stream.job_id} ({job_state_name(job.state)}); "
            f"`lorad logs {stream.job_id} --follow` picks it up again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def submit_and_follow(client: LoradClient, config_path: Path, *, detach: bool) -> int:
    """Submit a config file to the daemon; follow the job unless ``detach``."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except OSError as err:
        print(f"error: --config: cannot read {config_path}: {err.strerror}", file=sys.stderr)
        return 2
    job = client.submit_training(text, base_dir=Path.cwd(), source_name=str(config_path))
    position = f", #{job.queue_position} in the queue" if job.queue_position > 1 else ""
    print(f"job {job.job_id} submitted to the lorad daemon{position}", file=sys.stderr)
    if detach:
        print(job.job_id)
        return EXIT_OK
    return follow_job(client, job.job_id)


def show_captions(messages: Iterable[caption_pb2.CaptionImagesResponse], *, verbose: bool = False) -> int:
    """Draw a caption run (from the daemon, or converted from an in-process one): the plan, a
    progress bar over the images being captioned, a line per image that failed, and the summary
    (on stdout). With ``verbose``, every new caption is printed too.

    Returns EXIT_OK when every image has a caption afterwards, EXIT_FAILED when some could not be
    captioned (or the stream ended without a summary), EXIT_INTERRUPTED when the run was stopped.
    """
    from tqdm import tqdm

    bar = None
    to_caption = 0

    def say(text: str) -> None:
        if bar is not None:
            bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    try:
        for message in messages:
            item = message.WhichOneof("item")
            line = describe_caption(message)
            if item == "finished":
                if bar is not None:
                    bar.close()
                    bar = None
                print(line)
                finished = message.finished
                return EXIT_INTERRUPTED if finished.stopped else EXIT_FAILED if finished.failed else EXIT_OK
            if line is not None:
                say(line)
            if item == "planned":
                to_caption = message.planned.to_caption
            elif item == "captioner_ready":
                bar = tqdm(total=to_caption, file=sys.stderr, unit="image", dynamic_ncols=True, mininterval=0.5)
            elif item == "image" and bar is not None:
                bar.update(1)
                if verbose and message.image.status == caption_pb2.CAPTION_STATUS_CAPTIONED:
                    say(f"{message.image.path}: {message.image.caption}")
    finally:
        if bar is not None:
            bar.close()
    print("error: the caption run ended without a summary (did the daemon stop?)", file=sys.stderr)
    return EXIT_FAILED


def caption_with_daemon(client: LoradClient, folder: str, *, verbose: bool = False, **request: object) -> int:
    """Caption ``folder`` through the daemon (``request``: the keyword arguments of
    ``LoradClient.caption_images``); Ctrl-C stops it after the current batch, keeping what is written."""
    stream = client.caption_images(folder, base_dir=Path.cwd(), **request)  # type: ignore[arg-type]
    try:
        return show_captions(stream, verbose=verbose)
    except KeyboardInterrupt:
        stream.cancel()
        print(
            "\nstopped; the captions written so far are kept (run the same command to caption the rest)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


# --- watch folders -------------------------------------------------------------------------------
def _watch_state(watch: object) -> str:
    from lorad_api.v1 import watch_pb2

    return watch_pb2.WatchState.Name(watch.state).removeprefix("WATCH_STATE_").lower()  # type: ignore[attr-defined]


def add_watch(client: LoradClient, folder: str, config: str, **policy: object) -> int:
    watch = client.add_watch(folder, config, base_dir=str(Path.cwd()), **policy)  # type: ignore[arg-type]
    p = watch.policy
    print(
        f"watching {watch.folder} ({watch.watch_id}) with {watch.config_path}: "
        f"{_watch_state(watch)}, {watch.images_seen} images, quiet {p.quiet_seconds:g}s"
    )
    if watch.new_images:
        print(f"{watch.new_images} image(s) not trained yet: a job is queued once the folder is quiet")
    if watch.error:
        print(f"error: {watch.error}\nhint: {watch.hint}", file=sys.stderr)
    return EXIT_OK


def print_watches(client: LoradClient) -> int:
    watches = client.list_watches()
    if not watches:
        print("no watched folders — add one with `lorad watch add DIR --config FILE`")
        return EXIT_OK
    rows = []
    for w in watches:
        mode = "retrain" if w.policy.mode == 2 else "continue"
        latest = f"v{w.version}" if w.version else "-"
        rows.append(
            [
                w.watch_id,
                w.folder,
                _watch_state(w),
                str(w.images_seen),
                str(w.new_images),
                mode,
                latest,
                w.last_job_id or "-",
            ]
        )
    print(_table(rows, ["ID", "FOLDER", "STATE", "IMAGES", "NEW", "MODE", "LATEST", "LAST JOB"]))
    for w in watches:
        if w.error:
            print(f"\n{w.folder}: {w.error}\nhint: {w.hint}")
    return EXIT_OK


def retry_watch(client: LoradClient, watch: str) -> int:
    retried = client.retry_watch(watch, base_dir=str(Path.cwd()))
    print(f"{retried.folder} ({retried.watch_id}): {_watch_state(retried)}")
    if retried.error:
        print(f"error: {retried.error}\nhint: {retried.hint}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def remove_watch(client: LoradClient, watch: str) -> int:
    removed = client.remove_watch(watch, base_dir=str(Path.cwd()))
    print(f"stopped watching {removed.folder} ({removed.watch_id}); jobs it queued are left alone")
    return EXIT_OK
