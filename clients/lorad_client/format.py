"""Every user-facing rendering of jobs, events and LoRAs, shared by the CLI, the TUI and the WebUI
(vendored into the extension by scripts/gen_webui_api.py), so one job reads the same in each client.

No I/O and no daemon access; every function takes plain values or generated messages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from lorad_api.v1 import caption_pb2
from lorad_api.v1.jobs_pb2 import JOB_STATE_QUEUED, JOB_STATE_RUNNING, Job, JobEvent, JobState, Progress
from lorad_api.v1.lora_tools_pb2 import InspectLoraResponse

_STATE_PREFIX = "JOB_STATE_"


def job_state_name(state: int) -> str:
    """Lower-case name of a JobState value: "queued", "running", "succeeded", ...; "unknown(N)" if unknown."""
    try:
        name = JobState.Name(state)
    except ValueError:
        return f"unknown({state})"
    return name.removeprefix(_STATE_PREFIX).lower()


def format_duration(seconds: float) -> str:
    """Compact duration, rounded to whole seconds: "12s", "3m05s", "1h02m", "2d03h"; "?" if unknown (<0, inf, nan)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = round(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_bytes(n: float) -> str:
    """Binary size: "512 B", "1.5 KiB", "3.2 GiB" (one decimal above bytes)."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_progress(progress: Progress) -> str:
    """One status line: "step 120/1000 (12%) · epoch 2 · loss 0.1234 · 3.10 steps/s · ETA 4m44s"."""
    parts = [f"step {progress.step}/{progress.total_steps}"]
    if progress.total_steps > 0:
        parts[0] += f" ({100 * progress.step // progress.total_steps}%)"
    if progress.epoch:
        parts.append(f"epoch {progress.epoch}")
    parts.append(f"loss {progress.loss:.4f}")
    if progress.steps_per_second > 0:
        parts.append(f"{progress.steps_per_second:.2f} steps/s")
        parts.append(f"ETA {format_duration(progress.eta_seconds)}")
    return " · ".join(parts)


# The job table's columns, in every client that lists jobs (the CLI puts the job id in front).
JOB_COLUMNS = ("NAME", "STATE", "PROGRESS", "LOSS", "ETA", "STARTED")


def format_ago(stamp_seconds: float, now: float) -> str:
    """ "3m05s ago" for a set time (seconds since the epoch), "-" for an unset one (0)."""
    if not stamp_seconds:
        return "-"
    return f"{format_duration(max(0.0, now - stamp_seconds))} ago"


def job_state_label(job: Job) -> str:
    """The job's state as a word, with its place in line while queued ("queued #2")."""
    label = job_state_name(job.state)
    return f"{label} #{job.queue_position}" if job.state == JOB_STATE_QUEUED and job.queue_position else label


def job_cells(job: Job, now: float) -> tuple[str, ...]:
    """One job's cells in ``JOB_COLUMNS`` order: name, state, "step/total pct%", loss, ETA, started."""
    progress = job.progress
    if progress.total_steps:
        steps = f"{progress.step}/{progress.total_steps} {100 * progress.step // progress.total_steps:>3}%"
    else:
        steps = "-"
    loss = f"{progress.loss:.4f}" if progress.step else "-"
    running = job.state == JOB_STATE_RUNNING and progress.steps_per_second > 0
    eta = format_duration(progress.eta_seconds) if running else "-"
    return (job.name or job.job_id, job_state_label(job), steps, loss, eta, format_ago(job.started_at.seconds, now))


def lora_snippet(name: str, weight: float = 0.8) -> str:
    """The prompt tag AUTOMATIC1111 / Forge / ComfyUI's A1111-style nodes use to apply LoRA ``name``."""
    return f"<lora:{name}:{weight:g}>"


def describe_event(event: JobEvent) -> str | None:
    """A human line for one event (a few lines for failures and results).

    None for ``step`` events (a progress bar shows those) and for events whose kind this client
    does not know (sent by a newer daemon).
    """
    kind = event.WhichOneof("kind")
    describe = _DESCRIBERS.get(kind) if kind else None
    return describe(event) if describe else None


def _queued(e: JobEvent) -> str:
    return f"queued (position {e.queued.queue_position})" if e.queued.queue_position else "queued"


def _started(e: JobEvent) -> str:
    s = e.started
    text = f"started on {s.device or 'an unknown device'} (attempt {s.attempt or 1})"
    return text + (f", resuming from {s.resumed_from}" if s.resumed_from else "")


def _model_loaded(e: JobEvent) -> str:
    m = e.model_loaded
    how = "already resident" if m.resident else f"loaded in {format_duration(m.seconds)}"
    return f"model loaded: {m.source} ({m.model_version or 'unknown version'}, {how})"


def _data_report(e: JobEvent) -> str:
    d = e.data_report
    if d.text:  # the scan's own report: counts, captions, buckets and every skipped file with its reason
        return d.text
    text = f"data: {d.images_used} of {d.images_found} images used"
    if d.images_skipped:
        text += f", {d.images_skipped} skipped"
    if d.captions_generated:
        text += f", {d.captions_generated} captions generated"
    return text


def _latents_cached(e: JobEvent) -> str:
    c = e.latents_cached
    return f"latents ready: {c.encoded} encoded, {c.cached} from cache ({format_duration(c.seconds)})"


def _training_started(e: JobEvent) -> str:
    t = e.training_started
    if t.start_step:
        verb = f"training resumes at step {t.start_step} of {t.total_steps}"
        verb += f" (from {t.resumed_from})" if t.resumed_from else ""
    else:
        verb = f"training {t.total_steps} steps"
    epochs = f" over {t.epochs} epoch{'s' if t.epochs != 1 else ''}" if t.epochs else ""
    precision = f", {t.precision}" if t.precision else ""
    device = t.device or "an unknown device"
    return f"{verb}{epochs} on {device}{precision} ({t.trainable_params:,} trainable parameters)"


def _checkpoint_saved(e: JobEvent) -> str:
    return f"checkpoint saved at step {e.checkpoint_saved.step}: {e.checkpoint_saved.path}"


def _log(e: JobEvent) -> str:
    return f"{e.log.level}: {e.log.message}" if e.log.level and e.log.level != "info" else e.log.message


def _finished(e: JobEvent) -> str:
    f = e.finished
    lines = [f"finished: {f.steps} steps in {format_duration(f.seconds)}, final loss {f.final_loss:.4f}"]
    lines += [f"  {role}: {path}" for role, path in sorted(f.outputs.items())]
    return "\n".join(lines)


def _failed(e: JobEvent) -> str:
    f = e.failed
    lines = [f"failed: {f.error or 'unknown error'}"]
    if f.hint:
        lines.append(f"  hint: {f.hint}")
    if f.checkpoint:
        lines.append(f"  checkpoint kept: {f.checkpoint}")
    return "\n".join(lines)


def _partial(path: str) -> str:
    return f"\n  partial LoRA of the last step: {path}" if path else ""


def _cancelled(e: JobEvent) -> str:
    checkpoint = e.cancelled.checkpoint
    text = f"cancelled; checkpoint kept: {checkpoint}" if checkpoint else "cancelled"
    return text + _partial(e.cancelled.partial)


def _interrupted(e: JobEvent) -> str:
    i = e.interrupted
    if i.reason:  # a worker died: the job runs again at once
        start = f"resumes from {i.checkpoint}" if i.checkpoint else "starts over"
        return f"interrupted: {i.reason}; it {start} now" + _partial(i.partial)
    if not i.will_resume:
        return "interrupted by a daemon stop (resuming is off: it will not run again)"
    start = f"resume from {i.checkpoint}" if i.checkpoint else "start over"
    return f"interrupted by a daemon stop; it will {start} when the daemon restarts" + _partial(i.partial)


def _eval(e: JobEvent) -> str:
    return f"eval loss after step {e.eval.step}: {e.eval.loss:.4f} ({e.eval.samples} records)"


def _sample(e: JobEvent) -> str:
    cut = "" if e.sample.stopped == "eos" else " [cut at sample_max_new_tokens]"
    when = f" (step {e.sample.step})" if e.sample.step else ""
    return f"sample{when}: {e.sample.prompt!r} -> {e.sample.output!r}{cut}"


def describe_sample_image(step: int, prompt_index: int, prompt: str, path: str) -> str:
    """The line for one sample image: "sample at step 100, prompt 0 ('a cat'): PATH" (step 0: the baseline)."""
    when = f"at step {step}" if step else "before training (no LoRA)"
    return f"sample {when}, prompt {prompt_index} ({prompt!r}): {path}"


def _sample_image(e: JobEvent) -> str:
    i = e.sample_image
    return describe_sample_image(i.step, i.prompt_index, i.prompt, i.path)


def _memory_recovered(e: JobEvent) -> str:
    return f"warning: {e.memory_recovered.change} (the step was redone; the effective batch is unchanged)"


# One describer per JobEvent.kind field (None = deliberately silent). A kind added to the proto
# without an entry here is caught by tests/test_client_discovery.py.
_DESCRIBERS: dict[str, Callable[[JobEvent], str] | None] = {
    "queued": _queued,
    "started": _started,
    "model_loaded": _model_loaded,
    "data_report": _data_report,
    "latents_cached": _latents_cached,
    "training_started": _training_started,
    "step": None,
    "checkpoint_saved": _checkpoint_saved,
    "log": _log,
    "finished": _finished,
    "failed": _failed,
    "cancelled": _cancelled,
    "interrupted": _interrupted,
    "eval": _eval,
    "sample": _sample,
    "memory_recovered": _memory_recovered,
    "sample_image": _sample_image,
}


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def describe_caption(message: caption_pb2.CaptionImagesResponse) -> str | None:
    """A human line for one CaptionImages message.

    None for images that were captioned or kept (a progress bar counts those) and for items this
    client does not know; failed images get "path: why".
    """
    item = message.WhichOneof("item")
    if item == "planned":
        p = message.planned
        text = (
            f"{p.folder}: {p.images_found} image{_s(p.images_found)}, {p.to_caption} to caption, "
            f"{p.to_keep} keep{'s' if p.to_keep == 1 else ''} {'its' if p.to_keep == 1 else 'their'} caption"
        )
        if p.unusable:
            text += f", {p.unusable} cannot be captioned"
        return text + (f"; captions go to {p.written_to}" if p.to_caption else "")
    if item == "captioner_ready":
        r = message.captioner_ready
        how = "already resident" if r.resident else f"loaded in {format_duration(r.seconds)}"
        return f"captioner: {r.model_version or r.captioner} from {r.source}, {how}"
    if item == "image":
        i = message.image
        return f"{i.path}: {i.error}" if i.status == caption_pb2.CAPTION_STATUS_FAILED else None
    if item == "finished":
        f = message.finished
        speed = f" ({f.images_per_second:.2f} images/s)" if f.captioned else ""
        lines = [
            f"{'stopped' if f.stopped else 'done'}: {f.captioned} captioned, {f.kept} kept, {f.failed} failed "
            f"in {format_duration(f.seconds)}{speed}"
        ]
        if f.captioned:
            lines.append(f"  captions written to {f.written_to}; generated ones are listed in {f.record_path}")
        return "\n".join(lines)
    return None


# --- LoRA files (``lorad lora inspect``, InspectLora) ------------------------------------------------

# The per-block table's columns, in every client that shows an inspect report.
LORA_BLOCK_COLUMNS = ("BLOCK", "MODULES", "RANK", "ALPHA")
# Metadata shown in the report, in this order (the JSON form has every key).
SHOWN_METADATA = (
    "ss_output_name",
    "ss_sd_model_name",
    "ss_base_model_version",
    "modelspec.architecture",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_num_train_images",
    "ss_epoch",
    "ss_steps",
    "ss_learning_rate",
    "ss_optimizer",
    "ss_resolution",
    "ss_training_comment",
)
# Keys listed under each problem before "... and N more".
SHOWN_PROBLEM_KEYS = 5


def compact_values(values: Sequence[float]) -> str:
    """Ranks or alphas in a few characters: "4", "4,8", "2..64 (7 values)"; "-" for none."""
    if not values:
        return "-"
    shown = [f"{v:g}" for v in values]
    return ",".join(shown) if len(shown) <= 4 else f"{shown[0]}..{shown[-1]} ({len(shown)} values)"


def lora_summary_lines(report: InspectLoraResponse) -> list[str]:
    """What the file is, one fact a line: layout, base model (and what decided it), modules by network type,
    parameters and precision, ranks and alphas, trigger words and the most frequent tags."""
    version = f" ({report.base_version})" if report.base_version else ""
    kinds = sorted(report.network_types.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [
        f"layout:     {report.layout}",
        f"base model: {report.family_title}{version}",
        f"            decided by {report.family_evidence}",
        f"modules:    {report.modules} ({', '.join(f'{k} {v}' for k, v in kinds)})",
        f"parameters: {report.parameters:,} ({report.precision})",
        f"rank:       {compact_values(report.ranks)}    alpha: {compact_values(report.alphas)}",
    ]
    if report.trigger_words:
        lines.append(f"trigger:    {', '.join(report.trigger_words)}")
    if report.top_tags:
        lines.append("top tags:   " + ", ".join(f"{t.tag} ({t.count})" for t in report.top_tags))
    return lines


def lora_block_cells(report: InspectLoraResponse) -> list[tuple[str, str, str, str]]:
    """The per-block table's rows in ``LORA_BLOCK_COLUMNS`` order: block, modules, ranks, alphas."""
    return [(b.block, str(b.modules), compact_values(b.ranks), compact_values(b.alphas)) for b in report.blocks]


def lora_metadata_lines(report: InspectLoraResponse) -> list[str]:
    """``key = value`` for the metadata worth showing (``SHOWN_METADATA``), long values cut to 80 characters."""
    shown = [(k, report.metadata[k]) for k in SHOWN_METADATA if k in report.metadata]
    return [f"{k} = {v if len(v) <= 80 else v[:77] + '...'}" for k, v in shown]


def lora_problem_lines(report: InspectLoraResponse) -> list[str]:
    """Each problem as "[kind] message", then (indented) the first keys it concerns; empty for a sound file."""
    lines: list[str] = []
    for problem in report.problems:
        lines.append(f"[{problem.kind}] {problem.message}")
        lines += [f"    {k}" for k in problem.keys[:SHOWN_PROBLEM_KEYS]]
        if len(problem.keys) > SHOWN_PROBLEM_KEYS:
            lines.append(f"    ... and {len(problem.keys) - SHOWN_PROBLEM_KEYS} more")
    return lines


def format_lora_report(report: InspectLoraResponse) -> str:
    """The whole inspect report as text (``lorad lora inspect``, the WebUI tab): the summary, the per-block
    table, the metadata and the problems."""
    lines = [report.path, *(f"  {line}" for line in lora_summary_lines(report))]
    cells = lora_block_cells(report)
    if cells:
        width = max(len(LORA_BLOCK_COLUMNS[0]), *(len(row[0]) for row in cells))
        rank_width = max(8, *(len(row[2]) for row in cells))
        lines += ["", f"  {'block':<{width}}  modules  {'rank':<{rank_width}}  alpha"]
        lines += [f"  {b:<{width}}  {m:>7}  {r:<{rank_width}}  {a}" for b, m, r, a in cells]
    metadata = lora_metadata_lines(report)
    if metadata:
        lines += ["", "  metadata:", *(f"    {line}" for line in metadata)]
    lines += ["", f"  problems:   {len(report.problems) or 'none'}"]
    lines += [f"    {line}" if line.startswith(" ") else f"    - {line}" for line in lora_problem_lines(report)]
    return "\n".join(lines)
