"""Text data for a run: read the files, keep the usable samples, split off eval, tokenize, report.

:func:`read_samples` needs no tokenizer and no model, so a file with nothing usable fails in
milliseconds (:class:`~lorad.errors.DataError` listing the bad rows with file and line).
:func:`encode_samples` then tokenizes with the run's tokenizer and counts truncations.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from lorad.errors import DataError
from lorad.textdata.encoding import Encoded, encode_sample
from lorad.textdata.rows import BadRow, data_files, read_rows
from lorad.textdata.shapes import Sample, row_shape, to_sample
from lorad.textdata.templates import TemplateError

RENDER_LIMIT = 20


@dataclass(frozen=True)
class SampleSet:
    """Usable samples and the rows that were not, for one set of files."""

    samples: tuple[Sample, ...]
    bad_rows: tuple[BadRow, ...]
    files: tuple[str, ...]
    shapes: Mapping[str, int]


@dataclass(frozen=True)
class TextData:
    """The tokenized train (and eval) samples, and the report the user sees before training."""

    train: tuple[Encoded, ...]
    eval: tuple[Encoded, ...]
    report: dict[str, Any] = field(default_factory=dict)

    def render(self) -> str:
        """The report as a few lines of text."""
        r = self.report
        lines = [
            f"text data: {r['rows_used']} of {r['rows_found']} rows usable "
            f"({', '.join(f'{k}: {v}' for k, v in r['shapes'].items())}) from {len(r['files'])} file(s); "
            f"{len(self.train)} train / {len(self.eval)} eval samples, {r['trained_tokens']} response tokens"
        ]
        if r["truncated"]:
            lines.append(
                f"  {r['truncated']} sample(s) longer than max_seq_len={r['max_seq_len']} were cut "
                f"(longest: {r['longest_tokens']} tokens); raise max_seq_len to keep them whole"
            )
        if r["dropped_after_truncation"]:
            lines.append(
                f"  {r['dropped_after_truncation']} sample(s) had no response left within max_seq_len and were dropped"
            )
        bad = r["bad_rows"]
        if bad:
            lines.append(f"  {len(bad)} bad row(s):")
            lines += [f"    {b}" for b in bad[:RENDER_LIMIT]]
            if len(bad) > RENDER_LIMIT:
                lines.append(f"    ... and {len(bad) - RENDER_LIMIT} more")
        return "\n".join(lines)


def read_samples(
    path: Path, *, data_format: str, columns: Mapping[str, str], roles: Mapping[str, str], key: str = "train_data"
) -> SampleSet:
    """Every usable sample in ``path`` (a file or a folder of files), in file order.

    Raises DataError when no file is found or nothing usable remains; the message lists the first
    bad rows with their file and line so the user can fix them.
    """
    files = data_files(path)
    if not files:
        raise DataError(
            f"`{key}`: no .jsonl, .json, .csv or .parquet file in {path}",
            "point it at a data file or a folder holding some",
        )
    samples: list[Sample] = []
    bad: list[BadRow] = []
    for file in files:
        try:
            for row in read_rows(file):
                if isinstance(row, BadRow):
                    bad.append(row)
                    continue
                shape = row_shape(row, data_format, columns)
                result = shape if isinstance(shape, BadRow) else to_sample(row, shape, columns, roles)
                (bad if isinstance(result, BadRow) else samples).append(result)
        except (OSError, UnicodeDecodeError, ValueError) as err:
            bad.append(BadRow(file.name, 0, f"cannot be read: {err}"))
    if not samples:
        listed = "\n".join(f"  {b.render()}" for b in bad[:RENDER_LIMIT])
        found = f"{len(bad)} row(s), none usable:\n{listed}" if bad else "no rows (the file is empty)"
        raise DataError(
            f"`{key}`: {path} has {found}",
            "each row needs alpaca fields (instruction, output), `messages`, `conversations` or "
            "`text`; `lorad config --example llm` shows how to map other column names",
        )
    return SampleSet(
        samples=tuple(samples),
        bad_rows=tuple(bad),
        files=tuple(str(f) for f in files),
        shapes=dict(Counter(s.shape for s in samples)),
    )


def split_eval(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``fraction`` of the samples (at least one when fraction > 0), chosen by ``seed``."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    count = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    held = set(order[:count])
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


def encode_samples(
    train: SampleSet,
    eval_samples: Sequence[Sample],
    train_samples: Sequence[Sample],
    tokenizer: object,
    *,
    max_seq_len: int,
    eval_set: SampleSet | None = None,
) -> TextData:
    """Tokenize the split samples and build the report. Samples left with no response token after
    truncation are dropped (and counted); DataError when no train sample remains."""
    rejected: list[str] = []  # "file:line: reason" of samples the chat template refused

    def encode(items: Sequence[Sample]) -> tuple[list[Encoded], int, int, int]:
        kept, truncated, dropped, longest = [], 0, 0, 0
        for sample in items:
            try:
                encoded = encode_sample(sample, tokenizer, max_seq_len=max_seq_len)
            except (TemplateError, jinja2.TemplateError) as err:
                # Templates may refuse a conversation (e.g. Llama 2's "roles must alternate").
                rejected.append(f"{sample.where}: the chat template refused it ({err})")
                continue
            truncated += encoded.truncated
            longest = max(longest, encoded.original_length)
            if encoded.trained_tokens == 0:
                dropped += 1
                continue
            kept.append(encoded)
        return kept, truncated, dropped, longest

    train_enc, truncated, dropped, longest = encode(train_samples)
    eval_enc, eval_truncated, eval_dropped, _ = encode(eval_samples)
    bad = list(train.bad_rows) + list(eval_set.bad_rows if eval_set else ())
    report = {
        "files": list(train.files) + list(eval_set.files if eval_set else ()),
        "rows_found": len(train.samples)
        + len(train.bad_rows)
        + (len(eval_set.samples) + len(eval_set.bad_rows) if eval_set else 0),
        "rows_used": len(train_enc) + len(eval_enc),
        "shapes": dict(train.shapes),
        "bad_rows": [b.render() for b in bad] + rejected,
        "truncated": truncated + eval_truncated,
        "longest_tokens": longest,
        "max_seq_len": max_seq_len,
        "dropped_after_truncation": dropped + eval_dropped,
        "train_samples": len(train_enc),
        "eval_samples": len(eval_enc),
        "trained_tokens": sum(e.trained_tokens for e in train_enc),
        "total_tokens": sum(len(e.input_ids) for e in train_enc),
    }
    if not train_enc and rejected:
        raise DataError(
            "the chat template refused every training sample:\n  " + "\n  ".join(rejected[:RENDER_LIMIT]),
            "set `chat_template` to one that fits your conversations (chatml, llama2, alpaca)",
        )
    if not train_enc:
        raise DataError(
            f"no training sample has a response within max_seq_len={max_seq_len}",
            "raise max_seq_len, or shorten the prompts",
        )
    return TextData(train=tuple(train_enc), eval=tuple(eval_enc), report=report)
