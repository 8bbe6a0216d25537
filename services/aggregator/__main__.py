"""`python -m services.aggregator`: run the aggregator service."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from services.aggregator.server import AggregatorConfig, build_service
from services.common.errors import FLClusteringError
from services.common.flags import OneLineParser, add_auth_flags, env, resolve_token
from services.common.grpc_util import ready_addresses, serve_until_signal, write_ready_file
from services.common.metrics import parse_metrics_port
from services.participant.models import MODELS

logger = logging.getLogger("services.aggregator")


def parse_shape(raw: str) -> tuple[int, int, int]:
    """'C,H,W' as three positive integers."""
    parts = tuple(int(p) for p in raw.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(raw)
    return parts[0], parts[1], parts[2]


def parse_args(argv: Sequence[str] | None) -> AggregatorConfig:
    """Flags with AGGREGATOR_* environment-variable fallbacks."""
    d = AggregatorConfig()
    e = "AGGREGATOR_"
    p = OneLineParser(prog="python -m services.aggregator", description=__doc__)
    p.add_argument("--host", default=env(e + "HOST", d.host))
    p.add_argument("--port", type=int, default=env(e + "PORT", d.port))
    p.add_argument("--model", choices=sorted(MODELS), default=env("FLCLUSTERING_MODEL", d.model))
    p.add_argument(
        "--dataset",
        default=env("FLCLUSTERING_DATASET", d.dataset),
        help="sets the model's input shape and classes",
    )
    p.add_argument(
        "--input-shape",
        type=parse_shape,
        default=env(e + "INPUT_SHAPE", None, parse_shape),
        help="C,H,W when the dataset's shape is not built in (folder)",
    )
    p.add_argument("--num-classes", type=int, default=env(e + "NUM_CLASSES", None, int))
    p.add_argument("--seed", type=int, default=env("FLCLUSTERING_SEED", d.seed))
    p.add_argument(
        "--max-update-bytes", type=int, default=env(e + "MAX_UPDATE_BYTES", d.max_update_bytes)
    )
    p.add_argument("--keep-versions", type=int, default=env(e + "KEEP_VERSIONS", d.keep_versions))
    add_auth_flags(p)
    p.add_argument("--grace-s", type=float, default=env(e + "GRACE_S", d.grace_s))
    p.add_argument(
        "--ready-file",
        default=env(e + "READY_FILE", None, str),
        help="write the bound addresses as JSON here once serving",
    )
    p.add_argument("--metrics-host", default=env(e + "METRICS_HOST", d.metrics_host))
    p.add_argument(
        "--metrics-port",
        type=parse_metrics_port,
        default=env(e + "METRICS_PORT", d.metrics_port, parse_metrics_port),
        help="port of /metrics; 0 disables, auto picks a free one",
    )
    p.add_argument(
        "--state-dir",
        default=env(e + "STATE_DIR", None, str),
        help="keep the newest global model here (safetensors) and resume from it",
    )
    p.add_argument("--log-level", default=env("FLCLUSTERING_LOG_LEVEL", "INFO"))
    a = p.parse_args(argv)
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return AggregatorConfig(
        host=a.host,
        port=a.port,
        model=a.model,
        dataset=a.dataset,
        input_shape=a.input_shape,
        num_classes=a.num_classes,
        seed=a.seed,
        max_update_bytes=a.max_update_bytes,
        keep_versions=a.keep_versions,
        auth_token=resolve_token(p, a),
        grace_s=a.grace_s,
        ready_file=a.ready_file,
        metrics_host=a.metrics_host,
        metrics_port=a.metrics_port,
        state_dir=a.state_dir or None,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGTERM."""
    config = parse_args(argv)
    try:
        service = build_service(config)
        service.start()
    except FLClusteringError as exc:
        sys.stderr.write(f"aggregator: error: {exc}\n")
        return 2
    ready = ready_addresses(config.host, service.port, config.metrics_host, service.metrics_port)
    logger.info("aggregator serving on %s (model %s)", ready, config.model)
    write_ready_file(config.ready_file, ready)
    serve_until_signal(service.server, service.health, config.grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
