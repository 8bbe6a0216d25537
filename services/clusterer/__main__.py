"""`python -m services.clusterer`: run the clusterer service."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import fields

from services.clusterer.clustering import METHODS
from services.clusterer.config import ClustererConfig
from services.clusterer.server import build_service
from services.common.errors import FLClusteringError
from services.common.flags import (
    OneLineParser,
    add_auth_flags,
    env,
    optional_int,
    parse_bool,
    resolve_token,
)
from services.common.grpc_util import ready_addresses, serve_until_signal, write_ready_file
from services.common.metrics import parse_metrics_port
from services.common.strategies import STRATEGIES

logger = logging.getLogger("services.clusterer")


def parse_args(argv: Sequence[str] | None) -> tuple[ClustererConfig, str]:
    """Flags with CLUSTERER_* / FLCLUSTERING_* environment-variable fallbacks."""
    d = ClustererConfig()
    e = "CLUSTERER_"
    f = "FLCLUSTERING_"
    p = OneLineParser(prog="python -m services.clusterer", description=__doc__)
    p.add_argument("--host", default=env(e + "HOST", d.host))
    p.add_argument("--port", type=int, default=env(e + "PORT", d.port))
    p.add_argument("--aggregator", default=env("AGGREGATOR_ADDR", d.aggregator), help="host:port")
    p.add_argument(
        "--strategy", choices=sorted(STRATEGIES), default=env(f + "STRATEGY", d.strategy)
    )
    p.add_argument(
        "--participants",
        type=int,
        default=env(f + "PARTICIPANTS", d.participants),
        help="participants to wait for before pre-training",
    )
    p.add_argument("--rounds", type=int, default=env(f + "ROUNDS", d.rounds))
    p.add_argument("--select", type=int, default=env(f + "SELECT", d.select))
    p.add_argument(
        "--clusters", type=optional_int, default=env(f + "CLUSTERS", d.clusters, optional_int)
    )
    p.add_argument("--cluster-method", choices=METHODS, default=env(e + "METHOD", d.cluster_method))
    p.add_argument("--q", type=float, default=env(f + "Q", d.q))
    p.add_argument(
        "--byzantine-fraction",
        type=float,
        default=env(f + "BYZANTINE_FRACTION", d.byzantine_fraction),
    )
    p.add_argument(
        "--eval-per-cluster", type=int, default=env(e + "EVAL_PER_CLUSTER", d.eval_per_cluster)
    )
    p.add_argument("--local-epochs", type=int, default=env(f + "LOCAL_EPOCHS", d.local_epochs))
    p.add_argument("--batch-size", type=int, default=env(f + "BATCH_SIZE", d.batch_size))
    p.add_argument("--lr", type=float, default=env(f + "LR", d.lr))
    p.add_argument("--lr-decay", type=float, default=env(f + "LR_DECAY", d.lr_decay))
    p.add_argument("--momentum", type=float, default=env(f + "MOMENTUM", d.momentum))
    p.add_argument("--pre-steps", type=int, default=env(f + "PRE_STEPS", d.pre_steps))
    p.add_argument("--adjusted", type=parse_bool, default=env(f + "ADJUSTED", d.adjusted))
    p.add_argument(
        "--round-timeout-s", type=float, default=env(e + "ROUND_TIMEOUT_S", d.round_timeout_s)
    )
    p.add_argument(
        "--eval-timeout-s", type=float, default=env(e + "EVAL_TIMEOUT_S", d.eval_timeout_s)
    )
    p.add_argument(
        "--pretrain-timeout-s",
        type=float,
        default=env(e + "PRETRAIN_TIMEOUT_S", d.pretrain_timeout_s),
    )
    p.add_argument("--min-share", type=float, default=env(e + "MIN_SHARE", d.min_share))
    p.add_argument("--liveness-s", type=float, default=env(e + "LIVENESS_S", d.liveness_s))
    p.add_argument("--seed", type=int, default=env(f + "SEED", d.seed))
    add_auth_flags(p)
    p.add_argument(
        "--max-update-bytes", type=int, default=env(e + "MAX_UPDATE_BYTES", d.max_update_bytes)
    )
    p.add_argument("--grace-s", type=float, default=env(e + "GRACE_S", d.grace_s))
    p.add_argument("--ready-file", default=env(e + "READY_FILE", None, str))
    p.add_argument("--metrics-host", default=env(e + "METRICS_HOST", d.metrics_host))
    p.add_argument(
        "--metrics-port",
        type=parse_metrics_port,
        default=env(e + "METRICS_PORT", d.metrics_port, parse_metrics_port),
        help="port of /metrics; 0 disables, auto picks a free one",
    )
    p.add_argument(
        "--tls-port",
        type=int,
        default=env(e + "TLS_PORT", None, int),
        help="also serve TLS here (for participants outside the cluster)",
    )
    p.add_argument(
        "--tls-cert", default=env(e + "TLS_CERT", None, str), help="PEM certificate chain"
    )
    p.add_argument("--tls-key", default=env(e + "TLS_KEY", None, str), help="PEM private key")
    p.add_argument(
        "--state-dir",
        default=env(e + "STATE_DIR", None, str),
        help="write the rounds' history here (history.json)",
    )
    p.add_argument("--log-level", default=env(f + "LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    names = {fl.name for fl in fields(ClustererConfig)}
    values = {k: v for k, v in vars(a).items() if k in names}
    values["auth_token"] = resolve_token(p, a)
    try:
        return ClustererConfig(**values), a.log_level
    except FLClusteringError as exc:
        p.error(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM."""
    config, level = parse_args(argv)
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        service = build_service(config)
        service.start()
    except FLClusteringError as exc:
        sys.stderr.write(f"clusterer: error: {exc}\n")
        return 2
    ready = ready_addresses(config.host, service.port, config.metrics_host, service.metrics_port)
    logger.info("clusterer serving on %s, aggregator at %s", ready, config.aggregator)
    write_ready_file(config.ready_file, ready)
    serve_until_signal(service.server, service.health, config.grace_s, service.coordinator.shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
