"""Prometheus metrics: one registry per service, gRPC interceptors, an HTTP endpoint, and
`Catalogue`, the table form each service declares its own metrics in (in its metrics.py).

Names follow Prometheus conventions: the `flclustering_` prefix, base units (`_seconds`,
`_bytes`), `_total` on counters, histograms for durations and sizes. Label values come from
small fixed sets (status codes, rejection reasons, RPC methods, cluster ids capped at
MAX_CLUSTER_LABELS); the clusterer and aggregator never label by participant, so thousands
of participants add no series. Participant processes label by hosted participant, bounded
by their --count.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.exposition import start_http_server

from services.common.version import revision, version
from services.transport.interceptors import Wrapping, rewrap

PREFIX = "flclustering"
MAX_CLUSTER_LABELS = 32
SIZE_BUCKETS = tuple(float(2**k) for k in range(10, 34, 2))  # 1 KiB .. 8 GiB
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Label values created up front, so every series a dashboard or rule names exists from the
# first scrape (a labelled metric with no children is not exposed at all).
REFUSAL_REASONS = (
    "invalid_argument",
    "data_loss",
    "resource_exhausted",
    "not_found",
    "failed_precondition",
    "unauthenticated",
    "cancelled",
)


def cluster_label(cluster: int) -> str:
    """A cluster id as a label value; ids past the cap share one value."""
    return str(cluster) if 0 <= cluster < MAX_CLUSTER_LABELS else "other"


@contextmanager
def counting_refusals(counter: Counter) -> Iterator[None]:
    """Count an upload that fails, labelled by the status code it is answered with."""
    try:
        yield
    except (grpc.RpcError, asyncio.CancelledError):  # the sender's own stream broke
        counter.labels("cancelled").inc()
        raise
    except Exception as exc:
        code = getattr(exc, "code", None)  # a relayed status carries its code
        if not isinstance(code, grpc.StatusCode):
            from services.transport.status import status_for

            code = status_for(exc)
        counter.labels(code.name.lower()).inc()
        raise


def serve_metrics(registry: CollectorRegistry, host: str, port: int | None) -> int | None:
    """Serve /metrics on host:port in a daemon thread; returns the bound port (None: off)."""
    if port is None:
        return None
    if port == -1:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        from services.core.errors import ConfigError

        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    return int(server.server_port)


def _split(method: str) -> tuple[str, str]:
    parts = method.strip("/").split("/")
    return (parts[0], parts[1]) if len(parts) == 2 else ("unknown", method)


def _code_of(context: Any) -> str:
    code = getattr(context, "code", None)  # aio gives sync handlers a context without it
    code = code() if code is not None else None
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ServerMetricsInterceptor(Wrapping):
    """Counts and times every RPC by service, method and status code."""

    def __init__(self, metrics: RpcMetrics) -> None:
        super().__init__()
        self.m = metrics

    def wrap(self, handler: Any, full_method: str) -> Any:
        if handler is None:
            return None
        service, method = _split(full_method)
        m = self.m

        def observe(start: float, code: str) -> None:
            m.server_seconds.labels(service, method).observe(time.perf_counter() - start)
            m.server_handled.labels(service, method, code).inc()

        @contextmanager
        def timed(context: Any) -> Iterator[None]:
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                yield
                code = _code_of(context)
            except Exception:
                code = _code_of(context)
                code = "UNKNOWN" if code == "OK" else code
                raise
            except asyncio.CancelledError:  # an aio call whose client went away
                code = "CANCELLED"
                raise
            finally:
                observe(start, code)

        def call(fn: Callable[..., Any]) -> Callable[..., Any]:
            def inner(request: Any, context: grpc.ServicerContext) -> Any:
                with timed(context):
                    return fn(request, context)

            return inner

        def stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def inner(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                with timed(context):
                    yield from fn(request, context)

            return inner

        def acall(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def inner(request: Any, context: Any) -> Any:
                with timed(context):
                    return await fn(request, context)

            return inner

        def astream(fn: Callable[..., AsyncGenerator[Any]]) -> Callable[..., AsyncIterator[Any]]:
            async def inner(request: Any, context: Any) -> AsyncIterator[Any]:
                with timed(context):
                    async with aclosing(fn(request, context)) as it:
                        async for item in it:
                            yield item

            return inner

        return rewrap(handler, call=call, stream=stream, acall=acall, astream=astream)


class _ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    def __init__(self, metrics: RpcMetrics) -> None:
        self.m = metrics

    def _done(self, details: Any, start: float, code: grpc.StatusCode) -> None:
        self.m.client_done(*_split(details.method), time.perf_counter() - start, code)

    def _unary_result(self, continuation: Any, details: Any, request: Any) -> Any:
        start = time.perf_counter()
        call = continuation(details, request)
        try:
            call.result()
            self._done(details, start, grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            self._done(details, start, exc.code())
        return call

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return self._unary_result(continuation, details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return self._unary_result(continuation, details, request_iterator)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        start = time.perf_counter()
        call = continuation(details, request)
        interceptor = self

        class Tracked:
            def __iter__(self) -> Iterator[Any]:
                try:
                    yield from call
                    interceptor._done(details, start, grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    interceptor._done(details, start, exc.code())
                    raise

            def __getattr__(self, name: str) -> Any:
                return getattr(call, name)

        return Tracked()


def instrument_channel(channel: grpc.Channel, metrics: RpcMetrics | None) -> grpc.Channel:
    """The channel with client-side RPC metrics (unchanged when metrics are off)."""
    if metrics is None:
        return channel
    return grpc.intercept_channel(channel, _ClientInterceptor(metrics))


@dataclass(frozen=True)
class Metric:
    """One row of a service's metric table."""

    attr: str  # attribute of the catalogue
    kind: type  # Counter, Gauge, Histogram, Enum or Info
    name: str  # without the flclustering_ prefix
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None
    states: tuple[str, ...] | None = None  # Enum
    init: tuple[str, ...] = ()  # label values (one label) created up front

    def create(self, registry: CollectorRegistry) -> Any:
        """The prometheus_client object of this row, in registry."""
        kwargs: dict[str, Any] = {"registry": registry}
        if self.labels:
            kwargs["labelnames"] = list(self.labels)
        if self.buckets is not None:
            kwargs["buckets"] = self.buckets
        if self.states is not None:
            kwargs["states"] = list(self.states)
        metric = self.kind(f"{PREFIX}_{self.name}", self.help, **kwargs)
        for value in self.init:
            metric.labels(value)
        return metric


class Table:
    """Metrics declared as a TABLE of Metric rows, created in one registry."""

    TABLE: ClassVar[tuple[Metric, ...]] = ()

    def __init__(self, registry: CollectorRegistry) -> None:
        for row in self.TABLE:
            setattr(self, row.attr, row.create(registry))

    def __getattr__(self, name: str) -> Any:  # the table's attributes, for type checkers
        raise AttributeError(name)


CALL = ("grpc_service", "grpc_method")
CODED = (*CALL, "grpc_code")


class RpcMetrics(Table):
    """Latency and status codes of every RPC, served and made, and model bytes moved."""

    TABLE = (
        Metric(
            "server_handled",
            Counter,
            "grpc_server_handled_total",
            "RPCs completed by the server.",
            CODED,
        ),
        Metric(
            "server_seconds",
            Histogram,
            "grpc_server_handling_seconds",
            "Time to handle an RPC (streams: whole stream).",
            CALL,
            DURATION_BUCKETS,
        ),
        Metric(
            "client_handled",
            Counter,
            "grpc_client_handled_total",
            "RPCs completed as a client.",
            CODED,
        ),
        Metric(
            "client_seconds",
            Histogram,
            "grpc_client_handling_seconds",
            "Time an RPC made as a client took.",
            CALL,
            DURATION_BUCKETS,
        ),
        Metric(
            "received_bytes",
            Counter,
            "received_bytes_total",
            "Model bytes received in weight streams.",
        ),
        Metric("sent_bytes", Counter, "sent_bytes_total", "Model bytes sent in weight streams."),
    )

    def client_done(self, service: str, method: str, seconds: float, code: grpc.StatusCode) -> None:
        """An RPC this service made ended with `code` after `seconds`."""
        self.client_seconds.labels(service, method).observe(seconds)
        self.client_handled.labels(service, method, code.name).inc()


def refusals(*extra: str) -> Metric:
    """The updates-refused counter every receiving service exports, by reason."""
    return Metric(
        "updates_rejected",
        Counter,
        "updates_rejected_total",
        "Updates refused or rejected, by reason.",
        ("reason",),
        init=REFUSAL_REASONS + extra,
    )


class BuildMetrics(Table):
    """Which release a process runs: during a rolling upgrade (docs/compatibility.md),
    `count by (version) (flclustering_build_info)` shows what is left to upgrade."""

    TABLE = (
        Metric(
            "info",
            Info,
            "build",
            "The release and source revision (empty when unknown) this process runs; always 1.",
        ),
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.info.info({"version": version(), "revision": revision()})


class Catalogue(Table):
    """A service's metrics: its TABLE plus the RPC metrics (`.rpc`) and the build's
    (`.build`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__(registry)
        self.rpc = RpcMetrics(registry)
        self.build = BuildMetrics(registry)
