"""``lorad webui install``: put the AUTOMATIC1111 extension (clients/sd-webui-lorad) into a WebUI.

A link (the default) follows this checkout: updating lorad updates the tab. ``--copy`` makes an
independent copy (for a WebUI on another filesystem, or Windows without symlink rights); running
it again replaces an earlier copy in one rename. Works for A1111, Forge and SD.Next (same layout).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from lorad.errors import LoradError

EXTENSION_NAME = "sd-webui-lorad"
# The file that makes a folder this extension (A1111 loads it); also how an earlier install is recognised.
ENTRY_SCRIPT = Path("scripts") / "lorad_training_tab.py"
# What every A1111-style WebUI root holds.
WEBUI_MARKERS = ("launch.py", "modules")


class WebuiInstallError(LoradError):
    """The extension cannot be installed there; the message names the path, the hint the fix."""


def extension_source() -> Path:
    """The extension folder of this lorad checkout. Raises WebuiInstallError in an installed wheel."""
    source = Path(__file__).resolve().parents[3] / "clients" / EXTENSION_NAME
    if not (source / ENTRY_SCRIPT).is_file():
        raise WebuiInstallError(
            f"the WebUI extension is not at {source}",
            hint="Run `lorad webui install` from a lorad source checkout (pip install -e .), "
            "or copy clients/sd-webui-lorad into the WebUI's extensions/ folder by hand.",
        )
    return source


def check_webui_dir(webui_dir: Path) -> None:
    """Raise WebuiInstallError unless ``webui_dir`` looks like an A1111-style WebUI folder."""
    if not webui_dir.is_dir():
        raise WebuiInstallError(
            f"`--webui-dir`: {webui_dir} is not a folder",
            hint="Give the stable-diffusion-webui folder (the one with launch.py).",
        )
    missing = [name for name in WEBUI_MARKERS if not (webui_dir / name).exists()]
    if missing:
        raise WebuiInstallError(
            f"`--webui-dir`: {webui_dir} is not an AUTOMATIC1111 WebUI folder (no {' or '.join(missing)})",
            hint="Give the folder you start the WebUI from: it holds launch.py, modules/ and extensions/.",
        )


def install_extension(webui_dir: Path, *, copy: bool = False, source: Path | None = None) -> tuple[Path, str]:
    """Link (or copy) the extension into ``webui_dir/extensions``; returns (installed path, what was done).

    Idempotent: an existing link to ``source`` is kept, an earlier copy is replaced. Anything else
    already at the target is left alone and raises WebuiInstallError.
    """
    check_webui_dir(webui_dir)
    source = source or extension_source()
    extensions = webui_dir / "extensions"
    extensions.mkdir(exist_ok=True)
    target = extensions / EXTENSION_NAME
    if target.is_symlink():
        if target.resolve() == source.resolve() and not copy:
            return target, "already linked"
        if not (target / ENTRY_SCRIPT).is_file():
            raise WebuiInstallError(
                f"{target} is a link to {os.readlink(target)}, not this extension",
                hint="Remove it, then run this again.",
            )
    elif target.exists() and not (target / ENTRY_SCRIPT).is_file():
        raise WebuiInstallError(
            f"{target} exists and is not the lorad extension", hint="Move it away, then run this again."
        )
    if copy:
        staged = Path(tempfile.mkdtemp(prefix=f".{EXTENSION_NAME}.", dir=extensions))
        shutil.copytree(source, staged / EXTENSION_NAME, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        _replace(staged / EXTENSION_NAME, target)
        shutil.rmtree(staged, ignore_errors=True)
        return target, "copied"
    staged = extensions / f".{EXTENSION_NAME}.link"
    staged.unlink(missing_ok=True)
    staged.symlink_to(source, target_is_directory=True)
    _replace(staged, target)
    return target, "linked"


def _replace(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``: one rename over a link or nothing; an old folder is moved aside first."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)
