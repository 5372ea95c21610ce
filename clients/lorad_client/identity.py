"""Checking that a server is the lorad daemon whose token we hold, before sending that token.

Anyone on the machine can listen on a port (the default one included, while no daemon runs), so a
client must never hand its token to whatever answers. The daemon proves it knows the token without
revealing it: the client sends a fresh random challenge to ``SystemService.ProveIdentity`` (an RPC
that needs no token) and checks the answer, ``HMAC-SHA256(token, CONTEXT + challenge)``. A server
that does not know the token cannot answer; one that replays an old answer fails the new challenge.
Only after a correct answer does the client put the token on its calls.

The daemon computes the proof with :func:`identity_proof` too, so both sides cannot disagree.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

import grpc

from lorad_api.v1 import system_pb2, system_pb2_grpc

# Domain separation: a proof for lorad's identity check is no use as any other HMAC of the token.
CONTEXT = b"lorad identity v1\n"
CHALLENGE_BYTES = 32
# What the daemon accepts: short challenges would make answers replayable by guessing.
MIN_CHALLENGE_BYTES = 16
MAX_CHALLENGE_BYTES = 64

VERIFY_HINT = (
    "hint: start the daemon of this LORAD_HOME with `lorad serve`, or, for a daemon elsewhere, set "
    "$LORAD_TOKEN to that daemon's token (its state directory holds it in the `token` file)"
)


class IdentityNotProven(Exception):
    """The server did not prove it knows the token; ``str(err)`` says why (the token was not sent)."""


def identity_proof(token: str, challenge: bytes) -> bytes:
    """The proof a daemon with ``token`` gives for ``challenge``."""
    return hmac.new(token.encode("utf-8"), CONTEXT + challenge, hashlib.sha256).digest()


def verify_daemon(channel: grpc.Channel, token: str, *, target: str, timeout: float | None = 5.0) -> None:
    """Ask the server on ``channel`` to prove it knows ``token``; return when it does.

    Sends no token. Raises IdentityNotProven (message naming ``target``) when the answer is wrong or
    the server has no such RPC, and lets ``grpc.RpcError`` through for transport failures
    (UNAVAILABLE, DEADLINE_EXCEEDED) so callers report those the way they report any other call.
    """
    challenge = secrets.token_bytes(CHALLENGE_BYTES)
    stub = system_pb2_grpc.SystemServiceStub(channel)
    try:
        reply = stub.ProveIdentity(system_pb2.ProveIdentityRequest(challenge=challenge), timeout=timeout)
    except grpc.RpcError as err:
        code = err.code() if callable(getattr(err, "code", None)) else None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            raise
        raise IdentityNotProven(
            f"the server at {target} does not answer lorad's identity check ({getattr(code, 'name', code)}): "
            f"it is not a lorad daemon, or one too old to prove who it is; the token was not sent\n{VERIFY_HINT}"
        ) from None
    if not hmac.compare_digest(reply.proof, identity_proof(token, challenge)):
        raise IdentityNotProven(
            f"the server at {target} could not prove it knows this client's token: it is not the daemon of "
            f"this LORAD_HOME (another home's daemon, or another program on that address); the token was not "
            f"sent\n{VERIFY_HINT}"
        )
