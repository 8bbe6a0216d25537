"""The record of one finished round, as every command writes it.

`flclustering local` and `centralised` keep one per round in results.json and rounds.csv;
the clusterer in rounds.jsonl, history.json and its status (RoundSummary). Each command
records the fields it measures (the others stay None and are not written) in its own key
order, its `Layout`, so `to_dict()` gives exactly the JSON each has always written and
`from_dict()` reads it back (cluster and group ids as ints again).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any


class Layout(enum.Enum):
    """Who wrote a record, and so its keys' order."""

    SERVICE = "service"  # the clusterer (history, rounds.jsonl, status)
    LOCAL = "local"  # flclustering local
    CENTRALISED = "centralised"  # flclustering centralised


# What every in-process command measures each round from the participants' own test splits
# (local.measured builds these fields), first in its records.
MEASURED = (
    "round",
    "mean_accuracy",
    "mean_loss",
    "accuracy_std",
    "worst_accuracy",
    "worst_decile_accuracy",
    "group_accuracy",
)

ORDER = {
    Layout.SERVICE: (
        "round",
        "model_version",
        "selected",
        "received",
        "updates",
        "abandoned",
        "timed_out",
        "rejected",
        "rejected_by",
        "rejected_clusters",
        "fallbacks",
        "cluster_weights",
        "evaluated",
        "selection",
        "phases",
        "mean_accuracy",
        "accuracy_std",
        "worst_accuracy",
        "worst_decile_accuracy",
        "mean_loss",
        "group_accuracy",
        "cluster_accuracy",
        "personal_mean_accuracy",
        "personal_accuracy_std",
        "personal_worst_accuracy",
        "personal_group_accuracy",
        "personal_cluster_accuracy",
        "rolled_back",
        "rollback_reason",
        "refused_evaluations",
        "diverged_evaluations",
        "merge_refused",
        "failed_clusters",
        "duration_s",
        "convicted",
        "epsilon",
        "dp_noise",
        "dp_rate",
        "dp_clip",
        "dp_sigma",
        "dp_clipped",
        "finished_at",
        "evaluated_version",
        "staleness_mean",
        "staleness_max",
        "stale",
    ),
    Layout.LOCAL: (
        *MEASURED,
        "cluster_accuracy",
        "duration_s",
        "clock_s",
        "model_version",
        "updates",
        "stragglers",
        "dropouts",
        "staleness_mean",
        "staleness_max",
        "stale",
        "rejected",
        "rejected_attackers",
        "attackers_selected",
        "rejected_clusters",
        "fallbacks",
        "rejected_by",
        "attack_fired",
        "upload_bytes",
        "selection",
        "merge_refused",
        "merge_step",
        "largest_weight",
        "fell",
        "median_drop",
        "median_ratio",
        "rolled_back",
        "rollback_reason",
        "refused_evaluations",
        "diverged_evaluations",
        "personal_mean_accuracy",
        "personal_accuracy_std",
        "personal_worst_accuracy",
        "personal_group_accuracy",
        "backdoor_success_rate",
        "epsilon",
        "dp_noise",
        "dp_rate",
        "dp_clip",
        "dp_sigma",
        "dp_clipped",
    ),
    Layout.CENTRALISED: (
        *MEASURED,
        "train_loss",
        "examples",
        "duration_s",
        "rejected",
    ),
}
# Maps keyed by a cluster or group id (JSON makes the ids strings).
ID_MAPS = (
    "cluster_weights",
    "group_accuracy",
    "cluster_accuracy",
    "personal_group_accuracy",
    "personal_cluster_accuracy",
)


@dataclass(frozen=True)
class RoundRecord:
    """What one round measured. None: not recorded by the command that wrote it."""

    round: int
    layout: Layout = Layout.SERVICE
    # The round's accounting (the clusterer's).
    model_version: int | None = None
    selected: int | None = None  # participants selected
    received: int | None = None  # updates received
    updates: int | None = None  # updates aggregated (0 when abandoned)
    abandoned: bool | None = None
    timed_out: int | None = None
    evaluated: int | None = None
    phases: Mapping[str, float] | None = None  # seconds per phase
    convicted: list[str] | None = None  # quarantine: who this round convicted
    # The defence.
    rejected: int | None = None
    rejected_by: Mapping[str, int] | None = None  # per defence layer
    rejected_clusters: int | None = None
    fallbacks: int | None = None
    cluster_weights: Mapping[int, float] | None = None
    selection: Mapping[str, int] | None = None  # participant -> cluster
    # The new model's evaluation.
    mean_accuracy: float | None = None
    mean_loss: float | None = None
    accuracy_std: float | None = None
    worst_accuracy: float | None = None
    worst_decile_accuracy: float | None = None
    group_accuracy: Mapping[int, float] | None = None
    cluster_accuracy: Mapping[int, float] | None = None
    personal_mean_accuracy: float | None = None
    personal_accuracy_std: float | None = None
    personal_worst_accuracy: float | None = None
    personal_group_accuracy: Mapping[int, float] | None = None
    personal_cluster_accuracy: Mapping[int, float] | None = None
    # The divergence guard and the evaluators' verdicts.
    merge_refused: str | None = None
    merge_step: float | None = None
    largest_weight: float | None = None
    fell: int | None = None
    median_drop: float | None = None
    median_ratio: float | None = None
    rolled_back: bool | None = None
    rollback_reason: str | None = None
    refused_evaluations: int | None = None
    diverged_evaluations: int | None = None
    failed_clusters: Mapping[int, int] | None = None  # a failed round's updates per cluster
    # Simulated attacks (local runs).
    rejected_attackers: int | None = None
    attackers_selected: int | None = None
    attack_fired: bool | None = None
    backdoor_success_rate: float | None = None
    upload_bytes: int | None = None
    # Differential privacy: epsilon spent after the round (at the run's delta), the bound
    # the updates were clipped to, the noise's standard deviation per coordinate of the
    # merge, and how many updates were longer than the bound.
    epsilon: float | None = None
    dp_noise: float | None = None  # the mechanism's noise multiplier (the ledger's step)
    dp_rate: float | None = None  # the largest sampling rate of the round (the same)
    dp_clip: float | None = None
    dp_sigma: float | None = None
    dp_clipped: int | None = None
    # --mode async (the services): when the version was made (Unix time) and which version
    # the accuracy figures are of (the newest evaluated by then).
    finished_at: float | None = None
    evaluated_version: int | None = None
    # Pacing on simulated devices (local runs): the virtual clock when the record was
    # made (seconds since round 0), selected participants a round closed without (over-
    # selection), tasks dropped. Asynchronous runs: the staleness (versions) of the updates
    # merged (since the last record, in local runs), and `stale`: updates refused as staler
    # than --max-staleness.
    clock_s: float | None = None
    stragglers: int | None = None
    dropouts: int | None = None
    staleness_mean: float | None = None
    staleness_max: int | None = None
    stale: int | None = None
    # Centralised training.
    train_loss: float | None = None
    examples: int | None = None
    duration_s: float | None = None
    # Keys no field holds (a file written by another version), written back as they came.
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Whether the round's model was rolled back or its merge refused."""
        return bool(self.rolled_back or self.merge_refused)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able data: the recorded fields in its layout's order."""
        out: dict[str, Any] = {}
        for key in ORDER[self.layout]:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], layout: Layout = Layout.SERVICE) -> RoundRecord:
        """A record read back (ids of clusters and groups are ints again). The clusterer's
        history always has cluster_weights and group_accuracy."""
        known = {f.name for f in fields(cls)} - {"layout", "extra"}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        for key in ID_MAPS:
            if key in values:
                values[key] = {int(c): float(v) for c, v in values[key].items()}
        if "failed_clusters" in values:
            failed = values["failed_clusters"]
            values["failed_clusters"] = {int(c): int(n) for c, n in failed.items()}
        if layout is Layout.SERVICE:
            values.setdefault("cluster_weights", {})
            values.setdefault("group_accuracy", {})
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(layout=layout, extra=extra, **values)
