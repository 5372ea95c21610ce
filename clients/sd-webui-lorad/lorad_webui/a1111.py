"""The tab inside AUTOMATIC1111 (and Forge / SD.Next): A1111's folders, checkpoints, settings and
LoRA list, and the callbacks that register the tab and the settings.

Only A1111's public extension API is used: ``modules.script_callbacks``, ``modules.shared``
(``opts``, ``cmd_opts``, ``OptionInfo``), ``modules.sd_models`` and ``modules.paths_internal``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

from lorad_webui import TAB_TITLE

SECTION = ("lorad", "lorad (LoRA training)")
ADDRESS_OPTION = "lorad_address"
WEIGHT_OPTION = "lorad_snippet_weight"
TAB_ID = "lorad_training"


def _webui_paths() -> ModuleType:
    """The module with ``models_path`` and ``data_path``: ``paths_internal`` (A1111 ≥ 1.1, Forge), else ``paths``."""
    try:
        from modules import paths_internal
    except ImportError:
        from modules import paths

        return paths
    return paths_internal


class A1111Host:
    """lorad_webui.actions.Host for a running WebUI (reads settings at each call, so changes apply at once)."""

    def lora_dir(self) -> Path:
        """``--lora-dir`` when given, else ``models/Lora`` under the WebUI's models folder."""
        from modules import shared

        configured = getattr(shared.cmd_opts, "lora_dir", None)
        if configured:
            return Path(configured)
        return Path(_webui_paths().models_path) / "Lora"

    def work_dir(self) -> Path:
        """``outputs/lorad`` in the WebUI's data folder: uploads and training runs."""
        return Path(_webui_paths().data_path) / "outputs" / "lorad"

    def checkpoints(self) -> dict[str, str]:
        """The WebUI's checkpoint list (the titles its own dropdown shows) → file paths."""
        from modules import sd_models

        titles = sd_models.checkpoint_tiles()
        return {
            title: sd_models.checkpoints_list[title].filename for title in titles if title in sd_models.checkpoints_list
        }

    def refresh_loras(self) -> None:
        """Rescan the LoRA folder through the built-in Lora extension (``networks``, or ``lora`` before 1.5)."""
        for module_name, function in (("networks", "list_available_networks"), ("lora", "list_available_loras")):
            refresh = getattr(sys.modules.get(module_name), function, None)
            if callable(refresh):
                refresh()
                return

    def daemon_address(self) -> str:
        """The address from Settings → lorad ("" = the local daemon)."""
        from modules import shared

        return str(shared.opts.data.get(ADDRESS_OPTION, "") or "")

    def snippet_weight(self) -> float:
        """The snippet weight from Settings → lorad."""
        from modules import shared

        return float(shared.opts.data.get(WEIGHT_OPTION, 0.8) or 0.8)


def on_ui_settings() -> None:
    """Add the connection settings to A1111's Settings page."""
    from modules import shared

    shared.opts.add_option(
        ADDRESS_OPTION,
        shared.OptionInfo(
            "",
            "lorad daemon address (empty: find the daemon on this machine, and its token, by itself)",
            section=SECTION,
        ),
    )
    shared.opts.add_option(
        WEIGHT_OPTION,
        shared.OptionInfo(0.8, "Weight in the <lora:name:weight> snippet shown after training", section=SECTION),
    )


def on_ui_tabs() -> list[tuple[object, str, str]]:
    """A1111's ui_tabs callback: the tab's Blocks, its title and its element id."""
    from lorad_webui.ui import build_ui

    return [(build_ui(A1111Host()), TAB_TITLE, TAB_ID)]


def register() -> None:
    """Register the tab and the settings with A1111 (called once by the extension's script)."""
    from modules import script_callbacks

    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_ui_tabs(on_ui_tabs)
