"""A yes/no question over the current screen (used before cancelling a job)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Static

from lorad_client import JOB_STATE_RUNNING, Job


def cancel_question(job: Job) -> str:
    """What cancelling ``job`` will do, asked as a question."""
    name = job.name or job.job_id
    if job.state == JOB_STATE_RUNNING:
        return (
            f"Cancel the running job `{name}`?\nIt stops after its current step and keeps its last "
            "checkpoint (`resume_from: latest` continues it)."
        )
    return f"Cancel the job `{name}`?\nIt leaves the queue and never runs."


class ConfirmScreen(ModalScreen[bool]):
    """Ask ``question``; dismisses with True for yes (``y``), False for no (``n`` or ``escape``)."""

    # The safe answer has the focus: a stray enter does not cancel a long run.
    AUTO_FOCUS = "#no"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(self.question, id="confirm-question")
            with Horizontal(id="confirm-buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")
        yield Footer()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
