"""Errors the client raises instead of raw ``grpc.RpcError``.

``LoradRpcError`` is every failed call; ``str(err)`` is the daemon's own message (the daemon puts the
full human explanation, with its hint, in the status details). ``DaemonUnavailable`` is a
``LoradRpcError`` subclass (code ``UNAVAILABLE``) for "nothing answers at that address", so one
``except LoradRpcError`` handles everything and ``except DaemonUnavailable`` can say "start it".
``DaemonNotVerified`` (code ``UNAUTHENTICATED``) is a server that could not prove it is the daemon
whose token the client holds: the token was not sent.
"""

from __future__ import annotations

import grpc

START_HINT = "hint: start one with `lorad serve`"


class LoradRpcError(Exception):
    """A call the daemon refused or could not complete: ``code`` (a grpc.StatusCode) and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message or f"lorad daemon call failed ({self.code.name})"


class DaemonUnavailable(LoradRpcError):
    """No daemon answers at ``target`` (code is always ``grpc.StatusCode.UNAVAILABLE``)."""

    def __init__(self, message: str, target: str = "") -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, message)
        self.target = target
        # What pickling (e.g. across processes) passes back to __init__.
        self.args = (message, target)


class DaemonNotVerified(LoradRpcError):
    """The server at ``target`` did not prove it knows the token, so the token was not sent (code
    UNAUTHENTICATED). It is another home's daemon, or another program on that address."""

    def __init__(self, message: str, target: str = "") -> None:
        super().__init__(grpc.StatusCode.UNAUTHENTICATED, message)
        self.target = target
        self.args = (message, target)


def translate_rpc_error(err: grpc.RpcError, *, target: str, token_sent: bool) -> LoradRpcError:
    """The LoradRpcError for a failed call ``err`` (a grpc.Call) made to ``target``."""
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (err.details() if callable(getattr(err, "details", None)) else None) or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        why = f" ({details})" if details else ""
        return DaemonUnavailable(f"lorad daemon at {target} is not answering{why}; {START_HINT}", target)
    if code == grpc.StatusCode.UNAUTHENTICATED and not token_sent:
        details = (details or "the daemon requires a token") + (
            "\nhint: no token was sent; set $LORAD_TOKEN or make the daemon's token file readable"
        )
    return LoradRpcError(code, details)
