"""The sample images of one sampled step, side by side: drawn with the terminal's graphics protocol (Kitty
or Sixel, via textual-image) where it has one, with Unicode half blocks where it does not, and as the
file's path where the image cannot be read here (textual-image missing, or a daemon on another machine)."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.containers import HorizontalScroll, Vertical
from textual.widget import Widget
from textual.widgets import Static

from lorad_tui.state import SampleShot

try:  # imported before the App starts: textual-image asks the terminal what it can draw, once
    from textual_image.renderable import Image as _Best
    from textual_image.renderable import SixelImage as _Sixel
    from textual_image.renderable import TGPImage as _Tgp
    from textual_image.widget import HalfcellImage
    from textual_image.widget import Image as GraphicsImage

    GRAPHICS = _Best in (_Sixel, _Tgp)
except ImportError:  # pragma: no cover - textual-image is a dependency; a stripped install shows paths
    HalfcellImage = GraphicsImage = None  # type: ignore[assignment,misc]
    GRAPHICS = False

# Columns one image takes; its height follows its aspect ratio.
CELL_WIDTH = 24


def image_mode(requested: str = "auto") -> str:
    """How images are drawn: "graphics" (Kitty/Sixel), "halfblock", or "path". ``auto`` picks the best the
    terminal and the installed libraries allow."""
    if HalfcellImage is None:
        return "path"
    if requested == "auto":
        return "graphics" if GRAPHICS else "halfblock"
    return requested


class SampleCell(Vertical):
    """One image and its caption (prompt number and text)."""

    def __init__(self, shot: SampleShot, mode: str) -> None:
        super().__init__(classes="sample-cell")
        self.shot, self.mode = shot, mode

    def compose(self) -> ComposeResult:
        shot = self.shot
        readable = Path(shot.path).is_file()
        if self.mode != "path" and readable:
            cls = GraphicsImage if self.mode == "graphics" else HalfcellImage
            image = cls(shot.path, classes="sample-image")
            rows = max(1, round(CELL_WIDTH * shot.height / max(1, shot.width) / 2))
            image.styles.width, image.styles.height = CELL_WIDTH, rows
            yield image
        else:
            where = "" if readable else " (on the daemon's disk)"
            yield Static(f"{shot.path}{where}", classes="sample-path")
        text = shot.prompt if len(shot.prompt) <= CELL_WIDTH * 2 else shot.prompt[: CELL_WIDTH * 2 - 1] + "…"
        yield Static(f"#{shot.prompt_index} {text}", classes="sample-caption")


class SampleGallery(Widget):
    """The images of one step (``show``), in a row (it scrolls sideways when they do not fit)."""

    DEFAULT_CSS = """
    SampleGallery { height: auto; }
    SampleGallery > HorizontalScroll { height: auto; }
    SampleGallery .sample-cell { width: 26; height: auto; margin-right: 1; }
    SampleGallery .sample-caption { color: $text-muted; height: auto; }
    SampleGallery .sample-path { height: auto; }
    """

    def __init__(self, *, mode: str = "auto", id: str | None = None) -> None:
        super().__init__(id=id)
        self.mode = image_mode(mode)
        self._shown: tuple[SampleShot, ...] = ()

    def compose(self) -> ComposeResult:
        yield HorizontalScroll(id="sample-row")

    def show(self, shots: list[SampleShot]) -> None:
        """Draw ``shots`` (nothing changes when they are the ones shown already)."""
        if tuple(shots) == self._shown:
            return
        self._shown = tuple(shots)
        row = self.query_one("#sample-row", HorizontalScroll)
        row.remove_children()
        row.mount_all([SampleCell(shot, self.mode) for shot in shots])
