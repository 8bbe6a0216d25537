"""What the aggregator acknowledged survives kill -9: a real process, a real SIGKILL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from services.common.grpc_client import call_metadata, channel
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import build_stream, read_model

TOKEN = "durability-token"
META = call_metadata(TOKEN)


def start_aggregator(state: Path, ready: Path) -> tuple[subprocess.Popen[bytes], str]:
    ready.unlink(missing_ok=True)
    env = {**os.environ, "FLCLUSTERING_AUTH_TOKEN": TOKEN}
    flags = ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file"]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.aggregator",
            *flags,
            str(ready),
            "--state-dir",
            str(state),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "aggregator did not start"
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["grpc"]


def status(stub: agg_grpc.AggregatorStub) -> agg_pb.GetAggregatorStatusResponse:
    return stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META, timeout=10)


def test_an_acknowledged_update_survives_kill_9(tmp_path):
    proc, address = start_aggregator(tmp_path / "state", tmp_path / "ready.json")
    try:
        stub = agg_grpc.AggregatorStub(channel(address))
        _, weights = read_model(stub.GetModel(agg_pb.GetModelRequest(), metadata=META))
        model = tensors_pb2.ModelHeader(
            sender="participant-00001", round=0, model_version=0, num_samples=5, kind="weights"
        )
        update = agg_pb.UpdateHeader(model=model, cluster=0)
        stream = build_stream(agg_pb.ForwardUpdateRequest, update, update.model, weights)
        assert stub.ForwardUpdate(stream, metadata=META, timeout=60).accepted
        assert status(stub).pending_updates == 1
    finally:
        proc.kill()  # SIGKILL right after the acknowledgement
        proc.wait()
    proc, address = start_aggregator(tmp_path / "state", tmp_path / "ready.json")
    try:
        stub = agg_grpc.AggregatorStub(channel(address))
        after = status(stub)
        assert (after.pending_updates, after.open_round, after.model_version) == (1, 0, 0)
        reply = stub.Aggregate(
            agg_pb.AggregateRequest(round=0), metadata=META
        )
        assert reply.updates == 1
    finally:
        proc.terminate()
        proc.wait(30)
