"""Who calls: the caller's identity, read from its credential, and who it may act as.

The `Authenticator` reads an identity from a verified client certificate (mutual TLS), a
per-participant token or the shared development token; the Gate (services.transport.gate)
sets it around each handler, which reads it with `caller()` and checks that a participant
acts only under its own id with `act_as`.
"""

from __future__ import annotations

import hmac
from contextvars import ContextVar

import grpc

from services.core.errors import ForbiddenError
from services.transport.credentials import Identity, TokenTable, parse_spiffe_id

ANONYMOUS = Identity("dev", "anonymous")  # only when no credentials are configured at all
NOBODY = Identity("none", "")  # outside a call the Gate admitted: may act as no one
# Set by the Gate (services.transport.gate) around each handler it admits; read with caller().
CALLER: ContextVar[Identity] = ContextVar("flclustering_caller", default=NOBODY)


def caller() -> Identity:
    """Who makes the RPC being handled (set by the Gate around each handler)."""
    return CALLER.get()


def act_as(name: str) -> None:
    """Refuse (PERMISSION_DENIED) unless the caller is the participant `name` (the shared
    development token may act for anyone)."""
    who = caller()
    if who.is_dev:
        return
    if who.role != "participant" or who.name != name:
        raise ForbiddenError(
            f"{who.role} {who.name!r} may not act as participant {name[:64]!r}: "
            "a participant acts only under the id its credential names"
        )


class Authenticator:
    """Who a caller is: the identity of a verified client certificate (mutual TLS), else
    a per-participant token (edge devices), else the shared development token.

    Tokens: exactly one `authorization: Bearer ...` entry is accepted (a wrong one followed
    by the right one is refused) and secrets are compared in constant time.
    """

    def __init__(
        self,
        shared_token: str | None = None,
        tokens: TokenTable | None = None,
        open_: bool = False,
    ) -> None:
        self.shared_token = shared_token  # what this service sends to others (development)
        self._shared = f"Bearer {shared_token}".encode() if shared_token else None
        self._tokens = tokens
        self._open = open_  # no credentials configured at all: development only
        self.warning: str | None = None  # logged once the service is up

    def identity(self, context: grpc.ServicerContext) -> Identity | None:
        """The caller's identity, or None (unauthenticated)."""
        auth = context.auth_context()
        spiffe = auth.get("peer_spiffe_id")
        if spiffe:
            return parse_spiffe_id(spiffe[0].decode("ascii", "replace"))
        values = [v for k, v in context.invocation_metadata() if k == "authorization"]
        if not values:
            return ANONYMOUS if self._open else None
        if len(values) != 1:
            return None
        given = values[0].encode() if isinstance(values[0], str) else values[0]
        if self._shared is not None and hmac.compare_digest(given, self._shared):
            return Identity("dev", "dev")
        tls = auth.get("transport_security_type") == [b"ssl"]
        if self._tokens is not None and tls and given.startswith(b"Bearer "):
            return self._tokens.identity(given[len(b"Bearer ") :])  # never in plain text
        return None
