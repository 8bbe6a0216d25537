"""Robustness table: attacks x strategies, in-process (`flclustering local`), digits,
practical-noniid, 30 participants in 3 groups, 15 selected per round, several seeds, at
each attacker share.

Rows are attacks, columns strategies, cells the final mean accuracy over the seeds (every
participant's test split, the truth whatever attackers report). The colluding attacks
(alie, ipm, min-max, min-sum) pool the honest deltas of the round's attackers and all send
one crafted delta; `ipm-large` is IPM with epsilon 10 (the plain row: 0.1). Runs go two at a
time (one torch thread each). Prints one markdown table per share and, with --json, the
cells.

    python benchmarks/robustness.py [--seeds 0 1 2] [--rates 0.2 0.3] [--rounds 30]
        [--attacks ...] [--strategies ...] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

ATTACKS: dict[str, dict[str, Any]] = {
    "none": {},
    "scaling": {"attack": "scaling"},
    "sign-flip": {"attack": "sign-flip"},
    "gaussian": {"attack": "gaussian"},
    "label-flip": {"attack": "label-flip"},
    "alie": {"attack": "alie"},
    "ipm": {"attack": "ipm", "attack_epsilon": 0.1},
    "ipm-large": {"attack": "ipm", "attack_epsilon": 10.0},
    "min-max": {"attack": "min-max"},
    "min-sum": {"attack": "min-sum"},
    "lying-evaluation": {"attack": "lying-evaluation"},
}
STRATEGIES = ("fedavg", "krum", "multi-krum", "median", "trimmed-mean", "flclustering")


def cell(strategy: str, attack: str, rate: float, seed: int, rounds: int) -> dict[str, Any]:
    """One run's final figures."""
    import torch

    from services.experiment import ExperimentConfig
    from services.local import run_local

    torch.set_num_threads(1)
    extra = ATTACKS[attack]
    cfg = ExperimentConfig().replace(
        strategy=strategy,
        rounds=rounds,
        seed=seed,
        **({"attack_rate": rate, **extra} if extra else {}),
    )
    start = time.perf_counter()
    result = run_local(cfg)
    last = result.rounds[-1]
    return {
        "strategy": strategy,
        "attack": attack,
        "rate": rate,
        "seed": seed,
        "final": last["mean_accuracy"],
        "worst": last["worst_accuracy"],
        "rejected_attackers": sum(r["rejected_attackers"] for r in result.rounds),
        "attackers_selected": sum(r["attackers_selected"] for r in result.rounds),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write every run's figures to this file")
    a = p.parse_args()
    jobs = [
        (s, att, rate, seed, a.rounds)
        for rate in a.rates
        for att in a.attacks
        for s in a.strategies
        for seed in a.seeds
        if not (att == "none" and rate != a.rates[0])  # the clean run once
    ]
    start = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as pool:
        runs = list(pool.map(cell, *zip(*jobs, strict=True)))
    by: dict[tuple[str, str, float], list[float]] = {}
    for r in runs:
        rate = a.rates[0] if r["attack"] == "none" else r["rate"]
        by.setdefault((r["attack"], r["strategy"], rate), []).append(r["final"])
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s; seeds {a.seeds}")
    for rate in a.rates:
        print(f"\nfinal mean accuracy, {rate:.0%} attackers, mean of {len(a.seeds)} seed(s)\n")
        print("| attack | " + " | ".join(a.strategies) + " |")
        print("|---" * (len(a.strategies) + 1) + "|")
        for att in a.attacks:
            key_rate = a.rates[0] if att == "none" else rate
            cells = [statistics.fmean(by[(att, s, key_rate)]) for s in a.strategies]
            best = max(cells)
            shown = [f"**{c:.3f}**" if c == best else f"{c:.3f}" for c in cells]
            print(f"| {att} | " + " | ".join(shown) + " |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(runs, fh, indent=1)


if __name__ == "__main__":
    main()
