"""deploy/kustomize overlays: rendered with kubectl's kustomize, valid, linted, and doing
what each promises."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.checkov import run_checkov

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "kustomize" / "overlays"
NAMES = ("cpu", "registry", "prometheus-operator", "edge")
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def render(name: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the overlays: run scripts/test"
    run = subprocess.run(
        [kubectl, "kustomize", "--load-restrictor=LoadRestrictionsNone", str(OVERLAYS / name)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


def containers(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        c
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("name", NAMES)
def test_overlay_renders_and_validates_strictly(name):
    import kubernetes_validate

    docs = render(name)
    assert any(d["kind"] == "StatefulSet" for d in docs)
    for doc in docs:
        if doc["kind"] in OPERATOR_KINDS:
            # Custom resources: no Kubernetes schema; check the operator's required shape.
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["metadata"]["namespace"] == "flclustering" and doc["spec"]
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_cpu_overlay_drops_gpus():
    docs = render("cpu")
    participant = find(docs, "StatefulSet", "participant")["spec"]["template"]["spec"]
    text = json.dumps(participant)
    assert "nvidia.com/gpu" not in text and "tolerations" not in participant
    assert participant["containers"][0]["args"][-2:] == ["--device", "cpu"]
    assert all(c["image"] == "flclustering:0.1.0-cpu" for c in containers(docs))


def test_registry_overlay_pins_a_digest():
    for c in containers(render("registry")):
        assert c["image"].startswith("registry.example.com/ml/flclustering@sha256:")


def test_operator_overlay_monitors_every_metrics_port():
    docs = render("prometheus-operator")
    monitor = find(docs, "ServiceMonitor", "flclustering-services")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    services = [
        d
        for d in docs
        if d["kind"] == "Service"
        and d["metadata"]["labels"]["app.kubernetes.io/name"] in ("aggregator", "clusterer")
    ]
    assert all(any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in services)
    pods = find(docs, "PodMonitor", "flclustering-participants")
    assert pods["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    rule = find(docs, "PrometheusRule", "flclustering-alerts")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert alerts == {r["alert"] for g in shipped["groups"] for r in g["rules"]}


def test_edge_overlay_serves_tls_through_a_load_balancer():
    docs = render("edge")
    edge = find(docs, "Service", "clusterer-edge")
    assert edge["spec"]["type"] == "LoadBalancer"
    (port,) = edge["spec"]["ports"]
    assert port["port"] == 443
    clusterer = find(docs, "Deployment", "clusterer")["spec"]["template"]["spec"]
    c = clusterer["containers"][0]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert str(named[port["targetPort"]]) == c["args"][c["args"].index("--tls-port") + 1]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for flag in ("--tls-cert", "--tls-key"):
        path = c["args"][c["args"].index(flag) + 1]
        assert any(path.startswith(m + "/") for m in mounts), path
    # The flags exist in the code.
    helptext = subprocess.run(
        [sys.executable, "-m", "services.clusterer", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--tls-port", "--tls-cert", "--tls-key"):
        assert flag in helptext
    policy = find(docs, "NetworkPolicy", "edge-to-clusterer")
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == named["grpc-tls"]


def test_checkov_passes_on_rendered_overlays(tmp_path):
    for name in NAMES:
        docs = [d for d in render(name) if d["kind"] not in OPERATOR_KINDS]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    reports, out = run_checkov(tmp_path)
    failed = sum(r["summary"]["failed"] for r in reports)
    assert failed == 0, out[-3000:]
