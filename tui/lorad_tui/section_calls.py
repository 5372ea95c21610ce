"""How section screens (captions, watches) call the daemon: in a worker, through the App's client.

The App owns the connection; a section screen borrows its current client for one call and posts
the result to itself as a message. A daemon that went away is reported to the App
(``ConnectionLost``), which shows the daemon-down screen and reconnects, as for its own calls.
"""

from __future__ import annotations

from collections.abc import Callable

from textual.message import Message
from textual.screen import Screen

from lorad_client import DaemonUnavailable, LoradRpcError
from lorad_tui.connection import DaemonClient
from lorad_tui.messages import ConnectionLost, SectionCallFailed

NOT_CONNECTED = "not connected to the daemon (it shows the daemon-down screen until one answers)"


def current_client(screen: Screen) -> DaemonClient | None:
    """The App's client while a daemon answers, else None."""
    return getattr(screen.app, "client", None)


def call_daemon(screen: Screen, what: str, call: Callable[[DaemonClient], Message | None]) -> None:
    """Run ``call`` with the App's client (from a worker thread) and post the message it returns to
    ``screen``; a refusal becomes ``SectionCallFailed(what, the daemon's text)``."""
    client = current_client(screen)
    if client is None:
        screen.post_message(SectionCallFailed(what, NOT_CONNECTED))
        return
    try:
        message = call(client)
    except DaemonUnavailable as err:
        screen.post_message(SectionCallFailed(what, str(err)))
        screen.app.post_message(ConnectionLost(client, str(err)))
    except (LoradRpcError, ValueError) as err:  # ValueError: the channel closed under us (see app._GONE)
        screen.post_message(SectionCallFailed(what, str(err)))
    else:
        if message is not None:
            screen.post_message(message)
