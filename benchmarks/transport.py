"""Streaming a 200 MB model participant -> clusterer -> aggregator, against a plain socket.

Both services run as separate processes on loopback (as in `flclustering simulate`); the
same bytes then go over one plain TCP connection to a process that reads and discards
them. Prints both throughputs, the peak memory each service added during the transfer
(VmHWM after, minus VmRSS before, with the peak counter reset first), and ends with
`transport/socket throughput ratio: X.XX` (goal: 0.5 or more; memory goal: under twice
the model's size per service).

    python benchmarks/transport.py [--mb 200] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import torch

from services.common.grpc_client import call_metadata, channel
from services.common.lifecycle import memory_bytes
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import build_stream
from services.common.wire import encode

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


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def start(args: list[str], ready: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "FLCLUSTERING_AUTH_TOKEN": TOKEN, "FLCLUSTERING_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen([sys.executable, "-m", *args, "--ready-file", str(ready)], env=env)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{args[0]} did not start")
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["grpc"]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mb", type=float, default=200.0)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    # An MLP over a square image whose first layer makes the model about --mb megabytes.
    side = max(8, int(math.sqrt(a.mb * 1e6 / 4 / 512)))
    tmp = Path(tempfile.mkdtemp())
    agg, agg_addr = start(
        [
            "services.aggregator",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--model",
            "mclr",
            "--input-shape",
            f"1,{side},{side}",
            "--num-classes",
            "10",
            "--keep-versions",
            "2",
        ],
        tmp / "agg.json",
    )
    clu, clu_addr = start(
        [
            "services.clusterer",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--aggregator",
            agg_addr,
            "--strategy",
            "fedavg",
            "--participants",
            "1",
            "--select",
            "1",
            "--rounds",
            str(a.repeats),
            "--round-timeout-s",
            "3600",
            "--eval-timeout-s",
            "1",
        ],
        tmp / "clu.json",
    )
    try:
        stub = pb_grpc.ClustererStub(channel(clu_addr))
        meta = call_metadata(TOKEN)
        pid = "participant-00000"
        stub.Join(pb.JoinRequest(participant_id=pid, num_train=1, num_test=1), metadata=meta)
        weights: OrderedDict[str, torch.Tensor] | None = None
        pipeline: list[float] = []
        peaks = {"clusterer": 0, "aggregator": 0}
        size = 0
        for _ in range(a.repeats):
            task = stub.GetTask(pb.GetTaskRequest(participant_id=pid, wait_s=20), metadata=meta)
            while task.kind != pb.TASK_KIND_TRAIN:
                task = stub.GetTask(pb.GetTaskRequest(participant_id=pid, wait_s=20), metadata=meta)
            if weights is None:
                from services.common.streams import read_model

                _, weights = read_model(
                    stub.DownloadModel(
                        pb.DownloadModelRequest(model_version=task.model_version), metadata=meta
                    )
                )
                size = sum(t.numel() * t.element_size() for t in weights.values())
            before = {}
            for name, proc in (("clusterer", clu), ("aggregator", agg)):
                reset_peak(proc.pid)
                before[name] = rss(proc.pid, "VmRSS")
            header = tensors_pb2.ModelHeader(
                sender=pid,
                round=task.round,
                model_version=task.model_version,
                num_samples=1,
                kind="weights",
            )
            t0 = time.perf_counter()
            stub.SubmitUpdate(
                build_stream(pb.SubmitUpdateRequest, header, header, weights),
                metadata=meta,
                timeout=600,
            )
            pipeline.append(time.perf_counter() - t0)
            for name, proc in (("clusterer", clu), ("aggregator", agg)):
                peaks[name] = max(peaks[name], rss(proc.pid, "VmHWM") - before[name])
        # The same bytes over one plain TCP connection.
        assert weights is not None
        sink = subprocess.Popen(
            [sys.executable, "-c", SINK, str(a.repeats)], stdout=subprocess.PIPE
        )
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        plain: list[float] = []
        for _ in range(a.repeats):
            _, chunks, _ = encode(weights)
            data = list(chunks)
            with socket.create_connection(("127.0.0.1", port)) as s:
                t0 = time.perf_counter()
                for c in data:
                    s.sendall(c)
                s.shutdown(socket.SHUT_WR)
                s.recv(1)
                plain.append(time.perf_counter() - t0)
        sink.wait()
    finally:
        for proc in (clu, agg):
            proc.terminate()
            proc.wait()
    mb = size / 1e6
    t_pipe, t_sock = min(pipeline), min(plain)
    print(f"model: {mb:.1f} MB ({len(weights)} tensors), best of {a.repeats}")
    print(f"pipeline participant->clusterer->aggregator: {t_pipe:.2f}s, {mb / t_pipe:8.1f} MB/s")
    print(f"plain TCP socket:                            {t_sock:.2f}s, {mb / t_sock:8.1f} MB/s")
    for name, peak in peaks.items():
        print(
            f"peak memory added by the {name:<10}: {peak / 1e6:8.1f} MB "
            f"({peak / size:.2f}x the model)"
        )
    print(f"transport/socket throughput ratio: {t_sock / t_pipe:.2f}")


if __name__ == "__main__":
    main()
