"""Errors of the captioners: each names the file or key at fault and says how to fix it."""

from __future__ import annotations

from lorad.errors import LoradError, ModelLoadError


class CaptionModelError(ModelLoadError):
    """A captioner's model folder is missing, incomplete or malformed, or will not load."""


class VocabularyError(LoradError):
    """A CLIP vocabulary file cannot be read or holds no phrase."""


class FolderBusy(LoradError):
    """Another caption request is writing captions into the same folder right now."""
