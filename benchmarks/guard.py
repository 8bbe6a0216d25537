"""The divergence guard's thresholds, measured: what honest rounds do, and what attacks do.

Honest runs (`flclustering local`, digits, 30 participants, 30 rounds) on four partitions
(practical-noniid, Dirichlet(0.3), iid, rotated groups) with flclustering and FedAvg. Per
run it prints the largest ratio of a merge's step `||w_{t+1} - w_t||` to the median of the
five steps before it (the guard refuses past STEP_FACTOR), the largest growth of the
largest weight in one round (refused past GROWTH), the most evaluators whose accuracy fell
by more than FALL in one round (a rollback needs more than half), and whether the guard or
a rollback ever fired (it must not, on honest runs). Then attacked runs: how the guard and
the rollbacks act, and the final accuracy.

    python benchmarks/guard.py [--seeds 1 2] [--rounds 30] [--workers 2]
"""

from __future__ import annotations

import itertools
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from script import parser  # beside this script

PARTITIONS: dict[str, dict[str, Any]] = {
    "practical-noniid": {},
    "dirichlet(0.3)": {"partition": "dirichlet", "alpha": 0.3},
    "iid": {"partition": "iid"},
    "rotated": {"partition": "rotated-groups"},
}
HONEST = [(p, s) for p in PARTITIONS for s in ("flclustering", "fedavg")]
ATTACKS: dict[str, dict[str, Any]] = {
    "cluster-steering 30%, jitter 0.1": {
        "attack": "cluster-steering",
        "attack_rate": 0.3,
        "attack_jitter": 0.1,
    },
    "scaling x1e30 every round, 20%": {
        "attack": "scaling",
        "attack_rate": 0.2,
        "attack_factor": 1e30,
        "attack_every": 1,
    },
    "scaling x-1 every 3rd round, 50%": {
        "attack": "scaling",
        "attack_rate": 0.5,
        "attack_factor": -1.0,
        "attack_every": 3,
    },
}


def run(
    partition: str, strategy: str, attack: str, seed: int, rounds: int, guard: bool
) -> dict[str, Any]:
    """One run's guard figures."""
    import torch

    from services.core.guard import STEPS_KEPT
    from services.experiment import ExperimentConfig
    from services.local import run_local

    torch.set_num_threads(1)
    cfg = ExperimentConfig().replace(
        strategy=strategy,
        rounds=rounds,
        seed=seed,
        guard=guard,
        **PARTITIONS[partition],
        **ATTACKS.get(attack, {}),
    )
    result = run_local(cfg)
    rs = result.rounds
    ratios, growth = [], []
    accepted: list[float] = []
    top = None
    for r in rs:
        if len(accepted) >= 3 and not r["merge_refused"]:
            typical = statistics.median(accepted[-STEPS_KEPT:])
            if typical > 0:
                ratios.append(r["merge_step"] / typical)
        if not r["merge_refused"] and not r["rolled_back"] and r["merge_step"] > 0:
            accepted.append(r["merge_step"])
        if top is not None:
            growth.append(r["largest_weight"] / max(top, 1e-12))
        top = r["largest_weight"]
    n = cfg.federation.participants
    return {
        "partition": partition,
        "strategy": strategy,
        "attack": attack,
        "seed": seed,
        "max_step_ratio": max(ratios, default=0.0),
        "max_growth": max(growth, default=0.0),
        "max_fell_share": max(r["fell"] for r in rs) / n,
        "max_median_drop": max(r["median_drop"] for r in rs),
        "min_median_ratio": min(r["median_ratio"] for r in rs),
        "mean_fall": max(
            (a["mean_accuracy"] - b["mean_accuracy"] for a, b in itertools.pairwise(rs)),
            default=0.0,
        ),
        "refused": sum(bool(r["merge_refused"]) for r in rs),
        "rolled_back": sum(bool(r["rolled_back"]) for r in rs),
        "final": result.final["mean_accuracy"],
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-attacks", action="store_true")
    p.add_argument(
        "--no-guard", action="store_true", help="measure with --guard false (the raw figures)"
    )
    a = p.parse_args()
    guard = not a.no_guard
    jobs = [(part, strat, "none", s, a.rounds, guard) for part, strat in HONEST for s in a.seeds]
    if not a.skip_attacks:
        jobs += [
            (part, strat, att, s, a.rounds, guard)
            for att in ATTACKS
            for part in ("practical-noniid", "dirichlet(0.3)")
            for strat in ("flclustering", "fedavg")
            for s in a.seeds
        ]
    start = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as pool:
        runs = list(pool.map(run, *zip(*jobs, strict=True)))
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s; seeds {a.seeds}\n")
    print(f"guard {'on' if guard else 'off'}\n")
    print(
        "| attack | partition | strategy | step / median, max | growth, max | fell, max share "
        "| median evaluator's fall, max | median evaluator's new / old, min "
        "| mean accuracy's fall, max | merges refused "
        "| rolled back | final accuracy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted(
        {(r["attack"], r["partition"], r["strategy"]) for r in runs},
        key=lambda k: (k[0] != "none", k),
    )
    for att, part, strat in keys:
        got = [
            r for r in runs if (r["attack"], r["partition"], r["strategy"]) == (att, part, strat)
        ]
        print(
            f"| {att} | {part} | {strat} | {max(r['max_step_ratio'] for r in got):.2f} | "
            f"{max(r['max_growth'] for r in got):.2f} | "
            f"{max(r['max_fell_share'] for r in got):.2f} | "
            f"{max(r['max_median_drop'] for r in got):.2f} | "
            f"{min(r['min_median_ratio'] for r in got):.2f} | "
            f"{max(r['mean_fall'] for r in got):.2f} | "
            f"{sum(r['refused'] for r in got)} | {sum(r['rolled_back'] for r in got)} | "
            f"{statistics.fmean(r['final'] for r in got):.3f} |"
        )


if __name__ == "__main__":
    main()
