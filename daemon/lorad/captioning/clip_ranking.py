"""The CLIP captioner: a CLIP model scores a vocabulary of phrases against each image and keeps the
best ones — the "CLIP" path of the original tool, and what CLIP-interrogator-style captions do.

The vocabulary is lorad's built-in list of subject/medium/style/lighting/colour/composition phrases
(``vocabulary.txt`` beside this module), or the user's own file in the same format. Phrases are
embedded once per vocabulary and kept with the loaded model.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorad.captioning.captioner import processor_side
from lorad.captioning.errors import VocabularyError
from lorad.captioning.options import CaptionOptions

if TYPE_CHECKING:
    import torch
    from PIL import Image

BUILTIN_VOCABULARY = Path(__file__).with_name("vocabulary.txt")
# Phrases embedded per forward pass: bounds the text encoder's memory for large vocabularies.
_TEXT_CHUNK = 256
_HINT = "One phrase per line; `[name]` or `[name N]` (keep the N best) starts a section; # starts a comment."


@dataclass(frozen=True)
class Section:
    """Phrases that compete with each other; the ``keep`` best (None: the request's ``top_k``) win."""

    name: str
    phrases: tuple[str, ...]
    keep: int | None = None


def read_vocabulary(path: Path | None = None) -> tuple[Section, ...]:
    """The sections of a vocabulary file (None: the built-in one), empty sections dropped.

    Phrases before the first section line form an unnamed section; a phrase repeated within a section
    counts once. Raises :class:`VocabularyError` naming the file (and line) when it cannot be read,
    a section line is malformed, or it holds no phrase.
    """
    source = path or BUILTIN_VOCABULARY
    try:
        text = source.read_bytes().decode("utf-8-sig")
    except OSError as err:
        raise VocabularyError(f"vocabulary {source}: cannot be read ({err.strerror or err})", _HINT) from err
    except UnicodeDecodeError as err:
        raise VocabularyError(f"vocabulary {source}: not UTF-8 text (byte {err.start})", _HINT) from err
    sections: list[Section] = []
    name, keep, phrases = "", None, []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            header = _section_header(line)
            if header is None:
                # The line is not shown: the file may not be a vocabulary at all (errors never echo files).
                raise VocabularyError(
                    f"vocabulary {source} line {number}: starts with `[` but is not a `[section]` or "
                    "`[section N]` line",
                    _HINT,
                )
            sections.append(Section(name, tuple(dict.fromkeys(phrases)), keep))
            (name, keep), phrases = header, []
            continue
        phrases.append(line)
    sections.append(Section(name, tuple(dict.fromkeys(phrases)), keep))
    sections = [section for section in sections if section.phrases]
    if not sections:
        raise VocabularyError(f"vocabulary {source}: holds no phrase", _HINT)
    return tuple(sections)


def _section_header(line: str) -> tuple[str, int | None] | None:
    """(name, count or None) of a `[name]` / `[name N]` / `[N]` line; None if malformed."""
    if not line.endswith("]"):
        return None
    inner = line[1:-1].strip()
    name, _, last = inner.rpartition(" ")
    if last.isdigit():
        count = int(last)
        return (name.strip(), count) if count >= 1 else None
    return inner, None


class ClipRanker:
    """One loaded CLIP model with its processor; see :class:`lorad.captioning.captioner.Captioner`.

    The caption is each section's best phrases (by cosine similarity to the image, best first), the
    sections in file order, joined with ", ".
    """

    kind = "clip"
    max_batch = None

    def __init__(self, model: Any, processor: Any, *, source: str, device: str, dtype: str) -> None:
        self.model = model
        self.processor = processor
        self.source = source
        self.model_version = "clip"
        self.device = device
        self.dtype = dtype
        self.input_size = processor_side(processor.image_processor)
        self._lock = threading.Lock()
        # vocabulary identity (path, mtime, size) -> (its sections, their phrases' unit-length
        # embeddings stacked in file order)
        self._embedded: dict[tuple[str, int, int], tuple[tuple[Section, ...], torch.Tensor]] = {}

    def caption(self, images: Sequence[Image.Image], options: CaptionOptions) -> list[str]:
        import torch

        if not images:
            return []
        sections, phrase_embeddings = self._vocabulary(options.vocabulary)
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        with self._lock, torch.inference_mode():
            image_embeddings = _unit(
                _features(
                    self.model.get_image_features(pixel_values=pixels.to(self.device, dtype=getattr(torch, self.dtype)))
                )
            )
        similarity = (image_embeddings.float() @ phrase_embeddings.float().T).cpu()
        captions = []
        for row in similarity:
            chosen: list[str] = []
            start = 0
            for section in sections:
                scores = row[start : start + len(section.phrases)]
                start += len(section.phrases)
                keep = min(section.keep or options.top_k, len(section.phrases))
                best = torch.topk(scores, keep).indices.tolist()
                chosen += [section.phrases[i] for i in best]
            captions.append(", ".join(dict.fromkeys(chosen)))
        return captions

    def _vocabulary(self, path: Path | None) -> tuple[tuple[Section, ...], torch.Tensor]:
        """The sections of ``path`` and their phrase embeddings, computed once per file version."""
        import torch

        source = path or BUILTIN_VOCABULARY
        try:
            stat = source.stat()
        except OSError as err:
            raise VocabularyError(f"vocabulary {source}: cannot be read ({err.strerror or err})", _HINT) from err
        identity = (str(source), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._embedded.get(identity)
        if cached is not None:
            return cached
        sections = read_vocabulary(path)
        phrases = [phrase for section in sections for phrase in section.phrases]
        chunks = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(phrases), _TEXT_CHUNK):
                tokens = self.processor.tokenizer(
                    phrases[start : start + _TEXT_CHUNK], padding=True, truncation=True, return_tensors="pt"
                )
                tokens = {name: value.to(self.device) for name, value in tokens.items()}
                chunks.append(_unit(_features(self.model.get_text_features(**tokens))))
            embedded = (sections, torch.cat(chunks))
            self._embedded = {identity: embedded}  # only the newest vocabulary stays in memory
        return embedded


def _features(output: Any) -> torch.Tensor:
    # transformers < 5 returns the projected embeddings; 5.x returns an output whose pooler_output they are.
    return output if not hasattr(output, "pooler_output") else output.pooler_output


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def load_clip_ranker(folder: Path, *, device: str, dtype: str, allow_pickle: bool = False) -> ClipRanker:
    """Load the CLIP model in ``folder`` (checked complete by
    :func:`lorad.captioning.model_folder.resolve_captioner_model`) onto ``device`` in ``dtype``.
    Weights only from safetensors unless ``allow_pickle``."""
    import torch
    from transformers import AutoProcessor, CLIPModel

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = CLIPModel.from_pretrained(folder, local_files_only=True, use_safetensors=None if allow_pickle else True)
    model.to(device=device, dtype=getattr(torch, dtype)).eval()
    model.requires_grad_(False)
    return ClipRanker(model, processor, source=str(folder), device=device, dtype=dtype)
