"""Compressed updates: bytes, time and accuracy per scheme (`--compression`).

For each scheme (none, fp16, int8, topk:0.1, topk:0.01) on digits, practical-noniid, 30
participants, 15 selected per round, flclustering:

- in-process (`flclustering local`, several seeds): the bytes of update data uploaded per
  round (what the participants' streams carry: the same encoder, exactly) and the final
  mean accuracy over every participant, means over the seeds;
- through the services (`flclustering simulate`, real processes and gRPC, one seed): the
  mean seconds a round takes and its final mean accuracy.

`he` (`--secure he`: CKKS-encrypted weights, summed by an aggregator that cannot read them)
runs FedAvg, the only rule a sum of ciphertexts computes, so `fedavg` (plaintext FedAvg,
the same seeds) is its row to compare with.

    python benchmarks/compression.py [--seeds 0 1 2] [--rounds 30] [--schemes ...]
        [--no-simulate] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

SCHEMES = ("none", "fp16", "int8", "topk:0.1", "topk:0.01", "fedavg", "he")


def settings_of(scheme: str) -> dict[str, str]:
    """A row's settings: a compression scheme under flclustering, or FedAvg in the clear
    (`fedavg`) or encrypted (`he`)."""
    if scheme == "fedavg":
        return {"strategy": "fedavg"}
    if scheme == "he":
        return {"strategy": "fedavg", "secure": "he"}
    return {"compression": scheme}


def local_cell(scheme: str, seed: int, rounds: int) -> dict[str, Any]:
    """One in-process run: bytes per round and the final accuracy."""
    import torch

    from services.experiment import ExperimentConfig
    from services.local import run_local

    torch.set_num_threads(1)
    cfg = ExperimentConfig().replace(**settings_of(scheme), rounds=rounds, seed=seed)
    result = run_local(cfg)
    return {
        "scheme": scheme,
        "seed": seed,
        "upload_bytes": statistics.fmean(r["upload_bytes"] for r in result.rounds),
        "mean_accuracy": result.final["mean_accuracy"],
    }


def simulate_cell(scheme: str, rounds: int) -> dict[str, Any]:
    """One run through the services: seconds per round and the final accuracy."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            "-m",
            "services.cli",
            "simulate",
            *(a for k, v in settings_of(scheme).items() for a in (f"--{k}", v)),
            "--rounds",
            str(rounds),
            "--out",
            out,
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        results = json.loads((Path(out) / "results.json").read_text())
    return {
        "scheme": scheme,
        "seconds_per_round": statistics.fmean(r["duration_s"] for r in results["rounds"]),
        "simulate_accuracy": results["final"]["mean_accuracy"],
    }


def _ratio(base: float, bytes_: float) -> str:
    """How many times fewer (or more) bytes than `none`."""
    return f"{base / bytes_:.1f}x fewer" if bytes_ <= base else f"{bytes_ / base:.1f}x more"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--no-simulate", action="store_true", help="in-process runs only")
    parser.add_argument("--json", type=Path, default=None, help="write every run here")
    args = parser.parse_args()

    with ProcessPoolExecutor(2) as pool:
        jobs = [
            pool.submit(local_cell, s, seed, args.rounds)
            for s in args.schemes
            for seed in args.seeds
        ]
        local = [j.result() for j in jobs]
    served = [] if args.no_simulate else [simulate_cell(s, args.rounds) for s in args.schemes]

    rows = []
    for scheme in args.schemes:
        mine = [r for r in local if r["scheme"] == scheme]
        row = {
            "scheme": scheme,
            "upload_bytes": statistics.fmean(r["upload_bytes"] for r in mine),
            "mean_accuracy": statistics.fmean(r["mean_accuracy"] for r in mine),
        }
        row |= next((s for s in served if s["scheme"] == scheme), {})
        rows.append(row)
    base = next((r for r in rows if r["scheme"] == "none"), rows[0])
    print(
        "| scheme | bytes uploaded per round | bytes against none | final mean accuracy "
        f"(local, seeds {' '.join(map(str, args.seeds))}) | seconds per round (simulate) "
        "| final mean accuracy (simulate) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        secs = f"{r['seconds_per_round']:.3f}" if "seconds_per_round" in r else "-"
        acc = f"{r['simulate_accuracy']:.3f}" if "simulate_accuracy" in r else "-"
        print(
            f"| {r['scheme']} | {r['upload_bytes'] / 1e6:.3f} MB | "
            f"{_ratio(base['upload_bytes'], r['upload_bytes'])} | {r['mean_accuracy']:.3f} | "
            f"{secs} | {acc} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"local": local, "simulate": served}, indent=2) + "\n")


if __name__ == "__main__":
    main()
