"""Generate the Grafana dashboards, the alerting rules and their Kubernetes ConfigMaps.

    python scripts/gen_observability.py [--stall-window 15m] [--namespace flclustering]

Writes deploy/grafana/dashboards/*.json, deploy/prometheus/alerts.yml and, for
`kubectl apply -f deploy/k8s`, deploy/k8s/grafana-dashboards.yaml (label
grafana_dashboard: "1", picked up by Grafana's dashboard sidecar) and
deploy/k8s/prometheus-alerts.yaml. tests/deploy checks the committed files are what this
writes, runs every panel's query against a real Prometheus, and runs promtool on the rules.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
RANGE = "$__range"

# (title, unit, [(expr, legend)]) per panel, per dashboard.
Panel = tuple[str, str, list[tuple[str, str]]]
DASHBOARDS: dict[str, tuple[str, list[Panel]]] = {
    "flclustering-training": (
        "FLClustering / Training progress",
        [
            (
                "Mean test accuracy (global model; cluster models with --personalise)",
                "percentunit",
                [
                    ("flclustering_accuracy_mean", "global model"),
                    ('flclustering_personal_accuracy{stat="mean"}', "cluster models"),
                ],
            ),
            (
                "Worst participant accuracy",
                "percentunit",
                [
                    ("flclustering_accuracy_worst", "global model"),
                    ('flclustering_personal_accuracy{stat="worst"}', "cluster models"),
                ],
            ),
            ("Fairness: std of accuracy", "percentunit", [("flclustering_accuracy_std", "std")]),
            ("Mean test loss", "none", [("flclustering_loss_mean", "loss")]),
            (
                "Accuracy per cluster: global model and the cluster's own (--personalise)",
                "percentunit",
                [
                    ("flclustering_cluster_accuracy", "global, cluster {{cluster}}"),
                    ("flclustering_personal_cluster_accuracy", "own model, cluster {{cluster}}"),
                ],
            ),
            (
                "q-weight per cluster",
                "percentunit",
                [("flclustering_cluster_weight", "cluster {{cluster}}")],
            ),
            ("Cluster sizes", "none", [("flclustering_cluster_size", "cluster {{cluster}}")]),
            (
                "Round and model version",
                "none",
                [
                    ("max(flclustering_round)", "round"),
                    ("max(flclustering_model_version)", "version"),
                ],
            ),
            (
                "New global versions per minute (rounds; full buffers with --mode async)",
                "opm",
                [(f"sum(rate(flclustering_versions_made_total[{RATE}])) * 60", "versions")],
            ),
            (
                "Asynchronous rounds: updates waiting in each cluster's buffer",
                "none",
                [("flclustering_async_buffer_updates", "cluster {{cluster}}")],
            ),
            (
                "Asynchronous rounds: staleness of merged updates (versions behind)",
                "none",
                [
                    (
                        f"histogram_quantile({q}, sum by (le) (rate(flclustering_async_update_staleness_versions_bucket[{RATE}])))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
            ),
            (
                "Clustering purity (known groups)",
                "percentunit",
                [("flclustering_clustering_purity", "purity")],
            ),
            (
                "Differential privacy: epsilon spent (central: the federation; local: each "
                "participant's)",
                "none",
                [
                    ("max(flclustering_dp_epsilon)", "central"),
                    ("max(flclustering_participant_dp_epsilon)", "local, the most spent"),
                ],
            ),
            (
                "Differential privacy: clip bound and noise per coordinate (--dp central)",
                "none",
                [
                    ("max(flclustering_dp_clip_bound)", "clip bound C"),
                    ("max(flclustering_dp_noise_sigma)", "noise sigma"),
                ],
            ),
        ],
    ),
    "flclustering-robustness": (
        "FLClustering / Robustness",
        [
            (
                "Rejected updates by reason",
                "ops",
                [
                    (
                        f"sum by (reason) (rate(flclustering_updates_rejected_total[{RATE}]))",
                        "{{reason}}",
                    )
                ],
            ),
            (
                "Suspected attackers (norm screen, non-finite, near-twins)",
                "none",
                [
                    (
                        f'sum(increase(flclustering_updates_rejected_total{{reason=~"norm|non-finite|near-twin"}}'
                        f"[{RANGE}])) or vector(0)",
                        "suspected",
                    )
                ],
            ),
            (
                "Robust-rule rejections per cluster",
                "none",
                [
                    (
                        f"sum by (cluster) (increase(flclustering_robust_rejections_total[{RANGE}]))",
                        "cluster {{cluster}}",
                    )
                ],
            ),
            (
                "Divergence guard: merges refused, rounds rolled back, participants convicted",
                "none",
                [
                    (
                        f"sum(increase(flclustering_merges_refused_total[{RANGE}])) or vector(0)",
                        "merges refused",
                    ),
                    (
                        f"sum(increase(flclustering_rollbacks_total[{RANGE}])) or vector(0)",
                        "rolled back",
                    ),
                    ("max(flclustering_participants_convicted) or vector(0)", "convicted"),
                ],
            ),
            (
                "Evaluations by verdict (refused: not adopted; diverged: loss not finite)",
                "ops",
                [
                    (
                        f"sum by (verdict) (rate(flclustering_evaluations_total[{RATE}]))",
                        "{{verdict}}",
                    )
                ],
            ),
            (
                "Cluster models dropped or shortened by the cluster check",
                "none",
                [
                    (
                        f"sum(increase(flclustering_cluster_models_rejected_total[{RANGE}]))",
                        "dropped",
                    ),
                    (
                        f"sum(increase(flclustering_cluster_models_shortened_total[{RANGE}]))",
                        "shortened",
                    ),
                ],
            ),
            (
                "Median fallbacks (Krum precondition failed)",
                "none",
                [(f"sum(increase(flclustering_robust_fallbacks_total[{RANGE}]))", "fallbacks")],
            ),
            (
                "Rejection share of received updates",
                "percentunit",
                [
                    (
                        f'sum(rate(flclustering_updates_rejected_total{{reason!="robust-rule"}}[{RATE}]))'
                        f" / clamp_min(sum(rate(flclustering_updates_received_total[{RATE}])), 1e-9)"
                        " or vector(0)",
                        "share",
                    )
                ],
            ),
        ],
    ),
    "flclustering-system": (
        "FLClustering / System",
        [
            (
                "RPCs by method and code",
                "reqps",
                [
                    (
                        f"sum by (grpc_method, grpc_code) (rate(flclustering_grpc_server_handled_total[{RATE}]))",
                        "{{grpc_method}} {{grpc_code}}",
                    )
                ],
            ),
            (
                "RPC errors",
                "reqps",
                [
                    (
                        f'sum by (grpc_method) (rate(flclustering_grpc_server_handled_total{{grpc_code!="OK"}}'
                        f"[{RATE}])) or vector(0)",
                        "{{grpc_method}}",
                    )
                ],
            ),
            (
                "Server RPC latency p95",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, grpc_method) "
                        f"(rate(flclustering_grpc_server_handling_seconds_bucket[{RATE}])))",
                        "{{grpc_method}}",
                    )
                ],
            ),
            (
                "Client RPC latency p95",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (le, grpc_method) "
                        f"(rate(flclustering_grpc_client_handling_seconds_bucket[{RATE}])))",
                        "{{grpc_method}}",
                    )
                ],
            ),
            (
                "Model bytes received / sent",
                "Bps",
                [
                    (
                        f"sum by (job) (rate(flclustering_received_bytes_total[{RATE}]))",
                        "in {{job}}",
                    ),
                    (f"sum by (job) (rate(flclustering_sent_bytes_total[{RATE}]))", "out {{job}}"),
                ],
            ),
            (
                "Round duration",
                "s",
                [
                    (
                        f"histogram_quantile(0.5, sum by (le) (rate(flclustering_round_duration_seconds_bucket[{RATE}])))",
                        "p50",
                    ),
                    (
                        f"histogram_quantile(0.95, sum by (le) (rate(flclustering_round_duration_seconds_bucket[{RATE}])))",
                        "p95",
                    ),
                ],
            ),
            (
                "Round phases (mean)",
                "s",
                [
                    (
                        f"sum by (phase) (rate(flclustering_round_phase_duration_seconds_sum[{RATE}])) / "
                        f"clamp_min(sum by (phase) (rate(flclustering_round_phase_duration_seconds_count[{RATE}])), 1e-9)",
                        "{{phase}}",
                    ),
                ],
            ),
            (
                "Aggregation and clustering time",
                "s",
                [
                    (
                        f"sum(rate(flclustering_aggregation_duration_seconds_sum[{RATE}])) / "
                        f"clamp_min(sum(rate(flclustering_aggregation_duration_seconds_count[{RATE}])), 1e-9)",
                        "aggregation (mean)",
                    ),
                    ("max(flclustering_clustering_duration_seconds_sum)", "clustering (total)"),
                ],
            ),
            (
                "Work lost per minute: stragglers, abandoned tasks, stale updates refused",
                "opm",
                [
                    (
                        f"sum(rate(flclustering_stragglers_total[{RATE}])) * 60",
                        "stragglers (a round closed without them)",
                    ),
                    (
                        f"sum(rate(flclustering_tasks_abandoned_total[{RATE}])) * 60",
                        "abandoned tasks (--mode async)",
                    ),
                    (
                        f"sum(rate(flclustering_async_updates_stale_total[{RATE}])) * 60",
                        "stale updates refused (--mode async)",
                    ),
                ],
            ),
            (
                "Update size p50",
                "bytes",
                [
                    (
                        f"histogram_quantile(0.5, sum by (le) (rate(flclustering_update_size_bytes_bucket[{RATE}])))",
                        "p50",
                    )
                ],
            ),
            (
                "Releases running, per job (a rolling upgrade: what is left to upgrade)",
                "none",
                [
                    (
                        "count by (job, version, revision) (flclustering_build_info)",
                        "{{job}} {{version}} {{revision}}",
                    )
                ],
            ),
        ],
    ),
    "flclustering-participants": (
        "FLClustering / Participants",
        [
            (
                "Participants joined, active, selected",
                "none",
                [
                    ("max(flclustering_participants_joined)", "joined"),
                    ("max(flclustering_participants_active)", "active"),
                    ("max(flclustering_participants_selected)", "selected"),
                ],
            ),
            (
                "Timed-out tasks",
                "none",
                [
                    (
                        f"sum by (task) (increase(flclustering_participants_timed_out_total[{RANGE}]))"
                        " or vector(0)",
                        "{{task}}",
                    )
                ],
            ),
            (
                "Local training time p95",
                "s",
                [
                    (
                        "histogram_quantile(0.95, sum by (le) "
                        f"(rate(flclustering_local_training_duration_seconds_bucket[{RATE}])))",
                        "p95",
                    )
                ],
            ),
            (
                "Training loss per participant",
                "none",
                [("flclustering_training_loss", "{{participant}}")],
            ),
            (
                "Examples processed per second",
                "none",
                [(f"sum(rate(flclustering_examples_processed_total[{RATE}]))", "examples/s")],
            ),
            (
                "Test accuracy per participant",
                "percentunit",
                [("flclustering_participant_accuracy", "{{participant}}")],
            ),
            (
                "Devices in use",
                "none",
                [("count by (device) (flclustering_device_info)", "{{device}}")],
            ),
            (
                "Simulated devices: slowness factor per participant (--speed-spread)",
                "none",
                [("flclustering_participant_slowness_factor", "{{participant}}")],
            ),
        ],
    ),
}


def dashboard(uid: str, title: str, panels: list[Panel]) -> dict[str, Any]:
    """A Grafana dashboard (schema 39) with a Prometheus data-source variable."""
    out = []
    for i, (ptitle, unit, targets) in enumerate(panels):
        out.append(
            {
                "id": i + 1,
                "type": "timeseries",
                "title": ptitle,
                "datasource": DS,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {"refId": chr(65 + j), "datasource": DS, "expr": expr, "legendFormat": legend}
                    for j, (expr, legend) in enumerate(targets)
                ],
            }
        )
    return {
        "uid": uid,
        "title": title,
        "tags": ["flclustering"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                }
            ]
        },
        "panels": out,
    }


def alert_rules(stall_window: str) -> str:
    """The alerting rules as Prometheus rule-file YAML."""
    return f"""# Generated by scripts/gen_observability.py; edit there, not here.
groups:
  - name: flclustering
    rules:
      - alert: FLClusteringNoRoundProgress
        expr: |
          sum(increase(flclustering_rounds_completed_total[{stall_window}])) == 0
          and on() sum(flclustering_phase{{flclustering_phase=~"done|failed|waiting"}}) == 0
        for: 2m
        labels:
          severity: warning
        annotations:
          summary: No federation round finished in the last {stall_window}
          description: The clusterer is running but no round completed; look at participants and the aggregator.
      - alert: FLClusteringHighRejectionRate
        expr: |
          sum(rate(flclustering_updates_rejected_total{{reason!="robust-rule"}}[10m]))
            / clamp_min(sum(rate(flclustering_updates_received_total[10m])), 1e-9) > 0.25
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: More than 25% of updates are refused or screened out
          description: Updates fail validation, the norm screen or the near-twin screen; an attack or a broken client is likely.
      - alert: FLClusteringParticipantsDropping
        expr: |
          max(flclustering_participants_active) < 0.8 * max(flclustering_participants_joined)
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: Fewer than 80% of joined participants are active
          description: "{{{{ $value }}}} participants active; rounds may miss their minimum share."
      - alert: FLClusteringModelRefused
        expr: |
          (sum(increase(flclustering_merges_refused_total[{stall_window}])) or vector(0))
            + (sum(increase(flclustering_rollbacks_total[{stall_window}])) or vector(0)) > 0
        labels:
          severity: critical
        annotations:
          summary: The federation refused or rolled back a global model in the last {stall_window}
          description: A merge left any sane range or most evaluators refused the new model; the last good version is kept. Look at the rounds' merge_refused, rollback_reason and convicted in GetStatus or history.json.
      - alert: FLClusteringClusterLagging
        expr: |
          flclustering_cluster_accuracy < on() group_left() (avg(flclustering_cluster_accuracy) - 0.2)
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: Cluster {{{{ $labels.cluster }}}} is served far worse than the others
          description: Its accuracy is more than 20 points below the clusters' mean.
"""


def configmap(name: str, namespace: str, labels: dict[str, str], files: dict[str, str]) -> str:
    """A ConfigMap manifest carrying files (block scalars keep them readable)."""
    lines = [
        "# Generated by scripts/gen_observability.py; edit there, not here.",
        "apiVersion: v1",
        "kind: ConfigMap",
        "metadata:",
        f"  name: {name}",
        f"  namespace: {namespace}",
        "  labels:",
    ]
    lines += [f'    {k}: "{v}"' for k, v in labels.items()]
    lines.append("data:")
    for fname, text in files.items():
        lines.append(f"  {fname}: |")
        lines += [f"    {ln}" if ln else "" for ln in text.rstrip("\n").split("\n")]
    return "\n".join(lines) + "\n"


def generate(root: Path, stall_window: str = "15m", namespace: str = "flclustering") -> list[Path]:
    """Write every generated file under root; return their paths."""
    written = []
    boards = {}
    for uid, (title, panels) in DASHBOARDS.items():
        text = json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
        path = root / "deploy" / "grafana" / "dashboards" / f"{uid}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        boards[f"{uid}.json"] = text
        written.append(path)
    rules = alert_rules(stall_window)
    path = root / "deploy" / "prometheus" / "alerts.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rules)
    written.append(path)
    k8s = root / "deploy" / "k8s"
    k8s.mkdir(parents=True, exist_ok=True)
    common = {"app.kubernetes.io/part-of": "flclustering"}
    (k8s / "grafana-dashboards.yaml").write_text(
        configmap(
            "flclustering-dashboards", namespace, {**common, "grafana_dashboard": "1"}, boards
        )
    )
    (k8s / "prometheus-alerts.yaml").write_text(
        configmap(
            "flclustering-alerts",
            namespace,
            {**common, "prometheus_rule": "1"},
            {"flclustering-alerts.yml": rules},
        )
    )
    written += [k8s / "grafana-dashboards.yaml", k8s / "prometheus-alerts.yaml"]
    operator = (
        root / "deploy" / "kustomize" / "overlays" / "prometheus-operator" / "prometheusrule.yaml"
    )
    operator.parent.mkdir(parents=True, exist_ok=True)
    groups = rules.split("\n", 1)[1]  # drop the "generated" comment line
    operator.write_text(
        "# Generated by scripts/gen_observability.py; edit there, not here.\n"
        "apiVersion: monitoring.coreos.com/v1\nkind: PrometheusRule\nmetadata:\n"
        f"  name: flclustering-alerts\n  namespace: {namespace}\n  labels:\n"
        '    app.kubernetes.io/part-of: "flclustering"\nspec:\n'
        + "\n".join(f"  {ln}" if ln else "" for ln in groups.rstrip("\n").split("\n"))
        + "\n"
    )
    written.append(operator)
    return written


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--stall-window",
        default="15m",
        help="how long without a finished round before FLClusteringNoRoundProgress",
    )
    p.add_argument("--namespace", default="flclustering")
    a = p.parse_args()
    for path in generate(ROOT, a.stall_window, a.namespace):
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
