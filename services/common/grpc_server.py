"""The server side of gRPC: building servers, mapping domain errors to statuses, auth.

Domain errors map to status codes here, once; servicers stay thin.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import json
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import (
    AuthError,
    CapacityError,
    ConfigError,
    FLClusteringError,
    NotFoundError,
    SpecMismatchError,
    StateError,
)
from services.common.lifecycle import exit_with_parent
from services.common.settings import ServiceSettings
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


class Authenticator(Protocol):
    """Decides who a caller is from its metadata; None means unauthenticated."""

    def identity(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None: ...


class TokenAuthenticator:
    """A shared bearer token (`authorization: Bearer TOKEN`), compared in constant time.

    Exactly one authorization entry is accepted: a wrong one followed by the right one is
    refused, so a proxy or client library that adds its own header cannot be bypassed.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def identity(self, metadata: Sequence[tuple[str, str | bytes]]) -> str | None:
        values = [v for k, v in metadata if k == "authorization"]
        if len(values) != 1:
            return None
        given = values[0].encode() if isinstance(values[0], str) else values[0]
        return "token" if hmac.compare_digest(given, self._expected) else None


# Health stays open (Kubernetes probes carry no token); reflection, which lists the
# services and their messages, needs the token like any other call.
EXEMPT = ("/grpc.health.v1.Health/",)


class AuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls the authenticator does not accept (health exempt)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        method = handler_call_details.method
        if method.startswith(EXEMPT) or self._auth.identity(
            handler_call_details.invocation_metadata
        ):
            return continuation(handler_call_details)

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(deny)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


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
    token: str | None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> grpc.Server:
    """A thread-pool server with message limits, keepalive settings and optional auth."""
    chain = list(interceptors)
    if token:
        chain.append(AuthInterceptor(TokenAuthenticator(token)))
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


def bind_tls(server: grpc.Server, host: str, port: int, cert: str, key: str) -> int:
    """Bind a TLS port with a PEM certificate chain and key; errors are one ConfigError."""
    try:
        creds = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())])
    except OSError as exc:
        raise ConfigError(f"cannot read TLS certificate or key: {exc}") from exc
    check_port_free(host, port)
    try:
        bound = server.add_secure_port(f"{host}:{port}", creds)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen (TLS) on {host}:{port}: port in use") from exc
    if bound == 0:
        raise ConfigError(f"cannot listen (TLS) on {host}:{port}: port in use")
    return bound


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
    logger.info("%s serving on %s", name, ready)
    write_ready_file(settings.ready_file, ready)
    serve_until_signal(service.server, service.health, settings.grace_s, service.on_stop)
    return 0
