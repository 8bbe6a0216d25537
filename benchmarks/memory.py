"""The aggregator's memory with and without a budget, on a model too big for every delta of
a round to stay in memory, and the aggregates the two compute.

Starts the real aggregator process twice (`--memory-budget-mb BUDGET`, then no budget) with
an MLP of about `--mb` megabytes and the flclustering strategy (the norm screen, Multi-Krum
inside two clusters, the accuracy-weighted merge). This script plays the clusterer: it
streams `--updates` updates (the global model plus seeded noise, one of them 20 times
longer: the norm screen's) through the aggregator's real ForwardUpdate RPC, calls Aggregate
and downloads the new model. It prints each run's peak resident memory (VmHWM of the
aggregator process: start-up, receiving and aggregating), the time to receive and to
aggregate, and compares the two new models:

    memory: aggregator peak RSS X.XX GB with a budget of B.BB GB (Y.YY GB with none)
    aggregate equal to the in-memory one: True (max |difference| Z)

    python benchmarks/memory.py [--mb 1000] [--updates 8] [--budget-mb 2048]
"""

from __future__ import annotations

import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from processes import aggregator_args, mclr_side, start_service  # beside this script
from script import parser  # beside this script

from services.common.pb.flclustering.v1 import aggregator_pb2 as pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as pb_grpc
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import build_stream, read_model
from services.core.tensors import flatten, spec_of
from services.transport.client import call_metadata, channel, raw_requests
from services.transport.lifecycle import memory_bytes

TOKEN = "bench"
SERVICE = "flclustering.v1.Aggregator"


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    return (memory_bytes(pid) or 0) / (1 << 20)


def run(side: int, updates: int, budget_mb: int | None, tmp: Path) -> tuple[float, np.ndarray]:
    """One aggregator's round; returns its peak RSS (MB) and the new model (flat)."""
    args = aggregator_args(
        side, "--keep-versions=2", "--strategy=flclustering", "--byzantine-fraction=0.25"
    )
    if budget_mb is not None:
        args += [f"--memory-budget-mb={budget_mb}", f"--spill-dir={tmp / 'spill'}"]
    name = "budget" if budget_mb else "none"
    proc, address = start_service(args, tmp / f"agg-{name}.json", TOKEN, tmp / f"agg-{name}.log")
    try:
        ch = channel(address)
        stub = pb_grpc.AggregatorStub(ch)
        raw_requests(stub, ch, SERVICE, "ForwardUpdate", pb.ForwardUpdateResponse)
        md = call_metadata(TOKEN)
        _, base = read_model(stub.GetModel(pb.GetModelRequest(model_version=0), metadata=md))
        spec = spec_of(base)
        start = time.perf_counter()
        for i in range(updates):
            gen = torch.Generator().manual_seed(i)
            scale = 20.0 if i == updates - 1 else 1.0
            weights = OrderedDict(
                (k, v + scale * 1e-3 * torch.randn(v.shape, generator=gen)) for k, v in base.items()
            )
            header = pb.UpdateHeader(
                model=tensors_pb2.ModelHeader(
                    sender=f"participant-{i}",
                    round=0,
                    model_version=0,
                    kind="weights",
                    num_samples=100,
                ),
                cluster=i % 2,
            )
            stream = build_stream(
                pb.ForwardUpdateRequest, header, header.model, weights, framed=True
            )
            stub.ForwardUpdate(stream, metadata=md)
            del weights, stream
        received = time.perf_counter() - start
        start = time.perf_counter()
        report = stub.Aggregate(
            pb.AggregateRequest(round=0, cluster_accuracy={0: 0.8, 1: 0.6}), metadata=md
        )
        aggregated = time.perf_counter() - start
        rejected = {r.participant_id: r.reason for r in report.rejected}
        _, new = read_model(stub.GetModel(pb.GetModelRequest(model_version=1), metadata=md))
        flat = flatten(new, spec).numpy()
        del new, base
        peak = peak_rss_mb(proc.pid)
        label = f"budget {budget_mb} MB" if budget_mb else "no budget"
        print(
            f"{label:<16}: peak RSS {peak:8,.0f} MB, received {updates} updates in "
            f"{received:5.1f} s, aggregated in {aggregated:5.1f} s, version "
            f"{report.model_version}, rejected {rejected}",
            flush=True,
        )
        ch.close()
        return peak, flat
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--mb", type=float, default=1000.0)
    p.add_argument("--updates", type=int, default=8)
    p.add_argument("--budget-mb", type=int, default=2048)
    a = p.parse_args()
    side = mclr_side(a.mb)
    tmp = Path(tempfile.mkdtemp())
    torch.set_num_threads(1)
    print(f"model: about {a.mb:,.0f} MB (mclr over 1x{side}x{side}), {a.updates} updates")
    tight, with_budget = run(side, a.updates, a.budget_mb, tmp)
    free, in_memory = run(side, a.updates, None, tmp)
    diff = float(np.abs(with_budget - in_memory).max())
    equal = bool(np.allclose(with_budget, in_memory, rtol=1e-5, atol=1e-6))
    print(
        f"memory: aggregator peak RSS {tight / 1024:.2f} GB with a budget of "
        f"{a.budget_mb / 1024:.2f} GB ({free / 1024:.2f} GB with none)"
    )
    print(f"aggregate equal to the in-memory one: {equal} (max |difference| {diff:.2e})")
    if not equal:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
