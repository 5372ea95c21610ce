"""Limits on what a request or a config may hold, and the checks against them.

A daemon takes input from clients it does not control, so every value is bounded before it is used:
text sizes (a config, a path, a value echoed back in an error), numbers (finite, and within what a
real run can use: see each key's ``maximum`` in the schemas), and how much of a file's content an
error may show (none: errors name the file and line, never the text found there).
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from lorad.errors import ConfigProblem

# A training config is a few KB; this leaves room for long caption vocabularies and notes.
MAX_CONFIG_BYTES = 256 * 1024
# Linux's PATH_MAX and NAME_MAX: longer paths fail in the OS with ENAMETOOLONG.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
# Characters of a bad value shown in an error (the rest is elided).
MAX_SHOWN_CHARS = 80

_brief = reprlib.Repr()
_brief.maxstring = MAX_SHOWN_CHARS
_brief.maxother = MAX_SHOWN_CHARS
_brief.maxlong = 40
_brief.maxlist = _brief.maxtuple = _brief.maxdict = _brief.maxset = 4
_brief.maxlevel = 2


def shown(value: Any) -> str:
    """``repr(value)`` cut to a bounded size: nested, aliased or huge values cannot blow up an error."""
    return _brief.repr(value)


def path_problem(key: str, text: str, *, fix: str = "give a shorter path") -> ConfigProblem | None:
    """A problem when ``text`` cannot be a path on this system (a NUL character, a path longer than
    PATH_MAX or a part longer than NAME_MAX bytes), else None. Says what is wrong, not the text."""
    if "\0" in text:
        return ConfigProblem(key, "contains a NUL character", "paths cannot hold NUL; check how it was produced")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_PATH_BYTES:
        return ConfigProblem(key, f"is {size} bytes long; paths are at most {MAX_PATH_BYTES}", fix)
    longest = max(
        (len(part.encode("utf-8", "surrogatepass")) for part in text.replace("\\", "/").split("/")), default=0
    )
    if longest > MAX_NAME_BYTES:
        return ConfigProblem(key, f"has a {longest}-byte file name; names are at most {MAX_NAME_BYTES}", fix)
    return None


def number_problem(key: str, value: float, low: float, high: float, fix: str = "") -> ConfigProblem | None:
    """A problem when ``value`` is NaN, infinite or outside [low, high], else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return ConfigProblem(key, f"got {value!r}", fix or f"use a number from {low:g} to {high:g}")
    if not low <= value <= high:
        return ConfigProblem(key, f"got {shown(value)}", fix or f"use a number from {low:g} to {high:g}")
    return None
