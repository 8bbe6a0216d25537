"""What the clusterer exports (no per-participant labels: thousands add no series)."""

from __future__ import annotations

from prometheus_client import Counter, Enum, Gauge, Histogram

from services.common.metrics import DURATION_BUCKETS, Catalogue, Metric, refusals

TASKS = ("pretrain", "train", "evaluate")
PHASES = (
    "waiting",
    "pretraining",
    "clustering",
    "selecting",
    "evaluating",
    "training",
    "aggregating",
    "done",
    "failed",
)


class ClustererMetrics(Catalogue):
    """The clusterer's metric table."""

    TABLE = (
        Metric("round", Gauge, "round", "Current global round (-1 before the first)."),
        Metric("rounds_total", Gauge, "rounds_planned", "Rounds the federation will run."),
        Metric("phase", Enum, "phase", "Phase of the round state machine.", states=PHASES),
        Metric(
            "round_seconds",
            Histogram,
            "round_duration_seconds",
            "Wall time of a whole round.",
            buckets=DURATION_BUCKETS,
        ),
        Metric(
            "phase_seconds",
            Histogram,
            "round_phase_duration_seconds",
            "Wall time of one phase of a round (evaluate, train, upload, aggregate, publish).",
            ("phase",),
            buckets=DURATION_BUCKETS,
        ),
        Metric("rounds_completed", Counter, "rounds_completed_total", "Rounds finished."),
        Metric("joined", Gauge, "participants_joined", "Participants that joined."),
        Metric("active", Gauge, "participants_active", "Participants heard from recently."),
        Metric("selected", Gauge, "participants_selected", "Participants selected this round."),
        Metric(
            "stragglers",
            Counter,
            "stragglers_total",
            "Selected participants a round closed without (over-selection had enough, or the "
            "deadline passed).",
        ),
        Metric(
            "dropouts",
            Counter,
            "tasks_abandoned_total",
            "--mode async: training tasks that never came back (the participant asked again "
            "without uploading, or the task expired).",
        ),
        Metric(
            "timed_out",
            Counter,
            "participants_timed_out_total",
            "Tasks withdrawn at a deadline.",
            ("task",),
            init=TASKS,
        ),
        Metric(
            "updates_received",
            Counter,
            "updates_received_total",
            "Updates accepted and forwarded.",
        ),
        refusals(),
        Metric(
            "verdicts",
            Counter,
            "evaluations_total",
            "Evaluations received, by verdict: ok, refused (the model was not adopted: "
            "non-finite or absurd values), diverged (its loss was not finite).",
            ("verdict",),
        ),
        Metric(
            "rollbacks",
            Counter,
            "rollbacks_total",
            "Rounds whose model most evaluators refused or found diverged: rolled back.",
        ),
        Metric(
            "convicted",
            Gauge,
            "participants_convicted",
            "Participants never selected again: each was the one untrusted contributor of a "
            "rolled-back round.",
        ),
        Metric("cluster_size", Gauge, "cluster_size", "Members per cluster.", ("cluster",)),
        Metric(
            "cluster_weight",
            Gauge,
            "cluster_weight",
            "q-weight of each cluster in the last merge.",
            ("cluster",),
        ),
        Metric(
            "cluster_accuracy",
            Gauge,
            "cluster_accuracy",
            "Mean test accuracy of the newest global model per cluster.",
            ("cluster",),
        ),
        Metric(
            "personal_cluster_accuracy",
            Gauge,
            "personal_cluster_accuracy",
            "Mean test accuracy of each cluster's own model (--personalise).",
            ("cluster",),
        ),
        Metric(  # labelled: no series (not a misleading 0) without --personalise
            "personal_accuracy",
            Gauge,
            "personal_accuracy",
            "Test accuracy of the models participants serve, their clusters' (--personalise): "
            "the mean and the worst participant's.",
            ("stat",),
        ),
        Metric("accuracy_mean", Gauge, "accuracy_mean", "Mean test accuracy over participants."),
        Metric(
            "accuracy_std",
            Gauge,
            "accuracy_std",
            "Standard deviation of accuracy across participants (fairness).",
        ),
        Metric("accuracy_worst", Gauge, "accuracy_worst", "Worst participant's accuracy."),
        Metric("loss_mean", Gauge, "loss_mean", "Mean test loss over participants."),
        Metric(
            "clustering_seconds",
            Histogram,
            "clustering_duration_seconds",
            "Time to cluster the pre-training deltas.",
            buckets=DURATION_BUCKETS,
        ),
        Metric("purity", Gauge, "clustering_purity", "Purity against known groups (-1: unknown)."),
        Metric("model_version", Gauge, "model_version", "Global model version."),
        Metric(
            "dp_epsilon",
            Gauge,
            "dp_epsilon",
            "--dp central: epsilon spent so far, at the run's --dp-delta (the accountant's).",
        ),
    )
