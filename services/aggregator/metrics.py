"""What the aggregator exports."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from services.common.figures import rejection_layer
from services.common.metrics import (
    DURATION_BUCKETS,
    SIZE_BUCKETS,
    Catalogue,
    Metric,
    refusals,
)

DEFENCE_REASONS = ("norm", "non-finite", "robust-rule")


def reason_label(reason: str) -> str:
    """A defence rejection reason as a bounded label value (its layer)."""
    return rejection_layer(reason)


class AggregatorMetrics(Catalogue):
    """The aggregator's metric table."""

    TABLE = (
        Metric("model_version", Gauge, "model_version", "Global model version."),
        Metric(
            "policy",
            Info,
            "defence_policy",
            "The defence the aggregator was started with (strategy, q, Byzantine share).",
        ),
        Metric(
            "aggregation_seconds",
            Histogram,
            "aggregation_duration_seconds",
            "Time of defence plus merge for a round.",
            buckets=DURATION_BUCKETS,
        ),
        Metric(
            "updates_aggregated",
            Counter,
            "updates_aggregated_total",
            "Updates that entered an aggregation.",
        ),
        refusals(*DEFENCE_REASONS),
        Metric(
            "robust_rejections",
            Counter,
            "robust_rejections_total",
            "Updates the defence rejected, per cluster.",
            ("cluster",),
        ),
        Metric(
            "cluster_rejections",
            Counter,
            "cluster_models_rejected_total",
            "Cluster models dropped by the cluster check.",
        ),
        Metric(
            "cluster_shortenings",
            Counter,
            "cluster_models_shortened_total",
            "Cluster models the cluster check shortened to the round's median update length "
            "(the longer of two, over the factor times the other).",
        ),
        Metric(
            "merges_refused",
            Counter,
            "merges_refused_total",
            "Rounds whose merge the divergence guard refused (non-finite, grown past all "
            "proportion, or a step far beyond the recent ones): the model was kept.",
        ),
        Metric(
            "fallbacks",
            Counter,
            "robust_fallbacks_total",
            "Clusters whose rule fell back to the median.",
        ),
        Metric(
            "dp_sigma",
            Gauge,
            "dp_noise_sigma",
            "--dp central: standard deviation of the last merge's noise per coordinate.",
        ),
        Metric(
            "dp_clip",
            Gauge,
            "dp_clip_bound",
            "--dp central: the norm bound the last round's updates were clipped to.",
        ),
        Metric(
            "dp_clipped",
            Counter,
            "dp_clipped_updates_total",
            "--dp central: updates longer than the bound (scaled down to it).",
        ),
        Metric(
            "buffer_fill",
            Gauge,
            "async_buffer_updates",
            "--mode async: updates waiting in each cluster's buffer.",
            ("cluster",),
        ),
        Metric(
            "staleness",
            Histogram,
            "async_update_staleness_versions",
            "--mode async: versions between the model an update was trained from and the one "
            "it was merged into.",
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16, 32, 64),
        ),
        Metric(
            "versions",
            Counter,
            "versions_made_total",
            "New global versions made (rounds, or full buffers in --mode async).",
        ),
        Metric(
            "stale",
            Counter,
            "async_updates_stale_total",
            "--mode async: updates refused for being more than --max-staleness versions old.",
        ),
        Metric(
            "update_bytes",
            Histogram,
            "update_size_bytes",
            "Size of received updates.",
            buckets=SIZE_BUCKETS,
        ),
    )
