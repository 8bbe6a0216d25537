"""`flclustering simulate`: the whole federation as separate local processes over real gRPC.

Starts the aggregator, the clusterer and N participants (several per process) on
127.0.0.1, follows the rounds, and writes results.json, rounds.csv, the plots and
endpoints.json. Attackers are simulated participants, placed per ground-truth group or at
random, and say so loudly in their logs.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.json_format import MessageToDict

from services.common.flags import write_settings_file
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.report import devices_block, write_results
from services.common.settings import Settings
from services.core.catalog import is_reference
from services.core.errors import FLClusteringError
from services.experiment import EXPERIMENT_GROUPS, SimulateConfig
from services.participant.partition import scheme_for
from services.transport.client import channel
from services.transport.credentials import hand_out, load_tls, participant_id, write_kit
from services.transport.lifecycle import ParentPipe, memory_bytes


class SimulationError(FLClusteringError):
    """A service of the simulation failed; the message is its last words."""


def attackers_of(config: SimulateConfig) -> list[int]:
    """Which participants attack: the same draw as `flclustering local` makes."""
    scheme_for(config.federation.dataset, config.data.partition)  # a bad pair fails first
    if config.adversary.attack == "none" or config.adversary.attack_rate == 0:
        return []
    # Only here: placing attackers needs the data's groups (and so torch); a run without
    # attackers starts its processes without paying for that import.
    from services.inprocess import attacker_indices
    from services.participant.partition import federation_data, shards_of

    data = federation_data(config.federation, config.data, hosted=())  # synthetic: groups only
    shards = shards_of(config.federation, config.data, data)
    return sorted(attacker_indices(config, np.array([s.group for s in shards])))


def child_environment() -> dict[str, str]:
    """This process's environment without any variable a service would read as a setting:
    the settings file is the experiment, and an ambient FLCLUSTERING_ROUNDS (or a sourced
    ConfigMap) must not change what one child runs."""
    from services.aggregator.__main__ import parser as aggregator
    from services.clusterer.__main__ import parser as clusterer
    from services.participant.settings import parser as participant

    settings = set().union(*(p().env_names() for p in (aggregator, clusterer, participant)))
    return {k: v for k, v in os.environ.items() if k not in settings}


class Processes:
    """Child processes with their logs; all are stopped on exit."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.parent = ParentPipe()  # children stop when this process ends, however it ends

    def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
        """Start `python -m ARGS` logging to logs/NAME.log."""
        log = self.logs / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", *args],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**env, **self.parent.child_env()},
                stdin=subprocess.DEVNULL,
                pass_fds=(self.parent.read_fd,),
            )
        self.children[name] = (proc, log)

    def check(self) -> None:
        """Raise SimulationError if a child died with an error."""
        for name, (proc, log) in self.children.items():
            code = proc.poll()
            if code not in (None, 0):
                raise SimulationError(f"{name} exited with status {code}: {last_line(log)}")

    def wait_ready(self, name: str, ready: Path, timeout: float = 120.0) -> dict[str, str]:
        """The addresses a process wrote to its ready file."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists():
                return dict(json.loads(ready.read_text()))
            self.check()
            time.sleep(0.1)
        raise SimulationError(
            f"{name} did not start within {timeout:.0f}s: {last_line(self.children[name][1])}"
        )

    def peak_rss_mb(self) -> dict[str, float]:
        """Each running child's peak resident memory so far (VmHWM, MB): what it costs."""
        peaks = {name: memory_bytes(proc.pid) for name, (proc, _) in self.children.items()}
        return {name: round(b / (1 << 20), 1) for name, b in peaks.items() if b is not None}

    def terminate(self) -> None:
        """SIGTERM everyone still running (they shut down while the caller goes on)."""
        for proc, _ in self.children.values():
            if proc.poll() is None:
                proc.terminate()

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM everyone, then SIGKILL what is left after the grace period."""
        self.terminate()
        deadline = time.monotonic() + grace
        for proc, _ in self.children.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.parent.close()


def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel hands to outgoing connections (Linux's setting, else its
    default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(*wanted: int) -> list[int]:
    """The ports asked for, each 0 replaced by a port free on 127.0.0.1 now (all held open
    together while choosing, so they differ), taken below the ephemeral range: the
    services bind them seconds later (after importing torch), and meanwhile the other
    processes' outgoing connections (retried until the services listen) draw their local
    ports from the ephemeral range; one of them could take a port chosen there (or
    connect to itself on it) and the service would find it in use."""
    low, _ = ephemeral_range()
    window = range(max(1024, low - 12_000), low)
    pick = random.SystemRandom()  # which free port: no experiment depends on it
    held: list[socket.socket] = []
    try:
        for port in wanted:
            if port:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            for _ in range(200):
                try:
                    sock.bind(("127.0.0.1", pick.choice(window)))
                    break
                except OSError:
                    continue
            else:
                sock.bind(("127.0.0.1", 0))  # the window is taken: any free port
            held.append(sock)
        free = iter([s.getsockname()[1] for s in held])
        return [port or next(free) for port in wanted]
    finally:
        for sock in held:
            sock.close()


def last_line(log: Path) -> str:
    """The last non-empty line of a log (what a failing service said last)."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1] if lines else "(no output)"


def simulate(
    config: SimulateConfig,
    progress: Callable[[dict[str, Any], int], None] | None = None,
    serve: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run the federation; return the results written to config.run.out."""
    out = Path(config.run.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for stale in logs.glob("*.ready"):
        stale.unlink()
    attackers = attackers_of(config)
    # A fresh experiment: no state of an earlier run in this directory may be resumed.
    shutil.rmtree(out / "state", ignore_errors=True)
    # Every party gets its own identity: a new CA and certificates for this run only, and
    # every link is mutual TLS (as on Kubernetes). Each process gets a directory with only
    # its own keys (0600) under out/credentials; the CA key is deleted once they are made.
    kit = out / "credentials"
    shutil.rmtree(kit, ignore_errors=True)
    n = config.federation.participants
    per = config.hosting.hosted_per_process(n)
    n_procs = math.ceil(n / per)
    write_kit(kit, [participant_id(i) for i in range(n)])
    hosted_by = {
        f"participants-{k}": [participant_id(i) for i in range(k * per, min(n, (k + 1) * per))]
        for k in range(n_procs)
    }
    dirs = hand_out(
        kit,
        {"aggregator": ["aggregator"], "clusterer": ["clusterer"], "operator": ["operator"]}
        | hosted_by,
    )
    if config.federation.secure == "he":
        # One CKKS key pair: the secret context beside each participant process's keys
        # (and the operator's, this process, which decrypts the final model), the public
        # one beside the aggregator's: it adds ciphertexts it cannot read.
        from services.core.ckks import PUBLIC_FILE, SECRET_FILE, HeKeys
        from services.transport.credentials import write_file

        he = HeKeys.create()
        write_file(dirs["aggregator"] / PUBLIC_FILE, he.public_bytes(), secret=False)
        for holder in [*hosted_by, "operator"]:
            write_file(dirs[holder] / SECRET_FILE, he.secret_bytes(), secret=True)
        del he
    # A user's model: w0 is written here (this process imports the factory the user named)
    # and the aggregator starts from the file; it never imports user code.
    initial: list[str] = []
    if is_reference(config.federation.model):
        from services.experiment import InitModelConfig
        from services.initmodel import init_model

        w0 = init_model(
            InitModelConfig.build(
                federation=config.federation.model_dump(),
                data=config.data.model_dump(),
                run={"out": str(out / "initial-model")},
            )
        )
        initial = ["--initial-model", str(w0[0])]
    # Every process reads the experiment from one settings file.
    settings = out / "settings.json"
    groups: dict[str, Settings] = {k: getattr(config, k) for k in EXPERIMENT_GROUPS}
    transport = config.transport.replace(tls_dir=str(kit), auth_token=None, auth_token_file=None)
    write_settings_file(settings, {**groups, "transport": transport})
    env = {**child_environment(), "PYTHONUNBUFFERED": "1"}
    procs = Processes(logs)
    metrics_port = "auto" if config.hosting.metrics else "0"

    def service_args(name: str, port: int) -> list[str]:
        return [
            "--settings",
            str(settings),
            "--tls-dir",
            str(dirs[name]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            metrics_port,
            "--ready-file",
            str(logs / f"{name}.ready"),
        ]

    # The ports are chosen here so that all processes start at once: each spends seconds
    # importing torch and loading data, and the clusterer and participants retry until the
    # process they call listens.
    aggregator_port, clusterer_port = free_ports(
        config.hosting.aggregator_port, config.hosting.clusterer_port
    )
    clusterer = f"127.0.0.1:{clusterer_port}"
    try:
        procs.start(
            "aggregator",
            [
                "services.aggregator",
                *service_args("aggregator", aggregator_port),
                "--state-dir",
                str(out / "state" / "aggregator"),
                *initial,
            ],
            env,
        )
        procs.start(
            "clusterer",
            [
                "services.clusterer",
                *service_args("clusterer", clusterer_port),
                "--aggregator",
                f"127.0.0.1:{aggregator_port}",
                "--state-dir",
                str(out / "state" / "clusterer"),
            ],
            env,
        )
        for k in range(n_procs):
            first = k * per
            count = min(per, n - first)
            hosted = [i for i in attackers if first <= i < first + count]
            args = [
                "services.participant",
                "--settings",
                str(settings),
                "--tls-dir",
                str(dirs[f"participants-{k}"]),
                "--clusterer",
                clusterer,
                "--index",
                str(first),
                "--count",
                str(count),
                "--device",
                config.run.device,
                "--attack-indices",
                ",".join(map(str, hosted)),
                "--metrics-host",
                "127.0.0.1",
                "--metrics-port",
                metrics_port,
                "--ready-file",
                str(logs / f"participants-{k}.ready"),
            ]
            if serve is not None:
                args += ["--linger", "true"]
            procs.start(f"participants-{k}", args, env)
        participants = [
            {
                "name": f"participants-{k}",
                **procs.wait_ready(f"participants-{k}", logs / f"participants-{k}.ready"),
            }
            for k in range(n_procs)
        ]
        aggregator_ready = procs.wait_ready("aggregator", logs / "aggregator.ready")
        clusterer_ready = procs.wait_ready("clusterer", logs / "clusterer.ready")
        endpoints: dict[str, Any] = {
            "aggregator": aggregator_ready,
            "clusterer": clusterer_ready,
            "participants": participants,
        }
        (out / "endpoints.json").write_text(json.dumps(endpoints, indent=2) + "\n")
        operator = load_tls(dirs["operator"], "operator")
        stub = pb_grpc.ClustererStub(channel(clusterer, client=operator))
        # The saved model's card needs the data's shape, classes and normalisation: read
        # while the federation runs (this process waits on status polls meanwhile).
        card_data = ThreadPoolExecutor(1, thread_name_prefix="card").submit(data_facts, config)
        status = follow(stub, procs, progress)
        results = collect(config, status, members(stub), attackers, endpoints)
        results["processes"] = procs.peak_rss_mb()
        state = json.loads((out / "state" / "aggregator" / "state.json").read_text())
        model = out / "state" / "aggregator" / state["model"]
        if state.get("sealed"):  # --secure he: the operator's secret key opens it
            model = open_sealed_file(config, model, dirs["operator"], card_data.result())
        if config.adversary.config().backdoors:
            results["final"]["backdoor_success_rate"] = backdoor_success(config, model)
        save_final_model(config, model, card_data.result(), results["final"])
        if serve is None:
            procs.terminate()  # the services shut down while the figures are drawn
        write_results(out, results)
        if serve is not None:
            serve()
        return results
    finally:
        procs.stop()


def follow(
    stub: pb_grpc.ClustererStub,
    procs: Processes,
    progress: Callable[[dict[str, Any], int], None] | None,
) -> pb.GetStatusResponse:
    """Watch the clusterer (as an operator) until the federation is done; report each new
    round. The answer returned holds the whole history."""
    history: list[pb.RoundSummary] = []
    while True:
        procs.check()
        try:
            status = stub.GetStatus(pb.GetStatusRequest(history_offset=len(history)), timeout=10)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                time.sleep(0.5)
                continue
            raise
        for h in status.history:
            history.append(h)
            if progress is not None:
                progress(round_dict(h), status.rounds)
        if status.phase == "failed":
            raise SimulationError(f"the federation failed: {status.error}")
        if status.done and len(history) >= status.history_total:
            del status.history[:]
            status.history.extend(history)
            return status
        if len(history) >= status.history_total:
            time.sleep(0.25)


def members(stub: pb_grpc.ClustererStub) -> list[pb.ParticipantCluster]:
    """Every member and its cluster, page by page."""
    out: list[pb.ParticipantCluster] = []
    while True:
        page = stub.GetStatus(
            pb.GetStatusRequest(members_offset=len(out), members_limit=1000), timeout=30
        )
        out.extend(page.clusters)
        if not page.clusters or len(out) >= page.members_total:
            return out


def round_dict(h: pb.RoundSummary, asynchronous: bool = False) -> dict[str, Any]:
    """A round summary as a plain dict with every field present (and --mode async's
    figures in asynchronous runs only)."""
    d = MessageToDict(
        h, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for key in (
        "round",
        "rejected",
        "selected",
        "received",
        "timed_out",
        "model_version",
        "rejected_clusters",
        "fallbacks",
        "evaluated",
        "refused_evaluations",
        "diverged_evaluations",
    ):
        d[key] = int(d.get(key, 0))
    d["rejected_by"] = {k: int(v) for k, v in d.get("rejected_by", {}).items()}
    d["failed_clusters"] = {int(k): int(v) for k, v in d.get("failed_clusters", {}).items()}
    for key in (
        "cluster_weights",
        "group_accuracy",
        "cluster_accuracy",
        "personal_group_accuracy",
        "personal_cluster_accuracy",
    ):
        d[key] = {int(k): float(v) for k, v in d.get(key, {}).items()}
    if not d["personal_cluster_accuracy"]:  # no --personalise: its figures are no zeros
        for key in [k for k in d if k.startswith("personal_")]:
            del d[key]
    # Differential privacy's figures: the step's only where the mechanism ran, epsilon only
    # once something is spent (without --dp they are all absent, not zeros).
    if not d.get("dp_rate"):
        for key in ("dp_noise", "dp_rate", "dp_clip", "dp_sigma", "dp_clipped"):
            d.pop(key, None)
    if not d.get("epsilon"):
        d.pop("epsilon", None)
    if "dp_clipped" in d:
        d["dp_clipped"] = int(d["dp_clipped"])
    # --mode async's figures: only in its records (the version a record's accuracy is of
    # is always set there, 0 at the start).
    if not asynchronous:
        for key in ("evaluated_version", "staleness_mean", "staleness_max", "stale"):
            d.pop(key, None)
    else:
        for key in ("evaluated_version", "staleness_max", "stale"):
            d[key] = int(d.get(key, 0))
    if not d.get("finished_at"):
        d.pop("finished_at", None)
    return d


def collect(
    config: SimulateConfig,
    status: pb.GetStatusResponse,
    clusters: list[pb.ParticipantCluster],
    attackers: list[int],
    endpoints: dict[str, Any],
) -> dict[str, Any]:
    """results.json's content from the clusterer's final status."""
    rounds = [round_dict(h, config.pace.asynchronous) for h in status.history]
    attack = config.adversary.config()
    for r in rounds:  # the schedule of the attackers' processes (they log each firing)
        r["attack_fired"] = bool(attackers) and attack.fires(r["round"])
    last = rounds[-1]
    bad = set(attackers)
    return {
        "config": config.model_dump(mode="json", exclude={"transport": {"auth_token"}}),
        "rounds": rounds,
        "clusters": [
            {
                "participant": c.participant_id,
                "cluster": c.cluster,
                "group": c.group,
                "attacker": int(c.participant_id.rsplit("-", 1)[-1]) in bad,
            }
            for c in clusters
        ],
        "clustering": {"purity": None if status.purity < 0 else status.purity},
        "final": {
            "mean_accuracy": last["mean_accuracy"],
            "accuracy_std": last["accuracy_std"],
            "worst_accuracy": last["worst_accuracy"],
            "worst_decile_accuracy": last["worst_decile_accuracy"],
            **(
                {
                    "group_accuracy": last["group_accuracy"],
                    "worst_group_accuracy": min(last["group_accuracy"].values()),
                }
                if last["group_accuracy"]
                else {}
            ),
            **(personal_final(last) if "personal_mean_accuracy" in last else {}),
        },
        "endpoints": endpoints,
        "devices": devices_block(config),
        **(
            {"privacy": privacy_block(config, rounds, status)} if config.privacy.dp != "off" else {}
        ),
    }


def privacy_block(
    config: SimulateConfig, rounds: list[dict[str, Any]], status: pb.GetStatusResponse
) -> dict[str, Any]:
    """results.json's privacy block: the ledger as the clusterer kept it, and its stop."""
    p = config.privacy
    spent = [r for r in rounds if r.get("dp_rate")]  # rounds the mechanism ran in
    return {
        "mode": p.dp,
        "epsilon": rounds[-1].get("epsilon", 0.0) if rounds else 0.0,
        "delta": p.dp_delta,
        "budget": p.dp_epsilon,
        "noise_multiplier": p.dp_noise,
        "rounds": len(spent),
        **({"stopped": status.stopped} if status.stopped else {}),
    }


def personal_final(last: dict[str, Any]) -> dict[str, Any]:
    """The final figures of the models participants serve under --personalise."""
    out = {
        f"personal_{k}": last[f"personal_{k}"]
        for k in ("mean_accuracy", "accuracy_std", "worst_accuracy", "group_accuracy")
    }
    if last["personal_group_accuracy"]:
        out["personal_worst_group_accuracy"] = min(last["personal_group_accuracy"].values())
    return out


def data_facts(config: SimulateConfig) -> Any:
    """The dataset the federation trains on, without its samples where it can (synthetic:
    generated per participant, none here): for the saved model's card."""
    from services.participant.partition import federation_data

    return federation_data(config.federation, config.data, hosted=())


def open_sealed_file(config: SimulateConfig, sealed: Path, keys_dir: Path, data: Any) -> Path:
    """The aggregator's encrypted final model, decrypted beside it (model.safetensors)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from services.common.homomorphic import load_keys, open_model
    from services.core.models import build_model
    from services.core.tensors import spec_of

    fed = config.federation
    spec = spec_of(build_model(fed.model, data.input_shape, data.num_classes).state_dict())
    with safe_open(str(sealed), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    weights = open_model(tensors, load_keys(None, str(keys_dir), secret=True), spec)
    out = sealed.with_name("model-decrypted.safetensors")
    save_file(dict(weights), str(out))
    return out


def save_final_model(
    config: SimulateConfig, aggregator_model: Path, data: Any, final: dict[str, Any]
) -> None:
    """The aggregator's final global model as the run's model.safetensors and model.json
    (safetensors in, safetensors out: nothing is unpickled)."""
    from safetensors.torch import load_file

    from services.core.model_file import write_model_file
    from services.inprocess import card_of

    weights = load_file(str(aggregator_model))
    write_model_file(Path(config.run.out), weights, card_of(config, data, final))


def backdoor_success(config: SimulateConfig, model_file: Path) -> float:
    """The backdoor's success rate on the final global model (the aggregator's saved one:
    safetensors, nothing unpickled): triggered test inputs of other classes classified as
    the target."""
    from safetensors.torch import load_file

    from services.core.models import build_model
    from services.participant.backdoor import success_rate
    from services.participant.partition import federation_data

    fed = config.federation
    data = federation_data(fed, config.data)
    model = build_model(fed.model, data.input_shape, data.num_classes, fed.seed)
    model.load_state_dict(load_file(str(model_file)))
    return success_rate(model, data.x_test, data.y_test, config.adversary.attack_target)


def scrape_config(endpoints: dict[str, Any], rules: str | None = None, interval: str = "5s") -> str:
    """A Prometheus configuration scraping every service listed in an endpoints.json."""
    jobs: dict[str, list[str]] = {
        "aggregator": [endpoints["aggregator"].get("metrics", "")],
        "clusterer": [endpoints["clusterer"].get("metrics", "")],
        "participants": [p.get("metrics", "") for p in endpoints.get("participants", [])],
    }
    lines = ["global:", f"  scrape_interval: {interval}", f"  evaluation_interval: {interval}"]
    if rules:
        lines += ["rule_files:", f"  - {rules}"]
    lines.append("scrape_configs:")
    for job, targets in jobs.items():
        targets = [t for t in targets if t]
        if not targets:
            continue
        lines += [
            f"  - job_name: {job}",
            "    static_configs:",
            f"      - targets: {json.dumps(targets)}",
        ]
    return "\n".join(lines) + "\n"
