"""Rows in the three data shapes → one form the tokenizer side understands.

- alpaca: ``instruction``, ``input`` (optional), ``output``, ``system`` (optional)
- chat: ``messages`` = [{role, content}, ...]; ShareGPT: ``conversations`` = [{from, value}, ...]
- text: ``text`` (plain text; every token is trained on)

Column names and role names can be mapped by the config (``columns``, ``roles``). A row that does
not fit its shape becomes a :class:`BadRow` naming the field at fault.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from lorad.config.limits import shown
from lorad.textdata.rows import BadRow, Row

SHAPES = ("auto", "alpaca", "chat", "sharegpt", "text")
ROLES = ("system", "user", "assistant")
# ShareGPT's speaker names, and other common spellings, mapped to the three roles.
DEFAULT_ROLE_NAMES: Mapping[str, str] = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "human": "user",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
# The field that identifies each shape, checked in this order by `auto`.
SHAPE_KEYS = (("chat", "messages"), ("sharegpt", "conversations"), ("alpaca", "instruction"), ("text", "text"))


@dataclass(frozen=True)
class Message:
    role: str  # system, user or assistant
    content: str


@dataclass(frozen=True)
class Sample:
    """One usable training record: a conversation, or (``messages`` empty) plain ``text``."""

    where: str
    shape: str
    messages: tuple[Message, ...] = ()
    text: str = ""


def column(name: str, columns: Mapping[str, str]) -> str:
    """The file's column for lorad's field ``name`` (the config's ``columns`` mapping renames)."""
    return columns.get(name, name)


def detect_shape(row: Row, columns: Mapping[str, str]) -> str | None:
    """The shape a row's fields say it is, or None when no identifying field is present."""
    for shape, key in SHAPE_KEYS:
        if column(key, columns) in row.fields:
            return shape
    return None


def to_sample(row: Row, shape: str, columns: Mapping[str, str], roles: Mapping[str, str]) -> Sample | BadRow:
    """Convert one row of a known shape; problems become a BadRow at the row's line."""
    try:
        if shape == "alpaca":
            return _alpaca(row, columns)
        if shape in ("chat", "sharegpt"):
            return _conversation(row, shape, columns, roles)
        return Sample(where=row.where, shape="text", text=_text_field(row, "text", columns))
    except _BadField as bad:
        return BadRow(row.file, row.line, str(bad))


class _BadField(Exception):
    pass


def _text_field(row: Row, name: str, columns: Mapping[str, str], *, required: bool = True) -> str:
    key = column(name, columns)
    value = row.fields.get(key)
    if value is None or (isinstance(value, float) and value != value):  # CSV/Parquet blanks read as None/NaN
        if required:
            raise _BadField(f"missing field `{key}`")
        return ""
    if not isinstance(value, str):
        raise _BadField(f"`{key}` must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise _BadField(f"`{key}` is empty")
    return value


def _alpaca(row: Row, columns: Mapping[str, str]) -> Sample:
    instruction = _text_field(row, "instruction", columns)
    extra = _text_field(row, "input", columns, required=False)
    output = _text_field(row, "output", columns)
    system = _text_field(row, "system", columns, required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = ((Message("system", system),) if system.strip() else ()) + (
        Message("user", prompt),
        Message("assistant", output),
    )
    return Sample(where=row.where, shape="alpaca", messages=messages)


def _conversation(row: Row, shape: str, columns: Mapping[str, str], roles: Mapping[str, str]) -> Sample:
    list_key = column("messages" if shape == "chat" else "conversations", columns)
    role_key = column("role" if shape == "chat" else "from", columns)
    content_key = column("content" if shape == "chat" else "value", columns)
    turns = row.fields.get(list_key)
    if isinstance(turns, str):  # a CSV cell holding the JSON list
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise _BadField(f"`{list_key}` is text that is not a JSON list") from None
    if turns is None:
        raise _BadField(f"missing field `{list_key}`")
    if not isinstance(turns, list) or not turns:
        raise _BadField(f"`{list_key}` must be a non-empty list of turns")
    names = dict(DEFAULT_ROLE_NAMES) | {k.lower(): v for k, v in roles.items()}
    messages: list[Message] = []
    for index, turn in enumerate(turns, start=1):
        if not isinstance(turn, Mapping):
            raise _BadField(f"turn {index} of `{list_key}` must be an object with `{role_key}` and `{content_key}`")
        speaker, content = turn.get(role_key), turn.get(content_key)
        if not isinstance(speaker, str) or speaker.lower() not in names:
            example = speaker if isinstance(speaker, str) and len(speaker) <= 40 else "NAME"
            raise _BadField(
                f"turn {index}: unknown {role_key} {shown(speaker)} (map it with `roles`, "
                f"e.g. roles: {{{example}: assistant}})"
            )
        if not isinstance(content, str) or not content.strip():
            raise _BadField(f"turn {index}: `{content_key}` must be non-empty text")
        messages.append(Message(names[speaker.lower()], content))
    if not any(m.role == "assistant" for m in messages):
        raise _BadField("no assistant turn: nothing to learn from")
    first = next(m.role for m in messages if m.role != "system")
    if first != "user":
        raise _BadField("the conversation must start with a user turn (after an optional system turn)")
    return Sample(where=row.where, shape=shape, messages=tuple(messages))


def row_shape(row: Row, configured: str, columns: Mapping[str, str]) -> str | BadRow:
    """The shape to read ``row`` as: the configured one, or detected from its fields."""
    if configured != "auto":
        return configured
    found = detect_shape(row, columns)
    if found is None:
        wanted = ", ".join(f"`{column(key, columns)}`" for _, key in SHAPE_KEYS)
        return BadRow(
            row.file,
            row.line,
            f"no field identifies the shape (one of {wanted}); set `data_format` or map names with `columns`",
        )
    return found
