"""Robustness calibration: strategies x attacks on digits, in-process, several seeds.

Prints final mean accuracy, the mean over the last 10 rounds, the worst round in the second
half, attackers selected and rejected, per (strategy, attack). This is the measurement the
defence's design rests on (docs/decisions.md, "The defence"). Each cell runs `flclustering local`'s
loop with its defaults (30 participants in 3 groups, 15 selected, 30 rounds).

    python benchmarks/defence.py [--seeds 0 1] [--rounds 30] [--cases default|full]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from script import parser, write_json  # beside this script

from services.experiment import ExperimentConfig
from services.local import run_local

SCALING = {"attack": "scaling", "attack_rate": 0.3}
CASES: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "default": [
        ("fedavg", {}),
        ("fedavg", SCALING),
        ("flclustering", {}),
        ("flclustering", SCALING),
        ("flclustering-krum", {}),
        ("flclustering-krum", SCALING),
    ],
}
CASES["full"] = CASES["default"] + [
    ("flclustering", {**SCALING, "byzantine_fraction": 0.3}),
    ("flclustering", {"attack": "sign-flip", "attack_rate": 0.3}),
    ("flclustering", {"attack": "gaussian", "attack_rate": 0.3}),
    ("flclustering", {"attack": "label-flip", "attack_rate": 0.3}),
    ("flclustering", {**SCALING, "attack_factor": 10.0}),
    ("median", SCALING),
    ("multi-krum", SCALING),
    ("alpha-fedavg", {}),
    ("qffl", {}),
]


def summarise(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Final, last-10 mean and second-half minimum of mean accuracy, and rejections."""
    acc = [r["mean_accuracy"] for r in rounds]
    return {
        "final": acc[-1],
        "last10": statistics.fmean(acc[-10:]),
        "min2nd": min(acc[len(acc) // 2 :]),
        "std": rounds[-1]["accuracy_std"],
        "att_sel": sum(r["attackers_selected"] for r in rounds),
        "att_rej": sum(r["rejected_attackers"] for r in rounds),
        "fallbacks": sum(r["fallbacks"] for r in rounds),
    }


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=ExperimentConfig().federation.rounds)
    p.add_argument("--cases", choices=sorted(CASES), default="default")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    rows = []
    print(
        f"{'strategy':<18} {'case':<38} {'final':>6} {'last10':>6} {'min2nd':>6} {'std':>6} "
        f"{'att sel/rej':>11} {'fallb':>5}"
    )
    for strategy, extra in CASES[args.cases]:
        per_seed = []
        for seed in args.seeds:
            start = time.perf_counter()
            cfg = ExperimentConfig().replace(  # the rules alone, without the guard
                strategy=strategy, rounds=args.rounds, seed=seed, guard=False, **extra
            )
            per_seed.append(summarise(run_local(cfg).rounds) | {"s": time.perf_counter() - start})
        mean = {k: statistics.fmean(r[k] for r in per_seed) for k in per_seed[0]}
        case = ", ".join(f"{k}={v}" for k, v in extra.items()) or "clean"
        rows.append({"strategy": strategy, "case": case, "seeds": args.seeds, **mean})
        print(
            f"{strategy:<18} {case:<38} {mean['final']:>6.3f} {mean['last10']:>6.3f} "
            f"{mean['min2nd']:>6.3f} {mean['std']:>6.3f} "
            f"{mean['att_sel']:>5.0f}/{mean['att_rej']:<5.0f} {mean['fallbacks']:>5.0f}",
            flush=True,
        )
    write_json(args.json, rows, indent=2)


if __name__ == "__main__":
    main()
