"""Many protocol-level participants against the real clusterer and aggregator.

The aggregator and the clusterer run as separate processes (as in `flclustering simulate`),
with mutual TLS between them and the clusterer's edge port (server TLS plus one hashed
token per participant, as phones would connect). `--clients` processes (default 2) play
N participants without torch: one asyncio loop each, a few shared TLS channels, each
participant joining,
long-polling for tasks, uploading a small valid update (the global model it downloaded,
perturbed) when selected and reporting an evaluation when asked. The federation runs
fedavg (no pre-training, whose deltas would be N model-sized uploads; clustering at
scale is `benchmarks/clustering.py`).

It prints joins/s, the p50/p99 latency of task answers and uploads, the health checks'
latency under load (a plain Check every 50 ms on the health port, from a process of its
own) and the services' peak
RSS, and ends with
`load: N participants, p99 task latency X.XX s, health p99 Y.YYY s`
(goals: X <= 1.0, Y <= 0.1, clusterer RSS under 1 GB).

Task latency: for each batch of tasks of one kind and round (the coordinator hands them
out at once), the time from the first participant getting its task to this one getting
its own: how long it takes the clusterer to reach every waiting participant.

    python benchmarks/load.py [--participants 10000] [--select 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.simulate import free_ports
from services.transport.credentials import new_token, token_digest, write_kit
from services.transport.lifecycle import freeze_heap, memory_bytes

CHUNK = 1 << 20
DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64}


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory (VmHWM) in MB; 0 once it is gone."""
    return (memory_bytes(pid) or 0) / (1 << 20)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Models:
    """Global model versions downloaded once (header and bytes), shared by everyone."""

    def __init__(self) -> None:
        self._got: dict[int, asyncio.Future[tuple[tensors_pb2.ModelHeader, bytes]]] = {}

    async def get(
        self, stub: pb_grpc.ClustererStub, version: int, md: tuple[tuple[str, str], ...]
    ) -> tuple[tensors_pb2.ModelHeader, bytes]:
        fut = self._got.get(version)
        if fut is None:
            fut = self._got[version] = asyncio.get_running_loop().create_future()
            header, data = tensors_pb2.ModelHeader(), bytearray()
            call = stub.DownloadModel(
                pb.DownloadModelRequest(model_version=version), metadata=md, timeout=120
            )
            async for msg in call:
                part = msg.WhichOneof("part")
                if part == "header":
                    header.CopyFrom(msg.header)
                elif part == "data":
                    data += msg.data
            fut.set_result((header, bytes(data)))
        return await fut


def perturbed(header: tensors_pb2.ModelHeader, data: bytes, rng: np.random.Generator) -> bytes:
    """The model's bytes with small noise on its float tensors: a small, valid update."""
    out = bytearray()
    at = 0
    for t in header.tensors:
        dtype = np.dtype(DTYPES[t.dtype])
        n = int(np.prod(t.shape)) if len(t.shape) else 1
        values = np.frombuffer(data, dtype=dtype, count=n, offset=at)
        at += n * dtype.itemsize
        if dtype.kind == "f":
            values = values + rng.normal(0, 1e-3, n).astype(dtype)
        out += values.tobytes()
    return bytes(out)


def update_messages(
    pid: str, task: pb.GetTaskResponse, header: tensors_pb2.ModelHeader, body: bytes
) -> list[pb.SubmitUpdateRequest]:
    h = tensors_pb2.ModelHeader()
    h.CopyFrom(header)
    h.sender, h.round, h.model_version = pid, task.round, task.model_version
    h.kind, h.num_samples = "weights", 100
    h.metrics.clear()
    msgs = [pb.SubmitUpdateRequest(header=h)]
    msgs += [pb.SubmitUpdateRequest(data=body[i : i + CHUNK]) for i in range(0, len(body), CHUNK)]
    trailer = tensors_pb2.ModelTrailer(xxh3_128=xxhash.xxh3_128(body).digest())
    return [*msgs, pb.SubmitUpdateRequest(trailer=trailer)]


class Stats:
    def __init__(self) -> None:
        self.join_done: list[float] = []
        self.tasks: dict[tuple[int, int], list[float]] = defaultdict(list)
        self.uploads: list[float] = []
        self.evaluations = 0
        self.errors: dict[str, int] = defaultdict(int)
        self.done = 0


async def participant(
    pid: str,
    token: str,
    chan: grpc.aio.Channel,
    models: Models,
    stats: Stats,
    wait_s: float,
) -> None:
    stub = pb_grpc.ClustererStub(chan)
    md = (("authorization", f"Bearer {token}"),)
    rng = np.random.default_rng(abs(hash(pid)) % (1 << 32))
    for attempt in range(50):
        try:
            await stub.Join(
                pb.JoinRequest(participant_id=pid, num_train=100, num_test=20, group=-1),
                metadata=md,
                timeout=60,
            )
            break
        except grpc.aio.AioRpcError as exc:
            stats.errors[f"Join {exc.code().name}"] += 1
            await asyncio.sleep(random.uniform(0.5, 1.0) * min(8, 2**attempt))
    stats.join_done.append(time.perf_counter())
    while True:
        try:
            task = await stub.GetTask(
                pb.GetTaskRequest(participant_id=pid, wait_s=wait_s),
                metadata=md,
                timeout=wait_s + 30,
            )
        except grpc.aio.AioRpcError as exc:
            stats.errors[f"GetTask {exc.code().name}"] += 1
            await asyncio.sleep(random.uniform(0.5, 1.0))
            continue
        got = time.perf_counter()
        if task.kind == pb.TASK_KIND_DONE:
            stats.done += 1
            return
        if task.kind == pb.TASK_KIND_WAIT:
            if task.next_poll_s > 0:
                await asyncio.sleep(random.uniform(0.5, 1.0) * task.next_poll_s)
            continue
        stats.tasks[(task.kind, task.round)].append(got)
        try:
            if task.kind == pb.TASK_KIND_TRAIN:
                header, data = await models.get(stub, task.model_version, md)
                msgs = update_messages(pid, task, header, perturbed(header, data, rng))
                began = time.perf_counter()
                await stub.SubmitUpdate(iter(msgs), metadata=md, timeout=120)
                stats.uploads.append(time.perf_counter() - began)
            elif task.kind == pb.TASK_KIND_EVALUATE:
                await stub.ReportEvaluation(
                    pb.ReportEvaluationRequest(
                        participant_id=pid,
                        evaluation_id=task.evaluation_id,
                        model_version=task.model_version,
                        accuracy=float(rng.uniform(0.5, 1.0)),
                        loss=float(rng.uniform(0.1, 1.0)),
                        num_examples=20,
                    ),
                    metadata=md,
                    timeout=60,
                )
                stats.evaluations += 1
        except grpc.aio.AioRpcError as exc:
            stats.errors[f"{pb.TaskKind.Name(task.kind)} {exc.code().name}"] += 1


def health_probe(address: str, stop: Any, out: Any) -> None:
    """A plain Check every 50 ms on the health port until stop is set; the latencies
    (failures: inf) go to the queue out at the end.

    It runs in a process of its own, as a kubelet probes from outside: in this process it
    would measure how long it waits for this process's GIL behind 10,000 simulated
    participants, not how long the service takes to answer."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    got: list[float] = []
    while not stop.wait(0.05):
        began = time.perf_counter()
        try:
            stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            got.append(time.perf_counter() - began)
        except grpc.RpcError:
            got.append(float("inf"))
    out.put(got)


def start(name: str, args: list[str], logs: Path) -> subprocess.Popen[bytes]:
    with (logs / f"{name}.log").open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=fh, stderr=subprocess.STDOUT)


def wait_ready(path: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return dict(json.loads(path.read_text()))
        if proc.poll() is not None:
            raise SystemExit(f"load: {path.stem} exited ({proc.returncode}); see its log")
        time.sleep(0.1)
    raise SystemExit(f"load: {path.stem} did not start in {timeout:.0f} s")


async def drive(args: argparse.Namespace, edge: str, ca: bytes, tokens: dict[str, str]) -> Stats:
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    options = [("grpc.max_receive_message_length", 8 << 20)]
    chans = [grpc.aio.secure_channel(edge, creds, options=options) for _ in range(args.channels)]
    stats, models = Stats(), Models()
    jobs = [
        participant(pid, tok, chans[i % len(chans)], models, stats, args.wait_s)
        for i, (pid, tok) in enumerate(tokens.items())
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*jobs), args.timeout_s)
    finally:
        for ch in chans:
            await ch.close()
    return stats


def client(
    args: argparse.Namespace, edge: str, ca: bytes, tokens: dict[str, str], out: Any
) -> None:
    """One load-generating process: its share of the participants; their stats to out."""
    # It stands for thousands of devices: its own collector's pauses (its coroutines'
    # objects) must not delay the tasks it measures, as the services' own no longer do
    # (services.transport.lifecycle.freeze_heap).
    freeze_heap()
    stats = asyncio.run(drive(args, edge, ca, tokens))
    out.put(
        {
            "join_done": stats.join_done,
            "tasks": dict(stats.tasks),
            "uploads": stats.uploads,
            "evaluations": stats.evaluations,
            "errors": dict(stats.errors),
            "done": stats.done,
        }
    )


def merged(parts: list[dict[str, Any]]) -> Stats:
    """The clients' stats as one (their perf_counter clocks are the same system clock)."""
    stats = Stats()
    for part in parts:
        stats.join_done += part["join_done"]
        for key, times in part["tasks"].items():
            stats.tasks[key] += times
        stats.uploads += part["uploads"]
        stats.evaluations += part["evaluations"]
        for key, count in part["errors"].items():
            stats.errors[key] += count
        stats.done += part["done"]
    return stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--participants", type=int, default=10_000)
    ap.add_argument("--select", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="2nn", help="the model on digits' shape (default 2nn)")
    ap.add_argument("--channels", type=int, default=16, help="TLS connections per client")
    ap.add_argument("--clients", type=int, default=2, help="load-generating processes")
    ap.add_argument("--wait-s", type=float, default=20.0, help="long-poll wait per GetTask")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="give up after this long")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    if min(args.participants, args.select, args.rounds, args.clients) < 1:
        ap.error("--participants, --select, --rounds and --clients must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="flc-load-"))
    logs = work / "logs"
    logs.mkdir()
    kit = work / "kit"
    write_kit(kit, [])
    ids = [f"load-{i:06d}" for i in range(args.participants)]
    tokens = {p: new_token(p) for p in ids}
    digests = {p: token_digest(t.rpartition(".")[2]) for p, t in tokens.items()}
    (work / "tokens.sha256.json").write_text(json.dumps(digests))
    agg_port, clu_port, edge_port, health_port = free_ports(0, 0, 0, 0)
    common = [
        "--host", "127.0.0.1", "--tls-dir", str(kit), "--strategy", "fedavg",
        "--metrics-port", "0", "--log-level", "WARNING",
    ]  # fmt: skip
    aggregator = start(
        "aggregator",
        [
            "services.aggregator", *common, "--port", str(agg_port),
            "--model", args.model, "--dataset", "digits",
            "--state-dir", str(work / "state" / "aggregator"),
            "--ready-file", str(logs / "aggregator.ready"),
        ],
        logs,
    )  # fmt: skip
    clusterer = start(
        "clusterer",
        [
            "services.clusterer", *common, "--port", str(clu_port),
            "--aggregator", f"127.0.0.1:{agg_port}",
            "--participants", str(args.participants), "--select", str(args.select),
            "--rounds", str(args.rounds), "--max-participants", str(args.participants),
            "--participant-tokens", str(work / "tokens.sha256.json"),
            "--tls-port", str(edge_port), "--tls-cert", str(kit / "clusterer.crt"),
            "--tls-key", str(kit / "clusterer.key"), "--health-port", str(health_port),
            "--eval-timeout-s", "300", "--round-timeout-s", "300",
            "--state-dir", str(work / "state" / "clusterer"),
            "--ready-file", str(logs / "clusterer.ready"),
        ],
        logs,
    )  # fmt: skip
    procs = {"aggregator": aggregator, "clusterer": clusterer}
    try:
        wait_ready(logs / "aggregator.ready", aggregator)
        wait_ready(logs / "clusterer.ready", clusterer)
        spawn = multiprocessing.get_context("spawn")
        stop, results = spawn.Event(), spawn.Queue()
        probe = spawn.Process(
            target=health_probe, args=(f"127.0.0.1:{health_port}", stop, results), daemon=True
        )
        probe.start()
        # Participants are split over --clients processes (devices do not share one GIL:
        # a single process of 10,000 coroutines lagged by seconds, and a participant it
        # had not yet sent back into its poll got its task that much later).
        share = [dict(list(tokens.items())[k :: args.clients]) for k in range(args.clients)]
        stats_out = spawn.Queue()
        ca = (kit / "ca.crt").read_bytes()
        clients = [
            spawn.Process(target=client, args=(args, f"127.0.0.1:{edge_port}", ca, part, stats_out))
            for part in share
        ]
        began = time.perf_counter()
        for c in clients:
            c.start()
        stats = merged([stats_out.get(timeout=args.timeout_s + 60) for _ in clients])
        for c in clients:
            c.join()
        took = time.perf_counter() - began
        stop.set()
        health: list[float] = results.get(timeout=60)
        probe.join()
        rss = {name: peak_rss_mb(p.pid) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    joined = sorted(stats.join_done)
    latency = [
        t - min(times) for times in stats.tasks.values() for t in times
    ]  # from the batch's first answer
    n = args.participants
    print(f"participants: {n} in {took:.1f} s, {stats.done} told DONE")
    print(f"errors: {dict(stats.errors) or 'none'}")
    if joined:
        print(f"joins: {len(joined) / max(joined[-1] - began, 1e-9):.0f}/s")
    trains = sum(len(v) for (k, _), v in stats.tasks.items() if k == pb.TASK_KIND_TRAIN)
    print(f"tasks: {sum(len(v) for v in stats.tasks.values())} ({trains} train), "
          f"{stats.evaluations} evaluations reported")  # fmt: skip
    print(f"task latency: p50 {pct(latency, 50):.3f} s, p99 {pct(latency, 99):.3f} s")
    for (kind, rnd), times in sorted(stats.tasks.items()):
        late = [t - min(times) for t in times]
        print(f"  {pb.TaskKind.Name(kind)} round {rnd}: {len(times)} tasks, p50 "
              f"{pct(late, 50):.3f} s, p99 {pct(late, 99):.3f} s, "
              f"last {max(late):.3f} s")  # fmt: skip
    print(f"uploads: {len(stats.uploads)}, p50 {pct(stats.uploads, 50):.3f} s, "
          f"p99 {pct(stats.uploads, 99):.3f} s")  # fmt: skip
    print(f"health checks: {len(health)}, p50 {pct(health, 50):.4f} s, p99 {pct(health, 99):.4f} s")
    print("peak RSS: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work directory: {work}")
    ok = stats.done == n
    if not ok:
        print(f"load: only {stats.done} of {n} participants finished", file=sys.stderr)
    print(
        f"load: {n} participants, p99 task latency {pct(latency, 99):.2f} s, "
        f"health p99 {pct(health, 99):.3f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
