"""Settings of the clusterer service."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.errors import ConfigError
from services.common.strategies import get_strategy


@dataclass(frozen=True)
class ClustererConfig:
    """Federation settings the clusterer enforces; one frozen value built at start-up."""

    host: str = "0.0.0.0"
    port: int = 50051
    aggregator: str = "aggregator:50052"
    strategy: str = "flclustering"
    participants: int = 30  # members to wait for before pre-training
    rounds: int = 30
    select: int = 15
    clusters: int | None = 3  # None: choose k automatically
    cluster_method: str = "hierarchical"
    q: float = 0.5
    byzantine_fraction: float = 0.2
    eval_per_cluster: int = 5
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 0.99
    momentum: float = 0.9
    pre_steps: int = 20
    adjusted: bool = True
    round_timeout_s: float = 120.0
    eval_timeout_s: float = 60.0
    pretrain_timeout_s: float = 300.0
    min_share: float = 0.5  # share of selected updates a round needs to be aggregated
    liveness_s: float = 60.0
    poll_cap_s: float = 20.0
    seed: int = 0
    auth_token: str | None = None
    max_update_bytes: int = 2 << 30
    max_workers: int = 256
    grace_s: float = 10.0
    ready_file: str | None = None
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9101  # None: no /metrics; -1: any free port
    state_dir: str | None = None  # history.json of the rounds is written here
    tls_port: int | None = None  # an extra TLS port, for participants outside the cluster
    tls_cert: str | None = None
    tls_key: str | None = None

    def __post_init__(self) -> None:
        get_strategy(self.strategy)
        if self.participants < 1 or self.rounds < 0 or self.select < 1:
            raise ConfigError("participants and select must be >= 1, rounds >= 0")
        if not 0 < self.min_share <= 1:
            raise ConfigError(f"min share must be in (0, 1], got {self.min_share}")
        if not 0 <= self.byzantine_fraction < 0.5:
            raise ConfigError(
                f"byzantine fraction must be in [0, 0.5), got {self.byzantine_fraction}"
            )
        if self.tls_port is not None and not (self.tls_cert and self.tls_key):
            raise ConfigError("--tls-port needs --tls-cert and --tls-key")
        for name in ("round_timeout_s", "eval_timeout_s", "pretrain_timeout_s", "liveness_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be positive")

    def lr_at(self, round_: int) -> float:
        """Learning rate of a round (the seed's exponential decay)."""
        return self.lr * self.lr_decay ** max(0, round_)
