"""What the benchmarks that start the real services share: starting one, reading its CPU,
uploading to it as a participant.

Imported by path (the scripts' directory is on sys.path when they run), like relay.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import build_stream


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_service(
    args: list[str], ready: Path, token: str, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """`python -m ARGS` with a shared dev token, quiet logs (to `log` when given); waits for
    its ready file and returns the process and its gRPC address."""
    env = {**os.environ, "FLCLUSTERING_AUTH_TOKEN": token, "FLCLUSTERING_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", *args, f"--ready-file={ready}"]
    if log is None:
        proc = subprocess.Popen(cmd, env=env)
    else:
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{args[0]} did not start" + (f" (see {log})" if log else ""))
        time.sleep(0.1)
    return proc, json.loads(ready.read_text())["grpc"]


def mclr_side(mb: float, least: int = 8) -> int:
    """The image side that makes `mclr` (an MLP whose first layer is side^2 x 512) a model
    of about `mb` megabytes."""
    return max(least, int(math.sqrt(mb * 1e6 / 4 / 512)))


def aggregator_args(side: int, *extra: str) -> list[str]:
    """`python -m` arguments of an aggregator on a free loopback port serving `mclr` over
    1 x side x side images, plus `extra` flags."""
    return [
        "services.aggregator",
        "--host=127.0.0.1",
        "--port=0",
        "--model=mclr",
        f"--input-shape=1,{side},{side}",
        "--num-classes=10",
        *extra,
    ]


def submission(
    pid: str, task: Any, weights: Mapping[str, torch.Tensor], num_samples: int
) -> Iterator[bytes]:
    """The SubmitUpdate stream (framed) of participant pid's weights for a TRAIN task,
    encoded as it is sent."""
    header = tensors_pb2.ModelHeader(
        sender=pid,
        round=task.round,
        model_version=task.model_version,
        num_samples=num_samples,
        kind="weights",
    )
    return build_stream(pb.SubmitUpdateRequest, header, header, weights, framed=True)
