"""The clusterer's gRPC service: membership, long-polled tasks, uploads forwarded as streams.

The server is asyncio (`new_aio_server`): a participant waiting in a long poll is a future
on the server's loop (`_Polls`), resolved when the state's task listener says it has a task
or the federation ended, so thousands wait at once without a thread each while health
checks, status and joins answer at once.

Every handler is a coroutine that puts its blocking work on the server's threads, carrying
the caller along for `act_as`: the state's methods that journal before they answer and the
status page on a few threads (asyncio.to_thread), a pre-training delta, read whole, on the
large pool (`on_pool`, through `blocking_iter`). An update is passed on to the aggregator
from the loop itself (`AggregatorRelay`, an asyncio channel): each message goes from the
participant's call to the aggregator's as it arrives, with no thread held and no hop
between threads per message (the sync relay's three hops cost a fifth of the relay's CPU
and kept it under the bare relay's throughput; benchmarks/transport.py). A poll reads the
state without its lock (`ClustererState.peek`). They are not left sync, although aio would
run sync handlers in that same pool, because of what it gives them: a context without code(),
is_active() or cancel(), add_callback() callbacks run only after a unary answer, none of
the interceptors' contextvars, and an abort() that blocks its thread until the status is
out (for ever, behind a message a stalled receiver does not take), so a stalled stream
could not be cut safely. As coroutines, an upload is cut by `Cut` (its status goes out at
once and its pending read fails) and a download times its own writes (`StallWatch.send`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar, cast

import grpc
import torch
from grpc_health.v1.health import HealthServicer
from prometheus_client import CollectorRegistry

from services.clusterer.coordinator import ClustererParts, Coordinator, ModelCache
from services.clusterer.metrics import ClustererMetrics
from services.clusterer.settings import ClustererConfig
from services.clusterer.state import ClustererState, Evaluation, Task, TaskKind
from services.common.codecs import federation_codec
from services.common.metrics import (
    RpcMetrics,
    ServerMetricsInterceptor,
    counting_refusals,
    instrument_channel,
    serve_metrics,
)
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.schema import schema_from_wire
from services.common.streams import part_of, read_all
from services.common.uploads import check_update_header, check_upload
from services.common.version import UNVERSIONED, parse, revision, version
from services.common.wire import (
    MAX_ID_LENGTH,
    MAX_SAMPLES,
    TRAILER_TAG,
    StreamReader,
    check_header_tensors,
    check_id,
    read_frame,
)
from services.core.errors import ForbiddenError, NotFoundError, StateError, WireError, invalid
from services.core.sketch import SKETCH_ABOVE, SKETCH_DIM
from services.core.strategies import get_strategy
from services.core.tensors import TensorSpec
from services.transport.auth import act_as, caller
from services.transport.client import (
    PEER_OPTIONS,
    Renewing,
    aio_channel,
    call_metadata,
    channel,
    raw_responses,
)
from services.transport.credentials import TlsFiles, TokenTable
from services.transport.gate import Policy
from services.transport.interceptors import Wrapping, rewrap
from services.transport.limits import MAX_CLUSTERS
from services.transport.roles import rules_for
from services.transport.server import (
    AioServer,
    add_health_and_reflection,
    add_servicer,
    new_aio_server,
    on_pool,
    serve_health,
)
from services.transport.stall import Cut, StallWatch, blocking_iter
from services.transport.status import rpc
from services.transport.tls import bind_service, bind_tls, credentials

logger = logging.getLogger(__name__)

SERVICE = "flclustering.v1.Clusterer"
AGGREGATOR = "flclustering.v1.Aggregator"
Context: TypeAlias = grpc.aio.ServicerContext
T = TypeVar("T")
# (kind, round, model version) for a participant without a task
IdleAnswer = tuple[TaskKind, int, int]


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Polls:
    """Long polls waiting for a task, without a thread each: a waiting poll is a future on
    the server's loop that the state's task listener resolves (call_soon_threadsafe) when
    its participant is given a task or the federation ends. At most `most` wait at once;
    past that, and once the service stops, a poll is answered at once, busy."""

    def __init__(self, state: ClustererState, most: int) -> None:
        self._state = state
        self.most = most
        self.waiting = 0
        self.closed = False
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}  # touched on the loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        state.listen(self._told)

    def _told(self, pids: Iterable[str] | None) -> None:
        """The state gave pids a task (None: the federation ended). Any thread, the state's
        cond held: it only schedules the wake-up. A poll registers before it looks at the
        state, so one this misses looks after the task is there."""
        loop = self._loop
        if loop is None:
            return  # nobody has polled yet
        if pids is not None:
            pids = [p for p in pids if p in self._waiters]
            if not pids:
                return
        with contextlib.suppress(RuntimeError):  # the loop is closed: no poll is left
            loop.call_soon_threadsafe(self._wake, pids)

    def close(self) -> None:
        """The service stops: every waiting poll answers now, later ones at once, so the
        server drains without waiting them out (any thread)."""
        self.closed = True
        self._told(None)

    def _wake(self, pids: list[str] | None) -> None:
        for pid in list(self._waiters) if pids is None else pids:
            for waiter in self._waiters.get(pid, ()):
                _settle(waiter)

    async def next_task(self, pid: str, wait_s: float) -> tuple[Task | None, IdleAnswer, bool]:
        """pid's task, waited for up to wait_s; the idle answer; whether the poll was turned
        away because `most` polls wait already. A cancelled call drops its waiter."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        busy = self.closed or self.waiting >= self.most
        if wait_s <= 0 or busy:
            task, idle = self._state.peek(pid)
            return task, idle, busy and wait_s > 0
        deadline = loop.time() + wait_s
        self.waiting += 1
        try:
            while True:
                waiter = loop.create_future()
                self._waiters.setdefault(pid, set()).add(waiter)
                try:
                    task, idle = self._state.peek(pid)
                    left = deadline - loop.time()
                    if task is not None or idle[0] == TaskKind.DONE or left <= 0:
                        return task, idle, False
                    if self.closed:
                        return task, idle, True
                    timer = loop.call_later(left, _settle, waiter)
                    try:
                        await waiter  # a timer: asyncio.wait builds sets and callbacks per poll
                    finally:
                        timer.cancel()
                finally:
                    mine = self._waiters.get(pid)
                    if mine is not None:
                        mine.discard(waiter)
                        if not mine:
                            del self._waiters[pid]
        finally:
            self.waiting -= 1


class ClustererServicer(pb_grpc.ClustererServicer, ClustererParts):
    """Unpack, call the state's rules, pack: the coordinator thread runs the rounds."""

    def __init__(self, *parts: Any) -> None:  # ClustererParts' arguments
        ClustererParts.__init__(self, *parts)
        self.polls = _Polls(self.state, self.config.clustering.max_participants)
        # What a participant of this federation sends at Join ("" for shards).
        self.schema_text = self.config.sample.text() if self.config.sample.declared else ""
        self.oldest = parse(self.config.clustering.min_participant_version)
        self.release = (version(), revision())  # what GetStatus reports
        tr = self.config.transport
        self.watch = StallWatch(tr.stream_idle_s, tr.stream_max_s)
        # Pre-training deltas are read whole on the server's large pool, updates are passed
        # on to the aggregator from the loop (both set by build_service).
        self.stream_pool: futures.Executor | None = None
        self.relay: AggregatorRelay
        t = self.config.training
        self.training = pb.TrainingSettings(
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            momentum=t.momentum,
            pre_steps=t.pre_steps,
            adjusted=t.adjusted,
            report_loss=get_strategy(self.config.federation.strategy).needs_losses,
            compression=self.config.federation.compression,
            secure=self.config.federation.secure,
        )
        # The scheme its participants upload in (the aggregator holds the keys, if any).
        fed = self.config.federation
        self.codec = federation_codec(fed.compression, fed.secure)

    @rpc("Clusterer.Join")
    async def Join(self, request: pb.JoinRequest, context: Context) -> pb.JoinResponse:
        pid = request.participant_id
        check_id(pid, "participant_id")
        act_as(pid)
        if not (0 <= request.num_train <= MAX_SAMPLES and 0 <= request.num_test <= MAX_SAMPLES):
            raise invalid(f"sample counts must be in [0, {MAX_SAMPLES}]")
        if not -1 <= request.group < MAX_GROUPS:
            raise invalid(f"group must be -1 (unknown) or a group index below {MAX_GROUPS}")
        device = request.device[:MAX_ID_LENGTH]
        if not device.isprintable():
            raise invalid("device must be printable text")
        self._check_release(request.participant_version)
        self._check_schema(request.data_schema)
        return await asyncio.to_thread(self._join, request, device)

    def _check_release(self, sent: str) -> None:
        """Refuse a participant older than --min-participant-version, saying to upgrade it
        (FAILED_PRECONDITION); one that sends a text that is no version, INVALID_ARGUMENT.
        A participant that sends none predates the field: it is UNVERSIONED (0.1.0)."""
        try:
            release = parse(sent or UNVERSIONED)
        except ValueError as exc:
            raise invalid(f"participant_version: {exc}") from None
        if release < self.oldest:
            raise StateError(
                f"participant {release} is older than the oldest this federation accepts "
                f"({self.oldest}): upgrade the participant"
            )

    def _check_schema(self, sent: str) -> None:
        """One schema per federation: a participant's data must be what the federation
        declared (FAILED_PRECONDITION naming the first difference; a text that is no schema
        at all is INVALID_ARGUMENT). Equal canonical texts need no parsing."""
        expected = self.config.sample
        if sent == self.schema_text:
            return
        if not sent:
            raise StateError(
                "this federation trains on its participants' own data (--dataset own): "
                "this participant sent no data schema (a build from before own data, or "
                "not --dataset own); give it the federation's sample settings"
            )
        if not expected.declared:
            raise StateError(
                f"this federation trains on shards of --dataset "
                f"{self.config.federation.dataset} and declares no data schema; this "
                "participant sent one (--dataset own)"
            )
        difference = expected.difference(schema_from_wire(sent))  # at most 16 KiB, parsed
        if difference is not None:
            raise StateError(f"this participant's data schema differs: {difference}")

    def _join(self, request: pb.JoinRequest, device: str) -> pb.JoinResponse:
        """Admit a checked request (journaled before the answer)."""
        pid = request.participant_id
        if self.state.join(pid, request.num_train, request.num_test, request.group, device):
            logger.info("[Clusterer.Join] %s joined (%s)", pid, device or "?")
        joined = self.state.joined()
        self.metrics.joined.set(joined)
        return pb.JoinResponse(participant_id=pid, participants=joined)

    @rpc("Clusterer.GetTask")
    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.GetTaskResponse:
        pid = request.participant_id
        check_id(pid, "participant_id")
        act_as(pid)
        cap = self.config.transport.poll_cap_s
        wait = min(max(request.wait_s, 0.0), cap) if math.isfinite(request.wait_s) else 0.0
        # Past `most` waiting polls the answer comes at once, with a hint when to ask again.
        task, (kind, round_, version), busy = await self.polls.next_task(pid, wait)
        if task is None:
            return pb.GetTaskResponse(
                kind=TASK_KINDS[kind],
                round=round_,
                model_version=version,
                next_poll_s=min(wait, BUSY_POLL_S) if busy else 0.0,
            )
        training = pb.TrainingSettings()
        training.CopyFrom(self.training)
        training.lr = self.config.training.lr_at(task.round)
        if task.kind == TaskKind.PRETRAIN and self._sketched():
            training.sketch_dim = SKETCH_DIM  # send the sketch clustering uses, not the delta
            training.sketch_seed = self.config.federation.seed
        cluster = None
        if self.config.federation.personalise and task.kind in PERSONAL_TASKS:
            member = self.state.members.get(pid)  # one read (the cluster is set once)
            cluster = member.cluster if member is not None and member.cluster >= 0 else None
        return pb.GetTaskResponse(
            kind=TASK_KINDS[task.kind],
            round=task.round,
            model_version=task.model_version,
            training=training,
            evaluation_id=task.evaluation_id,
            cluster=cluster,
        )

    @rpc("Clusterer.SubmitUpdate")
    async def SubmitUpdate(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> pb.SubmitUpdateResponse:
        loop = asyncio.get_running_loop()
        cut = Cut(context, loop, "the upload was cut: it stalled, or its round closed")
        messages = self.watch.awatch(request_iterator, cut, "SubmitUpdate")
        with counting_refusals(self.metrics.updates_rejected):
            reply = await self._submit(messages, context, cut)
        if reply.round >= 0:
            self.metrics.updates_received.inc()
        return reply

    async def _submit(
        self, messages: AsyncIterator[bytes], context: Context, cut: Cut
    ) -> pb.SubmitUpdateResponse:
        """An upload (serialized messages: `add_servicer`): checked by its header, then
        passed on to the aggregator message by message, on the loop."""
        first = await _next(messages, context)
        part, h = part_of(first, pb.SubmitUpdateRequest) if first is not None else (None, None)
        if part != "header" or h is None:
            raise invalid("a weights stream must start with a header")
        check_update_header(h)
        act_as(h.sender)
        if h.kind in ("pretrain-delta", "pretrain-sketch"):
            # Kept here (clustering input), read whole on a pool thread.
            async def whole() -> AsyncIterator[bytes]:
                yield cast(bytes, first)
                async for raw in messages:
                    yield raw

            loop = asyncio.get_running_loop()
            rest = blocking_iter(whole(), context, loop)
            return await on_pool(self.stream_pool, self._pretrain_delta, h, rest)
        # The header against the scheme and the model (as that scheme sends it), before
        # the aggregator is called; the aggregator validates the content as it keeps it
        # (encrypted: it parses every ciphertext against its context).
        check_upload(h, self.models.spec, self.codec, self.config.transport.max_update_bytes)
        # The reservation is made and released on a thread of the large pool (the state
        # journals under its lock, and a reservation may wait for the one of the
        # participant's previous upload to be released; uploads are at most half the pool,
        # `policy`); a participant that goes away cancels this coroutine, never the
        # thread's work, and a reservation made meanwhile is released all the same.
        pid, round_, pool = h.sender, h.round, self.stream_pool
        reserving = _uncancelled(
            pool, self.state.begin_upload, pid, round_, h.model_version, cut.cancel
        )
        try:
            cluster = await asyncio.shield(reserving)
        except asyncio.CancelledError:

            def release(made: asyncio.Future[int]) -> None:
                if not made.cancelled() and made.exception() is None:
                    _uncancelled(pool, self.state.finish_upload, pid, round_, False)

            reserving.add_done_callback(release)
            raise
        accepted = False
        try:
            header = agg_pb.UpdateHeader(model=h, cluster=cluster)
            await self.relay.forward(header, self._passed_on(messages, context), self.token, cut)
            accepted = True
        finally:
            await asyncio.shield(
                _uncancelled(pool, self.state.finish_upload, pid, round_, accepted)
            )
        return pb.SubmitUpdateResponse(accepted=True, round=h.round)

    async def _passed_on(
        self, messages: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        """An upload's data and trailer messages as the aggregator's: SubmitUpdateRequest
        and ForwardUpdateRequest encode them as the same bytes (fields 2 and 3), so they pass
        untouched, and the aggregator, which keeps the update, validates content and
        checksum once. A message in another valid layout is re-encoded; a second header is
        refused here (as UpdateHeader it would read differently)."""
        counter = self.metrics.rpc
        while (raw := await _next(messages, context)) is not None:
            if read_frame(raw) is None and read_frame(raw, TRAILER_TAG) is None:
                raw = self._canonical(raw)
            counter.received_bytes.inc(len(raw))
            counter.sent_bytes.inc(len(raw))
            yield raw

    def _reader_for(
        self, header: Any, keep: bool = False, spec: tuple[TensorSpec, ...] | None = None
    ) -> StreamReader:
        """Check an upload's header against the model (or `spec`); the reader for its bytes."""
        spec = self.models.spec if spec is None else spec
        check_header_tensors(header.tensors, spec)
        return StreamReader(spec, keep=keep, max_bytes=self.config.transport.max_update_bytes)

    def _sketched(self) -> bool:
        """Whether the model is long enough that pre-training deltas are clustered as
        CountSketches (so participants send the sketch)."""
        return sum(t.numel for t in self.models.spec) > SKETCH_ABOVE

    @staticmethod
    def _canonical(raw: bytes) -> bytes:
        """A data or trailer message in another valid layout, as the aggregator's message."""
        part, value = part_of(raw, pb.SubmitUpdateRequest)
        if part == "data":
            return agg_pb.ForwardUpdateRequest(data=bytes(value)).SerializeToString()
        if part == "trailer":
            return agg_pb.ForwardUpdateRequest(trailer=value).SerializeToString()
        raise invalid("a weights stream carries exactly one header")

    def _pretrain_delta(self, header: Any, messages: Iterator[Any]) -> pb.SubmitUpdateResponse:
        """A pre-training delta (or its sketch), read whole and kept for the clustering."""
        self.state.check_pretrain_task(header.sender)
        spec = None
        if header.kind == "pretrain-sketch":
            if not self._sketched():
                raise invalid(
                    "this model is short: send the pre-training delta itself (pretrain-delta)"
                )
            spec = SKETCH_SPEC
        got = read_all(
            messages,
            lambda h: self._reader_for(h, keep=True, spec=spec),
            pb.SubmitUpdateRequest,
        )
        assert got.reader is not None and got.reader.flat is not None
        self.metrics.rpc.received_bytes.inc(got.reader.received)
        self.state.accept_pretrain_delta(header.sender, got.reader.flat)
        return pb.SubmitUpdateResponse(accepted=True, round=-1)

    @rpc("Clusterer.ReportEvaluation")
    async def ReportEvaluation(
        self, request: pb.ReportEvaluationRequest, context: Context
    ) -> pb.ReportEvaluationResponse:
        check_id(request.participant_id, "participant_id")
        act_as(request.participant_id)
        check_id(request.evaluation_id, "evaluation_id")
        verdict = VERDICTS.get(request.verdict)
        if verdict is None:
            raise invalid(f"verdict {request.verdict} is not one of {sorted(VERDICTS)}")
        if len(request.reason) > MAX_REASON:
            raise invalid(f"reason is at most {MAX_REASON} characters")
        if verdict != "ok":  # no figures: the model could not be judged by them
            if request.accuracy != 0.0 or request.loss != 0.0:
                raise invalid(f"a {verdict} verdict comes with accuracy and loss 0")
            if request.HasField("personal_accuracy") or request.HasField("personal_loss"):
                raise invalid(f"a {verdict} verdict comes without personal figures")
            if not 0 < request.num_examples <= MAX_SAMPLES:
                raise invalid(f"num_examples must be in [1, {MAX_SAMPLES}]")
            await asyncio.to_thread(
                self.state.record_evaluation,
                request.participant_id,
                request.evaluation_id,
                request.model_version,
                Evaluation(0.0, 0.0, request.num_examples, verdict=verdict, reason=request.reason),
            )
            self.metrics.verdicts.labels(verdict).inc()
            return pb.ReportEvaluationResponse(accepted=True)
        if not (0.0 <= request.accuracy <= 1.0):
            raise invalid(f"accuracy {request.accuracy} is outside [0, 1]")
        if not math.isfinite(request.loss) or request.loss < 0:
            raise invalid(f"loss {request.loss} must be finite and non-negative")
        if not 0 < request.num_examples <= MAX_SAMPLES:
            raise invalid(f"num_examples must be in [1, {MAX_SAMPLES}]")
        personal = (request.HasField("personal_accuracy"), request.HasField("personal_loss"))
        if personal[0] != personal[1]:
            raise invalid("personal_accuracy and personal_loss come together or not at all")
        if personal[0]:
            if not (0.0 <= request.personal_accuracy <= 1.0):
                raise invalid(f"personal_accuracy {request.personal_accuracy} is outside [0, 1]")
            if not math.isfinite(request.personal_loss) or request.personal_loss < 0:
                raise invalid(
                    f"personal_loss {request.personal_loss} must be finite and non-negative"
                )
        result = Evaluation(
            request.accuracy,
            request.loss,
            request.num_examples,
            request.personal_accuracy if personal[0] else None,
            request.personal_loss if personal[0] else None,
        )
        await asyncio.to_thread(
            self.state.record_evaluation,
            request.participant_id,
            request.evaluation_id,
            request.model_version,
            result,
        )
        self.metrics.verdicts.labels("ok").inc()
        return pb.ReportEvaluationResponse(accepted=True)

    @rpc("Clusterer.DownloadModel")
    async def DownloadModel(self, request: pb.DownloadModelRequest, context: Context) -> None:
        cluster = request.cluster if request.HasField("cluster") else None
        if cluster is not None and not 0 <= cluster < MAX_CLUSTERS:
            raise invalid(f"cluster must be in [0, {MAX_CLUSTERS})")
        who = caller()
        if cluster is not None and who.role == "participant":
            # A cluster's model is its members': close to their own updates when it is small.
            member = self.state.members.get(who.name)  # one lookup, atomic under the GIL
            mine = member.cluster if member is not None else -1
            if mine != cluster:
                raise ForbiddenError(
                    f"{who.name} is not in cluster {cluster}: a participant downloads its own "
                    "cluster's model"
                )
        cached = self.models.get(request.model_version, cluster)
        if cached is None:
            of = "" if cluster is None else f" of cluster {cluster}"
            raise NotFoundError(f"model version {request.model_version}{of} is not available")
        header, messages = cached  # serialized once, served to everyone as they are
        self.metrics.rpc.sent_bytes.inc(header.total_bytes)
        await self.watch.send(context, messages, "DownloadModel")  # a receiver that stalls

    @rpc("Clusterer.GetStatus")
    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        members = page(request.members_offset, request.members_limit, 100, MAX_PAGE)
        rounds = page(request.history_offset, request.history_limit, MAX_PAGE, MAX_PAGE)
        return await asyncio.to_thread(self._status, members, rounds)

    def _status(self, members: slice, rounds: slice) -> pb.GetStatusResponse:
        """The status page (up to a thousand members and rounds), built on a pool thread."""
        v = self.state.view(members, rounds)
        return pb.GetStatusResponse(
            phase=v.phase,
            round=v.round,
            rounds=self.config.federation.rounds,
            participants=v.members_total,
            members_total=v.members_total,
            history_total=v.history_total,
            model_version=v.model_version,
            history=[
                pb.RoundSummary(**{k: x for k, x in h.items() if k in ROUND_FIELDS})
                for h in v.history
            ],
            clusters=[
                pb.ParticipantCluster(participant_id=p, cluster=c, group=g)
                for p, c, g in v.clusters
            ],
            purity=-1.0 if v.purity is None else v.purity,
            done=v.phase == "done",
            strategy=self.config.federation.strategy,
            error=v.error,
            stopped=v.stopped,
            version=self.release[0],
            revision=self.release[1],
        )


ROUND_FIELDS = set(pb.RoundSummary.DESCRIPTOR.fields_by_name)
# An evaluation's verdict as the state keeps it (Evaluation.verdict).
VERDICTS = {
    pb.EVALUATION_VERDICT_OK: "ok",
    pb.EVALUATION_VERDICT_REFUSED: "refused",
    pb.EVALUATION_VERDICT_DIVERGED: "diverged",
}
MAX_REASON = 200  # characters of an evaluation's reason
# What a participant of a long model sends for clustering (services/core/sketch.py).
SKETCH_SPEC = (TensorSpec("sketch", (SKETCH_DIM,), torch.float32),)
MAX_PAGE = 1000  # members or rounds in one GetStatus answer
# Tasks that name the participant's cluster under --personalise (its model is trained from
# and evaluated).
PERSONAL_TASKS = (TaskKind.TRAIN, TaskKind.EVALUATE)
# The state's task kinds on the wire.
TASK_KINDS = {
    TaskKind.WAIT: pb.TASK_KIND_WAIT,
    TaskKind.PRETRAIN: pb.TASK_KIND_PRETRAIN,
    TaskKind.TRAIN: pb.TASK_KIND_TRAIN,
    TaskKind.EVALUATE: pb.TASK_KIND_EVALUATE,
    TaskKind.DONE: pb.TASK_KIND_DONE,
}
MAX_GROUPS = 1 << 16
BUSY_POLL_S = 2.0  # when `most` polls wait already, ask again after about this long


def page(offset: int, limit: int, default: int, most: int) -> slice:
    """The slice a (offset, limit) request asks for; limits outside [0, most] are refused."""
    if offset < 0 or limit < 0:
        raise invalid("offsets and limits must not be negative")
    if limit > most:
        raise invalid(f"at most {most} entries per page, asked for {limit}")
    return slice(offset, offset + (limit or default))


class _Relayed(Exception):
    """An aggregator status passed back to the participant unchanged."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details or "aggregator error"


FORWARD = f"/{AGGREGATOR}/ForwardUpdate"


class AggregatorRelay:
    """Uploads passed on to the aggregator's ForwardUpdate from the server's loop, over an
    asyncio channel of their own (the coordinator's sync stub makes every other call):
    an upload's messages go from the participant's call to the aggregator's as each
    arrives, without a thread or a hop between threads per message. The channel is made on
    the loop at the first upload and, with TLS, follows certificate renewals as the sync
    stub does (`Renewing`)."""

    def __init__(self, address: str, tls: TlsFiles | None, metrics: RpcMetrics) -> None:
        self._address = address
        self._tls = tls
        self._metrics = metrics
        self._fixed: tuple[grpc.aio.Channel, Any] | None = None
        self._renewing: Renewing[Any] | None = None

    def _build(self, client: TlsFiles | None) -> tuple[grpc.aio.Channel, Any]:
        ch = aio_channel(self._address, client=client, extra=PEER_OPTIONS)
        method = ch.stream_unary(
            FORWARD,
            request_serializer=None,  # the participant's serialized messages, as they came
            response_deserializer=agg_pb.ForwardUpdateResponse.FromString,
            _registered_method=True,
        )
        return ch, method

    def connect(self) -> None:
        """Make the channel (on the server's loop, once it runs: `AioServer.call`), so the
        first upload finds it connected and certificate renewals are checked from now."""
        if self._tls is not None:
            self._renewing = Renewing(self._tls, self._build)
        else:
            self._fixed = self._build(None)

    def _method(self) -> Any:
        if self._renewing is not None:
            return self._renewing.stub()
        assert self._fixed is not None, "connect() runs before the server serves"
        return self._fixed[1]

    async def forward(
        self, header: agg_pb.UpdateHeader, rest: AsyncIterator[bytes], token: str | None, cut: Cut
    ) -> None:
        """Stream header + rest to the aggregator; its refusal comes back as `_Relayed`
        (the same status for the participant). A failure of `rest` cancels the call, and so
        does a cut of the participant's (stalled, or its round closed): the aggregator
        keeps nothing the participant was told was refused."""
        call = self._method()(metadata=call_metadata(token), timeout=3600)
        ended = _FirstStatus(call)
        cut.also(call.cancel)
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            first = agg_pb.ForwardUpdateRequest(header=header).SerializeToString()
            if await _sent(call, first):
                async for raw in rest:
                    if not await _sent(call, raw):
                        break
                else:
                    await call.done_writing()
            await call
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.INTERNAL and ended.code not in (None, code):
                code, details = ended.code, ended.details  # see _FirstStatus
            raise _Relayed(code, details) from None
        except BaseException as exc:
            code = grpc.StatusCode.CANCELLED
            call.cancel()
            task = asyncio.current_task()
            ours = task is not None and task.cancelling() > 0  # the participant went away
            if isinstance(exc, asyncio.CancelledError) and cut.done and not ours:
                raise WireError("CANCELLED", "the upload was cut") from None  # the call's
            raise
        finally:
            self._metrics.client_done(
                AGGREGATOR, "ForwardUpdate", time.perf_counter() - start, code
            )

    async def close(self) -> None:
        """Close the channel (the server has stopped)."""
        channels = [self._fixed[0]] if self._fixed is not None else []
        if self._renewing is not None:
            channels += [self._renewing.channel, *self._renewing.previous()]
        for ch in channels:
            await ch.close()


async def _next(messages: AsyncIterator[bytes], context: Context) -> bytes | None:
    """The next message of a participant's stream (None at its end); a read that fails
    because the call was cut is the refusal CANCELLED (the participant has that status)."""
    try:
        return await anext(messages)
    except StopAsyncIteration:
        return None
    except Exception:
        if context.done():
            raise WireError("CANCELLED", "the upload was cut") from None
        raise


async def _sent(call: grpc.aio.StreamUnaryCall, message: bytes) -> bool:
    """Write one message; False when the call has ended (the aggregator refused the upload
    and stopped reading): its status is read by awaiting the call."""
    try:
        await call.write(message)
    except (asyncio.InvalidStateError, grpc.aio.AioRpcError):
        return False
    return True


_RUNNING: set[asyncio.Future[Any]] = set()  # work that outlives the call that started it


def _uncancelled(
    pool: futures.Executor | None, fn: Callable[..., T], *args: Any
) -> asyncio.Future[T]:
    """fn(*args) on `pool`, carrying the caller's context, as a task that runs to its end
    whatever happens to the coroutine that started it (await it through asyncio.shield)."""
    task = asyncio.ensure_future(on_pool(pool, fn, *args))
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return task


class _FirstStatus:
    """The status a grpc.aio call is first given, kept as it is set (a done callback runs
    once, then). A write that fails because the call has just ended makes grpc.aio set the
    call's status to INTERNAL "Internal error from Core" (grpc/grpc#36066): when the
    aggregator's answer had arrived first it is overwritten, and only this copy keeps it;
    when it arrives after, it overwrites the INTERNAL one and the call reports it."""

    def __init__(self, call: grpc.aio.Call) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        call.add_done_callback(self._done)

    def _done(self, call: grpc.aio.Call) -> None:
        # The status is set when this runs, so these coroutines finish without waiting.
        self.code = _settled(call.code())
        self.details = _settled(call.details()) or ""


def _settled(coroutine: Coroutine[Any, Any, T]) -> T | None:
    """The value of a coroutine that completes without suspending (None if it would)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coroutine.close()
    return None


@dataclass
class ClustererService:
    """A built clusterer: server (not started), port, servicer, coordinator, health."""

    server: AioServer
    port: int
    servicer: ClustererServicer
    coordinator: Coordinator
    health: HealthServicer
    aggregator_channel: grpc.Channel
    registry: CollectorRegistry
    metrics_port: int | None = None
    health_server: grpc.Server | None = None
    health_port: int | None = None
    tls_port: int | None = None

    def on_stop(self) -> None:
        """Stop the round protocol, the long polls and the health port (SIGTERM)."""
        self.coordinator.shutdown()
        self.servicer.polls.close()
        if self.health_server is not None:
            self.health_server.stop(0)

    def start(self) -> None:
        """Start serving gRPC and /metrics, then the round protocol."""
        self.server.start()
        if self.health_server is not None:
            self.health_server.start()
        self.metrics_port = serve_metrics(
            self.registry,
            self.servicer.config.service.metrics_host,
            self.servicer.config.service.metrics_port,
        )
        self.coordinator.start()
        self.await_initial_model()

    def await_initial_model(self) -> None:
        """Return once version 0 is cached (the coordinator fetches it from the aggregator
        first), or the protocol ended without it: the ready file and the log line that
        say "serving" come after this, so a download of version 0 at that moment never
        meets NOT_FOUND (it did once in about eight starts when they came first)."""
        models, coordinator = self.servicer.models, self.coordinator
        while not models.initial.wait(0.05):
            if not coordinator.thread.is_alive() or self.servicer.state.phase == "failed":
                return


class _RelayInterceptor(Wrapping):
    """Turns a relayed aggregator status into the same status for the caller."""

    def wrap(self, handler: Any, method: str) -> Any:
        if handler is None or not handler.request_streaming or handler.response_streaming:
            return handler

        def call(inner: Callable[..., Any]) -> Callable[..., Any]:
            def relay(request_iterator: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return inner(request_iterator, context)
                except _Relayed as exc:
                    context.abort(exc.code, exc.details)

            return relay

        def acall(inner: Callable[..., Any]) -> Callable[..., Any]:
            async def relay(request_iterator: Any, context: Context) -> Any:
                try:
                    return await inner(request_iterator, context)
                except _Relayed as exc:
                    if not context.done():  # else the upload was cut: it has its status
                        await context.abort(exc.code, exc.details)
                    return None

            return relay

        def same(inner: Callable[..., Any]) -> Callable[..., Any]:
            return inner

        return rewrap(handler, call=call, stream=same, acall=acall, astream=same)


def policy(max_workers: int) -> Policy:
    """Who may call what: the clusterer's rules in services/transport/roles.py (participants
    call the participant RPCs, as themselves: the servicer checks ids; status is for
    operators). Per identity: one poll and one upload at a time (plus one
    being torn down). A waiting poll holds no thread (the server is asyncio): up to
    --max-participants wait at once, past that a poll answers at once (WAIT with
    next_poll_s). Uploads (passed on from the loop, each holding one of the aggregator's
    threads while it streams, pre-training deltas one of ours) are at most half as many as
    the threads (a round selecting a hundred uploads at once), downloads (coroutines) a
    quarter, reflection and health watches a few streams: half the pool is always free for
    joins, evaluations and status, and health checks are answered on the loop."""
    return Policy(
        roles=rules_for(SERVICE),
        per_identity={"GetTask": 2, "SubmitUpdate": 2, "DownloadModel": 2},
        default_per_identity=4,
        total={
            "SubmitUpdate": max(1, max_workers // 2),
            "DownloadModel": max(1, max_workers // 4),
        },
    )


def build_service(config: ClustererConfig) -> ClustererService:
    """Build the clusterer server, its coordinator and the channel to the aggregator."""
    tokens = config.clustering.participant_tokens
    authenticator, tls = credentials(
        config.transport, "clusterer", TokenTable.load(tokens) if tokens else None
    )
    pace = config.pace
    # --mode async: every version a task or an evaluation may still name is served.
    models = ModelCache(pace.max_staleness + 2 if pace.asynchronous else 3)
    registry = CollectorRegistry()
    metrics = ClustererMetrics(registry)
    state = ClustererState(
        get_strategy(config.federation.strategy),
        config.federation.seed,
        config.clustering.max_participants,
        on_phase=metrics.phase.state,
    )

    def connect(client: TlsFiles | None) -> tuple[grpc.Channel, agg_grpc.AggregatorStub]:
        ch = channel(config.clustering.aggregator, client=client, extra=PEER_OPTIONS)
        calls = instrument_channel(ch, metrics.rpc)
        stub = agg_grpc.AggregatorStub(calls)  # uploads go by AggregatorRelay
        # Models come as the aggregator's messages, served to participants as they are.
        return ch, raw_responses(stub, calls, AGGREGATOR, "GetModel", agg_pb.GetModelRequest)

    if tls is None:
        agg_channel, aggregator = connect(None)
    else:  # the client certificate follows renewals, like the server's
        renewing = Renewing(tls, connect)
        agg_channel, aggregator = renewing.channel, cast(agg_grpc.AggregatorStub, renewing)
    # The token file was read once, by credentials(); the same token goes to the aggregator.
    parts = (config, state, aggregator, models, metrics, authenticator.shared_token)
    coordinator = Coordinator(*parts)
    servicer = ClustererServicer(*parts)
    interceptors = [ServerMetricsInterceptor(metrics.rpc), _RelayInterceptor()]
    svc = config.service
    # Every member may have a poll and one more call arriving at once (a broadcast wakes
    # them all): gRPC must queue that many new calls rather than cancel them.
    pending = max(1000, 2 * config.clustering.max_participants)
    server = new_aio_server(
        svc.max_workers, authenticator, policy(svc.max_workers), interceptors, pending
    )
    servicer.stream_pool = server.pool
    servicer.relay = AggregatorRelay(config.clustering.aggregator, tls, metrics.rpc)
    server.call(servicer.relay.connect)
    server.on_stop(servicer.relay.close)
    add_servicer(
        pb_grpc.add_ClustererServicer_to_server,
        servicer,
        server,
        raw_requests=["SubmitUpdate"],
        raw_responses=["DownloadModel"],
    )
    health = add_health_and_reflection(server, [SERVICE])
    port = bind_service(server, svc.host, svc.port, tls, authenticator)
    tls_port = None
    c = config.clustering
    if c.tls_port is not None and c.tls_cert and c.tls_key:
        tls_port = bind_tls(server, svc.host, c.tls_port, c.tls_cert, c.tls_key)
    health_server, health_port = serve_health(health, svc.host, svc.health_port)
    return ClustererService(
        server,
        port,
        servicer,
        coordinator,
        health,
        agg_channel,
        registry,
        tls_port=tls_port,
        health_server=health_server,
        health_port=health_port,
    )


def create_server(config: ClustererConfig) -> tuple[AioServer, int]:
    """Build (not start) the clusterer server; returns it and its bound port."""
    service = build_service(config)
    return service.server, service.port
