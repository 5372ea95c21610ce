"""The job-event schema has one source, lorad.events: every other place is derived or checked here.

A new event kind or field is added to its dataclass and to jobs.proto (then `just proto`); forgetting
the proto, the client's wording or the history row fails one of these tests.
"""

from __future__ import annotations

import dataclasses
import io
import typing

import pytest

from lorad import events as ev
from lorad.cli.progress import TerminalProgress
from lorad.jobs.payloads import engine_event_payload
from lorad.jobs.records import EventRecord
from lorad.server.proto_convert import engine_event_from_proto, event_to_proto
from lorad_api.v1 import jobs_pb2
from lorad_client.format import describe_event

ENGINE_EVENTS = sorted(ev.Event.__subclasses__(), key=lambda cls: cls.__name__)
# Kinds the job store writes itself (the job's life, not the run's): they have no engine event.
JOB_LEVEL_KINDS = {"queued", "started", "failed", "cancelled", "interrupted"}


def example(cls: type[ev.Event]) -> ev.Event:
    """An instance whose every field differs from its default, so a dropped field shows."""
    hints = typing.get_type_hints(cls)
    values: dict[str, object] = {}
    for number, field in enumerate(dataclasses.fields(cls), start=3):
        kind = hints[field.name]
        if kind is bool:
            values[field.name] = True
        elif kind is int:
            values[field.name] = number
        elif kind is float:
            values[field.name] = number + 0.25
        elif kind is str:
            values[field.name] = f"{field.name} {number}"
        elif field.name == "report":
            values[field.name] = {"images_found": 4, "images_used": 3, "skipped": [{"path": "x.png"}]}
        else:  # a str -> str map (outputs)
            values[field.name] = {"kohya": f"/out/{field.name}.safetensors"}
    return cls(**values)


def wire_message(kind: str) -> typing.Any:
    message = getattr(jobs_pb2.JobEvent(), kind)
    return message.progress if kind == "step" else message


@pytest.mark.parametrize("cls", ENGINE_EVENTS, ids=lambda cls: cls.__name__)
def test_every_engine_event_has_a_wire_field_with_the_same_fields(cls: type[ev.Event]) -> None:
    oneof = {field.name for field in jobs_pb2.JobEvent.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert cls.wire_kind in oneof, f"{cls.__name__}.wire_kind {cls.wire_kind!r} is not a JobEvent.kind field"
    kind, payload = engine_event_payload(example(cls))
    assert kind == cls.wire_kind
    proto_fields = {field.name for field in wire_message(kind).DESCRIPTOR.fields}
    assert set(payload) == proto_fields, f"{cls.__name__}'s payload and jobs.proto's {kind} differ"


@pytest.mark.parametrize("cls", ENGINE_EVENTS, ids=lambda cls: cls.__name__)
def test_every_engine_event_survives_the_history_and_the_wire(cls: type[ev.Event]) -> None:
    event = example(cls)
    row = EventRecord("job", 1, 0.0, *engine_event_payload(event))
    assert engine_event_from_proto(event_to_proto(row)) == event


def test_every_wire_kind_is_an_engine_event_or_a_job_level_one() -> None:
    engine_kinds = {cls.wire_kind for cls in ENGINE_EVENTS}
    oneof = {field.name for field in jobs_pb2.JobEvent.DESCRIPTOR.oneofs_by_name["kind"].fields}
    assert oneof == engine_kinds | JOB_LEVEL_KINDS
    assert len(engine_kinds) == len(ENGINE_EVENTS), "two engine events share one wire kind"


@pytest.mark.parametrize("cls", [c for c in ENGINE_EVENTS if c not in (ev.StepDone, ev.TrainingFinished)])
def test_the_terminal_prints_the_clients_line_for_each_event(cls: type[ev.Event]) -> None:
    """An in-process `lorad train` says what `lorad logs`, the TUI and the WebUI say for the same event."""
    event = example(cls)
    line = describe_event(event_to_proto(EventRecord("job", 1, 0.0, *engine_event_payload(event))))
    assert line, f"lorad_client.format has no line for {cls.wire_kind}"
    out = io.StringIO()
    progress = TerminalProgress(out)
    progress(event)
    progress.close()
    assert line in out.getvalue()


def test_fields_an_older_daemon_left_unset_read_as_what_they_meant() -> None:
    """A history written before `devices` or with an empty log level still reads as one device and info."""
    started = jobs_pb2.JobEvent(training_started=jobs_pb2.TrainingStarted(total_steps=8, device="cpu"))
    assert engine_event_from_proto(started).devices == 1
    log = jobs_pb2.JobEvent(log=jobs_pb2.LogLine(message="hello"))
    assert engine_event_from_proto(log) == ev.LogLine(message="hello", level="info")
