"""Widgets of the lorad TUI that Textual does not ship."""

from lorad_tui.widgets.job_log import JobLog
from lorad_tui.widgets.loss_plot import LossPlot
from lorad_tui.widgets.title_bar import TitleBar

__all__ = ["JobLog", "LossPlot", "TitleBar"]
