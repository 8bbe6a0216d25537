"""Fairness table: who a strategy serves, in-process (`flclustering local`), digits, 30
participants, 15 selected per round, several seeds.

Scenarios: `default` (practical-noniid, 3 label groups of 10), `rotated` (rotated-groups,
3 groups of 10 turned 0, 90 and 180 degrees) and `minority` (rotated-groups with group sizes
20, 8, 2: the smallest group has two participants and little data). Per strategy and
scenario: the final mean accuracy over every participant, the worst ground-truth group's
mean accuracy, the worst participant, and the standard deviation of participant accuracies
(the fairness figure), each a mean over the seeds. Runs go two at a time (one torch thread
each).

`flclustering+personalise` is flclustering with `--personalise`: its row is the accuracy of
the per-cluster models participants serve (and, in the JSON, `global_mean_accuracy` of its
global model, the fair merge of the cluster models).

    python benchmarks/fairness.py [--seeds 1 2 3] [--rounds 30] [--scenarios ...]
        [--strategies ...] [--workers 2] [--json FILE]
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from script import parser, write_json  # beside this script

SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "rotated": {"partition": "rotated-groups"},
    # min_cluster 1: the pair is a cluster of its own (undefended: smaller than the rule's
    # minimum, which would have it absorbed by the nearest cluster).
    "minority": {"partition": "rotated-groups", "group_sizes": (20, 8, 2), "min_cluster": 1},
}
STRATEGIES = ("fedavg", "qffl", "flclustering", "flclustering-fedavg", "flclustering+personalise")
PERSONAL = "+personalise"  # the strategy with --personalise: its rows read the cluster models
FIGURES = ("mean_accuracy", "worst_group_accuracy", "worst_accuracy", "accuracy_std")


def cell(strategy: str, scenario: str, seed: int, rounds: int) -> dict[str, Any]:
    """One run's final figures."""
    import torch

    from services.experiment import ExperimentConfig
    from services.local import run_local

    torch.set_num_threads(1)
    personal = strategy.endswith(PERSONAL)
    cfg = ExperimentConfig().replace(
        strategy=strategy.removesuffix(PERSONAL),
        personalise=personal,
        rounds=rounds,
        seed=seed,
        **SCENARIOS[scenario],
    )
    start = time.perf_counter()
    result = run_local(cfg)
    final = result.final
    if personal:  # what its participants serve: their cluster's model
        final = {k.removeprefix("personal_"): v for k, v in final.items() if "personal_" in k}
        final["global_mean_accuracy"] = result.final["mean_accuracy"]
    return {
        "strategy": strategy,
        "scenario": scenario,
        "seed": seed,
        **{k: final[k] for k in FIGURES},
        "group_accuracy": final["group_accuracy"],
        "global_mean_accuracy": final.get("global_mean_accuracy"),
        "purity": result.clustering.get("purity"),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write every run's figures to this file")
    a = p.parse_args()
    jobs = [(s, sc, seed, a.rounds) for sc in a.scenarios for s in a.strategies for seed in a.seeds]
    start = time.perf_counter()
    with ProcessPoolExecutor(a.workers) as pool:
        runs = list(pool.map(cell, *zip(*jobs, strict=True)))
    print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s; seeds {a.seeds}")
    for sc in a.scenarios:
        print(f"\n{sc}: mean of {len(a.seeds)} seed(s)\n")
        print("| strategy | mean | worst group | worst participant | std |")
        print("|---|---|---|---|---|")
        for s in a.strategies:
            got = [r for r in runs if r["strategy"] == s and r["scenario"] == sc]
            cells = [f"{statistics.fmean(r[k] for r in got):.3f}" for k in FIGURES]
            print(f"| {s} | " + " | ".join(cells) + " |")
    write_json(a.json, runs, indent=1)


if __name__ == "__main__":
    main()
