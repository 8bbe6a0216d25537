"""What a participant process exports, labelled by hosted participant (bounded by --count)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from services.common.metrics import DURATION_BUCKETS, Catalogue, Metric

P = ("participant",)


class ParticipantMetrics(Catalogue):
    """The participant's metric table."""

    TABLE = (
        Metric(
            "training_seconds",
            Histogram,
            "local_training_duration_seconds",
            "Local training time per task.",
            P,
            buckets=DURATION_BUCKETS,
        ),
        Metric(
            "training_loss",
            Gauge,
            "training_loss",
            "Mean training loss of the last local epoch.",
            P,
        ),
        Metric("examples", Counter, "examples_processed_total", "Training examples processed.", P),
        Metric("tasks", Counter, "tasks_total", "Tasks done, by kind.", ("participant", "kind")),
        Metric(
            "test_accuracy",
            Gauge,
            "participant_accuracy",
            "Test accuracy of the last evaluated global model.",
            P,
        ),
        Metric(
            "dp_epsilon",
            Gauge,
            "participant_dp_epsilon",
            "--dp local: epsilon this participant's DP-SGD has spent (at --dp-delta).",
            P,
        ),
        Metric(
            "slowness",
            Gauge,
            "participant_slowness_factor",
            "--speed-spread: how many times its measured training time a participant's "
            "simulated device takes to deliver an update (1: the process's own speed).",
            P,
        ),
        Metric("device", Info, "device", "Device the participants of this process train on."),
    )
