"""The client side of gRPC: channels with the project's limits, metadata, bounded retries.

Only what is safe to repeat is retried: UNAVAILABLE (the call never reached a handler)
always, DEADLINE_EXCEEDED only for idempotent calls (polls, joins, downloads). Every retry
loop is bounded and backs off exponentially with full jitter.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc

from services.core.errors import ConfigError
from services.transport.credentials import TlsFiles
from services.transport.limits import MESSAGE_LIMITS

logger = logging.getLogger(__name__)

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *MESSAGE_LIMITS,
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# A service's channel to another service of the same deployment (clusterer -> aggregator):
# reconnect within a second of the peer coming up, not after gRPC's default backoff of
# 1 s growing to 120 s (one peer, one client: no thundering herd to spread out).
# A participant's channel to the clusterer: the first reconnect after 250 ms rather than 1 s
# (a participant that starts before its clusterer joins as soon as it listens); the growth
# to gRPC's cap of 120 s, with jitter, is kept: thousands reconnect after a restart.
EDGE_OPTIONS: list[tuple[str, Any]] = [("grpc.initial_reconnect_backoff_ms", 250)]
PEER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def channel(
    address: str,
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
    client: TlsFiles | None = None,
    extra: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel with the project's message limits and keepalive (and `extra` options):
    mutual TLS with a client's kit, server-verified TLS with a CA file, plain otherwise."""
    options = [*CHANNEL_OPTIONS, *extra]
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    if client is not None:
        creds = grpc.ssl_channel_credentials(client.ca, client.key, client.cert)
        return grpc.secure_channel(address, creds, options=options)
    if not tls_ca:
        return grpc.insecure_channel(address, options=options)
    try:
        roots = Path(tls_ca).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the TLS CA file {tls_ca}: {exc.strerror}") from exc
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(roots), options=options)


S = TypeVar("S")
RENEW_CHECK_S = 60.0


def aio_channel(
    address: str, client: TlsFiles | None = None, extra: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """`channel`'s asyncio twin for a service's channel to another (mutual TLS with a
    client's kit, plain otherwise), with the same limits and keepalive; made on the loop
    that will use it."""
    options = [*CHANNEL_OPTIONS, *extra]
    if client is not None:
        creds = grpc.ssl_channel_credentials(client.ca, client.key, client.cert)
        return grpc.aio.secure_channel(address, creds, options=options)
    return grpc.aio.insecure_channel(address, options=options)


def raw_requests(stub: S, ch: grpc.Channel, service: str, method: str, response: Any) -> S:
    """`stub` whose stream-unary `method` takes serialized request messages (bytes) as they
    are, with no serializer (streams.build_stream(framed=True), or a relay passing on what
    it received): the upload paths, where re-encoding every chunk would cost a copy."""
    call = ch.stream_unary(
        f"/{service}/{method}",
        request_serializer=None,
        response_deserializer=response.FromString,
        _registered_method=True,
    )
    setattr(stub, method, call)
    return stub


def raw_responses(stub: S, ch: grpc.Channel, service: str, method: str, request: Any) -> S:
    """`stub` whose unary-stream `method` yields its answers serialized (bytes), to be
    validated in place (streams.read_encoded) and served again as they are."""
    call = ch.unary_stream(
        f"/{service}/{method}",
        request_serializer=request.SerializeToString,
        response_deserializer=None,
        _registered_method=True,
    )
    setattr(stub, method, call)
    return stub


class Renewing(Generic[S]):
    """A stub whose client certificate follows its files: before a call, at most once a
    minute, the files are compared with what the channel was built from; when they were
    renewed (cert-manager renews in place), a new channel and stub are built. Calls already
    under way finish on the previous channel, which is kept until the next renewal."""

    def __init__(self, tls: TlsFiles, build: Callable[[TlsFiles], tuple[grpc.Channel, S]]):
        self._tls = tls
        self._build = build
        self._channel, self._stub = build(tls)
        self._previous: grpc.Channel | None = None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @property
    def channel(self) -> grpc.Channel:
        """The channel calls go over now."""
        return self._channel

    def previous(self) -> list[grpc.Channel]:
        """The channel before the last renewal, kept for the calls still on it (if any)."""
        return [self._previous] if self._previous is not None else []

    def stub(self) -> S:
        """The stub to call now."""
        if time.monotonic() - self._checked >= RENEW_CHECK_S:
            with self._lock:
                self._checked = time.monotonic()
                fresh = self._tls.renewed()
                if fresh is not None:
                    logger.info("client certificate renewed on disk: reconnecting with it")
                    self._tls = fresh
                    self._previous = self._channel
                    self._channel, self._stub = self._build(fresh)
        return self._stub

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stub(), name)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata carrying the bearer token, if any."""
    return (("authorization", f"Bearer {token}"),) if token else ()


T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Which status codes are retried, how often at most, and how long the waits grow."""

    attempts: int = 8
    base_s: float = 0.2
    cap_s: float = 10.0
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE})
    budget_s: float | None = None  # give up once this long has passed since the first try


# For calls that are safe to repeat after a deadline: long polls, joins, downloads.
IDEMPOTENT = RetryPolicy(
    codes=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
)


def with_retries(
    fn: Callable[[], T],
    what: str,
    policy: RetryPolicy = RetryPolicy(),
    rng: random.Random | None = None,
    stop: threading.Event | None = None,
) -> T:
    """Call fn, retrying the policy's codes with exponential backoff and full jitter.

    The last error is raised when the attempts are used up, a code is not retryable, or
    `stop` is set while waiting.
    """
    rng = rng or random.Random()
    started = time.monotonic()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in policy.codes or attempt == policy.attempts - 1:
                raise
            delay = rng.uniform(0, min(policy.cap_s, policy.base_s * 2 ** min(attempt, 30)))
            spent = time.monotonic() - started
            if policy.budget_s is not None and spent + delay > policy.budget_s:
                logger.warning("%s: %s for %.0fs, giving up", what, code.name, spent)
                raise
            logger.info("%s: %s, retry %d in %.2fs", what, code.name, attempt + 1, delay)
            if (stop or threading.Event()).wait(delay):
                raise
    raise AssertionError("unreachable")
