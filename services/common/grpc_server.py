"""The server side of gRPC: building servers, mapping domain errors to statuses, auth.

Domain errors map to status codes here, once; servicers stay thin.

Two kinds of server are built here. `new_server` is grpc's thread-pool server, where a call
holds a thread while it lasts (the aggregator's: its one caller is the clusterer).
`new_aio_server` is an asyncio server on an event loop of its own (`AioServer`, the
clusterer's): a call waiting for something (a long poll) is a coroutine, not a thread, so
thousands can wait while health checks and status calls answer at once; blocking work goes
to its thread pool with asyncio.to_thread, which carries the caller along (`caller()`).

Each interceptor (`Gate`, `ParseInterceptor`, the metrics, the clusterer's relay) is one
`wrap(handler, method)` (`Wrapping`), served to a sync server as a grpc.ServerInterceptor and
to an aio server through `AioInterceptor`: around a coroutine function or an async generator
it puts async wrappers, around anything else sync ones (`rewrap`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import inspect
import itertools
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent import futures
from contextvars import ContextVar
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.credentials import (
    Identity,
    TlsFiles,
    TokenTable,
    load_tls,
    parse_spiffe_id,
)
from services.common.lifecycle import exit_with_parent, freeze_heap, limit_malloc_arenas
from services.common.settings import ServiceSettings, TransportSettings
from services.common.wire import MESSAGE_LIMITS, WireError, invalid
from services.core.errors import (
    AuthError,
    CapacityError,
    ConfigError,
    FLClusteringError,
    ForbiddenError,
    NotFoundError,
    SpecMismatchError,
    StateError,
)

logger = logging.getLogger(__name__)

SERVER_OPTIONS: list[tuple[str, Any]] = [
    *MESSAGE_LIMITS,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]

STATUS_OF: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (ForbiddenError, grpc.StatusCode.PERMISSION_DENIED),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (StateError, grpc.StatusCode.FAILED_PRECONDITION),
    (SpecMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code a domain error maps to."""
    if isinstance(exc, WireError):
        return getattr(grpc.StatusCode, exc.code)
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

MAX_DETAILS = 400  # characters of an error message sent back or logged


def bounded(message: str, limit: int = MAX_DETAILS) -> str:
    """A message cut to `limit` characters: whatever a caller sent, an error quoting it
    stays a short status detail and a short log line."""
    return message if len(message) <= limit else message[: limit - 14] + " ...(truncated)"


def _refusal(name: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a domain error ends a call with, logged as one `[name]` line."""
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("[%s] internal error", name)
        return code, f"internal error: {type(exc).__name__}"
    message = bounded(str(exc))
    logger.info("[%s] %s: %s", name, code.name, message)
    return code, message


def rpc(name: str) -> Callable[[F], F]:
    """Decorate a servicer method: domain errors become statuses with a `[name]` log line.

    Works for unary and server-streaming methods (generators) alike, sync or async (an
    aio call already ended, e.g. a stream cut, keeps the status it has).
    """

    def wrap(fn: F) -> F:
        def fail(context: grpc.ServicerContext, exc: BaseException) -> None:
            context.abort(*_refusal(name, exc))

        async def afail(context: Any, exc: BaseException) -> None:
            code, message = _refusal(name, exc)
            if not context.done():
                await context.abort(code, message)

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def agen(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async with contextlib.aclosing(fn(self, request, context)) as it:
                        async for item in it:
                            yield item
                except FLClusteringError as exc:
                    await afail(context, exc)

            return agen  # type: ignore[return-value]

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def coro(self: Any, request: Any, context: Any) -> Any:
                try:
                    return await fn(self, request, context)
                except FLClusteringError as exc:
                    await afail(context, exc)
                    return None

            return coro  # type: ignore[return-value]

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from fn(self, request, context)
                except FLClusteringError as exc:
                    fail(context, exc)

            return gen  # type: ignore[return-value]

        @functools.wraps(fn)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(self, request, context)
            except FLClusteringError as exc:
                fail(context, exc)

        return unary  # type: ignore[return-value]

    return wrap


# ---- interceptors as pure wrappers of method handlers ---------------------------------

SHAPES = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_BUILD: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap(
    handler: Any,
    *,
    call: Wrap,
    stream: Wrap,
    acall: Wrap,
    astream: Wrap,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """handler, its behaviour wrapped by the wrapper that fits it: `call` around a sync
    function answering once, `stream` around a sync function answering with an iterator,
    `acall` around a coroutine function (one answer, or a stream written with
    context.write) and `astream` around an async generator. What a wrapper returns must be
    of the same kind (an aio server runs coroutines on its loop, the rest in its pool)."""
    shape = next(s for s in SHAPES if getattr(handler, s) is not None)
    fn = getattr(handler, shape)
    if inspect.isasyncgenfunction(fn):
        wrapped = astream(fn)
    elif inspect.iscoroutinefunction(fn):
        wrapped = acall(fn)
    else:
        wrapped = stream(fn) if shape.endswith("_stream") else call(fn)
    return _BUILD[shape](
        wrapped, request_deserializer or handler.request_deserializer, handler.response_serializer
    )


class Wrapping(grpc.ServerInterceptor):
    """An interceptor as one pure function: `wrap(handler, method)`, the handler a method is
    served by given the one that would serve it (None: no such method). It intercepts for
    a sync server as it is and for an aio server through `AioInterceptor`; either way one
    wrapped handler per method is built, on the method's first call, and reused."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}

    def wrap(self, handler: Any, method: str) -> Any:
        """The handler to serve `method` with instead of `handler`."""
        raise NotImplementedError

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        done = self._wrapped.get(details.method)
        if done is None:
            done = self.wrap(continuation(details), details.method)
            if done is not None:
                self._wrapped[details.method] = done
        return done


class AioInterceptor(grpc.aio.ServerInterceptor):
    """A `Wrapping` intercepting for an aio server."""

    def __init__(self, wrapping: Wrapping) -> None:
        self.wrapping = wrapping
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        done = self._wrapped.get(details.method)
        if done is None:
            done = self.wrapping.wrap(await continuation(details), details.method)
            if done is not None:
                self._wrapped[details.method] = done
        return done


ANONYMOUS = Identity("dev", "anonymous")  # only when no credentials are configured at all
NOBODY = Identity("none", "")  # outside a call the Gate admitted: may act as no one
_CALLER: ContextVar[Identity] = ContextVar("flclustering_caller", default=NOBODY)


def caller() -> Identity:
    """Who makes the RPC being handled (set by the Gate around each handler)."""
    return _CALLER.get()


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


# Health checks stay open (Kubernetes probes carry no credential). Watch, a stream that
# holds a thread while it lasts, goes through the gate like every other call; reflection,
# which lists the services and their messages, is for operators.
EXEMPT = ("/grpc.health.v1.Health/Check",)
# Limits every server adds to its policy: the few threads streams of these may hold.
COMMON_ROLES = {"ServerReflectionInfo": frozenset({"operator"})}
COMMON_TOTAL = {"ServerReflectionInfo": 2, "Watch": 4}


@dataclass(frozen=True)
class Policy:
    """Which roles may call which method (by its short name), and how many calls of a method
    one identity and everyone together may have in flight (beyond: RESOURCE_EXHAUSTED).

    A method not listed in `roles` may be called by any authenticated caller.
    """

    roles: Mapping[str, frozenset[str]] = dataclass_field(default_factory=dict)
    per_identity: Mapping[str, int] = dataclass_field(default_factory=dict)
    default_per_identity: int = 8
    total: Mapping[str, int] = dataclass_field(default_factory=dict)
    # method -> role -> calls that role may have in flight together: a secondary reader
    # (operators exporting the model) cannot take the slots the main one (the clusterer)
    # needs when `total` leaves room for both.
    per_role: Mapping[str, Mapping[str, int]] = dataclass_field(default_factory=dict)


class _Admission:
    """Counts calls in flight per (identity, method) and per method."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._lock = threading.Lock()
        self._mine: dict[tuple[str, str, str], int] = {}
        self._all: dict[str, int] = {}
        self._roles: dict[tuple[str, str], int] = {}

    def enter(self, who: Identity, method: str) -> str | None:
        """Take a slot; None, or why there is none."""
        p = self._policy
        key = (who.role, who.name, method)
        limit = p.per_identity.get(method, p.default_per_identity)
        total = p.total.get(method)
        role_limit = p.per_role.get(method, {}).get(who.role)
        with self._lock:
            mine = self._mine.get(key, 0)
            if not who.is_dev and mine >= limit:
                return f"{who.name} already has {mine} {method} call(s) in flight (limit {limit})"
            if total is not None and self._all.get(method, 0) >= total:
                return f"the server is handling {total} {method} calls: try again shortly"
            role_key = (method, who.role)
            if role_limit is not None and self._roles.get(role_key, 0) >= role_limit:
                return (
                    f"{who.role}s have {role_limit} {method} call(s) in flight: try again shortly"
                )
            self._mine[key] = mine + 1
            self._all[method] = self._all.get(method, 0) + 1
            self._roles[role_key] = self._roles.get(role_key, 0) + 1
        return None

    def leave(self, who: Identity, method: str) -> None:
        """Give the slot back."""
        key = (who.role, who.name, method)
        with self._lock:
            left = self._mine.get(key, 1) - 1
            if left:
                self._mine[key] = left
            else:
                self._mine.pop(key, None)
            self._all[method] = self._all.get(method, 1) - 1
            role_key = (method, who.role)
            self._roles[role_key] = self._roles.get(role_key, 1) - 1


class Gate(Wrapping):
    """Authentication, authorisation and admission in front of every handler: who calls,
    whether its role may call this method, and whether it (or everyone) has too many such
    calls in flight. The handler then reads the caller with `caller()`."""

    def __init__(self, authenticator: Authenticator, policy: Policy) -> None:
        super().__init__()
        self._auth = authenticator
        self._policy = policy = Policy(
            roles={**COMMON_ROLES, **policy.roles},
            per_identity={"Watch": 1, **policy.per_identity},
            default_per_identity=policy.default_per_identity,
            total={**COMMON_TOTAL, **policy.total},
            per_role=policy.per_role,
        )
        self._admission = _Admission(policy)

    def _decide(self, context: Any, method: str) -> Identity | tuple[grpc.StatusCode, str]:
        """The caller, once it may make this call (a slot taken), or the refusal."""
        who = self._auth.identity(context)
        if who is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "no valid credential (client certificate or bearer token)",
            )
        roles = self._policy.roles.get(method)
        if roles is not None and not who.is_dev and who.role not in roles:
            logger.info("[%s] PERMISSION_DENIED: %s %s", method, who.role, who.name)
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who.role} {who.name!r} may not call {method} "
                f"(allowed: {', '.join(sorted(roles))})",
            )
        refused = self._admission.enter(who, method)
        if refused is not None:
            logger.info("[%s] RESOURCE_EXHAUSTED: %s", method, bounded(refused))
            return grpc.StatusCode.RESOURCE_EXHAUSTED, bounded(refused)
        return who

    def _admit(self, context: grpc.ServicerContext, method: str) -> Identity:
        """The caller, once it may make this call (else the call is aborted)."""
        decided = self._decide(context, method)
        if isinstance(decided, Identity):
            return decided
        context.abort(*decided)
        raise AssertionError("unreachable")  # abort raises

    async def _admit_async(self, context: Any, method: str) -> Identity:
        """The same for an aio call."""
        decided = self._decide(context, method)
        if isinstance(decided, Identity):
            return decided
        await context.abort(*decided)
        raise AssertionError("unreachable")  # abort raises

    def wrap(self, handler: Any, full_method: str) -> Any:
        if handler is None or full_method.startswith(EXEMPT):
            return handler
        method = full_method.rsplit("/", 1)[-1][:64]
        admit, admit_async, leave = self._admit, self._admit_async, self._admission.leave

        def call(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                who = admit(context, method)
                token = _CALLER.set(who)
                try:
                    return fn(request, context)
                finally:
                    _CALLER.reset(token)
                    leave(who, method)

            return run

        def acall(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Any) -> Any:
                who = await admit_async(context, method)
                token = _CALLER.set(who)
                try:
                    return await fn(request, context)
                finally:
                    _CALLER.reset(token)
                    leave(who, method)

            return run

        def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                who = admit(context, method)
                release = _once(lambda: leave(who, method))
                # gRPC does not close the response iterator of a cancelled call: the slot
                # is given back when the call ends, whatever happens to the generator.
                context.add_callback(release)
                it: Any = None
                try:
                    token = _CALLER.set(who)
                    try:
                        it = iter(fn(request, context))
                    finally:
                        _CALLER.reset(token)
                    while True:
                        token = _CALLER.set(who)
                        try:
                            item = next(it, _END)
                        finally:
                            _CALLER.reset(token)
                        if item is _END:
                            return
                        yield item
                finally:
                    if it is not None and hasattr(it, "close"):
                        token = _CALLER.set(who)  # the handler's cleanup runs as its caller
                        try:
                            it.close()
                        finally:
                            _CALLER.reset(token)
                    release()

            return run

        def astream(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Any) -> AsyncIterator[Any]:
                who = await admit_async(context, method)
                release = _once(lambda: leave(who, method))
                # aio closes the generator of a cancelled call only when it is collected:
                # the slot is given back when the call's task ends.
                context.add_done_callback(lambda _: release())
                it: Any = None
                try:
                    token = _CALLER.set(who)
                    try:
                        it = fn(request, context).__aiter__()
                    finally:
                        _CALLER.reset(token)
                    while True:
                        token = _CALLER.set(who)
                        try:
                            item = await it.__anext__()
                        except StopAsyncIteration:
                            return
                        finally:
                            _CALLER.reset(token)
                        yield item
                finally:
                    if it is not None:
                        token = _CALLER.set(who)
                        try:
                            await it.aclose()
                        finally:
                            _CALLER.reset(token)
                    release()

            return run

        return rewrap(handler, call=call, stream=stream, acall=acall, astream=astream)


_END = object()


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """fn, run by the first call only (from whichever thread makes it)."""
    lock = threading.Lock()
    done = False

    def run() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        fn()

    return run


class Cancellable(Protocol):
    """What StallWatch cuts a stream with: a sync call's context, or an aio call's `Cut`."""

    def cancel(self) -> Any:
        """End the call (CANCELLED)."""


class StallWatch:
    """Cuts streams that stall: an upload whose next message does not come within `idle_s`
    (its handler sees the stream end and refuses the upload), a download whose receiver
    takes no next message within `idle_s` (the server's send blocks meanwhile), or either
    still open after `total_s`, is cancelled, so a silent peer cannot hold a server thread
    or a stream slot.

    One daemon thread checks the watched streams twice a second (`watch`); an aio handler
    writing a stream times its own writes (`send`).
    """

    def __init__(self, idle_s: float, total_s: float) -> None:
        self.idle_s = idle_s
        self.total_s = total_s
        self._lock = threading.Lock()
        self._streams: dict[int, list[Any]] = {}  # id -> [call, started, last, name]
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, messages: Iterator[Any], context: Cancellable, what: str) -> Iterator[Any]:
        """messages, while cancelling the call if the sender stalls."""
        key = self._register(context, what)
        try:
            for msg in messages:
                self._seen(key)
                yield msg
        finally:
            self._forget(key)

    async def awatch(
        self, messages: AsyncIterator[T], cut: Cancellable, what: str
    ) -> AsyncIterator[T]:
        """`watch` for an aio call's request stream read on its loop (`cut`: its `Cut`)."""
        key = self._register(cut, what)
        try:
            async for msg in messages:
                self._seen(key)
                yield msg
        finally:
            self._forget(key)

    def _register(self, call: Cancellable, what: str) -> int:
        key = next(self._ids)
        now = time.monotonic()
        with self._lock:
            self._streams[key] = [call, now, now, what]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)
                self._thread.start()
        return key

    def _seen(self, key: int) -> None:
        with self._lock:
            entry = self._streams.get(key)
            if entry is not None:
                entry[2] = time.monotonic()

    def _forget(self, key: int) -> None:
        with self._lock:
            self._streams.pop(key, None)

    async def send(self, context: Any, messages: Iterable[Any], what: str) -> None:
        """Write messages on an aio call: a write its receiver does not take within `idle_s`,
        or one still due after `total_s`, cuts the call (CANCELLED) and ends the handler.
        aio cannot cancel a call as a sync server does, so its status goes out behind the
        message the receiver has not taken, when it takes it or goes away."""
        loop = asyncio.get_running_loop()
        started = last = loop.time()
        for msg in messages:
            left = min(self.idle_s, started + self.total_s - loop.time())
            try:
                await asyncio.wait_for(context.write(msg), max(left, 0.0))
            except TimeoutError:
                now = loop.time()
                logger.info(
                    "[%s] cut a stalled stream (%.0fs since its last message, %.0fs open)",
                    what,
                    now - last,
                    now - started,
                )
                await Cut(context, loop, f"{what}: the receiver stalled").now()
                return
            last = loop.time()

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                stalled = [
                    (k, v)
                    for k, v in self._streams.items()
                    if now - v[2] > self.idle_s or now - v[1] > self.total_s
                ]
                for k, _ in stalled:
                    self._streams.pop(k, None)
            for _, (context, started, last, what) in stalled:
                logger.info(
                    "[%s] cut a stalled stream (%.0fs since its last message, %.0fs open)",
                    what,
                    now - last,
                    now - started,
                )
                context.cancel()


CUT_WAIT_S = 1.0  # how long a handler cutting its own call waits for the status to go out
_CUTTING: set[asyncio.Task[None]] = set()  # cuts under way (a task is only weakly held)


class Cut:
    """Ends an aio call with CANCELLED, from any thread and without blocking (aio has no
    cancel()): the status goes out at once (a peer that stopped sending) or behind the
    message a stalled receiver has not taken; the call's pending read then fails."""

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop, why: str) -> None:
        self._context = context
        self._loop = loop
        self._why = why
        self._also: list[Callable[[], Any]] = []
        self.done = False  # the call has been cut

    def also(self, end: Callable[[], Any]) -> None:
        """Have the cut call end() too, on the loop (a call made on the cut call's behalf);
        at once if it has been cut already (call on the loop)."""
        if self.done:
            end()
        else:
            self._also.append(end)

    def cancel(self) -> None:
        """Cut the call soon (any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: so is every call
            self._loop.call_soon_threadsafe(self._start)

    async def now(self) -> None:
        """Cut the call from its own handler: the status is set when this returns (sent, or
        queued behind a message the peer does not take)."""
        await asyncio.wait({self._start()}, timeout=CUT_WAIT_S)

    def _start(self) -> asyncio.Task[None]:
        self.done = True
        for end in self._also:
            with contextlib.suppress(Exception):
                end()
        self._also.clear()
        task = asyncio.ensure_future(self._abort())
        _CUTTING.add(task)
        task.add_done_callback(_CUTTING.discard)
        return task

    async def _abort(self) -> None:
        with contextlib.suppress(Exception):  # it ended meanwhile, or its peer went away
            if not self._context.done():
                await self._context.abort(grpc.StatusCode.CANCELLED, self._why)


def blocking_iter(
    messages: AsyncIterator[T], context: Any, loop: asyncio.AbstractEventLoop
) -> Iterator[T]:
    """An aio call's request stream, read one message at a time from a pool thread (the
    loop does the reading). It ends where the stream ends, and where the call was cut."""
    it = messages.__aiter__()

    async def step() -> tuple[bool, Any]:
        try:
            return True, await it.__anext__()
        except StopAsyncIteration:
            return False, None

    while True:
        try:
            pending = asyncio.run_coroutine_threadsafe(step(), loop)
        except RuntimeError:
            return  # the loop has ended, with its server
        try:
            more, msg = _result(pending, loop)
        except Exception:
            if context.done() or loop.is_closed() or not loop.is_running():
                return  # cut, or the server stopped: the reader sees the stream end
            raise
        if not more:
            return
        yield msg


def _result(pending: futures.Future[T], loop: asyncio.AbstractEventLoop) -> T:
    """A loop's answer to a pool thread, given up if the loop stops first."""
    while True:
        try:
            return pending.result(timeout=1.0)
        except TimeoutError:
            if loop.is_closed() or not loop.is_running():
                pending.cancel()
                raise


class _Unparseable:
    """What a request that is not a valid message deserializes to (instead of raising,
    which gRPC answers with INTERNAL and a traceback in the log)."""

    def __init__(self, method: str, exc: Exception) -> None:
        self.error = invalid(f"the request is not a valid {method} message ({type(exc).__name__})")


class ParseInterceptor(Wrapping):
    """Unparseable request bodies are INVALID_ARGUMENT, logged as one line.

    Innermost, so the handler it wraps is the servicer's own.
    """

    def wrap(self, handler: Any, full_method: str) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        method = full_method.rsplit("/", 1)[-1][:64]
        deserialize = handler.request_deserializer

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:
                return _Unparseable(method, exc)

        def refused(request: Any) -> str | None:
            if not isinstance(request, _Unparseable):
                return None
            logger.info("[%s] INVALID_ARGUMENT: %s", method, request.error)
            return str(request.error)

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            why = refused(request)
            if why is not None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
            return request

        async def checked_async(request: Any, context: Any) -> Any:
            why = refused(request)
            if why is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
            return request

        # A stream of requests: for one answer (an upload) an unparseable message is a
        # domain error its handler maps like any other; for a stream of answers, an abort.
        def messages(it: Iterator[Any]) -> Iterator[Any]:
            for request in it:
                if isinstance(request, _Unparseable):
                    raise request.error
                yield request

        async def messages_async(it: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in it:
                if isinstance(request, _Unparseable):
                    raise request.error
                yield request

        def aborting(it: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in it:
                yield checked(request, context)

        async def aborting_async(it: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for request in it:
                yield await checked_async(request, context)

        if handler.request_streaming:
            answers = handler.response_streaming

            def call(fn: Callable[..., Any]) -> Callable[..., Any]:
                return lambda it, c: fn(messages(it), c)

            def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
                return lambda it, c: fn(aborting(it, c), c)

            def acall(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def run(it: AsyncIterator[Any], c: Any) -> Any:
                    return await fn(aborting_async(it, c) if answers else messages_async(it), c)

                return run

            def astream(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def run(it: AsyncIterator[Any], c: Any) -> AsyncIterator[Any]:
                    async with contextlib.aclosing(fn(aborting_async(it, c), c)) as out:
                        async for item in out:
                            yield item

                return run

        else:

            def call(fn: Callable[..., Any]) -> Callable[..., Any]:
                return lambda r, c: fn(checked(r, c), c)

            stream = call

            def acall(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def run(request: Any, c: Any) -> Any:
                    return await fn(await checked_async(request, c), c)

                return run

            def astream(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def run(request: Any, c: Any) -> AsyncIterator[Any]:
                    checked_request = await checked_async(request, c)
                    async with contextlib.aclosing(fn(checked_request, c)) as out:
                        async for item in out:
                            yield item

                return run

        return rewrap(
            handler,
            call=call,
            stream=stream,
            acall=acall,
            astream=astream,
            request_deserializer=parse,
        )


def new_server(
    max_workers: int,
    authenticator: Authenticator,
    policy: Policy,
    interceptors: Sequence[Wrapping] = (),
) -> grpc.Server:
    """A thread-pool server with message limits, keepalive settings and the Gate."""
    chain = [*interceptors, Gate(authenticator, policy)]
    chain.append(ParseInterceptor())  # innermost: its deserializers are the ones used
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=SERVER_OPTIONS,
        interceptors=chain,
    )


def new_aio_server(
    max_workers: int,
    authenticator: Authenticator,
    policy: Policy,
    interceptors: Sequence[Wrapping] = (),
    max_pending: int = 1000,
) -> AioServer:
    """An asyncio server on a loop of its own, with message limits, keepalive settings and
    the Gate; its handlers' blocking work runs on max_workers threads.

    gRPC cancels calls that arrive while `max_pending` wait to be taken up (and some from
    half that on), answering CANCELLED, which clients do not retry: a server that
    thousands of clients call at once (all woken by one broadcast) needs a deep queue."""
    chain = [*interceptors, Gate(authenticator, policy), ParseInterceptor()]
    options = [
        *SERVER_OPTIONS,
        ("grpc.server.max_pending_requests", max_pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending),
    ]
    return AioServer(max_workers, [AioInterceptor(w) for w in chain], options)


# Threads for short blocking work (a journaled state change, a status page): one GIL runs
# one at a time, and a burst of a thousand reports spread over hundreds of threads only
# makes every thread, the health port's included, queue longer for it (a p99 health check
# of 0.7 s with 256 threads at 10,000 participants).
QUICK_WORKERS = 8


async def on_pool(pool: futures.Executor | None, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on `pool` (None: the loop's default executor), carrying the caller's
    context: asyncio.to_thread on a chosen pool."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        pool, functools.partial(ctx.run, fn, *args)
    )


class AioServer:
    """A grpc.aio server on an event loop that runs in a daemon thread of its own, with the
    shape of grpc.Server where the rest of a service meets it: ports are bound from any
    thread, `start()`, and `stop(grace)` returns what `.wait()` waits on. Short blocking
    work goes to a few threads, the loop's default executor (asyncio.to_thread); work that
    holds a thread for long (an upload streamed through, `on_pool(server.pool, ...)`) to
    max_workers threads, also the server's migration pool (sync handlers, if any)."""

    def __init__(
        self,
        max_workers: int,
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self.pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grpc-worker")
        self.quick = futures.ThreadPoolExecutor(
            min(QUICK_WORKERS, max_workers), thread_name_prefix="grpc-quick"
        )
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.quick)
        self._ended = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        threading.Thread(target=self._run, name="grpc-aio", daemon=True).start()
        self.server: grpc.aio.Server = self.call(
            lambda: grpc.aio.server(
                migration_thread_pool=self.pool, interceptors=interceptors, options=options
            )
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            self._ended.set()

    def call(self, fn: Callable[[], T]) -> T:
        """fn() run on the loop's thread (where the aio server's objects live)."""
        answer: futures.Future[T] = futures.Future()

        def run() -> None:
            try:
                answer.set_result(fn())
            except BaseException as exc:
                answer.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return answer.result()

    def add_insecure_port(self, address: str) -> int:
        """Bind a plain-text port (0 picks one); the port bound."""
        return self.call(lambda: self.server.add_insecure_port(address))

    def add_secure_port(self, address: str, creds: grpc.ServerCredentials) -> int:
        """Bind a TLS port; the port bound."""
        return self.call(lambda: self.server.add_secure_port(address, creds))

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Serve these handlers (what generated add_*_to_server functions call)."""
        self.call(lambda: self.server.add_generic_rpc_handlers(handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        """Serve these handlers by method name (generated code calls this too)."""
        self.call(lambda: self.server.add_registered_method_handlers(service, handlers))

    def start(self) -> None:
        """Start serving."""
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, give those in flight `grace` seconds (None: as long as they
        take), cancel the rest; then end the loop. The event is set once it has ended."""
        with self._lock:
            if self._stopping or self.loop.is_closed():
                return self._ended
            self._stopping = True
        stopping = asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop)
        stopping.add_done_callback(lambda _: self._end())
        return self._ended

    def on_stop(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Have `stop` await close() on the loop once the server has stopped (a channel the
        handlers used)."""
        self._closers.append(close)

    async def _stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
        for close in self._closers:
            with contextlib.suppress(Exception):
                await close()

    def _end(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.pool.shutdown(wait=False)
        self.quick.shutdown(wait=False)


class _AioHealth(health_pb2_grpc.HealthServicer):
    """The health service on an aio server, answered from a (thread-safe, sync)
    HealthServicer: the one the plain health port serves and SIGTERM marks NOT_SERVING, so
    both ports always say the same."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self._servicer = servicer

    async def Check(self, request: Any, context: Any) -> Any:
        """The status now (NOT_FOUND for an unknown service); a lock held for a lookup."""
        return self._servicer.Check(request, context)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """The status now and each change, until the call ends."""
        loop = asyncio.get_running_loop()
        changes: asyncio.Queue[Any] = asyncio.Queue()
        closers: list[Callable[[], None]] = []

        def send(response: Any) -> None:  # from whichever thread sets a status
            with contextlib.suppress(RuntimeError):  # the loop is closed: the call too
                loop.call_soon_threadsafe(changes.put_nowait, response)

        class Registration:  # what the servicer calls to say how to stop sending
            add_callback = closers.append

        self._servicer.Watch(request, Registration(), send)
        try:
            while (response := await changes.get()) is not None:
                yield response
        finally:
            for close in closers:
                close()


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError if host:port is taken (checked before gRPC logs its own complaint)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's own listeners do
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port}: port in use ({exc.strerror})"
            ) from exc


def bind(server: Binds, host: str, port: int) -> int:
    """Bind host:port (0 picks a free port); a taken port is one clear ConfigError."""
    check_port_free(host, port)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: port in use or not allowed") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen on {host}:{port}: port in use or not allowed")
    return bound


def _add_secure_port(server: Binds, host: str, port: int, creds: grpc.ServerCredentials) -> int:
    """Bind a TLS port; a taken port is one ConfigError."""
    check_port_free(host, port)
    try:
        bound = server.add_secure_port(f"{host}:{port}", creds)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen (TLS) on {host}:{port}: port in use") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen (TLS) on {host}:{port}: port in use")
    return bound


def bind_tls(server: Binds, host: str, port: int, cert: str, key: str) -> int:
    """Bind a server-TLS port (edge participants with tokens) from PEM files, following
    renewals like the mutual-TLS port; errors are one ConfigError."""
    try:
        tls = TlsFiles.read(None, Path(cert), Path(key))
    except OSError as exc:
        raise ConfigError(f"cannot read TLS certificate or key: {exc}") from exc
    renewing = _Renewing(tls)
    creds = grpc.dynamic_ssl_server_credentials(renewing.config(tls), renewing.fetch)
    return _add_secure_port(server, host, port, creds)


def credentials(
    transport: TransportSettings, name: str, tokens: TokenTable | None = None
) -> tuple[Authenticator, TlsFiles | None]:
    """How a service named `name` authenticates its callers, and its mutual-TLS material
    (None: it listens without TLS, behind tokens or nothing)."""
    tls = load_tls(transport.tls_dir, name) if transport.tls_dir else None
    shared = transport.token()
    if tls is not None and shared is not None:
        raise ConfigError(
            "--tls-dir and a shared --auth-token exclude each other: the shared token would "
            "give anyone holding it every identity (it is for development only)"
        )
    open_ = tls is None and shared is None and tokens is None
    auth = Authenticator(shared, tokens, open_)
    if shared is not None:
        auth.warning = (
            f"{name}: a shared --auth-token gives every holder every role: development only "
            "(deployments use --tls-dir)"
        )
    if open_:
        auth.warning = (
            f"{name}: no credentials configured: any caller may call it (development only)"
        )
    return auth, tls


def bind_service(
    server: Binds, host: str, port: int, tls: TlsFiles | None, auth: Authenticator
) -> int:
    """Bind the service's main port: mutual TLS with tls, plain otherwise. A development
    setup (shared token, no credentials) is said once the port is bound."""
    bound = bind(server, host, port) if tls is None else bind_mtls(server, host, port, tls)
    if auth.warning:
        logger.warning("%s", auth.warning)
    return bound


RELOAD_EVERY_S = 60.0


class _Renewing:
    """The certificate a mutual-TLS port serves, re-read when its files change."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.checked = time.monotonic()

    @staticmethod
    def config(t: TlsFiles) -> Any:
        """gRPC's configuration of t: clients verified against t's CA when it has one."""
        return grpc.ssl_server_certificate_configuration(
            [(t.key, t.cert)], root_certificates=t.ca or None
        )

    def fetch(self) -> Any:
        """Called by gRPC before a handshake: a new configuration, or None to keep it."""
        if time.monotonic() - self.checked < RELOAD_EVERY_S:
            return None
        self.checked = time.monotonic()
        fresh = self.tls.renewed()
        if fresh is None:
            return None
        logger.info("TLS certificate renewed on disk: serving the new one")
        self.tls = fresh
        return self.config(fresh)


def bind_mtls(server: Binds, host: str, port: int, tls: TlsFiles) -> int:
    """Bind a mutual-TLS port whose certificate follows its files: a new handshake checks
    them at most once a minute, so a renewed certificate (cert-manager renews in place)
    is served without a restart."""
    renewing = _Renewing(tls)
    creds = grpc.dynamic_ssl_server_credentials(
        renewing.config(tls), renewing.fetch, require_client_authentication=True
    )
    return _add_secure_port(server, host, port, creds)


def add_servicer(
    add: Callable[[Any, Any], None],
    servicer: Any,
    server: Any,
    raw_requests: Sequence[str] = (),
    raw_responses: Sequence[str] = (),
) -> None:
    """`add(servicer, server)` (a generated add_*Servicer_to_server), with the methods named
    in `raw_requests` given their requests serialized (bytes, no deserializer): an upload
    read in place (streams.part_of) or relayed untouched, not parsed and copied per chunk;
    those in `raw_responses` answer with serialized messages (a cached model's)."""
    captured: list[tuple[str, dict[str, Any]]] = []

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass  # the same dict reaches add_registered_method_handlers

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            captured.append((service, handlers))

    add(servicer, Capture())
    for service, handlers in captured:
        for name in raw_requests:
            handlers[name] = handlers[name]._replace(request_deserializer=None)
        for name in raw_responses:
            handlers[name] = handlers[name]._replace(response_serializer=None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def add_health_and_reflection(
    server: grpc.Server | AioServer, service_names: Sequence[str]
) -> health.HealthServicer:
    """The standard health service (SERVING for '' and each service) and server reflection.

    The servicer returned is the one source of truth of the status: an aio server answers
    from it too, and `serve_health` serves it on its own port."""
    servicer = health.HealthServicer()
    for name in ("", *service_names):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    if isinstance(server, AioServer):
        aio = server.server

        def add() -> None:
            health_pb2_grpc.add_HealthServicer_to_server(_AioHealth(servicer), aio)
            reflection.enable_server_reflection(names, aio)  # the asyncio servicer

        server.call(add)
    else:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection(names, server)
    return servicer


def serve_health(
    servicer: health.HealthServicer, host: str, port: int | None
) -> tuple[grpc.Server | None, int | None]:
    """A plain-text server with nothing but the health service (the same servicer, so it
    says NOT_SERVING when the service shuts down) on threads of its own; None when port
    is None."""
    if port is None:
        return None, None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=SERVER_OPTIONS)
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    # Check only: a Watch stream would hold one of its two threads for as long as it lasts.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(health.SERVICE_NAME, {"Check": check}),)
    )
    return server, bind(server, host, port)


class Serving(Protocol):
    """A server as a service starts and stops it: grpc.Server or AioServer."""

    def start(self) -> None:
        """Start serving."""

    def stop(self, grace: float | None) -> Any:
        """Stop within grace seconds; something whose wait() returns once stopped."""


class Binds(Protocol):
    """A server ports are bound on: grpc.Server or AioServer."""

    def add_insecure_port(self, address: str) -> int:
        """Bind a plain-text port."""

    def add_secure_port(self, address: str, creds: grpc.ServerCredentials) -> int:
        """Bind a TLS port."""


def _wait_for_handler(stop: threading.Event) -> None:
    """Block the main thread until a signal handler sets stop.

    The kernel may deliver a process's signal to any of its threads, and CPython runs the
    Python handler only when the main thread next runs bytecode: blocked in stop.wait(), it
    would never see a signal that landed on one of the server's threads. The signal's C
    handler also writes to the wakeup fd, on whichever thread it runs, so the main thread
    waits on that instead."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        while not stop.is_set():
            os.read(r, 512)  # a signal arrived: its handler runs before the next check
    finally:
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)


def serve_until_signal(
    server: Serving,
    health_servicer: health.HealthServicer,
    grace_s: float,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Block until SIGTERM/SIGINT; then NOT_SERVING, stop within the grace period, clean up."""
    stop = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        logger.info("signal %s: shutting down (grace %.0fs)", signum, grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    _wait_for_handler(stop)
    health_servicer.enter_graceful_shutdown()
    if on_stop is not None:
        on_stop()
    server.stop(grace_s).wait()


def write_ready_file(path: str | None, addresses: dict[str, str]) -> None:
    """Atomically write the service's bound addresses as JSON (for launchers and tests)."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(addresses))
    tmp.replace(target)


def ready_addresses(
    host: str, port: int, metrics_host: str | None = None, metrics_port: int | None = None
) -> dict[str, str]:
    """The addresses a ready file lists (wildcard hosts written as 127.0.0.1)."""

    def local(h: str) -> str:
        return "127.0.0.1" if h in ("0.0.0.0", "::", "") else h

    out = {"grpc": f"{local(host)}:{port}"}
    if metrics_port is not None and metrics_host is not None:
        out["metrics"] = f"{local(metrics_host)}:{metrics_port}"
    return out


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Service(Protocol):
    """A built service: a gRPC server (not started), its port, health and /metrics."""

    @property
    def server(self) -> Serving:
        """Its gRPC server."""

    port: int
    health: health.HealthServicer
    metrics_port: int | None

    def start(self) -> None:
        """Start serving."""

    def on_stop(self) -> None:
        """Called on SIGTERM, before the server stops."""


def serve_main(name: str, settings: ServiceSettings, build: Callable[[], Service]) -> int:
    """A service's main(): build and start it, announce where it listens, serve until
    SIGTERM. A start-up failure (port taken, file missing) is one line and exit status 2."""
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT)
    limit_malloc_arenas()  # before the servers' threads exist
    try:
        service = build()
        freeze_heap()
        service.start()
    except FLClusteringError as exc:
        sys.stderr.write(f"{name}: error: {exc}\n")
        return 2
    exit_with_parent()
    ready = ready_addresses(
        settings.host, service.port, settings.metrics_host, service.metrics_port
    )
    health_port = getattr(service, "health_port", None)
    if health_port is not None:
        ready["health"] = ready_addresses(settings.host, health_port)["grpc"]
    logger.info("%s serving on %s", name, ready)
    write_ready_file(settings.ready_file, ready)
    serve_until_signal(service.server, service.health, settings.grace_s, service.on_stop)
    return 0
