"""Submit: pick a YAML config, see whether it is valid (every problem by key), queue it."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, DirectoryTree, Footer, Input, Static

from lorad.config.dispatch import parse_any_config_text
from lorad.errors import ConfigError, ConfigProblem, LoradError
from lorad.families.registry import spec_for
from lorad_tui.messages import SubmitRejected, SubmitRequested
from lorad_tui.widgets.title_bar import TitleBar

CONFIG_SUFFIXES = (".yaml", ".yml")


class ConfigTree(DirectoryTree):
    """A DirectoryTree of folders and YAML files only; hidden entries (``.venv``, ``.git``) left out."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [
            path
            for path in paths
            if not path.name.startswith(".") and (path.suffix.lower() in CONFIG_SUFFIXES or _is_dir(path))
        ]


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a broken link or a folder we may not read: not something to descend into
        return False


def problem_text(problem: ConfigProblem) -> Text:
    """One problem with its key highlighted: "`lora_rank`: got 'eight' (text) — write a whole number"."""
    text = Text(problem.render())
    if problem.key:
        text.highlight_words([f"`{problem.key}`"], style="bold yellow")
    return text


def problems_table(problems: list[ConfigProblem]) -> Table:
    """Every problem on its own row, a ✗ in front, long ones wrapped under their own text."""
    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold red", no_wrap=True)
    table.add_column(overflow="fold")  # a long path in a fix breaks across lines rather than being cut
    for problem in problems:
        table.add_row("✗", problem_text(problem))
    return table


class SubmitScreen(Screen[None]):
    """Pick a config in the tree (or type its path), see the verdict, press ``s`` to queue it.

    Validation is local and the same as the daemon's (``lorad.config.dispatch.parse_any_config_text``, pure
    Python), with relative paths resolved against ``base_dir`` — the folder the TUI runs in, which
    is also what the submit sends. A config with problems is never sent. On success the App
    replaces this screen with the new job's detail; a refusal by the daemon comes back as
    ``SubmitRejected`` and is shown here.
    """

    AUTO_FOCUS = "#config-tree"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("s", "submit", "Submit"),
    ]

    def __init__(self, base_dir: Path) -> None:
        super().__init__()
        self.base_dir = base_dir
        self._valid: tuple[Path, str] | None = None

    def compose(self) -> ComposeResult:
        yield TitleBar("submit a config")
        yield Static(
            Text.assemble(
                "Pick a training config. Relative paths in it resolve against ", (str(self.base_dir), "bold"), "."
            ),
            id="submit-help",
        )
        with Horizontal(id="submit-body"):
            yield ConfigTree(self.base_dir, id="config-tree")
            with Vertical(id="submit-side"):
                yield Input(placeholder="…or type a config path, then enter", id="config-path")
                yield Static("no config picked yet", id="verdict")
                with VerticalScroll(id="problems-box"):
                    yield Static(id="problems")
                yield Button("Submit (s)", id="submit-button", variant="primary", disabled=True)
        yield Footer()

    # -- picking -------------------------------------------------------------------------------

    def on_directory_tree_file_selected(self, event: DirectoryTree.FileSelected) -> None:
        event.stop()
        self.query_one("#config-path", Input).value = self._shown(event.path)
        self.check(event.path)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.check(Path(event.value.strip()).expanduser())

    def _shown(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.base_dir))
        except ValueError:
            return str(path)

    def check(self, path: Path) -> bool:
        """Read and validate the config at ``path`` (relative: to ``base_dir``) and show the verdict.

        Returns True when it is valid (it can then be submitted).
        """
        path = path if path.is_absolute() else self.base_dir / path
        self._valid = None
        verdict, problems = self.query_one("#verdict", Static), self.query_one("#problems", Static)
        button = self.query_one("#submit-button", Button)
        button.disabled = True
        self.refresh_bindings()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            verdict.update(Text(f"✗ cannot read {self._shown(path)}: {err}", style="bold red"))
            problems.update("")
            return False
        try:
            config = parse_any_config_text(text, base_dir=self.base_dir, source=self._shown(path))
        except ConfigError as err:
            count = len(err.problems)
            verdict.update(
                Text(
                    f"✗ {self._shown(path)}: {count} problem{'s' if count != 1 else ''} — "
                    "fix them, save, and pick the file again",
                    style="bold red",
                )
            )
            problems.update(problems_table(err.problems))
            return False
        except LoradError as err:  # not raised by the parser today; a clear line beats a crash
            verdict.update(Text(f"✗ {err}", style="bold red"))
            problems.update(Text(err.hint))
            return False
        self._valid = (path, text)
        verdict.update(Text.assemble(("✓ valid", "bold green"), f" — {self._shown(path)}"))
        steps = f"max {config.max_train_steps} steps" if config.max_train_steps else f"{config.epochs} epochs"
        # Label/value rows: a long path breaks under its own column, not under the labels.
        paths = Table.grid(padding=(0, 1, 0, 0))
        paths.add_column(no_wrap=True)
        paths.add_column(overflow="fold")
        paths.add_row("base model:", str(config.base_model))
        spec = spec_for(config)
        paths.add_row("family:", spec.title)
        paths.add_row("data:", str(getattr(config, spec.data_key)))
        paths.add_row("output:", str(config.output_dir))
        problems.update(
            Group(
                Text.assemble("LoRA ", (f"{config.output_name}", "bold"), f" · rank {config.lora_rank} · {steps}"),
                paths,
                Text("press s (or the button) to queue it", style="dim"),
            )
        )
        button.disabled = False
        self.refresh_bindings()
        return True

    # -- submitting ----------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Shown dimmed (None) until a valid config is picked: nothing invalid is ever sent.
        if action == "submit":
            return True if self._valid is not None else None
        return True

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "submit-button":
            self.action_submit()

    def action_submit(self) -> None:
        if self._valid is None:
            self.notify("pick a valid config first", severity="warning")
            return
        path, _ = self._valid
        # Read it again: the file may have been edited since it was checked.
        if not self.check(path) or self._valid is None:
            return
        path, text = self._valid
        self.query_one("#verdict", Static).update(Text(f"submitting {self._shown(path)}…", style="bold"))
        self.query_one("#submit-button", Button).disabled = True
        self.post_message(SubmitRequested(path, text))

    def on_submit_rejected(self, message: SubmitRejected) -> None:
        self.query_one("#verdict", Static).update(Text("✗ the daemon refused it:", style="bold red"))
        self.query_one("#problems", Static).update(Text(message.error))
        self.query_one("#submit-button", Button).disabled = self._valid is None

    def action_back(self) -> None:
        self.dismiss()
