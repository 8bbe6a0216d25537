"""Streaming a model participant -> clusterer -> aggregator, against a bare gRPC relay.

Both services run as separate processes on loopback (as in `flclustering simulate`) and
take one update per round; this process is the participant, encoding the model from its
tensors as a participant does. In the same run, taking turns with the pipeline so that both
see the same machine, the same bytes go (a) through a bare two-hop grpcio relay in three
processes (relay.py: raw messages, identity serializers, the middle forwarding
each message untouched, the sink counting; same chunk size, no TLS on either) and (b) over
one plain TCP connection to a process that reads and discards them. Prints the best of
`--repeats` for each, the CPU each process spent per MB in the pipeline's best transfer,
the peak memory each service added (VmHWM after, minus VmRSS before, the peak counter
reset first), and ends with

    transport/socket throughput ratio: X.XX   (for reference)
    transport/relay throughput ratio: X.XX    (goal: 0.8 or more)

Memory goal: under twice the model's size per service.

    python benchmarks/transport.py [--mb 200] [--repeats 5]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import relay  # benchmarks/relay.py, beside this script
import torch
from processes import aggregator_args, cpu_s, mclr_side, start_service, submission
from script import parser  # beside this script

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.streams import read_model
from services.common.wire import encode
from services.participant.worker import clusterer_stub
from services.transport.client import call_metadata, channel
from services.transport.lifecycle import memory_bytes
from services.transport.limits import CHUNK_BYTES

TOKEN = "bench"
SINK = """
import socket, sys
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
for _ in range(int(sys.argv[1])):
    conn, _ = srv.accept()
    buf = bytearray(1 << 20)
    while conn.recv_into(buf):
        pass
    conn.sendall(b"k"); conn.close()
"""


def rss(pid: int, field: str) -> int:
    """A /proc/PID/status memory field in bytes."""
    found = memory_bytes(pid, field)
    if found is None:
        raise KeyError(field)
    return found


def settle(pids: Iterable[int], idle_cpu_s: float = 0.01, most_s: float = 30.0) -> None:
    """Wait until the processes together use under `idle_cpu_s` of CPU in 0.2 s."""
    deadline = time.monotonic() + most_s
    while time.monotonic() < deadline:
        start = sum(cpu_s(p) for p in pids)
        time.sleep(0.2)
        if sum(cpu_s(p) for p in pids) - start < idle_cpu_s:
            return


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--mb", type=float, default=200.0)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    # An MLP over a square image whose first layer makes the model about --mb megabytes.
    side = mclr_side(a.mb)
    tmp = Path(tempfile.mkdtemp())
    procs: list[subprocess.Popen[bytes]] = []
    try:
        agg, agg_addr = start_service(
            aggregator_args(side, "--keep-versions=2", "--strategy=fedavg"),
            tmp / "agg.json",
            TOKEN,
        )
        procs.append(agg)
        clu, clu_addr = start_service(
            [
                "services.clusterer",
                "--host=127.0.0.1",
                "--port=0",
                f"--aggregator={agg_addr}",
                "--strategy=fedavg",
                "--participants=1",
                "--select=1",
                f"--rounds={a.repeats}",
                "--round-timeout-s=3600",
                "--eval-timeout-s=1",
            ],
            tmp / "clu.json",
            TOKEN,
        )
        procs.append(clu)
        sink, sink_port = spawn([sys.executable, "-c", SINK, str(a.repeats)])
        script = str(Path(__file__).with_name("relay.py"))
        bare = [spawn([sys.executable, script, "sink"])]
        bare.append(spawn([sys.executable, script, "middle", str(bare[0][1])]))
        procs += [sink, *(proc for proc, _ in bare)]
        run(a.repeats, clu_addr, {"clusterer": clu, "aggregator": agg}, bare[1][1], sink_port)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


def spawn(cmd: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    """A helper process that prints its port first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def run(
    repeats: int,
    clu_addr: str,
    services: dict[str, subprocess.Popen[bytes]],
    relay_port: int,
    sink_port: int,
) -> None:
    """`repeats` turns of: an update through the pipeline, the same bytes through the bare
    relay, the same bytes over a socket."""
    stub = clusterer_stub(channel(clu_addr))
    meta = call_metadata(TOKEN)
    pid = "participant-00000"
    stub.Join(pb.JoinRequest(participant_id=pid, num_train=1, num_test=1), metadata=meta)
    relay_channel = relay.connect(relay_port)
    relay.send(relay_channel, [b"warm-up"])
    weights: OrderedDict[str, torch.Tensor] | None = None
    times: dict[str, list[float]] = {"pipeline": [], "relay": [], "socket": []}
    cpu: list[dict[str, float]] = []
    peaks = dict.fromkeys(services, 0)
    pids = {"participant": os.getpid(), **{n: proc.pid for n, proc in services.items()}}
    size = 0
    for _ in range(repeats):
        task = stub.GetTask(pb.GetTaskRequest(participant_id=pid, wait_s=20), metadata=meta)
        while task.kind != pb.TASK_KIND_TRAIN:
            if task.kind == pb.TASK_KIND_DONE:
                raise SystemExit("the clusterer ended the federation (see its log)")
            task = stub.GetTask(pb.GetTaskRequest(participant_id=pid, wait_s=20), metadata=meta)
        if weights is None:
            request = pb.DownloadModelRequest(model_version=task.model_version)
            _, weights = read_model(
                stub.DownloadModel(request, metadata=meta), cls=pb.DownloadModelResponse
            )
            size = sum(t.numel() * t.element_size() for t in weights.values())
        # Each transfer starts on a quiet machine: the last round's aggregation and model
        # publication are over before the bare relay and the socket are timed.
        settle(pids.values())
        _, chunks, _ = encode(weights, CHUNK_BYTES)
        data = list(chunks)
        t0 = time.perf_counter()
        if relay.send(relay_channel, data) != size:
            raise SystemExit("the bare relay lost bytes")
        times["relay"].append(time.perf_counter() - t0)
        with socket.create_connection(("127.0.0.1", sink_port)) as s:
            t0 = time.perf_counter()
            for c in data:
                s.sendall(c)
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
            times["socket"].append(time.perf_counter() - t0)
        del data, chunks
        settle(pids.values())
        before = {}
        for name, proc in services.items():
            reset_peak(proc.pid)
            before[name] = rss(proc.pid, "VmRSS")
        messages = submission(pid, task, weights, 1)  # encoded as they are sent
        cpu0 = {n: cpu_s(p) for n, p in pids.items()}
        t0 = time.perf_counter()
        stub.SubmitUpdate(messages, metadata=meta, timeout=600)
        times["pipeline"].append(time.perf_counter() - t0)
        cpu.append({n: cpu_s(p) - cpu0[n] for n, p in pids.items()})
        for name, proc in services.items():
            peaks[name] = max(peaks[name], rss(proc.pid, "VmHWM") - before[name])
    assert weights is not None
    mb = size / 1e6
    best = {k: min(v) for k, v in times.items()}
    print(f"model: {mb:.1f} MB ({len(weights)} tensors), best of {repeats}")
    labels = {
        "pipeline": "pipeline participant->clusterer->aggregator",
        "relay": "bare grpcio relay (3 processes, 2 hops)",
        "socket": "plain TCP socket",
    }
    for key, label in labels.items():
        print(f"{label:<44}: {best[key]:.2f}s, {mb / best[key]:8.1f} MB/s")
    fastest = cpu[times["pipeline"].index(best["pipeline"])]
    print(
        "pipeline CPU per MB: "
        + ", ".join(f"{n} {1000 * s / mb:.2f} ms" for n, s in fastest.items())
    )
    for name, peak in peaks.items():
        print(
            f"peak memory added by the {name:<10}: {peak / 1e6:8.1f} MB "
            f"({peak / size:.2f}x the model)"
        )
    print(f"transport/socket throughput ratio: {best['socket'] / best['pipeline']:.2f}")
    print(f"transport/relay throughput ratio: {best['relay'] / best['pipeline']:.2f}")


if __name__ == "__main__":
    main()
