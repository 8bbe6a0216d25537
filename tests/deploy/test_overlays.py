"""deploy/kustomize overlays: rendered with kubectl's kustomize, valid, linted, and doing
what each promises."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.transport.client import call_metadata, channel
from services.transport.credentials import Authority, write_kit
from tests.deploy.checkov import run_checkov
from tests.deploy.test_manifests import (
    CERT_MANAGER_KINDS,
    SHARED_TOKEN,
    check_cert_manager_resource,
    identity_volume,
    pods_of,
    probe,
    refused,
    resolve_env,
    service_addresses,
    start,
    stop,
    volume_folders,
)

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "kustomize" / "overlays"
NAMES = ("cpu", "registry", "prometheus-operator", "edge")
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
CLI = (sys.executable, "-m", "services.cli")  # `flclustering`


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
        if doc["kind"] in CERT_MANAGER_KINDS:
            check_cert_manager_resource(doc)
            continue
        kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_base_lists_every_manifest():
    base = yaml.safe_load((OVERLAYS.parent / "base" / "kustomization.yaml").read_text())
    listed = {Path(r).name for r in base["resources"]}
    assert listed == {p.name for p in (ROOT / "deploy" / "k8s").glob("*.yaml")}


@pytest.mark.parametrize("name", NAMES)
def test_overlay_keeps_per_pod_identities_and_no_shared_token(name):
    docs = render(name)
    assert not SHARED_TOKEN.search(json.dumps(docs))
    assert any(d["kind"] == "Issuer" for d in docs)
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet"):
            spec = d["spec"]["template"]["spec"]
            _, mount = identity_volume(spec)
            env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
            assert env["FLCLUSTERING_TLS_DIR"] == mount, d["metadata"]["name"]


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


def test_edge_overlay_serves_tls_and_participant_tokens_through_a_load_balancer():
    docs = render("edge")
    edge = find(docs, "Service", "clusterer-edge")
    assert edge["spec"]["type"] == "LoadBalancer"
    (port,) = edge["spec"]["ports"]
    assert port["port"] == 443
    clusterer = find(docs, "Deployment", "clusterer")["spec"]["template"]["spec"]
    c = clusterer["containers"][0]
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert str(named[port["targetPort"]]) == c["args"][c["args"].index("--tls-port") + 1]
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in clusterer["volumes"]}

    def secret_behind(flag: str) -> str:
        path = c["args"][c["args"].index(flag) + 1]
        (mount,) = [m for m in mounts if path.startswith(m + "/")]
        return volumes[mounts[mount]]["secret"]["secretName"]

    # The TLS port's certificate: cert-manager's, for the edge name only, serving only, with
    # no SPIFFE identity (so its key, in a Secret, cannot act as the clusterer).
    cert = find(docs, "Certificate", "clusterer-edge")
    assert secret_behind("--tls-cert") == secret_behind("--tls-key") == cert["spec"]["secretName"]
    assert set(cert["spec"]["usages"]) == {"server auth", "digital signature"}
    assert not {"uris", "commonName", "isCA"} & set(cert["spec"])
    issuer = find(docs, "Issuer", cert["spec"]["issuerRef"]["name"])
    assert cert["spec"]["issuerRef"]["kind"] == issuer["kind"]
    # Edge participants' tokens: the clusterer reads only their digests, from a Secret.
    assert secret_behind("--participant-tokens") == "flclustering-participant-tokens"
    tokens_path = c["args"][c["args"].index("--participant-tokens") + 1]
    assert tokens_path.endswith("/tokens.sha256.json")  # the file `flclustering tokens` writes
    # The flags exist in the code.
    helptext = subprocess.run(
        [sys.executable, "-m", "services.clusterer", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--tls-port", "--tls-cert", "--tls-key", "--participant-tokens"):
        assert flag in helptext
    policy = find(docs, "NetworkPolicy", "edge-to-clusterer")
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == named["grpc-tls"]


def issue_like_cert_manager(ca: Authority, spec: dict[str, Any]) -> tuple[bytes, bytes]:
    """What cert-manager's CA issuer signs for a Certificate like edge.yaml's: its dnsNames
    and usages only (no subject, no URI), an ECDSA P-256 key in PKCS#8."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    assert spec["privateKey"] == {
        "algorithm": "ECDSA",
        "size": 256,
        "encoding": "PKCS8",
        "rotationPolicy": "Always",
    }
    extended = {"server auth": ExtendedKeyUsageOID.SERVER_AUTH}
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in spec["dnsNames"]]),
            critical=True,  # the subject is empty
        )
        .add_extension(
            x509.ExtendedKeyUsage([extended[u] for u in spec["usages"] if u in extended]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


def test_edge_overlay_admits_a_token_participant_over_tls(tmp_path):
    """The rendered edge overlay's aggregator and clusterer as local processes: an edge
    device with its own token (made by `flclustering tokens` command) joins over
    the TLS port as itself, and only as itself."""
    docs = render("edge")
    pods = [p for p in pods_of(docs) if p.labels["app.kubernetes.io/name"] != "participant"]
    services = service_addresses(docs, pods)
    kit = tmp_path / "kit"
    ca = write_kit(kit, [])  # the CA behind the Issuer; edge devices get its ca.crt
    edge_id = "participant-00009"
    tokens = tmp_path / "edge-tokens"
    made = subprocess.run(
        [*CLI, "tokens", "--out", str(tokens), "--participant", edge_id],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    cert = find(docs, "Certificate", "clusterer-edge")["spec"]
    crt, key = issue_like_cert_manager(ca, cert)
    secrets = {
        cert["secretName"]: {"tls.crt": crt, "tls.key": key, "ca.crt": ca.cert},
        "flclustering-participant-tokens": {
            "tokens.sha256.json": (tokens / "tokens.sha256.json").read_bytes()
        },
    }
    try:
        for pod in pods:
            mounts = volume_folders(pod, ca, tmp_path / "volumes", secrets)
            start(pod, resolve_env(pod, docs, services), mounts, tmp_path)
        deadline = time.monotonic() + 120
        for pod in pods:
            probe(pod, "readinessProbe", deadline)
        (clusterer,) = [p for p in pods if p.labels["app.kubernetes.io/name"] == "clusterer"]
        (port,) = find(docs, "Service", "clusterer-edge")["spec"]["ports"]
        address = f"127.0.0.1:{clusterer.ports[port['targetPort']]}"
        edge = pb_grpc.ClustererStub(
            channel(address, tls_ca=str(kit / "ca.crt"), tls_server_name=cert["dnsNames"][0])
        )
        token = (tokens / f"{edge_id}.token").read_text().strip()

        def join(pid: str, token: str) -> pb.JoinResponse:
            request = pb.JoinRequest(participant_id=pid, num_train=10, num_test=5, group=-1)
            return edge.Join(request, metadata=call_metadata(token), timeout=10)

        assert join(edge_id, token).participant_id == edge_id
        assert refused(lambda: join("participant-0", token)) == grpc.StatusCode.PERMISSION_DENIED
        wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        assert refused(lambda: join(edge_id, wrong)) == grpc.StatusCode.UNAUTHENTICATED
        plain = pb_grpc.ClustererStub(channel(address))  # TLS only on the edge port
        assert refused(lambda: plain.Join(pb.JoinRequest(), timeout=5)) in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.UNAUTHENTICATED,
        )
    finally:
        stop(pods)


def test_checkov_passes_on_rendered_overlays(tmp_path):
    for name in NAMES:
        docs = [d for d in render(name) if d["kind"] not in OPERATOR_KINDS]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    reports, out = run_checkov(tmp_path)
    failed = sum(r["summary"]["failed"] for r in reports)
    assert failed == 0, out[-3000:]
