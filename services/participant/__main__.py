"""`python -m services.participant`: one or several participants against a clusterer."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import grpc
import torch
from prometheus_client import CollectorRegistry

from services.common.homomorphic import load_keys
from services.common.metrics import instrument_channel, serve_metrics
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.core.device import resolve_device
from services.core.errors import ConfigError, FLClusteringError
from services.core.models import build_model
from services.core.objectives import OBJECTIVES
from services.core.tensors import spec_of
from services.participant.attacks import AttackConfig
from services.participant.collusion import Collusion
from services.participant.dpsgd import unsupported
from services.participant.examples import TensorExamples
from services.participant.heterogeneity import simulated_devices
from services.participant.metrics import ParticipantMetrics
from services.participant.partition import federation_data, shards_of
from services.participant.settings import ParticipantConfig, parser
from services.participant.sources import open_own_data
from services.participant.worker import (
    LocalData,
    ModelStore,
    Participant,
    WorkerSettings,
    clusterer_stub,
    shard_data,
)
from services.transport.client import EDGE_OPTIONS, Renewing, channel
from services.transport.credentials import (
    TlsFiles,
    certificate_identity,
    load_tls,
    participant_id,
    token_owner,
)
from services.transport.lifecycle import exit_with_parent, freeze_heap
from services.transport.serving import LOG_FORMAT, ready_addresses, write_ready_file

logger = logging.getLogger("services.participant")


def connect(
    config: ParticipantConfig, hosted: range, metrics: ParticipantMetrics
) -> tuple[list[str], list[pb_grpc.ClustererStub]]:
    """Each hosted participant's id and stub. With --tls-dir every participant has its own
    mutual-TLS channel and its id is the name its certificate gives it; otherwise they share
    one channel and are participant-<index>, unless one participant holds its own token
    (`<id>.<secret>`, `flclustering tokens`): then it is that id."""
    me = config.participant
    tls_dir = config.transport.tls_dir
    if not tls_dir:
        base = channel(me.clusterer, me.tls_ca, me.tls_server_name, extra=EDGE_OPTIONS)
        stub = clusterer_stub(instrument_channel(base, metrics.rpc))
        token = config.transport.token()
        owner = token_owner(token) if token and len(hosted) == 1 else None
        ids = [owner] if owner else [participant_id(i) for i in hosted]
        return ids, [stub] * len(hosted)

    def build(tls: TlsFiles) -> tuple[grpc.Channel, pb_grpc.ClustererStub]:
        ch = channel(
            me.clusterer, tls_server_name=me.tls_server_name, client=tls, extra=EDGE_OPTIONS
        )
        return ch, clusterer_stub(instrument_channel(ch, metrics.rpc))

    ids, stubs = [], []
    for i in hosted:
        tls = load_tls(tls_dir, participant_id(i), fallback=len(hosted) == 1)
        who = certificate_identity(tls.cert)
        if who is None or who.role != "participant":
            raise ConfigError(
                f"--tls-dir {tls_dir}: the certificate of participant {i} names no participant "
                "(make it with `flclustering certs`)"
            )
        ids.append(who.name)
        # The stub follows a renewed certificate (cert-manager renews in place).
        stubs.append(cast(pb_grpc.ClustererStub, Renewing(tls, build)))
    return ids, stubs


def own_data(config: ParticipantConfig, device: torch.device) -> LocalData:
    """This owner's data in --data-dir, checked against the federation's schema (a file
    that does not fit is one ConfigError naming it, before anything is sent)."""
    sample = config.sample
    own = open_own_data(Path(config.data.data_dir), sample, config.data.loader_workers)
    logger.info(
        "own data in %s: %s, %d training and %d test examples (split %s)",
        config.data.data_dir,
        own.facts.get("format"),
        len(own.train),
        len(own.test),
        own.facts.get("split"),
    )
    # Tables and in-memory images go to the device once; images on disk per batch.
    train, test = (
        e.to(device) if isinstance(e, TensorExamples) else e for e in (own.train, own.test)
    )
    return LocalData(
        train,
        test,
        sample.input_shape,
        sample.outputs,
        objective=OBJECTIVES[sample.target],
        schema=sample.text(),
        facts=own.facts,
    )


def check_private(config: ParticipantConfig, local: LocalData, device: torch.device) -> None:
    """--dp local: the model must give per-example gradients (ConfigError in one line
    otherwise, before joining), and the ledgers' directory must exist; said once what
    each participant will do."""
    fed, privacy, state_dir = config.federation, config.privacy, config.service.state_dir
    model = build_model(fed.model, local.input_shape, local.outputs).to(device)
    why = unsupported(model, local.input_shape)
    if why:
        raise ConfigError(
            f"--dp local: Opacus cannot compute per-example gradients of --model {fed.model} "
            f"({why}); choose another model or --dp off"
        )
    if state_dir:
        Path(state_dir).mkdir(parents=True, exist_ok=True)
    budget = "none" if privacy.dp_epsilon is None else f"{privacy.dp_epsilon:g}"
    kept = f"in {state_dir}"
    if not state_dir:
        kept = "in memory only (no --state-dir: a restart starts every participant's epsilon at 0)"
    logger.info(
        "--dp local: DP-SGD with noise %g, per-example clip %g, delta %g, epsilon budget %s; "
        "ledgers %s",
        privacy.dp_noise,
        privacy.dp_clip,
        privacy.dp_delta,
        budget,
        kept,
    )


def run(config: ParticipantConfig, stop: threading.Event) -> int:
    """Host the configured participants until the federation is done or stop is set."""
    me, fed, svc = config.participant, config.federation, config.service
    device = resolve_device(me.device)
    if device.type == "cpu" and fed.dataset != "own":
        # Simulated participants, many per process: one core each is fastest. An owner's
        # process is its one participant: torch's threads use the device's cores.
        torch.set_num_threads(1)
    hosted = range(me.index, me.index + me.count)
    if fed.dataset == "own":  # this owner's data, checked against the federation's schema
        local = [own_data(config, device)]
    else:  # a simulation: shards of a named dataset every participant computes alike
        data = federation_data(fed, config.data, hosted)
        shards = shards_of(fed, config.data, data)
        local = [shard_data(data, shards[i], device) for i in hosted]
    token = config.transport.token()
    registry = CollectorRegistry()
    metrics = ParticipantMetrics(registry)
    facts = local[0].facts or {}
    metrics.device.info(
        {
            "device": str(device),
            "model": fed.model,
            "dataset": fed.dataset,
            # Own data: its format and the held-out split, given or made (seeded): recorded.
            **{
                k: json.dumps(facts[k])
                for k in ("format", "split", "n_train", "n_test")
                if k in facts
            },
        }
    )
    metrics_port = serve_metrics(registry, svc.metrics_host, svc.metrics_port)
    last = me.index + me.count - 1
    if svc.ready_file:
        ready = ready_addresses("", 0, svc.metrics_host, metrics_port)
        del ready["grpc"]  # participants serve no gRPC
        ready["participants"] = f"{me.index}..{last}"
        write_ready_file(svc.ready_file, ready)
    he = None
    if fed.secure == "he":  # the secret context: encrypts uploads, decrypts the model
        tr = config.transport
        keys = load_keys(tr.he_key, tr.tls_dir, secret=True)
        he = (
            keys,
            spec_of(build_model(fed.model, local[0].input_shape, local[0].outputs).state_dict()),
        )
        logger.info("--secure he: updates are encrypted under key %s", keys.short())
    private = config.privacy.local
    if private:
        check_private(config, local[0], device)
    ids, stubs = connect(config, hosted, metrics)
    settings = WorkerSettings(
        fed.model,
        device,
        token,
        me.poll_wait_s,
        fed.seed,
        me.retry_budget_s,
        fed.select,
        he[0] if he else None,
        config.privacy if private else None,
        svc.state_dir,
    )
    collusion = Collusion()  # the attackers this process hosts pool their updates here
    store = ModelStore(stubs[0], token, on_bytes=metrics.rpc.received_bytes.inc, stop=stop, he=he)
    attackers = set(hosted) if me.attack_indices is None else set(me.attack_indices)
    honest = AttackConfig()
    devices = simulated_devices(hosted, fed.participants, config.devices, fed.seed)
    participants = [
        Participant(
            i,
            pid,
            mine,
            settings,
            stub,
            store,
            config.adversary.config() if i in attackers else honest,
            stop,
            metrics,
            collusion,
            simulated,
        )
        for i, pid, stub, mine, simulated in zip(hosted, ids, stubs, local, devices, strict=True)
    ]
    logger.info(
        "hosting %d participant(s) %d..%d on %s against %s",
        len(participants),
        me.index,
        last,
        device,
        me.clusterer,
    )
    errors: list[BaseException] = []

    def work(p: Participant) -> None:
        try:
            p.run()
        except FLClusteringError as exc:  # a refusal or a bad file: one line, no trace
            logger.error("%s stopped: %s", p.id, exc)
            errors.append(exc)
        except Exception as exc:  # one participant's failure is logged; the others go on
            logger.exception("%s failed", p.id)
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(p,), name=p.id, daemon=True) for p in participants
    ]
    freeze_heap()  # torch and the dataset stay out of the garbage collector's walks
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=1.0)
    if me.linger:
        logger.info("federation done; serving metrics until stopped")
        stop.wait()
    if len(errors) == len(participants) == 1 and isinstance(errors[0], ConfigError):
        raise errors[0]  # refused at Join: one owner's process answers with its one line
    return 1 if errors and not stop.is_set() else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    config: ParticipantConfig = parser().parse(argv)
    logging.basicConfig(level=config.service.log_level, format=LOG_FORMAT)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    exit_with_parent()
    try:
        return run(config, stop)
    except FLClusteringError as exc:
        sys.stderr.write(f"participant: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
