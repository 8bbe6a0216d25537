"""deploy/k8s: strictly valid, linted, and true to the code.

The last test reads the manifests, takes each container's command, arguments and
environment (ConfigMaps and the Secret resolved, Service DNS names mapped to loopback
ports), starts them as local processes and runs a short federation: a flag the code lacks,
a wrong environment name or a probe on a port nothing listens on fails it.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_client import call_metadata, channel
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from tests.deploy.checkov import run_checkov

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
TOKEN = "manifest-test-token"  # stands in for the flclustering-auth Secret
ROUNDS = "2"  # the one value changed from the shipped ConfigMap: a short federation


def documents(directory: Path = K8S) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def test_manifests_validate_strictly_against_kubernetes_1_30():
    import kubernetes_validate

    docs = documents()
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "ConfigMap",
        "Deployment",
        "StatefulSet",
        "Service",
        "ServiceAccount",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    } <= kinds
    assert not (K8S / "kustomization.yaml").exists()
    for version in ("1.30.0", "1.33.0"):
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(workloads(docs)[0])
    broken["spec"]["template"]["spec"]["containers"][0]["imagePolicy"] = "x"  # unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.30.0", strict=True)


def test_checkov_passes_with_justified_exceptions():
    reports, out = run_checkov(K8S)
    summary = reports[0]["summary"]
    assert summary["failed"] == 0, out[-3000:]
    assert summary["passed"] > 200
    # Every exception is written next to its object, with a reason.
    for doc in workloads(documents()):
        for key, value in doc["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, reason = value.partition("=")
                assert check.startswith("CKV_") and len(reason) > 10, value


def test_hadolint_passes_and_image_matches_manifests_and_readme():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    run = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert re.search(r"^USER 10001", dockerfile, re.M)
    readme = (ROOT / "README.md").read_text()
    for doc in workloads(documents()):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            assert c["command"][: len(entry)] == entry
            module = c["command"][len(entry)]
            assert f"python -m {module}" in readme, module


# ---- running the manifests as local processes ----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pod:
    name: str
    labels: dict[str, str]
    container: dict[str, Any]
    ports: dict[str, int] = field(default_factory=dict)  # containerPort name/number -> local
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


def pods_of(docs: list[dict[str, Any]]) -> list[Pod]:
    pods = []
    for w in workloads(docs):
        replicas = int(w["spec"].get("replicas", 1))
        spec = w["spec"]["template"]
        for ordinal in range(replicas):
            name = f"{w['metadata']['name']}-{ordinal}"
            labels = dict(spec["metadata"]["labels"])
            if w["kind"] == "StatefulSet":
                labels["apps.kubernetes.io/pod-index"] = str(ordinal)
            (container,) = spec["spec"]["containers"]
            pod = Pod(name, labels, container)
            for port in container.get("ports", []):
                local = free_port()
                pod.ports[str(port["containerPort"])] = local
                pod.ports[port["name"]] = local
            pods.append(pod)
    return pods


def resolve_env(pod: Pod, docs: list[dict[str, Any]], services: dict[str, str]) -> dict[str, str]:
    configmaps = {d["metadata"]["name"]: dict(d["data"]) for d in docs if d["kind"] == "ConfigMap"}
    out: dict[str, str] = {}
    for source in pod.container.get("envFrom", []):
        out.update(configmaps[source["configMapRef"]["name"]])
    for item in pod.container.get("env", []):
        if "value" in item:
            out[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]
        if "configMapKeyRef" in ref:
            out[item["name"]] = configmaps[ref["configMapKeyRef"]["name"]][
                ref["configMapKeyRef"]["key"]
            ]
        elif "fieldRef" in ref:
            m = re.fullmatch(r"metadata\.labels\['(.+)'\]", ref["fieldRef"]["fieldPath"])
            assert m, ref
            out[item["name"]] = pod.labels[m.group(1)]
        else:
            raise AssertionError(f"unhandled env source {ref}")
    out["FLCLUSTERING_ROUNDS"] = ROUNDS
    # Service DNS names (name, name.ns, name.ns.svc[.cluster.local]) -> loopback ports.
    for key, value in out.items():
        for svc, address in services.items():
            value = re.sub(
                rf"\b{svc}(\.flclustering(\.svc(\.cluster\.local)?)?)?:\d+\b", address, value
            )
        out[key] = value
    return out


def service_addresses(docs: list[dict[str, Any]], pods: list[Pod]) -> dict[str, str]:
    """Each ClusterIP Service's grpc port -> the loopback port of the pod behind it."""
    out = {}
    for svc in (d for d in docs if d["kind"] == "Service"):
        if svc["spec"].get("clusterIP") == "None":
            continue
        backing = [
            p for p in pods if all(p.labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        ]
        assert len(backing) == 1, svc["metadata"]["name"]
        port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
        out[svc["metadata"]["name"]] = f"127.0.0.1:{backing[0].ports[str(port['targetPort'])]}"
    return out


def remap(value: str, mounts: dict[str, Path]) -> str:
    """A path under a volume's mountPath, moved to the folder standing in for the volume."""
    for mount, local in mounts.items():
        if value == mount or value.startswith(mount + "/"):
            return str(local) + value[len(mount) :]
    return value


def start(pod: Pod, env: dict[str, str], mounts: dict[str, Path], logs: Path) -> None:
    # Container ports -> this pod's loopback ports; mount paths -> temporary folders.
    args = [str(a) for a in pod.container.get("args", [])]
    args = [remap(str(pod.ports.get(a, a)) if a.isdigit() else a, mounts) for a in args]
    env = {k: remap(v, mounts) for k, v in env.items()}
    mounted = {m["mountPath"] for m in pod.container.get("volumeMounts", [])}
    assert mounted <= set(mounts), f"{pod.name} mounts {mounted - set(mounts)}"
    command = [sys.executable if c == "python" else c for c in pod.container["command"]]
    pod.log = logs / f"{pod.name}.log"
    with pod.log.open("wb") as fh:
        pod.process = subprocess.Popen(
            [*command, *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=logs,
            env={"PATH": "/usr/bin:/bin", "HOME": str(logs), "PYTHONUNBUFFERED": "1", **env},
        )


def probe(pod: Pod, kind: str, deadline: float) -> None:
    spec = pod.container[kind]
    while True:
        assert pod.process is not None and pod.process.poll() is None, (
            f"{pod.name} exited: {pod.log.read_text()[-1500:] if pod.log else ''}"
        )
        try:
            if "grpc" in spec:
                port = pod.ports[str(spec["grpc"]["port"])]
                stub = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{port}"))
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=spec["grpc"].get("service", "")),
                    timeout=2,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            else:
                port = pod.ports[str(spec["httpGet"]["port"])]
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}{spec['httpGet']['path']}", timeout=2
                ) as r:
                    if r.status == 200:
                        return
        except (grpc.RpcError, OSError):
            pass
        assert time.monotonic() < deadline, f"{pod.name}: {kind} never succeeded"
        time.sleep(0.3)


def test_manifests_run_as_local_processes_and_a_federation_completes(tmp_path):
    docs = documents()
    pods = pods_of(docs)
    services = service_addresses(docs, pods)
    mounts = {
        "/var/run/secrets/flclustering": tmp_path / "secret",  # the flclustering-auth Secret
        "/var/lib/flclustering": tmp_path / "state",  # the PersistentVolumeClaims
        "/tmp": tmp_path / "tmp",
        "/data": tmp_path / "data",
    }
    mounts["/var/run/secrets/flclustering"].mkdir()
    (mounts["/var/run/secrets/flclustering"] / "token").write_text(TOKEN)
    order = sorted(
        pods,
        key=lambda p: ["aggregator", "clusterer", "participant"].index(
            p.labels["app.kubernetes.io/name"]
        ),
    )
    try:
        for pod in order:
            per_pod = {
                m: (p / pod.name if m in ("/var/lib/flclustering", "/tmp") else p)
                for m, p in mounts.items()
            }
            for p in per_pod.values():
                p.mkdir(parents=True, exist_ok=True)
            start(pod, resolve_env(pod, docs, services), per_pod, tmp_path)
        deadline = time.monotonic() + 180
        for pod in order:
            for kind in ("readinessProbe", "livenessProbe"):
                probe(pod, kind, deadline)
        stub = pb_grpc.ClustererStub(channel(services["clusterer"]))
        deadline = time.monotonic() + 300
        while True:
            status = stub.GetStatus(
                pb.GetStatusRequest(), metadata=call_metadata(TOKEN), timeout=10
            )
            if status.done:
                break
            assert status.phase != "failed", status.error
            assert time.monotonic() < deadline, f"stuck in {status.phase} round {status.round}"
            time.sleep(0.5)
        assert len(status.history) == int(ROUNDS)
        assert status.participants == sum(
            1 for p in pods if p.labels["app.kubernetes.io/name"] == "participant"
        )
        assert status.model_version == int(ROUNDS)  # every round aggregated
        assert all(h.evaluated == status.participants for h in status.history)
        assert status.purity == 1.0  # participant-k computed shard k: the ordinal reached it
        # The aggregator wrote its state where the PersistentVolumeClaim is mounted.
        assert list((mounts["/var/lib/flclustering"] / "aggregator-0").glob("model-v*.safetensors"))
    finally:
        for pod in pods:
            if pod.process is not None and pod.process.poll() is None:
                pod.process.terminate()
        for pod in pods:
            if pod.process is not None:
                try:
                    pod.process.wait(30)
                except subprocess.TimeoutExpired:
                    pod.process.kill()
