"""What one federated round costs when training costs nothing: the protocol's own overhead.

The aggregator and the clusterer run as separate processes (as in `flclustering simulate`);
`--participants` processes (default 8) each play one participant that does no training:
told to train, it downloads the global model (a 10 MB MLP by default), adds a small fixed
noise and uploads the result, through the real participant's stub and stream code
(`worker.clusterer_stub`, `read_model`, `build_stream`). The federation runs fedavg, all
participants selected every round, for `--rounds` rounds (default 20) after one warm-up
round (the participants' start-up, first connections and downloads; not counted). A
round's wall time is measured from the first TRAIN task of the round reaching a
participant to the first TRAIN task of the next (the last round: to the first DONE).
Prints each round, the phases as the clusterer records them, the CPU each kind of process
spent per counted round (start-up left out) and what that CPU alone takes of the machine's
cores, and ends with

    round: mean X.XXX s, p95 Y.YYY s

(goal: X <= 0.25 here; Flower's gRPC path takes 0.51 s for the same round on this machine).

    python benchmarks/round.py [--participants 8] [--rounds 20] [--mb 10]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from processes import (  # beside this script
    aggregator_args,
    cpu_s,
    mclr_side,
    start_service,
    submission,
)

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.transport.client import call_metadata, channel

TOKEN = "bench"


def participant(index: int, address: str, out: Any) -> None:
    """One participant's life, on the real participant's stub and stream code; the times
    it got each TRAIN task (by round) and DONE, and the CPU it used."""
    import torch

    from services.common.streams import read_model
    from services.participant.worker import clusterer_stub

    torch.set_num_threads(1)  # as services.participant does on the CPU
    pid = f"participant-{index:05d}"
    stub = clusterer_stub(channel(address))
    md = call_metadata(TOKEN)
    stub.Join(
        pb.JoinRequest(participant_id=pid, num_train=100, num_test=20),
        metadata=md,
        wait_for_ready=True,
        timeout=120,
    )
    gen = torch.Generator().manual_seed(index)
    noise: dict[str, torch.Tensor] = {}
    trains: dict[int, float] = {}
    counted = 0.0  # CPU time when round 1 (the first counted) began here
    while True:
        task = stub.GetTask(pb.GetTaskRequest(participant_id=pid, wait_s=20), metadata=md)
        got = time.time()
        if task.kind == pb.TASK_KIND_DONE:
            out.put((index, trains, got, time.process_time() - counted))
            return
        if task.kind == pb.TASK_KIND_TRAIN:
            trains[task.round] = got
            if task.round == 1:
                counted = time.process_time()
            request = pb.DownloadModelRequest(model_version=task.model_version)
            _, weights = read_model(
                stub.DownloadModel(request, metadata=md), cls=pb.DownloadModelResponse
            )
            for name, w in weights.items():
                if name not in noise:
                    noise[name] = 1e-3 * torch.randn(w.shape, generator=gen)
                w += noise[name]
            stub.SubmitUpdate(submission(pid, task, weights, 100), metadata=md, timeout=120)
        elif task.kind == pb.TASK_KIND_EVALUATE:
            stub.ReportEvaluation(
                pb.ReportEvaluationRequest(
                    participant_id=pid,
                    evaluation_id=task.evaluation_id,
                    model_version=task.model_version,
                    accuracy=0.9,
                    loss=0.3,
                    num_examples=20,
                ),
                metadata=md,
                timeout=60,
            )


class Sampler:
    """The CPU time of processes, sampled every 20 ms from a thread (read at any moment
    after by interpolation), so that a run's start-up can be left out."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids
        self.samples: list[tuple[float, ...]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.time(), *(cpu_s(p) for p in self.pids)))
            self._done.wait(0.02)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def at(self, when: float) -> list[float]:
        """Each process's CPU seconds at time `when` (within the samples)."""
        times = [s[0] for s in self.samples]
        return [
            float(np.interp(when, times, [s[i] for s in self.samples]))
            for i in range(1, len(self.pids) + 1)
        ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--participants", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument(
        "--mb", type=float, default=10.0, help="model size in MB (an MLP over a square image)"
    )
    a = ap.parse_args()
    if min(a.participants, a.rounds) < 1 or a.mb <= 0:
        ap.error("--participants and --rounds must be at least 1, --mb positive")
    # `mclr` on images is an MLP whose first layer (side^2 x 512) makes up the model.
    side = mclr_side(a.mb, least=4)
    work = Path(tempfile.mkdtemp(prefix="flc-round-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        agg, agg_addr = start_service(
            aggregator_args(side, "--strategy=fedavg"),
            work / "aggregator.json",
            TOKEN,
            work / "aggregator.log",
        )
        procs.append(agg)
        clu, clu_addr = start_service(
            [
                "services.clusterer", "--host=127.0.0.1", "--port=0",
                f"--aggregator={agg_addr}", "--strategy=fedavg",
                f"--participants={a.participants}", f"--select={a.participants}",
                f"--rounds={a.rounds + 1}", f"--state-dir={work / 'clusterer'}",
            ],
            work / "clusterer.json",
            TOKEN,
            work / "clusterer.log",
        )  # fmt: skip
        procs.append(clu)
        spawn = multiprocessing.get_context("spawn")
        out = spawn.Queue()
        players = [
            spawn.Process(target=participant, args=(i, clu_addr, out), daemon=True)
            for i in range(a.participants)
        ]
        for p in players:
            p.start()
        services = Sampler(clu.pid, agg.pid)
        results = [out.get(timeout=600) for _ in players]
        services.stop()
        for p in players:
            p.join(30)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    rounds = range(1, a.rounds + 1)  # round 0 warms up
    starts = {r: min(res[1][r] for res in results if r in res[1]) for r in range(a.rounds + 1)}
    done = min(res[2] for res in results)
    took = [starts.get(r + 1, done) - starts[r] for r in rounds]
    phases: dict[str, list[float]] = {}
    history = work / "clusterer" / "rounds.jsonl"  # the clusterer's round records
    for line in history.read_text().splitlines()[1:] if history.exists() else []:
        for name, seconds in (json.loads(line).get("phases") or {}).items():
            phases.setdefault(name, []).append(float(seconds))
    mb = (512 * side * side + 512 * 522 + 10) * 4 / 1e6
    print(f"model: {mb:.1f} MB, {a.participants} participants, {a.rounds} rounds (+1 warm-up)")
    print("rounds (s): " + " ".join(f"{t:.3f}" for t in took))
    if phases:
        print("phases, mean (s): " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in phases.items()))
    # CPU over the counted rounds (from the first TRAIN task of round 1 to the first DONE):
    # the services' sampled, the participants' own.
    began = starts[1]
    clu_cpu, agg_cpu = (b - a for a, b in zip(services.at(began), services.at(done), strict=True))
    cpu = {"clusterer": clu_cpu, "aggregator": agg_cpu, "participants": sum(r[3] for r in results)}
    total = sum(cpu.values()) / a.rounds
    cores = os.cpu_count() or 1
    print(
        "CPU per round (s): "
        + ", ".join(f"{k} {v / a.rounds:.3f}" for k, v in cpu.items())
        + f"; together {total:.3f}, at least {total / cores:.3f} s of wall time on {cores} cores"
    )
    print(f"round: mean {np.mean(took):.3f} s, p95 {np.percentile(took, 95):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
