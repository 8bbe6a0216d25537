"""The aggregator's gRPC service: a thin layer over AggregatorState."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from grpc_health.v1.health import HealthServicer
from prometheus_client import CollectorRegistry

from services.aggregator.state import AggregatorState, PendingUpdate
from services.common.errors import ConfigError
from services.common.grpc_util import (
    add_health_and_reflection,
    bind,
    new_server,
    rpc,
)
from services.common.metrics import (
    AggregatorMetrics,
    ServerMetricsInterceptor,
    cluster_label,
    counting_refusals,
    reason_label,
    serve_metrics,
)
from services.common.pb.flclustering.v1 import aggregator_pb2 as pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as pb_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import Received, build_stream, validated
from services.common.tensors import state_of
from services.common.wire import StreamReader, check_header_spec, invalid, spec_from_pb
from services.participant.datasets import SHAPES
from services.participant.models import build_model

logger = logging.getLogger(__name__)

SERVICE = "flclustering.v1.Aggregator"


@dataclass(frozen=True)
class AggregatorConfig:
    """Settings of the aggregator service."""

    host: str = "0.0.0.0"
    port: int = 50052
    model: str = "cnn"
    dataset: str = "digits"
    input_shape: tuple[int, int, int] | None = None  # default: the dataset's
    num_classes: int | None = None
    seed: int = 0
    max_update_bytes: int = 2 << 30
    keep_versions: int = 3
    auth_token: str | None = None
    max_workers: int = 16
    grace_s: float = 10.0
    ready_file: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9102  # None: no /metrics; -1: any free port
    state_dir: str | None = None  # where the newest global model survives restarts

    def shape(self) -> tuple[tuple[int, int, int], int]:
        """Input shape and class count of the model."""
        if self.input_shape is not None and self.num_classes is not None:
            return self.input_shape, self.num_classes
        if self.dataset not in SHAPES:
            raise ConfigError(
                f"dataset {self.dataset!r} has no known shape: give --input-shape and --num-classes"
            )
        shape, classes = SHAPES[self.dataset]
        return self.input_shape or shape, self.num_classes or classes


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """Receives grouped updates, aggregates rounds, serves global models."""

    def __init__(
        self, state: AggregatorState, config: AggregatorConfig, metrics: AggregatorMetrics
    ) -> None:
        self.state = state
        self.config = config
        self.metrics = metrics
        metrics.model_version.set(state.version)

    @rpc("Aggregator.ForwardUpdate")
    def ForwardUpdate(
        self, request_iterator: Iterator[pb.ForwardUpdateRequest], context: grpc.ServicerContext
    ) -> pb.ForwardUpdateResponse:
        with counting_refusals(self.metrics.updates_rejected):
            return self._receive(request_iterator)

    def _receive(
        self, request_iterator: Iterator[pb.ForwardUpdateRequest]
    ) -> pb.ForwardUpdateResponse:
        received = Received()
        reserved: list[tuple[str, torch.Tensor]] = []  # (sender, the model it trained from)

        def on_header(header: pb.UpdateHeader) -> StreamReader:
            m = header.model
            if not m.sender:
                raise invalid("the update names no sender")
            if m.kind != "weights":
                raise invalid(f"the aggregator takes weights, not {m.kind!r}")
            if m.num_samples < 0:
                raise invalid("num_samples must not be negative")
            check_header_spec(spec_from_pb(m.tensors), self.state.spec)
            reserved.append((m.sender, self.state.begin_update(m.sender, m.round, m.model_version)))
            return StreamReader(self.state.spec, keep=True, max_bytes=self.config.max_update_bytes)

        try:
            for _ in validated(request_iterator, on_header, received):
                pass
            m = received.header.model
            assert received.reader is not None and received.reader.flat is not None
            base = reserved[0][1]
            update = PendingUpdate(
                m.sender,
                int(received.header.cluster),
                int(m.num_samples),
                received.reader.flat.sub_(base),  # in place: no second model-sized buffer
                dict(m.metrics),
            )
            self.state.end_update(update, m.round)
            self.metrics.rpc.received_bytes.inc(received.reader.received)
            self.metrics.update_bytes.observe(received.reader.received)
        finally:
            for who, _ in reserved:
                self.state.release(who)
        logger.info("[Aggregator.ForwardUpdate] round %d: accepted %s", m.round, m.sender)
        return pb.ForwardUpdateResponse(accepted=True, round=m.round)

    @rpc("Aggregator.Aggregate")
    def Aggregate(
        self, request: pb.AggregateRequest, context: grpc.ServicerContext
    ) -> pb.AggregateResponse:
        for c, acc in request.cluster_accuracy.items():
            if not 0.0 <= acc <= 1.0:
                raise invalid(f"cluster {c} accuracy {acc} is outside [0, 1]")
        if not 0.0 <= request.byzantine_fraction < 0.5:
            raise invalid("byzantine_fraction must be in [0, 0.5)")
        start = time.perf_counter()
        report = self.state.aggregate(
            request.round,
            request.strategy or "flclustering",
            dict(request.cluster_accuracy),
            request.q,
            request.byzantine_fraction,
            request.lr or 0.05,
            request.abandon,
        )
        m = self.metrics
        m.aggregation_seconds.observe(time.perf_counter() - start)
        m.updates_aggregated.inc(report.updates)
        m.model_version.set(report.version)
        for reason in report.rejected.values():
            m.updates_rejected.labels(reason_label(reason)).inc()
        for c, n in report.rejected_per_cluster.items():
            m.robust_rejections.labels(cluster_label(c)).inc(n)
        m.cluster_rejections.inc(len(report.rejected_clusters))
        m.fallbacks.inc(len(report.fallbacks))
        if self.config.state_dir:
            self.state.save(Path(self.config.state_dir))
        logger.info(
            "[Aggregator.Aggregate] round %d: %d updates, %d rejected -> version %d",
            request.round,
            report.updates,
            len(report.rejected),
            report.version,
        )
        return pb.AggregateResponse(
            model_version=report.version,
            rejected=[pb.Rejection(participant_id=p, reason=r) for p, r in report.rejected.items()],
            cluster_weights=report.cluster_weights,
            rejected_clusters=[f"{c}: {r}" for c, r in report.rejected_clusters.items()],
            fallbacks=[f"{c}: {r}" for c, r in report.fallbacks.items()],
            updates=report.updates,
        )

    @rpc("Aggregator.GetModel")
    def GetModel(
        self, request: pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetModelResponse]:
        version, weights = self.state.weights(request.model_version)
        header = tensors_pb2.ModelHeader(sender="aggregator", model_version=version, kind="weights")
        for msg in build_stream(pb.GetModelResponse, header, header, weights):
            if msg.WhichOneof("part") == "data":
                self.metrics.rpc.sent_bytes.inc(len(msg.data))
            yield msg

    @rpc("Aggregator.GetAggregatorStatus")
    def GetAggregatorStatus(
        self, request: pb.GetAggregatorStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetAggregatorStatusResponse:
        with self.state.lock:
            return pb.GetAggregatorStatusResponse(
                model_version=self.state.version,
                open_round=self.state.open_round,
                pending_updates=len(self.state.pending),
            )


def initial_state(config: AggregatorConfig) -> AggregatorState:
    """Version 0: the initial model w0, the same for every participant."""
    shape, classes = config.shape()
    model = build_model(config.model, shape, classes, config.seed)
    state = AggregatorState(state_of(model), config.keep_versions)
    if config.state_dir and state.restore(Path(config.state_dir)):
        logger.info(
            "restored model version %d (open round %d) from %s",
            state.version,
            state.open_round,
            config.state_dir,
        )
    return state


@dataclass
class AggregatorService:
    """A built aggregator: the server (not started), its port, servicer and health service."""

    server: grpc.Server
    port: int
    servicer: AggregatorServicer
    health: HealthServicer
    registry: CollectorRegistry
    metrics_port: int | None = None

    def start(self) -> None:
        """Start serving gRPC and /metrics."""
        self.server.start()
        config = self.servicer.config
        self.metrics_port = serve_metrics(self.registry, config.metrics_host, config.metrics_port)


def build_service(config: AggregatorConfig) -> AggregatorService:
    """Build the aggregator server and everything it serves."""
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry)
    servicer = AggregatorServicer(initial_state(config), config, metrics)
    server = new_server(
        config.max_workers, config.auth_token, [ServerMetricsInterceptor(metrics.rpc)]
    )
    pb_grpc.add_AggregatorServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind(server, config.host, config.port)
    return AggregatorService(server, port, servicer, health, registry)


def create_server(config: AggregatorConfig) -> tuple[grpc.Server, int]:
    """Build (not start) the aggregator server; returns it and its bound port."""
    service = build_service(config)
    return service.server, service.port
