"""The aggregator's gRPC service: a thin layer over AggregatorState."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import torch
from google.protobuf.json_format import MessageToDict
from grpc_health.v1.health import HealthServicer
from prometheus_client import CollectorRegistry

from services.aggregator.metrics import AggregatorMetrics, reason_label
from services.aggregator.sealed import SealedState
from services.aggregator.settings import AggregatorConfig
from services.aggregator.state import AggregatorState, PendingUpdate, RoundClose, RoundReport
from services.aggregator.store import Delta, DeltaStore, RowFile
from services.common.codecs import Parts
from services.common.homomorphic import load_keys
from services.common.metrics import (
    ServerMetricsInterceptor,
    cluster_label,
    counting_refusals,
    serve_metrics,
)
from services.common.pb.flclustering.v1 import aggregator_pb2 as pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as pb_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.settings import PrivacySettings
from services.common.streams import Received, build_stream, validated
from services.common.uploads import (
    Upload,
    check_update_header,
    check_upload,
    content_checked,
    upload_reader,
)
from services.common.uploads import decoded as decoded_parts
from services.common.version import revision, version
from services.common.wire import StreamReader
from services.core.device import resolve_device
from services.core.errors import ForbiddenError, StaleError, StateError, invalid
from services.core.model_file import read_weights
from services.core.models import build_model
from services.core.privacy import CentralNoise
from services.core.strategies import get_strategy
from services.core.tensors import state_of
from services.transport.auth import caller
from services.transport.gate import Policy
from services.transport.limits import MAX_CLUSTERS
from services.transport.roles import rules_for
from services.transport.server import (
    add_health_and_reflection,
    add_servicer,
    new_server,
    serve_health,
)
from services.transport.stall import StallWatch
from services.transport.status import rpc
from services.transport.tls import bind_service, credentials

logger = logging.getLogger(__name__)

SERVICE = "flclustering.v1.Aggregator"
MAX_REASON = 200  # characters of a rollback's reason


def cluster_accuracies(given: Mapping[int, float]) -> dict[int, float]:
    """The clusters' accuracies an Aggregate call weighs the merge with, checked before
    anything is touched: at most MAX_CLUSTERS ids, each in range, each accuracy in [0, 1]."""
    if len(given) > MAX_CLUSTERS:
        raise invalid(f"at most {MAX_CLUSTERS} cluster accuracies")
    for c, acc in given.items():
        if not 0 <= c < MAX_CLUSTERS:
            raise invalid(f"cluster ids must be in [0, {MAX_CLUSTERS})")
        if not 0.0 <= acc <= 1.0:  # NaN fails this too
            raise invalid(f"cluster {c} accuracy {acc} is outside [0, 1]")
    return dict(given)


def buffers_request(
    request: pb.AggregateRequest, asynchronous: bool
) -> tuple[frozenset[int] | None, tuple[int, ...]]:
    """--mode async: the clusters to flush and every cluster, checked before anything is
    touched (in rounds both must be empty)."""
    flush, clusters = list(request.flush), list(request.clusters)
    if not asynchronous:
        if flush or clusters:
            raise StateError(
                "this aggregator runs synchronous rounds (--mode sync): a round closes whole, "
                "not by cluster buffers; start both services with the same --mode"
            )
        return None, ()
    if request.abandon or request.HasField("privacy"):
        raise invalid("--mode async flushes buffers: abandon and privacy are for rounds")
    if not flush:
        raise StateError(
            "this aggregator runs --mode async: say which clusters' buffers to flush (a "
            "clusterer in --mode sync? start both with the same --mode)"
        )
    for c in (*flush, *clusters):
        if not 0 <= c < MAX_CLUSTERS:
            raise invalid(f"cluster ids must be in [0, {MAX_CLUSTERS})")
    if len(clusters) > MAX_CLUSTERS or len(set(flush)) != len(flush):
        raise invalid(f"at most {MAX_CLUSTERS} clusters, each flushed once")
    return frozenset(flush), tuple(sorted(set(clusters) | set(flush)))


MAX_EXPECTED = 1e7  # an expected sampled count per cluster beyond any federation


def privacy_request(request: pb.AggregateRequest, privacy: PrivacySettings) -> dict[int, float]:
    """The expected sampled counts of a round under --dp central, checked before anything
    is touched: the request's mechanism must be this aggregator's (both sides run the
    same --dp; the clusterer accounts for the noise multiplier this aggregator adds)."""
    asked = request.HasField("privacy")
    if not privacy.central:
        if asked:
            raise StateError(
                "the clusterer runs --dp central but this aggregator does not: start both "
                "with the same --dp settings"
            )
        return {}
    if not asked:
        raise StateError(
            "this aggregator runs --dp central (it clips and noises every merge): the "
            "clusterer must run with --dp central too, it samples and accounts for the rounds"
        )
    z = request.privacy.noise_multiplier
    if not z == privacy.dp_noise:  # NaN fails this too
        raise StateError(
            f"the clusterer accounts for noise multiplier {z:g}, this aggregator adds "
            f"{privacy.dp_noise:g}: start both with the same --dp-noise"
        )
    given = request.privacy.expected
    if not 0 < len(given) <= MAX_CLUSTERS:
        raise invalid(f"--dp central needs 1 to {MAX_CLUSTERS} expected counts, got {len(given)}")
    for c, n in given.items():
        if not 0 <= c < MAX_CLUSTERS:
            raise invalid(f"cluster ids must be in [0, {MAX_CLUSTERS})")
        if not 0 < n <= MAX_EXPECTED:  # NaN fails this too
            raise invalid(f"cluster {c}'s expected sampled count {n} is outside (0, 1e7]")
    return dict(given)


class AggregatorServicer(pb_grpc.AggregatorServicer):
    """Receives grouped updates, aggregates rounds, serves global models."""

    def __init__(
        self, state: AggregatorState, config: AggregatorConfig, metrics: AggregatorMetrics
    ) -> None:
        self.state = state
        self.config = config
        self.metrics = metrics
        t = config.transport
        self.watch = StallWatch(t.stream_idle_s, t.stream_max_s)
        self._closing = threading.Lock()
        self._saved_round = state.open_round - 1  # restored state is on disk already
        self._clusters_seen: set[int] = set()  # --mode async: buffers shown on /metrics
        self.sealed = state if isinstance(state, SealedState) else None  # --secure he
        metrics.model_version.set(state.version)
        d = config.defence
        self.policy = pb.DefencePolicy(
            strategy=config.federation.strategy,
            q=d.q,
            byzantine_fraction=d.byzantine_fraction,
            norm_factor=d.norm_factor,
            cluster_factor=d.cluster_factor,
            twin_factor=d.twin_factor,
            personalise=config.federation.personalise,
            secure=config.federation.secure,
            guard=config.federation.guard,
            mode=config.pace.mode,
            max_staleness=config.pace.max_staleness if config.pace.asynchronous else 0,
        )
        metrics.policy.info({k: str(v) for k, v in MessageToDict(self.policy).items()})
        self.release = (version(), revision())  # what GetAggregatorStatus reports

    @rpc("Aggregator.ForwardUpdate")
    def ForwardUpdate(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> pb.ForwardUpdateResponse:
        """An update, its messages serialized (`add_servicer`): data is read in place."""
        with counting_refusals(self.metrics.updates_rejected):
            return self._receive(self.watch.watch(request_iterator, context, "ForwardUpdate"))

    def _receive(self, request_iterator: Iterator[bytes]) -> pb.ForwardUpdateResponse:
        received = Received()
        reserved: list[str] = []  # the sender, once its upload may start
        upload: list[Upload] = []  # its codec and tensors, from its header
        decoded: list[torch.Tensor | RowFile] = []  # where a compressed upload's delta went
        # --secure he: ciphertexts only; else any scheme in the clear (the clusterer checked
        # the federation's).
        takes = self.sealed.codec if self.sealed is not None else None

        def on_header(header: pb.UpdateHeader) -> StreamReader:
            m = header.model
            check_update_header(m)
            if not 0 <= header.cluster < MAX_CLUSTERS:
                raise invalid(f"cluster must be in [0, {MAX_CLUSTERS})")
            upload.append(check_upload(m, self.state.spec, takes, aggregator=True))
            try:
                base = self.state.begin_update(m.sender, m.round, m.model_version, header.cluster)
            except StaleError:
                self.metrics.stale.inc()
                raise
            reserved.append(m.sender)
            # Weights: the delta against the model they came from; int8, top-k and
            # ciphertexts are kept as they came, to be decoded (or checked) after.
            limit = self.config.transport.max_update_bytes
            return upload_reader(upload[0], limit, out=self.state.buffer, base=base)

        accepted = False
        try:
            for _ in validated(request_iterator, on_header, received, pb.ForwardUpdateRequest):
                pass
            m = received.header.model
            reader = received.reader
            assert reader is not None
            sink = reader.sink
            delta: Delta | None
            cluster = int(received.header.cluster)
            codec = upload[0].codec
            if self.sealed is not None:
                with content_checked(codec):
                    update = self.sealed.sealed_update(
                        m.sender, cluster, int(m.num_samples), dict(reader.others), dict(m.metrics)
                    )
            else:
                if not codec.streamed:
                    place = self.state.buffer(self.state.store.numel)
                    decoded.append(place)
                    delta = decode_into(decoded_parts(upload[0], reader, self.state.spec), place)
                else:
                    delta = reader.flat if not isinstance(sink, RowFile) else sink.close()
                assert delta is not None
                update = PendingUpdate(
                    m.sender,
                    cluster,
                    int(m.num_samples),
                    delta,
                    dict(m.metrics),
                    base_version=int(m.model_version),
                )
            state_dir = self.config.service.state_dir
            # Durable before acknowledged: a kill -9 after the answer loses nothing.
            saved = self.state.persist(update, m.round, Path(state_dir)) if state_dir else None
            try:
                self.state.end_update(update, m.round)
            except Exception:
                if saved is not None:
                    saved.unlink(missing_ok=True)
                raise
            accepted = True
            if self.config.pace.asynchronous:
                self._buffers()
            self.metrics.rpc.received_bytes.inc(reader.received)
            self.metrics.update_bytes.observe(reader.received)
        finally:
            for who in reserved:
                self.state.release(who)
            r = received.reader
            if not accepted and decoded:
                self.state.discard(decoded[0])  # a decoded upload's place goes back
            elif not accepted and r is not None and upload and upload[0].codec.streamed:
                # The refused update's buffer or file goes back; nothing else changed.
                self.state.discard(r.flat if r.sink is None else r.sink)
        logger.info("[Aggregator.ForwardUpdate] round %d: accepted %s", m.round, m.sender)
        return pb.ForwardUpdateResponse(accepted=True, round=m.round)

    @rpc("Aggregator.Aggregate")
    def Aggregate(
        self, request: pb.AggregateRequest, context: grpc.ServicerContext
    ) -> pb.AggregateResponse:
        accuracies = cluster_accuracies(request.cluster_accuracy)
        expected = {} if request.abandon else privacy_request(request, self.config.privacy)
        flush, clusters = buffers_request(request, self.config.pace.asynchronous)
        # Strategy, q, the Byzantine share and q-FFL's rate are this service's own settings.
        close = RoundClose(
            request.round,
            get_strategy(self.config.federation.strategy),
            accuracies,
            self.config.defence,
            self.config.training.lr_at(int(request.round)),
            request.abandon,
            (self.config.training.local_epochs, self.config.training.batch_size),
            guard=self.config.federation.guard,
            flush=flush,
            clusters=clusters,
        )
        start = time.perf_counter()
        # One aggregation at a time, saved before anyone is answered: a repeated call that
        # arrives while the first is still saving waits for it.
        with self._closing:
            if expected:
                close = replace(close, privacy=self._mechanism(expected))
            report = self.state.aggregate(close)
            if not report.replayed:
                self._record(report, time.perf_counter() - start)
            self._save(int(request.round))
        if report.replayed:
            # Asked again (the caller restarted or lost the answer): the same answer,
            # counted once.
            logger.info("[Aggregator.Aggregate] round %d: answered again", request.round)
        elif report.refused:
            logger.warning(
                "[Aggregator.Aggregate] round %d: %d updates, merge refused (%s); version %d kept",
                request.round,
                report.updates,
                report.refused,
                report.version,
            )
        else:
            logger.info(
                "[Aggregator.Aggregate] round %d: %d updates, %d rejected -> version %d",
                request.round,
                report.updates,
                len(report.rejected),
                report.version,
            )
            for c, why in report.shortened_clusters.items():
                logger.info("[Aggregator.Aggregate] round %d: cluster %d %s", request.round, c, why)
        return pb.AggregateResponse(
            model_version=report.version,
            rejected=[pb.Rejection(participant_id=p, reason=r) for p, r in report.rejected.items()],
            cluster_weights=report.cluster_weights,
            rejected_clusters=[f"{c}: {r}" for c, r in report.rejected_clusters.items()],
            fallbacks=[f"{c}: {r}" for c, r in report.fallbacks.items()],
            updates=report.updates,
            round=request.round,
            abandoned=report.abandoned,
            refused=report.refused,
            merged=list(report.merged),
            staleness_mean=float(sum(report.staleness) / len(report.staleness))
            if report.staleness
            else 0.0,
            staleness_max=max(report.staleness, default=0),
            stale=report.stale,
            privacy=None
            if report.privacy is None
            else pb.PrivacyReport(
                clip=report.noise["clip"],
                next_clip=report.noise["next_clip"],
                sigma=report.noise["sigma"],
                sensitivity=report.noise["sensitivity"],
                clipped=int(report.noise["clipped"]),
            ),
        )

    def _mechanism(self, expected: dict[int, float]) -> CentralNoise:
        """This round's mechanism: the bound where adaptive clipping left it, and the noise
        drawn from a generator seeded by the operating system's CSPRNG each round (no one
        can predict the seed, so no one can subtract the noise)."""
        p = self.config.privacy
        generator = torch.Generator().manual_seed(secrets.randbits(63))
        return p.mechanism(self.state.dp_clip or p.dp_clip, expected, generator)

    def _record(self, report: RoundReport, seconds: float) -> None:
        """Metrics of a round just aggregated."""
        m = self.metrics
        m.aggregation_seconds.observe(seconds)
        m.updates_aggregated.inc(report.updates)
        m.model_version.set(report.version)
        for reason in report.rejected.values():
            m.updates_rejected.labels(reason_label(reason)).inc()
        for c, n in report.rejected_per_cluster.items():
            m.robust_rejections.labels(cluster_label(c)).inc(n)
        m.cluster_rejections.inc(len(report.rejected_clusters))
        m.cluster_shortenings.inc(len(report.shortened_clusters))
        m.fallbacks.inc(len(report.fallbacks))
        if report.refused:
            m.merges_refused.inc()
        if not report.abandoned and not report.refused:
            m.versions.inc()
        for age in report.staleness:
            m.staleness.observe(age)
        m.stale.inc(report.stale)
        if self.config.pace.asynchronous:
            self._buffers()
        if report.privacy is not None:
            m.dp_sigma.set(report.noise["sigma"])
            m.dp_clip.set(report.noise["clip"])
            m.dp_clipped.inc(report.noise["clipped"])

    def _buffers(self) -> None:
        """--mode async: the buffers' fill on /metrics (every cluster that had one)."""
        counts = self.state.buffered()
        for c in set(counts) | self._clusters_seen:
            self.metrics.buffer_fill.labels(cluster_label(c)).set(counts.get(c, 0))
        self._clusters_seen |= set(counts)

    def _save(self, round_: int) -> None:
        """Make the aggregation of round_ durable (once; a failed save is tried again by the
        next call for that round, before it is answered)."""
        state_dir = self.config.service.state_dir
        if state_dir and self._saved_round < round_:
            self.state.save(Path(state_dir))
            self._saved_round = round_

    @rpc("Aggregator.GetModel")
    def GetModel(
        self, request: pb.GetModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.GetModelResponse]:
        cluster = request.cluster if request.HasField("cluster") else None
        if cluster is not None and not 0 <= cluster < MAX_CLUSTERS:
            raise invalid(f"cluster must be in [0, {MAX_CLUSTERS})")
        if cluster is not None and caller().role == "operator":
            # A small cluster's model is close to its few members' own: operators export
            # the global model only.
            raise ForbiddenError("operators read global models only, not a cluster's")
        version, kind, weights = self.state.served(request.model_version, cluster)
        header = tensors_pb2.ModelHeader(sender="aggregator", model_version=version, kind=kind)
        messages = build_stream(pb.GetModelResponse, header, header, weights)
        for msg in self.watch.watch(messages, context, "GetModel"):
            if msg.WhichOneof("part") == "data":
                self.metrics.rpc.sent_bytes.inc(len(msg.data))
            yield msg

    @rpc("Aggregator.Rollback")
    def Rollback(
        self, request: pb.RollbackRequest, context: grpc.ServicerContext
    ) -> pb.RollbackResponse:
        if len(request.reason) > MAX_REASON:
            raise invalid(f"reason is at most {MAX_REASON} characters")
        if request.to_version < 0:
            raise invalid(f"to_version must be >= 0, not {request.to_version}")
        with self._closing:  # not while a round is being aggregated or saved
            done = self.state.rollback(int(request.round), int(request.to_version), request.reason)
            self.metrics.model_version.set(done.version)
            state_dir = self.config.service.state_dir
            if state_dir:  # durable before it is answered (again when asked again: a save
                self.state.save(Path(state_dir))  # that failed the first time is retried)
        logger.warning(
            "[Aggregator.Rollback] round %d: version %d refused (%s); version %d is a copy of %d%s",
            done.round,
            done.refused,
            done.reason[:200] or "no reason given",
            done.version,
            done.to,
            " (answered again)" if done.replayed else "",
        )
        return pb.RollbackResponse(
            model_version=done.version, round=done.round, refused_version=done.refused
        )

    @rpc("Aggregator.GetAggregatorStatus")
    def GetAggregatorStatus(
        self, request: pb.GetAggregatorStatusRequest, context: grpc.ServicerContext
    ) -> pb.GetAggregatorStatusResponse:
        with self.state.lock:
            return pb.GetAggregatorStatusResponse(
                model_version=self.state.version,
                open_round=self.state.open_round,
                pending_updates=len(self.state.pending),
                pending_participants=list(self.state.pending),
                policy=self.policy,
                version=self.release[0],
                revision=self.release[1],
            )


def initial_state(config: AggregatorConfig) -> AggregatorState:
    """Version 0: the initial model w0, the same for every participant."""
    fed = config.federation
    device = resolve_device(config.compute.device)
    state_dir = config.service.state_dir
    store = config.store
    if store.initial_model:  # a user's model or pretrained weights: read, never built
        weights = read_weights(Path(store.initial_model))
        logger.info("w0 from %s (%d tensors)", store.initial_model, len(weights))
    else:
        shape, classes = config.shape()  # a dataset without a known shape: one clear error
        model = build_model(fed.model, shape, classes, fed.seed)
        weights = state_of(model)
        del model
    spill = Path(store.spill_dir) if store.spill_dir else None
    if spill is None and store.memory_budget_mb is not None and state_dir:
        spill = Path(state_dir) / "spill"
    deltas = DeltaStore(
        sum(v.numel() for v in weights.values() if v.dtype.is_floating_point),
        store.memory_budget_mb,
        spill,
    )
    state: AggregatorState
    if config.federation.secure == "he":  # the public context only: it adds, never reads
        t = config.transport
        keys = load_keys(t.he_key, t.tls_dir, secret=False)
        logger.info("--secure he: adding ciphertexts under key %s", keys.short())
        state = SealedState(weights, keys, store.keep_versions)
    else:
        state = AggregatorState(
            weights,
            store.keep_versions,
            device,
            deltas,
            config.federation.personalise,
            config.pace.max_staleness if config.pace.asynchronous else None,
        )
    del weights
    if state_dir and state.restore(Path(state_dir)):
        logger.info(
            "restored model version %d, open round %d with %d accepted update(s), from %s",
            state.version,
            state.open_round,
            len(state.pending),
            state_dir,
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
    health_server: grpc.Server | None = None
    health_port: int | None = None

    def on_stop(self) -> None:
        """Stop the health port and remove the store's temporary files; every round's state
        is saved as it closes."""
        if self.health_server is not None:
            self.health_server.stop(0)
        self.servicer.state.store.close()

    def start(self) -> None:
        """Start serving gRPC and /metrics."""
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        config = self.servicer.config
        svc = config.service
        self.metrics_port = serve_metrics(self.registry, svc.metrics_host, svc.metrics_port)


def decode_into(parts: Parts, place: torch.Tensor | RowFile) -> torch.Tensor | Delta:
    """A compressed upload's delta, its decoded parts (checked: `uploads.decoded`) written
    into `place` (a buffer of the store, or its file) a float tensor at a time."""
    for at, values in parts:
        if isinstance(place, RowFile):
            place.write(at, values.numpy())
        else:
            place[at : at + values.numel()] = values
    return place.close() if isinstance(place, RowFile) else place


MODEL_READS = 4  # GetModel calls the clusterer may have in flight
OPERATOR_MODEL_READS = 1  # and operators (flclustering export), together


def policy(max_workers: int) -> Policy:
    """Who may call what: the aggregator's rules in services/transport/roles.py (only the
    clusterer writes; it and operators read models and the status). Upload streams leave
    threads free for health, status and Aggregate."""
    streams = max(1, max_workers - 24)  # leaves threads for Aggregate, status, health
    return Policy(
        roles=rules_for(SERVICE),
        # The clusterer's four model downloads always have their slots; operators
        # exporting the model share one more between them.
        per_identity={"ForwardUpdate": streams, "GetModel": MODEL_READS},
        total={"ForwardUpdate": streams, "GetModel": MODEL_READS + OPERATOR_MODEL_READS},
        per_role={"GetModel": {"operator": OPERATOR_MODEL_READS}},
    )


def build_service(config: AggregatorConfig) -> AggregatorService:
    """Build the aggregator server and everything it serves."""
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry)
    authenticator, tls = credentials(config.transport, "aggregator")
    servicer = AggregatorServicer(initial_state(config), config, metrics)
    svc = config.service
    server = new_server(
        svc.max_workers,
        authenticator,
        policy(svc.max_workers),
        [ServerMetricsInterceptor(metrics.rpc)],
    )
    add_servicer(
        pb_grpc.add_AggregatorServicer_to_server, servicer, server, raw_requests=["ForwardUpdate"]
    )
    health = add_health_and_reflection(server, [SERVICE])
    port = bind_service(server, svc.host, svc.port, tls, authenticator)
    health_server, health_port = serve_health(health, svc.host, svc.health_port)
    return AggregatorService(
        server,
        port,
        servicer,
        health,
        registry,
        health_server=health_server,
        health_port=health_port,
    )


def create_server(config: AggregatorConfig) -> tuple[grpc.Server, int]:
    """Build (not start) the aggregator server; returns it and its bound port."""
    service = build_service(config)
    return service.server, service.port
