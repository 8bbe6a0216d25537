"""deploy/k8s: strictly valid, linted, and true to the code.

The last test reads the manifests, takes each container's command, arguments and
environment (ConfigMaps resolved, Service DNS names mapped to loopback ports), fills each
pod's cert-manager CSI volume the way the driver would (tls.crt, tls.key and ca.crt for the
identity the volume's attributes ask for, ${POD_NAME} filled in), starts them as local
processes and runs a short federation over mutual TLS: a flag the code lacks, a wrong
environment name, a certificate naming the wrong party or a probe on a port nothing listens
on fails it.
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

from services.common.homomorphic import write_keys
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.transport.client import channel
from services.transport.credentials import Authority, Identity, load_tls, parse_spiffe_id, write_kit
from tests.deploy.checkov import run_checkov

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
ROUNDS = "2"  # the one value changed from the shipped ConfigMap: a short federation
CSI_DRIVER = "csi.cert-manager.io"
CSI = CSI_DRIVER + "/"  # prefix of the driver's volume attributes
CERT_MANAGER_KINDS = {"Issuer", "ClusterIssuer", "Certificate"}  # custom resources: no schema
# How a shared development token would show up in a manifest (env, flag, Secret).
SHARED_TOKEN = re.compile(r"auth[-_]token|flclustering-auth", re.I)
# The Dockerfile's targets, and which one runs each service: the control plane's image for
# the aggregator and the clusterer, the participant image for participants. An image is named
# flclustering-<target> (a registry path may come before it, a tag or digest after it).
TARGET_OF = {
    "services.aggregator": "control-plane",
    "services.clusterer": "control-plane",
    "services.participant": "participant",
}


def documents(directory: Path = K8S) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def check_cert_manager_resource(doc: dict[str, Any]) -> None:
    """cert-manager's custom resources have no Kubernetes schema: check the shape they need."""
    assert doc["apiVersion"] == "cert-manager.io/v1", doc["apiVersion"]
    assert doc["metadata"]["namespace"] == "flclustering" and doc["spec"]
    if doc["kind"] == "Issuer":
        assert set(doc["spec"]) == {"ca"} and doc["spec"]["ca"]["secretName"]
    if doc["kind"] == "Certificate":
        assert doc["spec"]["secretName"] and doc["spec"]["issuerRef"]["name"]


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
        "Issuer",
    } <= kinds
    assert not (K8S / "kustomization.yaml").exists()
    for version in ("1.30.0", "1.33.0"):
        for doc in docs:
            if doc["kind"] in CERT_MANAGER_KINDS:
                check_cert_manager_resource(doc)
                continue
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


def dockerfile_stages(text: str) -> dict[str, str]:
    """Each named stage of a Dockerfile (`FROM ... AS name`) -> its instructions."""
    parts = re.split(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?\s*$", text, flags=re.M | re.I)
    return {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True) if name}


def image_name(image: str) -> str:
    """An image reference without its registry path, tag or digest."""
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


def check_images(docs: list[dict[str, Any]], allowed: dict[str, set[str]] | None = None) -> None:
    """Every workload's containers run the image of their service's target (or, for a
    workload named in `allowed`, one of the images given there)."""
    for doc in workloads(docs):
        name = doc["metadata"]["name"]
        for c in doc["spec"]["template"]["spec"]["containers"]:
            module = c["command"][2]  # python -m services.<name>
            wanted = (allowed or {}).get(name, {f"flclustering-{TARGET_OF[module]}"})
            assert image_name(c["image"]) in wanted, f"{name} runs {c['image']}, not {wanted}"


def test_hadolint_passes_and_image_matches_manifests_and_readme():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    run = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    assert re.search(r"^USER 10001", dockerfile, re.M)
    # Both targets, each running its own services by default.
    stages = dockerfile_stages(dockerfile)
    assert {"control-plane", "participant"} <= set(stages), list(stages)
    for target in ("control-plane", "participant"):
        cmd = json.loads(re.search(r"^CMD (\[.*\])$", stages[target], re.M).group(1))
        assert TARGET_OF[cmd[0]] == target, (target, cmd)
    readme = (ROOT / "README.md").read_text()
    deployment = (ROOT / "docs" / "deployment.md").read_text()
    for target in ("control-plane", "participant"):
        build = f"docker build --target {target} -t flclustering-{target}"
        assert build in readme and build in deployment, build
    docs = documents()
    for doc in workloads(docs):
        for c in doc["spec"]["template"]["spec"]["containers"]:
            assert c["command"][: len(entry)] == entry
            module = c["command"][len(entry)]
            assert f"python -m {module}" in readme, module
    check_images(docs)
    # A participant on the control plane's image (no Parquet reader) fails the check.
    swapped = copy.deepcopy(docs)
    for doc in workloads(swapped):
        (c,) = doc["spec"]["template"]["spec"]["containers"]
        c["image"] = "flclustering-control-plane:0.2.0"
    with pytest.raises(AssertionError, match="participant runs flclustering-control-plane"):
        check_images(swapped)


# ---- identities ------------------------------------------------------------------------


def test_no_manifest_carries_a_shared_token():
    """The shared bearer token is for development only: no variable, flag or Secret of it."""
    for doc in documents():
        assert not SHARED_TOKEN.search(json.dumps(doc)), doc["metadata"]["name"]
        if doc["kind"] == "Secret":
            raise AssertionError(f"a Secret in deploy/k8s: {doc['metadata']['name']}")


def identity_volume(spec: dict[str, Any]) -> tuple[dict[str, str], str]:
    """The pod's one csi.cert-manager.io volume: its attributes and where it is mounted."""
    (volume,) = [v for v in spec["volumes"] if v.get("csi", {}).get("driver") == CSI_DRIVER]
    assert volume["csi"]["readOnly"] is True
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    return volume["csi"]["volumeAttributes"], mount["mountPath"]


def expand(value: str, variables: dict[str, str]) -> str:
    """The driver's variable expansion (Go's os.Expand over the pod's variables)."""
    unknown = set(re.findall(r"\$\{?(\w+)", value)) - set(variables)
    assert not unknown, f"undefined variable(s) {unknown} in {value!r}"
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m[1] or m[2]], value)


def csv(value: str | None) -> list[str]:
    return [s.strip() for s in value.split(",")] if value else []


def requested_identity(attrs: dict[str, str], variables: dict[str, str]) -> Identity:
    """The one identity a volume's certificate will name: its single SPIFFE URI, which the
    common name repeats."""
    (uri,) = csv(expand(attrs[CSI + "uri-sans"], variables))
    identity = parse_spiffe_id(uri)
    assert identity is not None, uri
    assert expand(attrs[CSI + "common-name"], variables) == identity.name
    return identity


def pod_variables(name: str, namespace: str, spec: dict[str, Any]) -> dict[str, str]:
    return {
        "POD_NAME": name,
        "POD_NAMESPACE": namespace,
        "POD_UID": f"uid-of-{name}",
        "SERVICE_ACCOUNT_NAME": spec.get("serviceAccountName", "default"),
    }


def test_every_pod_gets_its_own_identity_from_the_issuer():
    docs = documents()
    (issuer,) = [d for d in docs if d["kind"] == "Issuer"]
    config = next(d["data"] for d in docs if d["kind"] == "ConfigMap")
    dialled = {
        "clusterer": config["CLUSTERER_ADDR"].rpartition(":")[0],
        "aggregator": config["AGGREGATOR_ADDR"].rpartition(":")[0],
    }
    for w in workloads(docs):
        name, ns = w["metadata"]["name"], w["metadata"]["namespace"]
        spec = w["spec"]["template"]["spec"]
        attrs, mount = identity_volume(spec)
        (container,) = spec["containers"]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["FLCLUSTERING_TLS_DIR"] == mount, name
        # No identity key or shared token in a Secret. The one Secret a pod may mount is
        # --secure he's CKKS context (one key pair for the federation, as single-key HE
        # works), optional: participants the secret key, the aggregator the public context
        # only, the clusterer none.
        secrets = [v for v in spec["volumes"] if "secret" in v or "projected" in v]
        he = {"participant": "flclustering-he-secret", "aggregator": "flclustering-he-public"}
        want = [he[name]] if name in he else []
        assert [v["secret"]["secretName"] for v in secrets] == want, name
        assert all(v["secret"]["optional"] for v in secrets), name
        if want:
            key = "he-secret.ctx" if name == "participant" else "he-public.ctx"
            assert env["FLCLUSTERING_HE_KEY"].endswith("/" + key), name
        assert attrs[CSI + "issuer-name"] == issuer["metadata"]["name"]
        assert attrs[CSI + "issuer-kind"] == "Issuer"
        assert attrs.get(CSI + "is-ca", "false") == "false"
        assert attrs[CSI + "fs-group"] == str(spec["securityContext"]["runAsGroup"])
        assert attrs[CSI + "key-algorithm"] == "ECDSA" and attrs[CSI + "key-size"] == "256"
        usages = set(csv(attrs[CSI + "key-usages"]))
        # Files where the code reads them: the driver's defaults, tls.crt/tls.key/ca.crt.
        assert not {CSI + "certificate-file", CSI + "privatekey-file", CSI + "ca-file"} & set(attrs)
        if w["kind"] == "StatefulSet":
            # Every participant pod's credential names that pod and nothing else.
            assert attrs[CSI + "common-name"] == "${POD_NAME}"
            assert attrs[CSI + "uri-sans"] == "spiffe://flclustering/participant/${POD_NAME}"
            assert not {CSI + "dns-names", CSI + "ip-sans", CSI + "literal-subject"} & set(attrs)
            assert usages == {"client auth", "digital signature"}
            pods = [f"{name}-{i}" for i in range(int(w["spec"]["replicas"]))]
            ids = [requested_identity(attrs, pod_variables(p, ns, spec)) for p in pods]
            assert ids == [Identity("participant", p) for p in pods]
        else:
            # A service's name, role and the DNS name its clients dial.
            variables = pod_variables(f"{name}-5d8f7c9b4-x2x7q", ns, spec)
            assert requested_identity(attrs, variables) == Identity(name, name)
            assert dialled[name] in csv(expand(attrs[CSI + "dns-names"], variables))
            assert "server auth" in usages
            assert ("client auth" in usages) == (name == "clusterer")  # it calls the aggregator


def test_probes_use_the_plain_text_health_port_only():
    """The kubelet cannot present a certificate: probes go to --health-port, which no
    Service exposes and no NetworkPolicy opens to other pods."""
    docs = documents()
    exposed = {
        str(p.get("targetPort", p["port"]))
        for d in docs
        if d["kind"] == "Service"
        for p in d["spec"]["ports"]
    }
    opened = {
        str(p["port"])
        for d in docs
        if d["kind"] == "NetworkPolicy"
        for rule in d["spec"].get("ingress", [])
        for p in rule.get("ports", [])
    }
    for w in workloads(docs):
        (c,) = w["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        for kind in ("readinessProbe", "livenessProbe"):
            if "grpc" in c[kind]:
                health = c[kind]["grpc"]["port"]
                assert c["args"][c["args"].index("--health-port") + 1] == str(health)
                assert ports["health"] == health and ports["grpc"] != health
                assert {"health", str(health)}.isdisjoint(exposed | opened)


# ---- running the manifests as local processes ----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    spec: dict[str, Any]
    ports: dict[str, int] = field(default_factory=dict)  # containerPort name/number -> local
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.spec["containers"]
        return container


def pods_of(docs: list[dict[str, Any]]) -> list[Pod]:
    pods = []
    for w in workloads(docs):
        replicas = int(w["spec"].get("replicas", 1))
        template = w["spec"]["template"]
        for ordinal in range(replicas):
            name = f"{w['metadata']['name']}-{ordinal}"
            labels = dict(template["metadata"]["labels"])
            spec = template["spec"]
            if w["kind"] == "StatefulSet":
                labels["apps.kubernetes.io/pod-index"] = str(ordinal)
                # The controller gives each pod its own claim of each template, named
                # <template>-<pod>, as a volume of the template's name.
                claims = [
                    {
                        "name": t["metadata"]["name"],
                        "persistentVolumeClaim": {"claimName": f"{t['metadata']['name']}-{name}"},
                    }
                    for t in w["spec"].get("volumeClaimTemplates", [])
                ]
                if claims:
                    spec = {**spec, "volumes": [*spec.get("volumes", []), *claims]}
            pod = Pod(name, w["metadata"]["namespace"], labels, spec)
            for port in pod.container.get("ports", []):
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
        grpc_ports = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        if svc["spec"].get("clusterIP") == "None" or not grpc_ports:
            continue
        backing = [
            p for p in pods if all(p.labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        ]
        assert len(backing) == 1, svc["metadata"]["name"]
        target = str(grpc_ports[0]["targetPort"])
        out[svc["metadata"]["name"]] = f"127.0.0.1:{backing[0].ports[target]}"
    return out


def fill_identity_volume(pod: Pod, ca: Authority, directory: Path) -> Identity:
    """What cert-manager's CSI driver mounts for this pod: the certificate its volume's
    attributes ask for (variables filled in), signed by the Issuer's CA, as tls.crt, tls.key
    and ca.crt. The Services' DNS names stand in for loopback here, so a server's certificate
    also names 127.0.0.1 (the address its clients dial in this test)."""
    attrs, _ = identity_volume(pod.spec)
    variables = pod_variables(pod.name, pod.namespace, pod.spec)
    identity = requested_identity(attrs, variables)
    dns = csv(expand(attrs.get(CSI + "dns-names", ""), variables))
    cert, key = ca.issue(identity.role, identity.name, dns, ["127.0.0.1"] if dns else [])
    directory.mkdir(parents=True)
    (directory / "tls.crt").write_bytes(cert)
    (directory / "tls.key").write_bytes(key)
    (directory / "tls.key").chmod(0o600)
    (directory / "ca.crt").write_bytes(ca.cert)
    return identity


def volume_folders(
    pod: Pod,
    ca: Authority,
    root: Path,
    secrets: dict[str, dict[str, bytes]] | None = None,
    configmaps: dict[str, dict[str, str]] | None = None,
    container: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Each of the pod's mounts (of its container, or of `container`: an init container)
    -> a folder standing in for the volume: the pod's own (emptyDir, CSI), or the claim's,
    shared by every pod mounting it (a PersistentVolumeClaim); a Secret's keys as files, from
    `secrets`, a ConfigMap's from `configmaps`."""
    volumes = {v["name"]: v for v in pod.spec["volumes"]}
    mounts = {}
    for m in (container or pod.container).get("volumeMounts", []):
        volume = volumes[m["name"]]
        folder = root / m["name"] / pod.name
        if "csi" in volume:
            fill_identity_volume(pod, ca, folder)
        elif "persistentVolumeClaim" in volume:
            folder = root / "claims" / volume["persistentVolumeClaim"]["claimName"]
            folder.mkdir(parents=True, exist_ok=True)
        elif "emptyDir" in volume:
            folder.mkdir(parents=True)
        elif "configMap" in volume:
            data = (configmaps or {}).get(volume["configMap"]["name"])
            if data is None:
                raise AssertionError(f"{pod.name}: no ConfigMap {volume['configMap']['name']}")
            folder.mkdir(parents=True)
            for key, text in data.items():
                (folder / key).write_text(text)
        elif "secret" in volume:
            given = (secrets or {}).get(volume["secret"]["secretName"])
            if given is None and not volume["secret"].get("optional"):
                raise AssertionError(f"{pod.name}: no Secret {volume['secret']['secretName']}")
            folder.mkdir(parents=True)  # an optional Secret not there: an empty folder
            for key, data in (given or {}).items():
                (folder / key).write_bytes(data)
        else:
            raise AssertionError(f"{pod.name}: unhandled volume {volume}")
        mounts[m["mountPath"]] = folder
    return mounts


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
    """The kubelet's probe: plain text, no credential."""
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


def stop(pods: list[Pod]) -> None:
    """SIGTERM every started pod, then SIGKILL what is left after 30 s."""
    for pod in pods:
        if pod.process is not None and pod.process.poll() is None:
            pod.process.terminate()
    for pod in pods:
        if pod.process is not None:
            try:
                pod.process.wait(30)
            except subprocess.TimeoutExpired:
                pod.process.kill()


def refused(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


@pytest.mark.parametrize("secure", ["none", "he"])
def test_manifests_run_as_local_processes_and_a_federation_completes(tmp_path, secure):
    """The manifests' commands as local processes; `he`: the ConfigMap switched to
    encrypted FedAvg, the key Secrets made as the ConfigMap's comment says."""
    docs = documents()
    secrets = None
    if secure == "he":
        config = next(d["data"] for d in docs if d["kind"] == "ConfigMap")
        config |= {"FLCLUSTERING_STRATEGY": "fedavg", "FLCLUSTERING_SECURE": "he"}
        write_keys(tmp_path / "he")
        secrets = {
            f"flclustering-he-{kind}": {
                f"he-{kind}.ctx": (tmp_path / "he" / f"he-{kind}.ctx").read_bytes()
            }
            for kind in ("secret", "public")
        }
    pods = pods_of(docs)
    services = service_addresses(docs, pods)
    # The federation's CA (the Secret flclustering-ca behind the Issuer) and an operator's kit.
    kit = tmp_path / "kit"
    ca = write_kit(kit, [])
    operator = load_tls(kit, "operator")
    order = sorted(
        pods,
        key=lambda p: ["aggregator", "clusterer", "participant"].index(
            p.labels["app.kubernetes.io/name"]
        ),
    )
    participants = [p for p in pods if p.labels["app.kubernetes.io/name"] == "participant"]
    folders: dict[str, dict[str, Path]] = {}
    try:
        for pod in order:
            folders[pod.name] = volume_folders(pod, ca, tmp_path / "volumes", secrets)
            start(pod, resolve_env(pod, docs, services), folders[pod.name], tmp_path)
        deadline = time.monotonic() + 180
        for pod in order:
            for kind in ("readinessProbe", "livenessProbe"):
                probe(pod, kind, deadline)
        stub = pb_grpc.ClustererStub(channel(services["clusterer"], client=operator))
        deadline = time.monotonic() + 300
        while True:
            status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
            if status.done:
                break
            assert status.phase != "failed", status.error
            assert time.monotonic() < deadline, f"stuck in {status.phase} round {status.round}"
            time.sleep(0.5)
        assert len(status.history) == int(ROUNDS)
        assert status.participants == len(participants)
        assert status.model_version == int(ROUNDS)  # every round aggregated
        assert all(h.evaluated == status.participants for h in status.history)
        if secure == "none":  # participant-k computed shard k: the ordinal reached it
            assert status.purity == 1.0
        else:  # encrypted FedAvg learns too (digits: far above chance's 0.1)
            assert status.history[-1].mean_accuracy > 0.5
        # A finished participant stays up (a StatefulSet restarts a pod whose process ends,
        # exit 0 included: a restart loop) and its liveness probe keeps answering.
        for pod in participants:
            probe(pod, "livenessProbe", time.monotonic() + 30)
        # Each participant took part under the name its own certificate gives it: its pod's.
        assert {c.participant_id for c in status.clusters} == {p.name for p in participants}
        # The aggregator wrote its state where the PersistentVolumeClaim is mounted.
        state = folders["aggregator-0"]["/var/lib/flclustering"]
        assert list(state.glob("model-v*.safetensors" if secure == "none" else "sealed-v*"))
        # Every link is mutual TLS: no certificate, no call; a participant reads no status.
        plain = pb_grpc.ClustererStub(channel(services["clusterer"]))
        assert refused(lambda: plain.GetStatus(pb.GetStatusRequest(), timeout=5)) in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.UNAUTHENTICATED,
        )
        tls_dir = folders["participant-0"]["/var/run/secrets/flclustering"]
        as_participant = pb_grpc.ClustererStub(
            channel(services["clusterer"], client=load_tls(tls_dir, "participant-0"))
        )
        code = refused(lambda: as_participant.GetStatus(pb.GetStatusRequest(), timeout=5))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    finally:
        stop(pods)
