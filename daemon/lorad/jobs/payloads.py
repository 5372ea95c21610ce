"""Engine events → (kind, payload) rows of a job's history.

Kinds are the names of the ``JobEvent.kind`` oneof in proto/lorad/v1/jobs.proto, so the gRPC
layer converts a row without knowing the engine. Each event says its own kind and payload
(lorad.events is the schema's one source).
"""

from __future__ import annotations

from typing import Any

from lorad import events as ev


def engine_event_payload(event: ev.Event) -> tuple[str, dict[str, Any]]:
    """The history row for one engine event; an event without a wire kind is kept as a log line."""
    if event.wire_kind:
        return event.wire_kind, event.payload()
    return "log", {"message": f"{event.kind}: {event.to_dict()}", "level": "info"}
