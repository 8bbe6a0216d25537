"""deploy/kustomize overlays: rendered with kubectl's kustomize, valid, linted, and doing
what each promises."""

from __future__ import annotations

import datetime
import json
import os
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
from services.core.catalog import is_reference
from services.scaffold import RUN_FILE
from services.transport.client import call_metadata, channel
from services.transport.credentials import Authority, load_tls, write_kit
from tests.deploy.checkov import run_checkov
from tests.deploy.test_manifests import (
    CERT_MANAGER_KINDS,
    SHARED_TOKEN,
    TARGET_OF,
    Pod,
    check_cert_manager_resource,
    check_images,
    identity_volume,
    pods_of,
    probe,
    refused,
    remap,
    resolve_env,
    service_addresses,
    start,
    stop,
    volume_folders,
)

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "kustomize" / "overlays"
NAMES = ("cpu", "registry", "prometheus-operator", "edge", "own-data")
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


@pytest.mark.parametrize("name", NAMES)
def test_overlay_runs_each_service_on_its_target_image(name):
    # own-data: participants run the owners' task image, built on the participant image.
    allowed = {"participant": {"flclustering-task"}} if name == "own-data" else None
    check_images(render(name), allowed)


def test_cpu_overlay_drops_gpus():
    docs = render("cpu")
    participant = find(docs, "StatefulSet", "participant")["spec"]["template"]["spec"]
    text = json.dumps(participant)
    assert "nvidia.com/gpu" not in text and "tolerations" not in participant
    assert participant["containers"][0]["args"][-2:] == ["--device", "cpu"]
    for c in containers(docs):
        assert c["image"] == f"flclustering-{TARGET_OF[c['command'][2]]}:0.2.0-cpu"


def test_registry_overlay_pins_a_digest():
    for c in containers(render("registry")):
        target = TARGET_OF[c["command"][2]]
        assert c["image"].startswith(f"registry.example.com/ml/flclustering-{target}@sha256:")


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


def mounted_volume(spec: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume a container reads `path` from (the mount it lies under)."""
    (mount,) = [
        m
        for m in container["volumeMounts"]
        if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")
    ]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return volume


def flag(container: dict[str, Any], name: str) -> str:
    args = [str(a) for a in container["args"]]
    return args[args.index(name) + 1]


def test_own_data_overlay_gives_each_owner_a_claim_and_the_aggregator_w0():
    import kubernetes_validate

    docs = render("own-data")
    config = find(docs, "ConfigMap", "flclustering-config")["data"]
    # Dataset and model from the run file alone (a variable would override it; the
    # clusterer has no --dataset flag, so it reads the dataset from a run file only).
    assert not {"FLCLUSTERING_DATASET", "FLCLUSTERING_MODEL"} & set(config)
    # Every participant pod reads its own claim, read-only, where --data-dir points.
    participant = find(docs, "StatefulSet", "participant")
    assert int(participant["spec"]["replicas"]) == int(config["FLCLUSTERING_PARTICIPANTS"])
    spec = participant["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == flag(c, "--data-dir")]
    assert mount["readOnly"] is True
    assert mount["name"] not in {v["name"] for v in spec["volumes"]}  # no shared volume
    (template,) = [
        t
        for t in participant["spec"]["volumeClaimTemplates"]
        if t["metadata"]["name"] == mount["name"]
    ]
    # No storage class: only an owner's volume binds a claim, as owner-volume.yaml shows one
    # (for pod 0's claim; not a resource of the overlay).
    assert template["spec"]["storageClassName"] == ""
    example = yaml.safe_load((OVERLAYS / "own-data" / "owner-volume.yaml").read_text())
    kubernetes_validate.validate(example, "1.30.0", strict=True)
    name, ns = participant["metadata"]["name"], participant["metadata"]["namespace"]
    assert example["spec"]["claimRef"] == {
        "namespace": ns,
        "name": f"{template['metadata']['name']}-{name}-0",
    }
    assert example["spec"]["storageClassName"] == template["spec"]["storageClassName"]
    assert set(template["spec"]["accessModes"]) <= set(example["spec"]["accessModes"])
    assert example["spec"]["capacity"] == template["spec"]["resources"]["requests"]
    assert not any(d["kind"] == "PersistentVolume" for d in docs)
    # The run file carrying the sample group, where FLCLUSTERING_SETTINGS points, in every
    # pod that reads settings: the services and the Job writing w0.
    settings = config["FLCLUSTERING_SETTINGS"]
    job = find(docs, "Job", "init-model")
    run = find(docs, "ConfigMap", "flclustering-run")["data"]
    for w in [*(d for d in docs if d["kind"] in ("Deployment", "StatefulSet")), job]:
        pod = w["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert {"configMapRef": {"name": "flclustering-config"}} in container["envFrom"]
        volume = mounted_volume(pod, container, settings)
        assert volume["configMap"]["name"] == "flclustering-run", w["metadata"]["name"]
    assert list(run) == [Path(settings).name]
    # Own data, a user's model and the sample group `flclustering new` writes: its run.yaml
    # and this one agree.
    ours, scaffold = yaml.safe_load(run["run.yaml"]), yaml.safe_load(RUN_FILE)
    assert ours["federation"] == {k: scaffold["federation"][k] for k in ("dataset", "model")}
    assert ours["federation"]["dataset"] == "own" and is_reference(ours["federation"]["model"])
    assert ours["sample"] == scaffold["sample"]
    assert set(ours) == {"federation", "sample"}
    # The owners' code runs where it is trusted: participants and the Job (the task image, the
    # participant image plus the task); the aggregator and the clusterer (and the aggregator's
    # init container) run the control plane's.
    images = {
        d["metadata"]["name"]: {
            c["image"]
            for c in d["spec"]["template"]["spec"]["containers"]
            + d["spec"]["template"]["spec"].get("initContainers", [])
        }
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }
    assert images == {
        "aggregator": {"flclustering-control-plane:0.2.0"},
        "clusterer": {"flclustering-control-plane:0.2.0"},
        "participant": {"flclustering-task:0.2.0"},
        "init-model": {"flclustering-task:0.2.0"},
    }
    task_dockerfile = (OVERLAYS / "own-data" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=flclustering-participant:0.2.0\n" in task_dockerfile
    # The aggregator starts from the file the Job writes, in the claim they share, read-only
    # for the aggregator; its init container waits for the card, written last.
    aggregator = find(docs, "Deployment", "aggregator")["spec"]["template"]["spec"]
    (agg,) = aggregator["containers"]
    (wait,) = aggregator["initContainers"]
    (writer,) = job["spec"]["template"]["spec"]["containers"]
    initial = flag(agg, "--initial-model")
    out = flag(writer, "--out")
    assert initial == out + "/model.safetensors"
    assert wait["args"][-1] == out + "/model.json"
    claims = {
        mounted_volume(aggregator, agg, initial)["persistentVolumeClaim"]["claimName"],
        mounted_volume(aggregator, wait, wait["args"][-1])["persistentVolumeClaim"]["claimName"],
        mounted_volume(job["spec"]["template"]["spec"], writer, out)["persistentVolumeClaim"][
            "claimName"
        ],
    }
    assert claims == {"initial-model"}
    assert find(docs, "PersistentVolumeClaim", "initial-model")
    assert all(
        m.get("readOnly")
        for c in (agg, wait)
        for m in c["volumeMounts"]
        if m["name"] == "initial-model"
    )
    assert "PYTHONPATH" not in json.dumps(aggregator)  # nothing puts the owners' code on its path


def test_own_data_overlays_commands_parse_with_the_services_parsers(tmp_path, monkeypatch):
    """Each container's arguments and environment (the ConfigMaps resolved, the run file
    where the ConfigMap volume puts it) parse with its program's parser."""
    from services.aggregator.__main__ import parser as aggregator_parser
    from services.cli import build_parser
    from services.clusterer.__main__ import parser as clusterer_parser
    from services.participant.settings import parser as participant_parser

    docs = render("own-data")
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    parsers = {
        "services.aggregator": aggregator_parser,
        "services.clusterer": clusterer_parser,
        "services.participant": participant_parser,
    }
    job = find(docs, "Job", "init-model")
    pods = [
        *pods_of(docs),
        Pod("init-model-x", "flclustering", {}, job["spec"]["template"]["spec"]),
    ]
    ca = write_kit(tmp_path / "kit", [])
    for pod in pods:
        mounts = volume_folders(pod, ca, tmp_path / "volumes", None, configmaps)
        env = {k: remap(v, mounts) for k, v in resolve_env(pod, docs, {}).items()}
        for name in list(os.environ):
            if name.startswith(("FLCLUSTERING_", "PARTICIPANT_", "CLUSTERER_", "AGGREGATOR_")):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        command, args = pod.container["command"], [str(a) for a in pod.container["args"]]
        assert command[:2] == ["python", "-m"], command
        if command[2] == "services.cli":  # the Job: flclustering init-model
            cli, settings = build_parser()  # reads FLCLUSTERING_SETTINGS when built
            parsed = cli.parse_args([*command[3:], *args])
            config = settings[parsed.command].from_namespace(parsed)
        else:
            config = parsers[command[2]]().parse(args)
        assert config.federation.dataset == "own" and config.sample.declared, pod.name
        assert config.sample.class_names == tuple(str(c) for c in range(10))


def test_own_data_overlay_runs_a_federation_of_owners(tmp_path):
    """The rendered overlay as local processes: the Job writes w0 from the task package
    `flclustering new` writes (the task image's), the aggregator's init container finds it
    and the aggregator starts from it, and three participants, each on the example data in
    its own claim, run the federation to the end."""
    docs = render("own-data")
    configmaps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    made = subprocess.run(
        [*CLI, "new", str(tmp_path / "myfed")], capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    task = tmp_path / "myfed"
    owners = subprocess.run(
        [sys.executable, "example_data.py", str(tmp_path / "owners"), "--owners", "3"],
        cwd=task,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert owners.returncode == 0, owners.stderr
    code = {"PYTHONPATH": str(ROOT)}  # this checkout's services, as the image holds them
    with_task = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(task)])}  # the task image
    kit = tmp_path / "kit"
    ca = write_kit(kit, [])
    volumes = tmp_path / "volumes"
    job = find(docs, "Job", "init-model")
    writer = Pod("init-model-x", "flclustering", {}, job["spec"]["template"]["spec"])
    mounts = volume_folders(writer, ca, volumes, None, configmaps)
    start(writer, {**resolve_env(writer, docs, {}), **with_task}, mounts, tmp_path)
    assert writer.process is not None and writer.process.wait(300) == 0, writer.log.read_text()
    pods = pods_of(docs)
    services = service_addresses(docs, pods)
    (aggregator,) = [p for p in pods if p.labels["app.kubernetes.io/name"] == "aggregator"]
    (wait,) = aggregator.spec["initContainers"]
    mounts = volume_folders(aggregator, ca, volumes, None, configmaps, wait)
    waited = subprocess.run(
        [sys.executable, "-c", wait["args"][0], remap(wait["args"][1], mounts)], timeout=60
    )
    assert waited.returncode == 0
    participants = [p for p in pods if p.labels["app.kubernetes.io/name"] == "participant"]
    for p in participants:  # each owner's data in its own claim, before the pod starts
        ordinal = p.labels["apps.kubernetes.io/pod-index"]
        shutil.copytree(
            tmp_path / "owners" / f"owner-{ordinal}", volumes / "claims" / f"data-{p.name}"
        )
    order = sorted(
        pods,
        key=lambda p: ["aggregator", "clusterer", "participant"].index(
            p.labels["app.kubernetes.io/name"]
        ),
    )
    try:
        for pod in order:
            mounts = volume_folders(pod, ca, volumes, None, configmaps)
            extra = with_task if pod in participants else code
            start(pod, {**resolve_env(pod, docs, services), **extra}, mounts, tmp_path)
        deadline = time.monotonic() + 180
        for pod in order:
            probe(pod, "readinessProbe", deadline)
        operator = load_tls(kit, "operator")
        stub = pb_grpc.ClustererStub(channel(services["clusterer"], client=operator))
        deadline = time.monotonic() + 300
        while True:
            status = stub.GetStatus(pb.GetStatusRequest(), timeout=10)
            if status.done:
                break
            assert status.phase != "failed", status.error
            assert time.monotonic() < deadline, f"stuck in {status.phase} round {status.round}"
            time.sleep(0.5)
        assert status.participants == len(participants) == 3
        assert len(status.history) == status.model_version >= 1  # every round aggregated
        assert all(h.evaluated == status.participants for h in status.history)
        assert status.history[-1].mean_accuracy > 0.5  # digits: far above chance's 0.1
        for p in participants:
            assert "own data in" in p.log.read_text()  # read from its claim
    finally:
        stop(pods)


def test_checkov_passes_on_rendered_overlays(tmp_path):
    for name in NAMES:
        docs = [d for d in render(name) if d["kind"] not in OPERATOR_KINDS]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs))
    reports, out = run_checkov(tmp_path)
    failed = sum(r["summary"]["failed"] for r in reports)
    assert failed == 0, out[-3000:]
