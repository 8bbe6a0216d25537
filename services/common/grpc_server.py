"""The server side of gRPC: building servers, mapping domain errors to statuses, auth.

Domain errors map to status codes here, once; servicers stay thin.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import itertools
import json
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from services.common.errors import (
    AuthError,
    CapacityError,
    ConfigError,
    FLClusteringError,
    ForbiddenError,
    NotFoundError,
    SpecMismatchError,
    StateError,
)
from services.common.lifecycle import exit_with_parent
from services.common.settings import ServiceSettings, TransportSettings
from services.common.wire import MESSAGE_LIMITS, WireError, invalid

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

MAX_DETAILS = 400  # characters of an error message sent back or logged


def bounded(message: str, limit: int = MAX_DETAILS) -> str:
    """A message cut to `limit` characters: whatever a caller sent, an error quoting it
    stays a short status detail and a short log line."""
    return message if len(message) <= limit else message[: limit - 14] + " ...(truncated)"


def rpc(name: str) -> Callable[[F], F]:
    """Decorate a servicer method: domain errors become statuses with a `[name]` log line.

    Works for unary and server-streaming methods (generators) alike.
    """

    def wrap(fn: F) -> F:
        def fail(context: grpc.ServicerContext, exc: BaseException) -> None:
            code = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                logger.exception("[%s] internal error", name)
                context.abort(code, f"internal error: {type(exc).__name__}")
            message = bounded(str(exc))
            logger.info("[%s] %s: %s", name, code.name, message)
            context.abort(code, message)

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


class _Admission:
    """Counts calls in flight per (identity, method) and per method."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._lock = threading.Lock()
        self._mine: dict[tuple[str, str, str], int] = {}
        self._all: dict[str, int] = {}

    def enter(self, who: Identity, method: str) -> str | None:
        """Take a slot; None, or why there is none."""
        p = self._policy
        key = (who.role, who.name, method)
        limit = p.per_identity.get(method, p.default_per_identity)
        total = p.total.get(method)
        with self._lock:
            mine = self._mine.get(key, 0)
            if not who.is_dev and mine >= limit:
                return f"{who.name} already has {mine} {method} call(s) in flight (limit {limit})"
            if total is not None and self._all.get(method, 0) >= total:
                return f"the server is handling {total} {method} calls: try again shortly"
            self._mine[key] = mine + 1
            self._all[method] = self._all.get(method, 0) + 1
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


class Gate(grpc.ServerInterceptor):
    """Authentication, authorisation and admission in front of every handler: who calls,
    whether its role may call this method, and whether it (or everyone) has too many such
    calls in flight. The handler then reads the caller with `caller()`."""

    def __init__(self, authenticator: Authenticator, policy: Policy) -> None:
        self._auth = authenticator
        self._policy = policy = Policy(
            roles={**COMMON_ROLES, **policy.roles},
            per_identity={"Watch": 1, **policy.per_identity},
            default_per_identity=policy.default_per_identity,
            total={**COMMON_TOTAL, **policy.total},
        )
        self._admission = _Admission(policy)
        self._wrapped: dict[str, Any] = {}

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        method = details.method
        if method.startswith(EXEMPT):
            return continuation(details)
        done = self._wrapped.get(method)
        if done is None:
            done = self._wrap(continuation(details), method)
            if done is not None:
                self._wrapped[method] = done
        return done

    def _admit(self, context: grpc.ServicerContext, method: str) -> Identity:
        """The caller, once it may make this call (else the call is aborted)."""
        who = self._auth.identity(context)
        if who is None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no valid credential (client certificate or bearer token)",
            )
            raise AssertionError("unreachable")  # abort raises
        roles = self._policy.roles.get(method)
        if roles is not None and not who.is_dev and who.role not in roles:
            logger.info("[%s] PERMISSION_DENIED: %s %s", method, who.role, who.name)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who.role} {who.name!r} may not call {method} "
                f"(allowed: {', '.join(sorted(roles))})",
            )
        refused = self._admission.enter(who, method)
        if refused is not None:
            logger.info("[%s] RESOURCE_EXHAUSTED: %s", method, bounded(refused))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, bounded(refused))
        return who

    def _wrap(self, handler: Any, full_method: str) -> Any:
        if handler is None:
            return None
        method = full_method.rsplit("/", 1)[-1][:64]
        admit, leave = self._admit, self._admission.leave

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

        def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                who = admit(context, method)
                released = threading.Event()

                def release() -> None:
                    if not released.is_set():
                        released.set()
                        leave(who, method)

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

        de, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(call(handler.unary_unary), de, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), de, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(call(handler.stream_unary), de, ser)
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), de, ser)


_END = object()


class StallWatch:
    """Cuts streams that stall: an upload whose next message does not come within `idle_s`
    (its handler sees the stream end and refuses the upload), a download whose receiver
    takes no next message within `idle_s` (the server's send blocks meanwhile), or either
    still open after `total_s`, is cancelled, so a silent peer cannot hold a server thread.

    One daemon thread checks the watched streams twice a second.
    """

    def __init__(self, idle_s: float, total_s: float) -> None:
        self.idle_s = idle_s
        self.total_s = total_s
        self._lock = threading.Lock()
        self._streams: dict[int, list[Any]] = {}  # id -> [context, started, last, name]
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(
        self, messages: Iterator[Any], context: grpc.ServicerContext, what: str
    ) -> Iterator[Any]:
        """messages, while cancelling the call if the sender stalls."""
        key = next(self._ids)
        now = time.monotonic()
        with self._lock:
            self._streams[key] = [context, now, now, what]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)
                self._thread.start()
        try:
            for msg in messages:
                with self._lock:
                    entry = self._streams.get(key)
                    if entry is not None:
                        entry[2] = time.monotonic()
                yield msg
        finally:
            with self._lock:
                self._streams.pop(key, None)

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


class _Unparseable:
    """What a request that is not a valid message deserializes to (instead of raising,
    which gRPC answers with INTERNAL and a traceback in the log)."""

    def __init__(self, method: str, exc: Exception) -> None:
        self.error = invalid(f"the request is not a valid {method} message ({type(exc).__name__})")


class ParseInterceptor(grpc.ServerInterceptor):
    """Unparseable request bodies are INVALID_ARGUMENT, logged as one line.

    Innermost, so the handler it wraps is the servicer's own: one wrapped handler per
    method, built on the first call and reused.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        done = self._wrapped.get(details.method)
        if done is None:
            done = self._wrap(continuation(details), details.method)
            if done is not None:
                self._wrapped[details.method] = done
        return done

    def _wrap(self, handler: Any, full_method: str) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        method = full_method.rsplit("/", 1)[-1][:64]
        deserialize = handler.request_deserializer

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:
                return _Unparseable(method, exc)

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, _Unparseable):
                logger.info("[%s] INVALID_ARGUMENT: %s", method, request.error)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error))
            return request

        def messages(it: Iterator[Any]) -> Iterator[Any]:
            for request in it:
                if isinstance(request, _Unparseable):
                    raise request.error  # a domain error: the handler maps it like any other
                yield request

        def aborting(it: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in it:
                yield checked(request, context)

        out = handler.response_serializer
        if handler.unary_unary:
            fn = handler.unary_unary
            return grpc.unary_unary_rpc_method_handler(
                lambda r, c: fn(checked(r, c), c), parse, out
            )
        if handler.unary_stream:
            gen = handler.unary_stream
            return grpc.unary_stream_rpc_method_handler(
                lambda r, c: gen(checked(r, c), c), parse, out
            )
        if handler.stream_unary:
            su = handler.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda it, c: su(messages(it), c), parse, out
            )
        ss = handler.stream_stream
        return grpc.stream_stream_rpc_method_handler(
            lambda it, c: ss(aborting(it, c), c), parse, out
        )


def new_server(
    max_workers: int,
    authenticator: Authenticator,
    policy: Policy,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> grpc.Server:
    """A thread-pool server with message limits, keepalive settings and the Gate."""
    chain = [*interceptors, Gate(authenticator, policy)]
    chain.append(ParseInterceptor())  # innermost: its deserializers are the ones used
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=SERVER_OPTIONS,
        interceptors=chain,
    )


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


def bind(server: grpc.Server, host: str, port: int) -> int:
    """Bind host:port (0 picks a free port); a taken port is one clear ConfigError."""
    check_port_free(host, port)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: port in use or not allowed") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen on {host}:{port}: port in use or not allowed")
    return bound


def _add_secure_port(
    server: grpc.Server, host: str, port: int, creds: grpc.ServerCredentials
) -> int:
    """Bind a TLS port; a taken port is one ConfigError."""
    check_port_free(host, port)
    try:
        bound = server.add_secure_port(f"{host}:{port}", creds)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen (TLS) on {host}:{port}: port in use") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen (TLS) on {host}:{port}: port in use")
    return bound


def bind_tls(server: grpc.Server, host: str, port: int, cert: str, key: str) -> int:
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
    server: grpc.Server, host: str, port: int, tls: TlsFiles | None, auth: Authenticator
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


def bind_mtls(server: grpc.Server, host: str, port: int, tls: TlsFiles) -> int:
    """Bind a mutual-TLS port whose certificate follows its files: a new handshake checks
    them at most once a minute, so a renewed certificate (cert-manager renews in place)
    is served without a restart."""
    renewing = _Renewing(tls)
    creds = grpc.dynamic_ssl_server_credentials(
        renewing.config(tls), renewing.fetch, require_client_authentication=True
    )
    return _add_secure_port(server, host, port, creds)


def add_health_and_reflection(
    server: grpc.Server, service_names: Sequence[str]
) -> health.HealthServicer:
    """The standard health service (SERVING for '' and each service) and server reflection."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *service_names):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
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


def serve_until_signal(
    server: grpc.Server,
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
    stop.wait()
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

    server: grpc.Server
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
    try:
        service = build()
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
