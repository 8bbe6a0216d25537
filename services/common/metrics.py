"""Prometheus metrics: one registry per service, a gRPC interceptor, an HTTP endpoint.

Names follow Prometheus conventions: the `flclustering_` prefix, base units (`_seconds`,
`_bytes`), `_total` on counters, histograms for durations and sizes. Label values come from
small fixed sets (status codes, rejection reasons, RPC methods, cluster ids capped at
MAX_CLUSTER_LABELS); the clusterer and aggregator never label by participant, so thousands
of participants add no series. Participant processes label by hosted participant, bounded
by their --count.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.exposition import start_http_server

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
DEFENCE_REASONS = ("norm", "non-finite", "robust-rule")
TASKS = ("pretrain", "train", "evaluate")
PHASES = (
    "waiting",
    "pretraining",
    "clustering",
    "selecting",
    "evaluating",
    "training",
    "aggregating",
    "done",
    "failed",
)


def cluster_label(cluster: int) -> str:
    """A cluster id as a label value; ids past the cap share one value."""
    return str(cluster) if 0 <= cluster < MAX_CLUSTER_LABELS else "other"


def reason_label(reason: str) -> str:
    """A defence rejection reason as a bounded label value."""
    return reason if reason in ("norm", "non-finite") else "robust-rule"


@contextmanager
def counting_refusals(counter: Counter) -> Iterator[None]:
    """Count an upload that fails, labelled by the status code it is answered with."""
    try:
        yield
    except grpc.RpcError:  # the sender's own stream broke
        counter.labels("cancelled").inc()
        raise
    except Exception as exc:
        code = getattr(exc, "code", None)  # a relayed status carries its code
        if not isinstance(code, grpc.StatusCode):
            from services.common.grpc_util import status_for

            code = status_for(exc)
        counter.labels(code.name.lower()).inc()
        raise


def parse_metrics_port(raw: str) -> int | None:
    """'0' disables metrics (None); 'auto' picks a free port (-1); else a port number."""
    raw = raw.strip().lower()
    if raw in ("0", "", "off", "none"):
        return None
    if raw == "auto":
        return -1
    port = int(raw)
    if not 0 < port < 65536:
        raise ValueError(raw)
    return port


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
        from services.common.errors import ConfigError

        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    return int(server.server_port)


class RpcMetrics:
    """Latency and status codes of every RPC, served and made."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.server_handled = Counter(
            f"{PREFIX}_grpc_server_handled_total",
            "RPCs completed by the server.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.server_seconds = Histogram(
            f"{PREFIX}_grpc_server_handling_seconds",
            "Time to handle an RPC (streams: whole stream).",
            ["grpc_service", "grpc_method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.client_handled = Counter(
            f"{PREFIX}_grpc_client_handled_total",
            "RPCs completed as a client.",
            ["grpc_service", "grpc_method", "grpc_code"],
            registry=registry,
        )
        self.client_seconds = Histogram(
            f"{PREFIX}_grpc_client_handling_seconds",
            "Time an RPC made as a client took.",
            ["grpc_service", "grpc_method"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.received_bytes = Counter(
            f"{PREFIX}_received_bytes_total",
            "Model bytes received in weight streams.",
            registry=registry,
        )
        self.sent_bytes = Counter(
            f"{PREFIX}_sent_bytes_total", "Model bytes sent in weight streams.", registry=registry
        )


def _split(method: str) -> tuple[str, str]:
    parts = method.strip("/").split("/")
    return (parts[0], parts[1]) if len(parts) == 2 else ("unknown", method)


def _code_of(context: grpc.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class ServerMetricsInterceptor(grpc.ServerInterceptor):
    """Counts and times every RPC by service, method and status code."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self.m = metrics

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        service, method = _split(details.method)
        m = self.m

        def observe(start: float, code: str) -> None:
            m.server_seconds.labels(service, method).observe(time.perf_counter() - start)
            m.server_handled.labels(service, method, code).inc()

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            def inner(request: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                code = "UNKNOWN"
                try:
                    result = fn(request, context)
                    code = _code_of(context)
                    return result
                except Exception:
                    code = _code_of(context)
                    code = "UNKNOWN" if code == "OK" else code
                    raise
                finally:
                    observe(start, code)

            return inner

        def wrap_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def inner(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                code = "UNKNOWN"
                try:
                    yield from fn(request, context)
                    code = _code_of(context)
                except Exception:
                    code = _code_of(context)
                    code = "UNKNOWN" if code == "OK" else code
                    raise
                finally:
                    observe(start, code)

            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream),
            handler.request_deserializer,
            handler.response_serializer,
        )


class _ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    def __init__(self, metrics: RpcMetrics) -> None:
        self.m = metrics

    def _done(self, details: Any, start: float, code: grpc.StatusCode) -> None:
        service, method = _split(details.method)
        self.m.client_seconds.labels(service, method).observe(time.perf_counter() - start)
        self.m.client_handled.labels(service, method, code.name).inc()

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


class ClustererMetrics:
    """What the clusterer exports (no per-participant labels)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.rpc = RpcMetrics(r)
        self.round = Gauge(
            f"{PREFIX}_round", "Current global round (-1 before the first).", registry=r
        )
        self.rounds_total = Gauge(
            f"{PREFIX}_rounds_planned", "Rounds the federation will run.", registry=r
        )
        self.phase = Enum(
            f"{PREFIX}_phase", "Phase of the round state machine.", states=list(PHASES), registry=r
        )
        self.round_seconds = Histogram(
            f"{PREFIX}_round_duration_seconds",
            "Wall time of a whole round.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.rounds_completed = Counter(
            f"{PREFIX}_rounds_completed_total", "Rounds finished.", registry=r
        )
        self.joined = Gauge(
            f"{PREFIX}_participants_joined", "Participants that joined.", registry=r
        )
        self.active = Gauge(
            f"{PREFIX}_participants_active", "Participants heard from recently.", registry=r
        )
        self.selected = Gauge(
            f"{PREFIX}_participants_selected", "Participants selected this round.", registry=r
        )
        self.timed_out = Counter(
            f"{PREFIX}_participants_timed_out_total",
            "Tasks withdrawn at a deadline.",
            ["task"],
            registry=r,
        )
        self.updates_received = Counter(
            f"{PREFIX}_updates_received_total", "Updates accepted and forwarded.", registry=r
        )
        self.updates_rejected = Counter(
            f"{PREFIX}_updates_rejected_total",
            "Updates refused or rejected, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.updates_rejected.labels(reason)
        for task in TASKS:
            self.timed_out.labels(task)
        self.cluster_size = Gauge(
            f"{PREFIX}_cluster_size", "Members per cluster.", ["cluster"], registry=r
        )
        self.cluster_weight = Gauge(
            f"{PREFIX}_cluster_weight",
            "q-weight of each cluster in the last merge.",
            ["cluster"],
            registry=r,
        )
        self.cluster_accuracy = Gauge(
            f"{PREFIX}_cluster_accuracy",
            "Mean test accuracy of the global model per cluster.",
            ["cluster"],
            registry=r,
        )
        self.accuracy_mean = Gauge(
            f"{PREFIX}_accuracy_mean", "Mean test accuracy over participants.", registry=r
        )
        self.accuracy_std = Gauge(
            f"{PREFIX}_accuracy_std",
            "Standard deviation of accuracy across participants (fairness).",
            registry=r,
        )
        self.accuracy_worst = Gauge(
            f"{PREFIX}_accuracy_worst", "Worst participant's accuracy.", registry=r
        )
        self.loss_mean = Gauge(
            f"{PREFIX}_loss_mean", "Mean test loss over participants.", registry=r
        )
        self.clustering_seconds = Histogram(
            f"{PREFIX}_clustering_duration_seconds",
            "Time to cluster the pre-training deltas.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.purity = Gauge(
            f"{PREFIX}_clustering_purity", "Purity against known groups (-1: unknown).", registry=r
        )
        self.model_version = Gauge(f"{PREFIX}_model_version", "Global model version.", registry=r)


class AggregatorMetrics:
    """What the aggregator exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.rpc = RpcMetrics(r)
        self.model_version = Gauge(f"{PREFIX}_model_version", "Global model version.", registry=r)
        self.aggregation_seconds = Histogram(
            f"{PREFIX}_aggregation_duration_seconds",
            "Time of defence plus merge for a round.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.updates_aggregated = Counter(
            f"{PREFIX}_updates_aggregated_total", "Updates that entered an aggregation.", registry=r
        )
        self.updates_rejected = Counter(
            f"{PREFIX}_updates_rejected_total",
            "Updates refused or rejected, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS + DEFENCE_REASONS:
            self.updates_rejected.labels(reason)
        self.robust_rejections = Counter(
            f"{PREFIX}_robust_rejections_total",
            "Updates the defence rejected, per cluster.",
            ["cluster"],
            registry=r,
        )
        self.cluster_rejections = Counter(
            f"{PREFIX}_cluster_models_rejected_total",
            "Cluster models dropped by the cluster check.",
            registry=r,
        )
        self.fallbacks = Counter(
            f"{PREFIX}_robust_fallbacks_total",
            "Clusters whose rule fell back to the median.",
            registry=r,
        )
        self.update_bytes = Histogram(
            f"{PREFIX}_update_size_bytes",
            "Size of received updates.",
            buckets=SIZE_BUCKETS,
            registry=r,
        )


class ParticipantMetrics:
    """What a participant process exports, labelled by hosted participant."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.rpc = RpcMetrics(r)
        self.training_seconds = Histogram(
            f"{PREFIX}_local_training_duration_seconds",
            "Local training time per task.",
            ["participant"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.training_loss = Gauge(
            f"{PREFIX}_training_loss",
            "Mean training loss of the last local epoch.",
            ["participant"],
            registry=r,
        )
        self.examples = Counter(
            f"{PREFIX}_examples_processed_total",
            "Training examples processed.",
            ["participant"],
            registry=r,
        )
        self.tasks = Counter(
            f"{PREFIX}_tasks_total", "Tasks done, by kind.", ["participant", "kind"], registry=r
        )
        self.test_accuracy = Gauge(
            f"{PREFIX}_participant_accuracy",
            "Test accuracy of the last evaluated global model.",
            ["participant"],
            registry=r,
        )
        self.device = Info(
            f"{PREFIX}_device", "Device the participants of this process train on.", registry=r
        )
