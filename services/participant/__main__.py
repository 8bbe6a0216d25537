"""`python -m services.participant`: one or several participants against a clusterer."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry

from services.common.errors import FLClusteringError
from services.common.flags import OneLineParser, add_auth_flags, env, parse_bool, resolve_token
from services.common.grpc_util import channel, ready_addresses, write_ready_file
from services.common.metrics import (
    ParticipantMetrics,
    instrument_channel,
    parse_metrics_port,
    serve_metrics,
)
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.participant.attacks import ATTACKS, AttackConfig
from services.participant.datasets import DATASETS, load_dataset
from services.participant.device import resolve_device
from services.participant.models import MODELS
from services.participant.partition import PARTITIONS, partition
from services.participant.worker import ModelStore, Participant, WorkerSettings

logger = logging.getLogger("services.participant")


@dataclass(frozen=True)
class ParticipantConfig:
    """Settings of a participant process."""

    clusterer: str = "clusterer:50051"
    dataset: str = "digits"
    data_dir: str = "data"
    download: bool = True
    partition: str = "practical-noniid"
    num_participants: int = 30
    index: int = 0
    count: int = 1
    groups: int = 3
    alpha: float = 0.5
    seed: int = 0
    model: str = "cnn"
    device: str = "auto"
    auth_token: str | None = None
    poll_wait_s: float = 10.0
    attack: str = "none"
    attack_factor: float = -1.0
    attack_every: int = 5
    attack_indices: tuple[int, ...] | None = None  # None: every hosted participant attacks
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = None  # None: no /metrics; -1: any free port
    ready_file: str | None = None
    tls_ca: str | None = None  # CA file: talk TLS to the clusterer (edge devices)
    tls_server_name: str | None = None
    linger: bool = False  # after the federation is done, keep serving /metrics until stopped


def parse_indices(raw: str) -> tuple[int, ...]:
    """'1,5,9' as indices; '' as none."""
    return tuple(int(x) for x in raw.split(",") if x.strip())


def parse_args(argv: Sequence[str] | None) -> tuple[ParticipantConfig, str]:
    """Flags with environment-variable fallbacks (CLUSTERER_ADDR, PARTICIPANT_INDEX, ...)."""
    d = ParticipantConfig()
    p = OneLineParser(prog="python -m services.participant", description=__doc__)
    p.add_argument(
        "--clusterer", default=env("CLUSTERER_ADDR", d.clusterer), help="host:port of the clusterer"
    )
    p.add_argument("--dataset", choices=DATASETS, default=env("FLCLUSTERING_DATASET", d.dataset))
    p.add_argument("--data-dir", default=env("FLCLUSTERING_DATA_DIR", d.data_dir))
    p.add_argument("--download", type=parse_bool, default=env("FLCLUSTERING_DOWNLOAD", d.download))
    p.add_argument(
        "--partition", choices=PARTITIONS, default=env("FLCLUSTERING_PARTITION", d.partition)
    )
    p.add_argument(
        "--num-participants", type=int, default=env("FLCLUSTERING_PARTICIPANTS", d.num_participants)
    )
    p.add_argument(
        "--index",
        type=int,
        default=env("PARTICIPANT_INDEX", d.index),
        help="this participant's index (the first one's, with --count)",
    )
    p.add_argument(
        "--count",
        type=int,
        default=env("PARTICIPANT_COUNT", d.count),
        help="host this many participants (index, index+1, ...) in one process",
    )
    p.add_argument("--groups", type=int, default=env("FLCLUSTERING_GROUPS", d.groups))
    p.add_argument("--alpha", type=float, default=env("FLCLUSTERING_ALPHA", d.alpha))
    p.add_argument("--seed", type=int, default=env("FLCLUSTERING_SEED", d.seed))
    p.add_argument("--model", choices=sorted(MODELS), default=env("FLCLUSTERING_MODEL", d.model))
    p.add_argument(
        "--device", default=env("PARTICIPANT_DEVICE", d.device), help="auto, cpu or cuda[:n]"
    )
    add_auth_flags(p)
    p.add_argument(
        "--poll-wait-s", type=float, default=env("PARTICIPANT_POLL_WAIT_S", d.poll_wait_s)
    )
    p.add_argument(
        "--attack",
        choices=ATTACKS,
        default=env("PARTICIPANT_ATTACK", d.attack),
        help="SIMULATION ONLY: make these participants attackers",
    )
    p.add_argument(
        "--attack-factor", type=float, default=env("PARTICIPANT_ATTACK_FACTOR", d.attack_factor)
    )
    p.add_argument(
        "--attack-every", type=int, default=env("PARTICIPANT_ATTACK_EVERY", d.attack_every)
    )
    p.add_argument(
        "--attack-indices",
        type=parse_indices,
        default=env("PARTICIPANT_ATTACK_INDICES", None, parse_indices),
        help="which hosted indices attack (default: all of them)",
    )
    p.add_argument("--metrics-host", default=env("PARTICIPANT_METRICS_HOST", d.metrics_host))
    p.add_argument(
        "--metrics-port",
        type=parse_metrics_port,
        default=env("PARTICIPANT_METRICS_PORT", d.metrics_port, parse_metrics_port),
        help="port of /metrics for all hosted participants; 0 (default) disables, auto picks one",
    )
    p.add_argument(
        "--ready-file",
        default=env("PARTICIPANT_READY_FILE", None, str),
        help="write the metrics address as JSON here once serving",
    )
    p.add_argument(
        "--tls-ca",
        default=env("PARTICIPANT_TLS_CA", None, str),
        help="PEM CA certificate: connect to the clusterer over TLS",
    )
    p.add_argument(
        "--tls-server-name",
        default=env("PARTICIPANT_TLS_SERVER_NAME", None, str),
        help="name the clusterer's certificate is issued for, if not its address",
    )
    p.add_argument(
        "--linger",
        action="store_true",
        help="after the federation is done keep serving /metrics until SIGTERM",
    )
    p.add_argument("--log-level", default=env("FLCLUSTERING_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    if a.count < 1 or not a.index >= 0 or a.index + a.count > a.num_participants:
        p.error(
            f"--index {a.index} --count {a.count} must lie within "
            f"--num-participants {a.num_participants}"
        )
    values: dict[str, Any] = {
        k: v for k, v in vars(a).items() if k not in ("log_level", "auth_token_file")
    }
    values["auth_token"] = resolve_token(p, a)
    return ParticipantConfig(**values), a.log_level


def run(config: ParticipantConfig, stop: threading.Event) -> int:
    """Host config.count participants until the federation is done or stop is set."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # many participants per process: one core each is fastest
    data = load_dataset(config.dataset, config.data_dir, config.download)
    shards = partition(
        data.y_train.numpy(),
        data.y_test.numpy(),
        config.partition,
        config.num_participants,
        config.seed,
        data.num_classes,
        config.groups,
        config.alpha,
    )
    registry = CollectorRegistry()
    metrics = ParticipantMetrics(registry)
    metrics.device.info({"device": str(device), "model": config.model, "dataset": config.dataset})
    metrics_port = serve_metrics(registry, config.metrics_host, config.metrics_port)
    if config.ready_file:
        ready = ready_addresses("", 0, config.metrics_host, metrics_port)
        del ready["grpc"]  # participants serve no gRPC
        ready["participants"] = f"{config.index}..{config.index + config.count - 1}"
        write_ready_file(config.ready_file, ready)
    base = channel(config.clusterer, config.tls_ca, config.tls_server_name)
    stub = pb_grpc.ClustererStub(instrument_channel(base, metrics.rpc))
    settings = WorkerSettings(
        config.model, device, config.auth_token, config.poll_wait_s, config.seed
    )
    store = ModelStore(stub, config.auth_token, on_bytes=metrics.rpc.received_bytes.inc)
    hosted = range(config.index, config.index + config.count)
    attackers = set(hosted) if config.attack_indices is None else set(config.attack_indices)
    participants = []
    for i in hosted:
        attack = AttackConfig(
            config.attack if i in attackers else "none", config.attack_factor, config.attack_every
        )
        participants.append(
            Participant(i, data, shards[i], settings, stub, store, attack, stop, metrics)
        )
    logger.info(
        "hosting %d participant(s) %d..%d on %s against %s",
        len(participants),
        config.index,
        config.index + config.count - 1,
        device,
        config.clusterer,
    )
    errors: list[BaseException] = []

    def work(p: Participant) -> None:
        try:
            p.run()
        except Exception as exc:  # one participant's failure is logged; the others go on
            logger.exception("%s failed", p.id)
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(p,), name=p.id, daemon=True) for p in participants
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=1.0)
    if config.linger:
        logger.info("federation done; serving metrics until stopped")
        stop.wait()
    return 1 if errors and not stop.is_set() else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    config, level = parse_args(argv)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        return run(config, stop)
    except FLClusteringError as exc:
        sys.stderr.write(f"participant: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
