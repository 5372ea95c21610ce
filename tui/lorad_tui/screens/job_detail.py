"""One job: progress, loss curve, learning rate, log tail, data report, and the result."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, ProgressBar, Sparkline, Static

from lorad_client import (
    JOB_STATE_CANCELLED,
    JOB_STATE_FAILED,
    JOB_STATE_INTERRUPTED,
    JOB_STATE_QUEUED,
    JOB_STATE_RUNNING,
    JOB_STATE_SUCCEEDED,
)
from lorad_client.format import format_duration
from lorad_tui.display import state_text
from lorad_tui.messages import CancelRequested, CloseJob, RunRequested, ViewChanged
from lorad_tui.screens.confirm import ConfirmScreen, cancel_question
from lorad_tui.screens.lora_inspect import LoraInspectScreen
from lorad_tui.state import DaemonView, JobView, is_final, usage_snippet
from lorad_tui.widgets.job_log import JobLog
from lorad_tui.widgets.loss_plot import LossPlot
from lorad_tui.widgets.sample_gallery import SampleGallery
from lorad_tui.widgets.title_bar import TitleBar

# How the output roles the daemon reports are labelled, in the order shown.
OUTPUT_LABELS = {
    "kohya": "kohya / A1111",
    "diffusers": "diffusers",
    "adapter": "PEFT adapter",
    "merged": "merged model",
    "samples": "contact sheet",
    "summary": "summary",
    "logs": "TensorBoard",
}


def output_folder(view: JobView) -> str:
    """Where the job's files are: its output_dir, else the folder of its kohya file, else ""."""
    job = view.job
    if job.output_dir:
        return job.output_dir
    kohya = job.outputs.get("kohya", "")
    return str(Path(kohya).parent) if kohya else ""


class JobDetailScreen(Screen[None]):
    """The detail of ``job_id``, drawn from ``view`` whenever the App says the job changed.

    Keys: ``c`` cancels (after a yes/no question), ``y`` copies the ``<lora:NAME:0.8>`` snippet,
    ``o`` copies the output folder's path and shows it, ``i`` inspects the kohya file (base model, rank
    and alpha per block, problems: the daemon's InspectLora), ``[`` / ``]`` step through the sampled steps
    (the newest is shown until one is picked), ``s`` samples now and ``w`` saves now (running jobs),
    ``escape`` goes back. Keys that do nothing for the job's state are hidden.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("c", "cancel_job", "Cancel"),
        Binding("y", "copy_snippet", "Copy snippet"),
        Binding("o", "output_folder", "Folder path"),
        Binding("i", "inspect_lora", "Inspect LoRA"),
        Binding("left_square_bracket", "sample_step(-1)", "Older samples", key_display="["),
        Binding("right_square_bracket", "sample_step(1)", "Newer samples", key_display="]"),
        Binding("s", "run_request('sample')", "Sample now"),
        Binding("w", "run_request('save')", "Save now"),
    ]
    # Wide terminals put the log beside the curve instead of under it.
    HORIZONTAL_BREAKPOINTS: ClassVar[list[tuple[int, str]] | None] = [(0, "-narrow"), (120, "-wide")]

    def __init__(self, job_id: str, view: DaemonView, clock: Callable[[], float]) -> None:
        super().__init__()
        self.job_id = job_id
        self.view = view
        self.clock = clock
        self._log_lines_shown = 0
        self._keys_state: tuple[int, bool] | None = None
        self._sample_step: int | None = None  # the sampled step shown; None follows the newest

    @property
    def job_view(self) -> JobView | None:
        return self.view.jobs.get(self.job_id)

    def compose(self) -> ComposeResult:
        yield TitleBar(f"job {self.job_id}")
        with VerticalScroll(id="detail-body"):
            yield Static(id="job-title")
            yield ProgressBar(id="job-progress", show_eta=False)
            yield Static(id="job-stats")
            yield Static(id="job-outcome")
            with Vertical(id="samples-panel"):
                yield Static(id="samples-title", classes="section-title")
                yield SampleGallery(id="samples")
            with Vertical(id="job-panels"):
                with Vertical(id="curve-panel"):
                    yield LossPlot(id="loss-plot")
                    yield Static("learning rate", id="lr-label")
                    yield Sparkline([], id="lr-spark")
                with Vertical(id="text-panel"):
                    yield Static("Log", classes="section-title")
                    yield JobLog(id="job-log")
                    yield Static("Data", classes="section-title")
                    yield Static("the data report appears when the job has scanned its images", id="data-report")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#detail-body").focus()
        self.redraw()

    def on_unmount(self) -> None:
        # The App may stop following this job if no one else needs its stream.
        self.app.post_message(CloseJob(self.job_id))

    def on_view_changed(self, message: ViewChanged) -> None:
        if not message.job_ids or self.job_id in message.job_ids:
            self.redraw()

    def redraw(self) -> None:
        """Draw every part from the job's view (a job not known yet shows as loading)."""
        view = self.job_view
        if view is None:
            self.query_one("#job-title", Static).update(f"job {self.job_id}: loading…")
            return
        job, progress = view.job, view.job.progress
        title = Text.assemble((job.name or job.job_id, "bold"), "  ", state_text(job), f"  · job {job.job_id}")
        if job.source_name:
            title.append(f" · {job.source_name}", style="dim")
        self.query_one("#job-title", Static).update(title)

        bar = self.query_one("#job-progress", ProgressBar)
        # A known total even before the first step: an indeterminate bar would animate forever.
        bar.update(total=max(1, progress.total_steps), progress=progress.step)
        self.query_one("#job-stats", Static).update(self._stats(view))
        outcome = self._outcome(view)
        self.query_one("#job-outcome", Static).update(outcome)
        self.query_one("#job-outcome").display = not isinstance(outcome, Text) or bool(outcome.plain)

        plot = self.query_one("#loss-plot", LossPlot)
        plot.set_data(view.steps, view.losses)
        # Before the first step the plot is a one-line note, not ten empty rows.
        plot.set_class(not view.losses, "-empty")
        lr_now = f" {progress.lr:.2e}" if progress.step else ": no steps yet"
        self.query_one("#lr-label", Static).update(f"learning rate{lr_now}")
        spark = self.query_one("#lr-spark", Sparkline)
        spark.data = list(view.lrs)
        spark.display = bool(view.lrs)
        if view.data_report:
            self.query_one("#data-report", Static).update(Text(view.data_report))
        self._append_log(view)
        self._draw_samples(view)
        keys = (job.state, bool(view.samples))
        if keys != self._keys_state:  # the keys depend on these only; a footer refresh is costly
            self._keys_state = keys
            self.refresh_bindings()

    def _draw_samples(self, view: JobView) -> None:
        """The images of the chosen sampled step (the newest unless one was picked); hidden without any."""
        steps = view.sample_steps()
        panel = self.query_one("#samples-panel")
        panel.display = bool(steps)
        if not steps:
            return
        step = self._sample_step if self._sample_step in steps else steps[-1]
        when = f"step {step}" if step else "before training (no LoRA)"
        title = Text.assemble(("Samples", "bold"), f" · {when} · {steps.index(step) + 1} of {len(steps)} sampled")
        title.append("  ([ ] older/newer)", style="dim")
        self.query_one("#samples-title", Static).update(title)
        self.query_one("#samples", SampleGallery).show(view.samples_at(step))

    def _append_log(self, view: JobView) -> None:
        new = view.log_total - self._log_lines_shown
        if new > 0:
            self.query_one("#job-log", JobLog).add(view.log[-min(new, len(view.log)) :])
        self._log_lines_shown = view.log_total

    @staticmethod
    def _stats(view: JobView) -> Text:
        job, progress = view.job, view.job.progress
        if not progress.step and not progress.total_steps:
            if job.state == JOB_STATE_RUNNING:
                return Text("preparing: loading the base model and scanning the data…")
            return Text("no training steps ran" if is_final(job) else "not started yet", style="dim")
        parts = [f"step {progress.step}/{progress.total_steps or '?'}"]
        if progress.epoch:
            parts.append(f"epoch {progress.epoch}" + (f"/{view.epochs}" if view.epochs else ""))
        if progress.steps_per_second > 0:
            parts.append(f"{progress.steps_per_second:.2f} it/s")
        if job.state not in (JOB_STATE_SUCCEEDED, JOB_STATE_FAILED, JOB_STATE_CANCELLED) and progress.step:
            parts.append(f"ETA {format_duration(progress.eta_seconds)}")
        if progress.step:
            parts.append(f"loss {progress.loss:.4f}")
        if view.resumed_at:
            parts.append(f"resumed at step {view.resumed_at}")
        return Text(" · ".join(parts))

    @staticmethod
    def _outcome(view: JobView) -> Text | Group:
        job = view.job
        text = Text()
        if job.state == JOB_STATE_SUCCEEDED:
            return _succeeded(view)
        if job.state == JOB_STATE_FAILED:
            text.append(f"✗ failed: {job.error or 'unknown error'}", style="bold red")
            if job.hint:
                text.append(f"\n  hint: {job.hint}")
            if job.checkpoint:
                text.append(f"\n  checkpoint kept: {job.checkpoint}")
        elif job.state == JOB_STATE_CANCELLED:
            text.append("cancelled", style="bold magenta")
            if job.checkpoint:
                text.append(f"; checkpoint kept: {job.checkpoint}")
            if view.partial:
                text.append(f"\n  partial LoRA of the last step: {view.partial}")
        elif job.state == JOB_STATE_QUEUED:
            where = f" (#{job.queue_position})" if job.queue_position else ""
            text.append(f"waiting in the queue{where}; it starts when the jobs before it are done", style="yellow")
        elif job.state == JOB_STATE_INTERRUPTED:
            text.append(
                "interrupted by a daemon stop; it resumes from its last checkpoint when the daemon restarts",
                style="yellow",
            )
        return text

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        view = self.job_view
        # False hides a key that means nothing for the job's state (None would show it dimmed).
        if action == "cancel_job":
            return view is not None and not is_final(view.job)
        if action in ("copy_snippet", "output_folder"):
            return view is not None and view.job.state == JOB_STATE_SUCCEEDED
        if action == "inspect_lora":
            return view is not None and view.job.state == JOB_STATE_SUCCEEDED and "kohya" in view.job.outputs
        if action == "sample_step":
            return view is not None and bool(view.samples)
        if action == "run_request":
            return view is not None and view.job.state == JOB_STATE_RUNNING
        return True

    def action_sample_step(self, direction: int) -> None:
        view = self.job_view
        steps = view.sample_steps() if view is not None else []
        if not steps:
            return
        at = steps.index(self._sample_step) if self._sample_step in steps else len(steps) - 1
        at = min(max(at + direction, 0), len(steps) - 1)
        # Back at the newest: follow new rounds again.
        self._sample_step = None if at == len(steps) - 1 else steps[at]
        self._draw_samples(view)

    def action_run_request(self, what: str) -> None:
        view = self.job_view
        if view is not None and view.job.state == JOB_STATE_RUNNING:
            self._sample_step = None  # show the new round when it arrives
            self.post_message(RunRequested(self.job_id, what))

    def action_back(self) -> None:
        self.dismiss()

    def action_cancel_job(self) -> None:
        view = self.job_view
        if view is None or is_final(view.job):
            return

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.post_message(CancelRequested(self.job_id))

        self.app.push_screen(ConfirmScreen(cancel_question(view.job)), confirmed)

    def action_copy_snippet(self) -> None:
        view = self.job_view
        if view is None:
            return
        snippet = usage_snippet(view.job)
        self.app.copy_to_clipboard(snippet)
        where = "your code" if "adapter" in view.job.outputs else "your prompt"
        self.notify(f"copied {snippet} — paste it into {where}", title="clipboard")

    def action_inspect_lora(self) -> None:
        view = self.job_view
        if view is not None and "kohya" in view.job.outputs:
            # The daemon reports absolute output paths; the App's base_dir only matters for a relative one.
            self.app.push_screen(LoraInspectScreen(view.job.outputs["kohya"], getattr(self.app, "base_dir", None)))

    def action_output_folder(self) -> None:
        view = self.job_view
        folder = output_folder(view) if view is not None else ""
        if not folder:
            self.notify("this job has no output folder yet", severity="warning")
            return
        self.app.copy_to_clipboard(folder)
        self.notify(f"{folder}\n(path copied to the clipboard)", title="output folder")


def _succeeded(view: JobView) -> Group:
    """What a finished job made: each output path, the folder and the prompt snippet, as label/value
    rows; a path too long for the line breaks under its own column, never under the labels."""
    job = view.job
    rows = Table.grid(padding=(0, 1, 0, 0))
    rows.add_column(no_wrap=True)
    rows.add_column(overflow="fold")
    for role, label in OUTPUT_LABELS.items():
        if role in job.outputs:
            rows.add_row(f"  {label}:", job.outputs[role])
    for role in sorted(set(job.outputs) - set(OUTPUT_LABELS)):
        rows.add_row(f"  {role}:", job.outputs[role])
    rows.add_row("  output folder:", Text.assemble(output_folder(view), ("  (o copies it)", "dim")))
    rows.add_row("  use it:", Text.assemble((usage_snippet(job), "bold"), ("  (y copies it)", "dim")))
    made = "adapter" if "adapter" in job.outputs else "LoRA"
    return Group(Text(f"✓ {made} written", style="bold green"), rows)
