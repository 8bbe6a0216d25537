"""A participant's life: join, long-poll tasks, pre-train, train, evaluate, stream weights.

Several participants can live in one process (`--count`); they share the dataset and the
downloaded global models but each trains its own copy of the model.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import torch

from services.common.codecs import CkksCodec, Codec, DeltaCodec, RawCodec, codec_named
from services.common.homomorphic import KIND as HE_KIND
from services.common.homomorphic import open_model
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.settings import PrivacySettings, TrainingSettings
from services.common.streams import build_stream, read_model
from services.common.version import UNKNOWN, version
from services.core.ckks import HeKeys, PayloadError
from services.core.errors import ConfigError, SpecMismatchError, StateError
from services.core.models import build_model
from services.core.objectives import CLASSIFICATION, Objective
from services.core.quantise import ErrorFeedback
from services.core.sanity import largest, unfit
from services.core.sketch import count_sketch
from services.core.tensors import (
    TensorSpec,
    check_spec,
    flatten,
    spec_of,
    state_of,
    unflatten,
)
from services.participant.attacks import AttackConfig, View, build_attack
from services.participant.collusion import Collusion
from services.participant.datasets import Dataset
from services.participant.dpsgd import BudgetSpent, DpSgd, ledger_path, load_ledger, save_ledger
from services.participant.examples import Examples, LoaderExamples, TensorExamples
from services.participant.heterogeneity import SimulatedDevice
from services.participant.metrics import ParticipantMetrics
from services.participant.partition import Shard, shard_tensors
from services.participant.training import (
    evaluate,
    local_train,
    pre_train_batches,
    pre_train_delta,
)
from services.transport.client import (
    RetryPolicy,
    call_metadata,
    raw_requests,
    raw_responses,
    with_retries,
)

if TYPE_CHECKING:  # the accountant imports opacus (2 s): only where DP-SGD runs
    from services.core.accountant import Step

logger = logging.getLogger(__name__)

# A participant outlives a clusterer restart or a slow start: it retries for the retry
# budget (--retry-budget-s), waits capped at 10 s; uploads are not retried after a deadline.
# RESOURCE_EXHAUSTED: the clusterer is at a limit (streams, calls in flight): back off, retry.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
MAX_REJOINS = 5
MAX_SKETCH_DIM = 1 << 16  # what a task may ask this process to allocate for a sketch


class TaskNotDone(StateError):
    """A task this participant skips and says why (the participant goes on)."""


class TaskDropped(TaskNotDone):
    """A TRAIN task whose work a simulated device lost (--dropout): trained, not sent."""


class ModelRefused(TaskNotDone):
    """A downloaded model that is not adopted (non-finite or absurd values:
    services/core/sanity.py); evaluation tasks report it as their verdict."""


def clusterer_stub(calls: grpc.Channel) -> pb_grpc.ClustererStub:
    """The clusterer's stub for a participant: uploads go as serialized messages, each
    chunk built with one copy of the weights' bytes (build_stream(framed=True)), and models
    come serialized, read in place (read_model(cls=...))."""
    stub = pb_grpc.ClustererStub(calls)
    service = "flclustering.v1.Clusterer"
    raw_requests(stub, calls, service, "SubmitUpdate", pb.SubmitUpdateResponse)
    return raw_responses(stub, calls, service, "DownloadModel", pb.DownloadModelRequest)


def participant_generator(seed: int, index: int) -> torch.Generator:
    """The generator participant `index` draws its batches from (the in-process federation
    uses the same, so both runs train alike)."""
    return torch.Generator().manual_seed(seed * 100_003 + index)


def rounding_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of participant `index`'s int8 stochastic rounding (the in-process
    federation uses the same)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def check_secure(asked: str, encrypts: bool) -> None:
    """A TRAIN task's `secure` against this participant's own setting: never a downgrade
    (a participant set up to encrypt sends nothing in the clear), never a mode it cannot
    do; a StateError quoting at most 32 characters of the task's value otherwise."""
    mine = "he" if encrypts else "none"
    if (asked or "none") != mine:
        raise StateError(
            f"the clusterer asked for updates with --secure {asked[:32]!r}; this participant "
            f"is set up for --secure {mine}"
        )


@dataclass(frozen=True)
class WorkerSettings:
    """What every participant of a process shares."""

    model: str
    device: torch.device
    auth_token: str | None
    poll_wait_s: float = 10.0
    seed: int = 0
    retry_budget_s: float = 900.0
    round_size: int = 15  # participants selected per round (what colluding attackers assume)
    he: HeKeys | None = None  # --secure he: the secret context (encrypts, decrypts)
    privacy: PrivacySettings | None = None  # --dp local: every participant trains with DP-SGD
    state_dir: str | None = None  # where each participant keeps its privacy ledger


@dataclass(frozen=True)
class LocalData:
    """What one participant trains and evaluates on: a shard of a named dataset (tensors),
    or its owner's own data (services.participant.sources), with what the model needs."""

    train: Examples
    test: Examples
    input_shape: tuple[int, int, int]
    outputs: int  # classes, or 1 (regression)
    group: int = -1  # ground-truth group (simulations), else -1
    objective: Objective = CLASSIFICATION
    schema: str = ""  # own data: the schema it was checked against, sent at Join
    # Own data: what was found (format, counts, the split given or made with its seed);
    # shown on /metrics, never sent to the federation.
    facts: Mapping[str, Any] | None = None

    @property
    def eval_batch(self) -> int:
        """Examples per evaluation batch: tensors in memory 2,048 at a time; images decoded
        from disk 256 at a time, so that a large held-out set does not raise a participant's
        peak memory (benchmarks/data_memory.py: 1,656 MB at 2,048 for 2 GB of images with
        2,368 held out, 1,431 MB at 256 with 2,400)."""
        return 256 if isinstance(self.test, LoaderExamples) else 2048


def shard_data(data: Dataset, shard: Shard, device: torch.device) -> LocalData:
    """A simulated participant's shard of a named dataset, its tensors on device."""
    x_train, y_train, x_test, y_test = shard_tensors(data, shard)
    return LocalData(
        TensorExamples(x_train, y_train).to(device),
        TensorExamples(x_test, y_test).to(device),
        data.input_shape,
        data.num_classes,
        shard.group,
    )


class ModelStore:
    """Global model versions (and, --personalise, clusters' models of them) downloaded
    once per process, shared by its participants."""

    def __init__(
        self,
        stub: pb_grpc.ClustererStub,
        token: str | None,
        keep: int = 3,
        on_bytes: Callable[[int], None] | None = None,
        stop: threading.Event | None = None,
        he: tuple[HeKeys, tuple[TensorSpec, ...]] | None = None,
    ) -> None:
        self._he = he  # --secure he: encrypted versions are decrypted once, here
        self._on_bytes = on_bytes
        self._stop = stop  # a stopping process gives up retrying downloads
        self._stub = stub
        self._token = token
        self._keep = keep
        # Keyed by (version, cluster); cluster -1: the global model.
        self._models: OrderedDict[tuple[int, int], OrderedDict[str, torch.Tensor]] = OrderedDict()
        self._locks: dict[tuple[int, int], threading.Lock] = {}
        self._lock = threading.Lock()
        self._refused: dict[tuple[int, int], str] = {}  # versions not adopted, and why
        self._last: tuple[int, float] | None = None  # newest adopted version, largest weight

    def get(
        self,
        version: int,
        cluster: int | None = None,
        via: tuple[pb_grpc.ClustererStub, Any] | None = None,
    ) -> OrderedDict[str, torch.Tensor]:
        """The weights of a version (or of a cluster's model of it), downloaded on first use;
        `via`: the stub and call metadata to download with (a cluster's model is served to
        that cluster's members only, so a member asks for it), the process's first
        participant's otherwise."""
        stub, metadata = via if via is not None else (self._stub, call_metadata(self._token))
        key = (version, -1 if cluster is None else cluster)
        with self._lock:
            if key in self._models:
                return self._models[key]
            self._check_refused(key)
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
                self._check_refused(key)
            # Downloads are idempotent: retried while the clusterer is busy or restarting.
            header, weights = with_retries(
                lambda: read_model(
                    stub.DownloadModel(
                        pb.DownloadModelRequest(model_version=version, cluster=cluster),
                        metadata=metadata,
                        timeout=600,
                    ),
                    cls=pb.DownloadModelResponse,
                ),
                f"DownloadModel {version}",
                RetryPolicy(attempts=30, codes=RETRYABLE, budget_s=300),
                stop=self._stop,
            )
            if self._on_bytes is not None:
                self._on_bytes(header.total_bytes)
            if header.model_version != version:
                raise SpecMismatchError(f"asked for version {version}, got {header.model_version}")
            if header.kind == HE_KIND:
                weights = self._open(weights)
            with self._lock:
                last_top = self._last[1] if self._last is not None else 0.0
                top = largest(weights)
                why = unfit(weights, last_top, top)
                if why is not None:
                    self._refused[key] = why
                    self._locks.pop(key, None)
                    logger.warning("model version %d%s not adopted: %s", version, _of(cluster), why)
                    self._check_refused(key)
                if cluster is None and (self._last is None or version >= self._last[0]):
                    self._last = (version, top)
                self._models[key] = weights
                while len({v for v, _ in self._models}) > self._keep:
                    self._models.popitem(last=False)
                self._locks.pop(key, None)
            return weights

    def _check_refused(self, key: tuple[int, int]) -> None:
        """ModelRefused for a version (or cluster model) found unfit before (lock held)."""
        why = self._refused.get(key)
        if why is not None:
            raise ModelRefused(f"model version {key[0]}{_of(key[1])}: {why}")

    def _open(self, sealed: OrderedDict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """An encrypted global model, decrypted with this process's secret key."""
        if self._he is None:
            raise StateError(
                "the global model is encrypted (--secure he) and this participant holds no "
                "HE key (--he-key)"
            )
        keys, spec = self._he
        try:
            return open_model(sealed, keys, spec)
        except PayloadError as exc:
            raise SpecMismatchError(f"the encrypted global model: {exc}") from None


def _of(cluster: int | None) -> str:
    """' of cluster c' for a cluster's model, '' for the global one."""
    return "" if cluster is None or cluster < 0 else f" of cluster {cluster}"


def sent_version() -> str:
    """The release this participant tells the clusterer at Join; none (taken as 0.1.0, the
    release before versions were sent) when this copy was never installed."""
    mine = version()
    return "" if mine == UNKNOWN else mine


class Participant:
    """One data owner: its data, its model, its attack (simulations only)."""

    def __init__(
        self,
        index: int,
        pid: str,
        local: LocalData,
        settings: WorkerSettings,
        stub: pb_grpc.ClustererStub,
        store: ModelStore,
        attack: AttackConfig,
        stop: threading.Event,
        metrics: ParticipantMetrics,
        collusion: Collusion | None = None,
        simulated: SimulatedDevice | None = None,
    ) -> None:
        self.metrics = metrics
        self.label = str(index)
        self.id = pid  # the name its credential gives it
        self.index = index
        # --speed-spread, --dropout: how much slower its device is, and which TRAIN tasks'
        # work it loses; trained counts its TRAIN tasks (the dropout draws' task number).
        self.simulated = simulated or SimulatedDevice(index, seed=settings.seed)
        self.trained = 0
        self.metrics.slowness.labels(self.label).set(self.simulated.factor)
        if self.simulated.heterogeneous:
            logger.info(
                "%s: simulated device %.3gx slower than the process, dropout %g",
                pid,
                self.simulated.factor,
                self.simulated.dropout,
            )
        self.local = local
        self.objective = local.objective
        self.settings = settings
        self.stub = stub
        self.store = store
        self.attack = build_attack(attack)  # its hooks (simulations only)
        # Colluding attackers of this process pool their honest deltas here.
        self.collusion = collusion or Collusion()
        self.stop = stop
        attack.check_classes(local.outputs)
        self.model = build_model(settings.model, local.input_shape, local.outputs).to(
            settings.device
        )
        # The model's own order of its tensors, and the order they travel in: the same,
        # unless the federation's w0 lists them otherwise (see _load).
        self.model_spec = spec_of(self.model.state_dict())
        self.spec = self.model_spec
        self.gen = participant_generator(settings.seed, index)
        self.rng = random.Random(settings.seed * 7919 + index)
        self.meta = call_metadata(settings.auth_token)
        self.via = (self.stub, self.meta)  # how it downloads its cluster's model
        self.feedback = ErrorFeedback()  # top-k: what it has not sent yet
        self.cpu_gen = rounding_generator(settings.seed, index)  # int8's rounding, on the CPU
        # Bounded by time, not by count: an unreachable clusterer gets the whole budget.
        self.retries = RetryPolicy(
            attempts=1 << 20, codes=RETRYABLE, budget_s=settings.retry_budget_s
        )
        # A long poll cut by the clusterer going away (a restart, SIGTERM's grace running
        # out) ends CANCELLED on this side: asking for a task again is always safe.
        self.poll_retries = replace(self.retries, codes=RETRYABLE | {grpc.StatusCode.CANCELLED})
        self.upload_retries = RetryPolicy(
            attempts=1 << 20,
            codes=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}),
            budget_s=settings.retry_budget_s,
        )
        if attack.kind != "none":
            logger.warning(
                "SIMULATED ATTACK: %s is an attacker (%s)", self.id, self.attack.describe()
            )
        # --dp local: its DP-SGD and ledger, resumed from --state-dir after a restart.
        self.dp: DpSgd | None = None
        self.ledger_file: Path | None = None
        self.spent = ""  # why it stopped training (its budget), once it has
        if settings.privacy is not None:
            if settings.state_dir:
                self.ledger_file = ledger_path(settings.state_dir, pid)
            resumed = load_ledger(self.ledger_file) if self.ledger_file else None
            self.dp = DpSgd(settings.privacy, len(local.train), resumed)
            self.metrics.dp_epsilon.labels(self.label).set(self.dp.epsilon)
            if resumed is not None:
                logger.info(
                    "%s: DP-SGD ledger resumed from %s: epsilon %.3g so far",
                    self.id,
                    self.ledger_file,
                    self.dp.epsilon,
                )

    # ---- plumbing --------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], object], idempotent: bool = True) -> object:
        """Call the clusterer with bounded retries; re-join once it forgot us (NOT_FOUND).

        Returns None when the process is stopping.
        """
        policy = self.retries if idempotent else self.upload_retries
        if what == "GetTask":
            policy = self.poll_retries
        for _ in range(MAX_REJOINS):
            try:
                return with_retries(fn, f"{self.id} {what}", policy, self.rng, self.stop)
            except grpc.RpcError as exc:
                if self.stop.is_set():
                    return None
                if exc.code() == grpc.StatusCode.NOT_FOUND and what != "Join":
                    logger.info("%s: unknown to the clusterer (restarted?), joining again", self.id)
                    self.join()
                    continue
                raise
        raise StateError(f"{self.id}: the clusterer keeps forgetting this participant")

    def join(self) -> None:
        """Register with the clusterer (idempotent)."""
        request = pb.JoinRequest(
            participant_id=self.id,
            num_train=len(self.local.train),
            num_test=len(self.local.test),
            group=self.local.group,
            data_schema=self.local.schema,
            device=str(self.settings.device),
            participant_version=sent_version(),
        )
        # A clusterer still starting is waited for on the channel (wait_for_ready): the
        # join goes out as soon as it connects, not after the next step of a retry backoff.
        try:
            self._call(
                "Join",
                lambda: self.stub.Join(
                    request, metadata=self.meta, timeout=30, wait_for_ready=True
                ),
            )
        except grpc.RpcError as exc:
            if exc.code() in (
                grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.INVALID_ARGUMENT,
            ):
                raise ConfigError(
                    f"{self.id}: the clusterer refused to admit it ({exc.code().name}): "
                    f"{exc.details()}"
                ) from None
            raise

    def _ordered(self, weights: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        """The model's tensors in the order they travel in (self.spec)."""
        return OrderedDict((s.name, weights[s.name]) for s in self.spec)

    def _load(self, version: int, cluster: int | None = None) -> None:
        weights = self.store.get(version, cluster, self.via)
        check_spec(weights, self.spec)
        if list(weights) != [s.name for s in self.spec]:
            # The federation's order (its w0 may come from a file that lists tensors by
            # name): the same tensors, sent in the order the services expect them.
            by_name = {s.name: s for s in self.spec}
            self.spec = tuple(by_name[name] for name in weights)
        self.model.load_state_dict(weights)

    def _send(
        self,
        kind: str,
        round_: int,
        version: int,
        weights: Mapping[str, torch.Tensor],
        metrics: dict[str, float],
    ) -> None:
        header = tensors_pb2.ModelHeader(
            sender=self.id,
            round=round_,
            model_version=version,
            num_samples=len(self.local.train),
            kind=kind,
            metrics=metrics,
        )
        self._call(
            "SubmitUpdate",
            lambda: self.stub.SubmitUpdate(
                build_stream(pb.SubmitUpdateRequest, header, header, weights, framed=True),
                metadata=self.meta,
                timeout=3600,
            ),
            idempotent=False,
        )
        self.metrics.rpc.sent_bytes.inc(header.total_bytes)

    # ---- tasks -----------------------------------------------------------------------
    def pretrain(self, task: pb.GetTaskResponse) -> None:
        """Send the pre-training delta that clustering groups."""
        t = task.training
        if not 0 <= t.sketch_dim <= MAX_SKETCH_DIM:
            raise StateError(f"the clusterer asked for a sketch of {t.sketch_dim} values")
        steps, batch = t.pre_steps or 20, t.batch_size or 32
        if self.dp is not None:  # before it promises colluders a delta
            count = pre_train_batches(len(self.local.train), t.adjusted, steps, 1, batch)
            self._check_budget(self.dp.plan(batch, count))
        self._load(task.model_version)
        steering = self.attack.pools_pretrain  # cluster steering: pooled in round -1
        if steering:
            self.collusion.enlist(-1, self.id)
        delta = pre_train_delta(
            self.model,
            self.local.train,
            self.gen,
            t.adjusted,
            steps,
            batch_size=batch,
            objective=self.objective,
            privacy=self.dp,
        )
        self._spent_privately(-1)
        pooled = self.collusion.pool(-1, self.id, delta) if steering else None
        delta = self.attack.on_pretrain(delta, self._view(-1), pooled).to(delta.device)
        if t.sketch_dim > 0:  # a long model: the clusterer clusters sketches, send one
            sketch = count_sketch(delta.unsqueeze(0), t.sketch_dim, t.sketch_seed)[0]
            self._send("pretrain-sketch", -1, task.model_version, {"sketch": sketch}, {})
            return
        reference = self.store.get(task.model_version)
        self._send(
            "pretrain-delta",
            -1,
            task.model_version,
            self._ordered(unflatten(delta, self.model_spec, reference)),
            {},
        )

    def train(self, task: pb.GetTaskResponse) -> None:
        """Train from the global model (personalised: the cluster's the task names) and
        stream the weights (attacked when simulated). A simulated device (--speed-spread,
        --dropout) sends them late, or loses them; pre-training and evaluation tasks are
        neither slowed nor dropped (services/participant/heterogeneity.py)."""
        # The scheme first: a value this participant cannot send fails the task before it
        # trains (StateError, as any task it cannot do), not after.
        try:
            codec = codec_named(task.training.compression or "none")
        except ConfigError as exc:
            raise StateError(f"the clusterer asked for {exc}") from None
        he = self.settings.he
        check_secure(task.training.secure, he is not None)
        if he is not None:  # n_i * w_i, encrypted: the aggregator adds what it cannot read
            codec = CkksCodec(he)
        t = task.training
        # The clusterer already decayed the rate for this round; the values are checked here.
        cfg = TrainingSettings.build(
            local_epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum, lr_decay=1
        )
        if self.dp is not None:  # before anything is computed on the data, or promised
            if t.report_loss:
                raise TaskNotDone(
                    "the clusterer asked for the loss on the training data (q-FFL); with "
                    "--dp local it would leave without privacy"
                )
            self._check_budget(self.dp.round_plan(cfg))
        view = self._view(task.round)
        crafting = self.attack.crafts_update(task.round)
        colluding = crafting and self.attack.pools_update
        if colluding:
            self.collusion.enlist(task.round, self.id)
        cluster = task.cluster if task.HasField("cluster") else None
        self._load(task.model_version, cluster)
        # Only a merge that weighs by it (q-FFL) asks for the received model's loss.
        before: dict[str, float] = {}
        if t.report_loss:
            before["loss_before"] = evaluate(
                self.model, self.local.train, self.local.eval_batch, self.objective
            )[0]
        train = self.local.train
        if isinstance(train, TensorExamples):  # attacks are simulations: shards only
            train = TensorExamples(*self.attack.on_data(train.x, train.y, view))
        result = local_train(self.model, train, cfg, 0, self.gen, self.objective, self.dp)
        self._spent_privately(task.round)
        self.metrics.training_seconds.labels(self.label).observe(result.seconds)
        self.metrics.training_loss.labels(self.label).set(result.loss)
        self.metrics.examples.labels(self.label).inc(result.examples)
        weights = self._ordered(state_of(self.model))
        flat_bases: list[torch.Tensor] = []

        def base_flat() -> torch.Tensor:
            """The model it trained from, flat: fetched and flattened once per task."""
            if not flat_bases:
                got = self.store.get(task.model_version, cluster, self.via)
                flat_bases.append(flatten(got, self.spec))
            return flat_bases[0]

        flat: torch.Tensor | None = None  # the weights sent, flat: flattened once
        if crafting:
            base = base_flat()
            flat = flatten(weights, self.spec)
            if colluding:
                pooled = self.collusion.pool(task.round, self.id, flat - base)
                flat = base + self.attack.on_pooled(pooled, view).to(base.device)
            else:
                flat = self.attack.on_update(flat, base, view)
        upload = self._encoded(codec, weights, flat, base_flat, view)
        # Under DP-SGD the training loss is a statistic of the data DP-SGD does not cover:
        # it stays here (on this participant's /metrics); its epsilon, a public figure, goes.
        figures = (
            {"train_loss": result.loss} if self.dp is None else {"dp_epsilon": self.dp.epsilon}
        )
        # A simulated device waits as a slower one would; one that loses the work sends
        # nothing (TaskDropped: what top-k left out stays, and the budget is checked by the
        # next task, as after a refused upload) and asks for its next task.
        if not self._as_simulated(task.round, result.seconds):
            return  # the process is stopping
        self._send(
            codec.kind,
            task.round,
            task.model_version,
            upload,
            {**before, **figures, "train_seconds": result.seconds},
        )
        self.feedback.commit()  # accepted: what top-k left out is carried to the next round
        if self.dp is not None:  # a round like this one would break the budget: stop now
            self.spent = self.dp.refuses(cfg)

    def _as_simulated(self, round_: int, compute_s: float) -> bool:
        """Wait as this participant's simulated device would after compute_s of training;
        whether it uploads (TaskDropped when the device lost the work; False when the
        process is stopping)."""
        task = self.trained
        self.trained += 1
        if not self.simulated.wait(compute_s, self.stop):
            return False
        if self.simulated.loses(task):
            raise TaskDropped(
                f"round {round_}: the simulated device lost its work (TRAIN task {task}, "
                f"dropout {self.simulated.dropout:g})"
            )
        return True

    def _check_budget(self, plan: Step) -> None:
        """BudgetSpent with the ledger's reason when `plan` would break the budget."""
        why = self.dp.refuses_plan(plan) if self.dp is not None else ""
        if why:
            raise BudgetSpent(why)

    def _spent_privately(self, round_: int) -> None:
        """After DP-SGD: the ledger kept (durably, before the update leaves), the gauge
        and the log line."""
        if self.dp is None:
            return
        if self.ledger_file is not None:
            save_ledger(self.ledger_file, self.dp.ledger)
        eps = self.dp.epsilon
        self.metrics.dp_epsilon.labels(self.label).set(eps)
        budget = self.dp.ledger.budget
        logger.info(
            "%s: %s with DP-SGD: epsilon %.3g at delta %g (budget %s)",
            self.id,
            "pre-trained" if round_ < 0 else f"round {round_} trained",
            eps,
            self.dp.ledger.delta,
            "none" if budget is None else f"{budget:g}",
        )

    def _encoded(
        self,
        codec: Codec,
        weights: Mapping[str, torch.Tensor],
        flat: torch.Tensor | None,
        base_flat: Callable[[], torch.Tensor],
        view: View,
    ) -> Mapping[str, torch.Tensor]:
        """The upload's tensors in the task's scheme. `flat` is the attacked weights, already
        flat, or None; the weights are flattened at most once (in the clear and unattacked,
        not at all: they stream as the model's tensors)."""
        if isinstance(codec, RawCodec):
            return codec.encode(weights if flat is None else unflatten(flat, self.spec, weights))
        if flat is None:
            flat = flatten(weights, self.spec)  # the upload's one flattening
        if isinstance(codec, CkksCodec):
            assert codec.keys is not None
            try:
                return codec.pack(self._encrypt(codec.keys, flat, view))
            except ValueError as exc:  # non-finite or past CKKS's range: nothing is sent
                raise TaskNotDone(f"round {view.round}: the trained weights: {exc}") from None
        assert isinstance(codec, DeltaCodec)
        # The delta, compressed (top-k: the residual of earlier rounds carried).
        return codec.encode(flat - base_flat(), self.spec, self.cpu_gen, memory=self.feedback)

    def _encrypt(self, he: HeKeys, flat: torch.Tensor, view: View) -> list[bytes]:
        """n_i * w_i as ciphertexts; a simulated forger's instead when it attacks (the
        upload still carries the federation's key tag: the aggregator cannot tell)."""
        n = len(self.local.train)
        forged = self.attack.on_encrypt(he, flat, n, view)
        return he.encrypt(flat, n) if forged is None else forged

    def _view(self, round_: int) -> View:
        """What this participant, as an attacker, knows in a round (-1: pre-training)."""
        return View(round_, self.settings.round_size, self.gen, self.id, logger)

    def evaluate(self, task: pb.GetTaskResponse) -> None:
        """Evaluate a global model version (and the cluster's model of it, when the task
        names a cluster) on the own test split and report it; a model it refused to adopt,
        or whose loss is not finite, is reported as such (the verdict), not as figures."""
        personal: dict[str, float] = {}
        try:
            if task.HasField("cluster"):
                self._load(task.model_version, task.cluster)
                p_loss, p_acc = evaluate(
                    self.model, self.local.test, self.local.eval_batch, self.objective
                )
                personal = {"personal_accuracy": p_acc, "personal_loss": p_loss}
            self._load(task.model_version)
            loss, acc = evaluate(self.model, self.local.test, self.local.eval_batch, self.objective)
        except ModelRefused as exc:
            self._report_verdict(task, pb.EVALUATION_VERDICT_REFUSED, str(exc))
            return
        if not all(math.isfinite(v) for v in (loss, *personal.values())):
            why = f"model version {task.model_version}: its loss on {len(self.local.test)} test "
            self._report_verdict(
                task, pb.EVALUATION_VERDICT_DIVERGED, why + "examples is not finite"
            )
            return
        self.metrics.test_accuracy.labels(self.label).set(acc)
        reported = self.attack.on_report(
            {"accuracy": acc, "loss": loss, **personal}, self._view(task.round)
        )
        acc, loss = reported["accuracy"], reported["loss"]
        personal = {k: reported[k] for k in personal}
        request = pb.ReportEvaluationRequest(
            participant_id=self.id,
            evaluation_id=task.evaluation_id,
            model_version=task.model_version,
            accuracy=acc,
            loss=loss,
            num_examples=len(self.local.test),
            personal_accuracy=personal.get("personal_accuracy"),
            personal_loss=personal.get("personal_loss"),
        )
        self._call(
            "ReportEvaluation",
            lambda: self.stub.ReportEvaluation(request, metadata=self.meta, timeout=30),
        )

    def _report_verdict(self, task: pb.GetTaskResponse, verdict: int, reason: str) -> None:
        """Report that the model of an evaluation task could not be judged by its figures."""
        logger.warning(
            "%s: %s: %s", self.id, pb.EvaluationVerdict.Name(verdict).lower(), reason[:200]
        )
        request = pb.ReportEvaluationRequest(
            participant_id=self.id,
            evaluation_id=task.evaluation_id,
            model_version=task.model_version,
            num_examples=len(self.local.test),
            verdict=verdict,  # type: ignore[arg-type]
            reason=reason[:200],
        )
        self._call(
            "ReportEvaluation",
            lambda: self.stub.ReportEvaluation(request, metadata=self.meta, timeout=30),
        )

    def run(self) -> None:
        """Work until the clusterer says DONE, the process is stopped or (--dp local) a
        round would break this participant's privacy budget."""
        self.join()
        handlers = {
            pb.TASK_KIND_PRETRAIN: self.pretrain,
            pb.TASK_KIND_TRAIN: self.train,
            pb.TASK_KIND_EVALUATE: self.evaluate,
        }
        wait = self.settings.poll_wait_s
        while not self.stop.is_set():
            try:
                task = self._call(
                    "GetTask",
                    lambda: self.stub.GetTask(
                        pb.GetTaskRequest(participant_id=self.id, wait_s=wait),
                        metadata=self.meta,
                        timeout=wait + 30,
                    ),
                )
            except grpc.RpcError as exc:
                raise StateError(
                    f"{self.id}: the clusterer stayed unreachable ({exc.code().name}) for the "
                    f"retry budget of {self.settings.retry_budget_s:.0f}s"
                ) from None
            if not isinstance(task, pb.GetTaskResponse):
                break
            if task.kind == pb.TASK_KIND_DONE:
                logger.info("%s: federation done", self.id)
                return
            if task.kind == pb.TASK_KIND_WAIT and task.next_poll_s > 0:
                # The clusterer's poll slots are taken: ask again later, jittered.
                self.stop.wait(self.rng.uniform(0.5, 1.0) * min(task.next_poll_s, 30.0))
                continue
            handler = handlers.get(task.kind)
            if handler is None:
                continue
            try:
                handler(task)
                self.metrics.tasks.labels(self.label, pb.TaskKind.Name(task.kind)).inc()
            except BudgetSpent as exc:  # --dp local: the next round would break the budget
                self.spent = str(exc)
            except TaskDropped as exc:  # simulated (--dropout): expected, not a warning
                logger.info("%s: TRAIN not done: %s", self.id, exc)
            except TaskNotDone as exc:  # a model it refused, weights it cannot send
                logger.warning(
                    "%s: %s not done: %s", self.id, pb.TaskKind.Name(task.kind), str(exc)[:300]
                )
            except grpc.RpcError as exc:
                # Late, duplicate or rejected: the clusterer said why; go on with the next task.
                logger.warning(
                    "%s: %s refused: %s %s",
                    self.id,
                    pb.TaskKind.Name(task.kind),
                    exc.code().name,
                    exc.details(),
                )
            if self.spent:
                # No RPC says "leaving": it stops asking for tasks, and the clusterer stops
                # selecting it once it has not been heard from for its liveness window.
                logger.warning(
                    "%s: stops training and leaves the federation: %s", self.id, self.spent
                )
                return
