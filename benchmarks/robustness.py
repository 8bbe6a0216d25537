"""Robustness table: attacks x strategies, in-process (`flclustering local`), digits,
practical-noniid, 30 participants in 3 groups, 15 selected per round, several seeds, at
each attacker share.

Rows are attacks, columns strategies, cells the final mean accuracy over the seeds (every
participant's test split, the truth whatever attackers report); for the backdoor also its
success rate (triggered test inputs of other classes classified as the target). The
colluding attacks (alie, ipm, min-max, min-sum, cluster-steering) pool the honest deltas
of the round's attackers and all send one crafted delta; `ipm-large` is IPM with epsilon
10 (the plain row: 0.1).

Searched strengths: the rows "alie, worst z" and "ipm, worst epsilon" run the whole
pipeline at each strength of a grid and keep, per column, the strength that hurt it most
(the strength is shown in the cell). Evasive forms (`--evasive`, flclustering only): the
colluders jitter their copies (0.1 x the median distance between their honest deltas) to
stay clear of the near-twin screen. Runs go two at a time (one torch thread each). Prints
one markdown table per share and, with --json, every run's figures.

    python benchmarks/robustness.py [--seeds 0 1 2] [--rates 0.2 0.3] [--rounds 30]
        [--attacks ...] [--strategies ...] [--workers 2] [--no-search] [--no-evasive]
        [--json FILE] [--load FILE ...]
"""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from script import parser, write_json  # beside this script

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
    "backdoor": {"attack": "backdoor"},
    "lying-evaluation": {"attack": "lying-evaluation"},
    "cluster-steering": {"attack": "cluster-steering"},
}
# The strength grids of the searched rows: each point is a whole run per column and seed.
SEARCHED: dict[str, dict[str, dict[str, Any]]] = {
    "alie, worst z": {
        "z from n, f": ATTACKS["alie"],
        **{f"z {z:g}": {"attack": "alie", "attack_z": z} for z in (1.0, 2.0, 4.0)},
    },
    "ipm, worst epsilon": {
        f"eps {e:g}": {"attack": "ipm", "attack_epsilon": e} for e in (0.1, 0.5, 2.0, 10.0)
    },
}
JITTER = 0.1
EVASIVE: dict[str, dict[str, Any]] = {
    f"{name}, jittered": {**ATTACKS[name], "attack_jitter": JITTER}
    for name in ("alie", "ipm", "min-max", "cluster-steering")
}
VARIANTS: dict[str, dict[str, Any]] = {
    **ATTACKS,
    **{v: kw for grid in SEARCHED.values() for v, kw in grid.items() if kw not in ATTACKS.values()},
    **EVASIVE,
}
STRATEGIES = ("fedavg", "krum", "multi-krum", "median", "trimmed-mean", "flclustering")


def cell(strategy: str, attack: str, rate: float, seed: int, rounds: int) -> dict[str, Any]:
    """One run's final figures (`attack` names an entry of VARIANTS)."""
    import torch

    from services.experiment import ExperimentConfig
    from services.local import run_local

    torch.set_num_threads(1)
    extra = VARIANTS[attack]
    cfg = ExperimentConfig().replace(
        strategy=strategy,
        rounds=rounds,
        seed=seed,
        guard=False,  # the rules alone: the divergence guard is benchmarks/guard.py's
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
        "backdoor_success_rate": last.get("backdoor_success_rate"),
        "rejected_attackers": sum(r["rejected_attackers"] for r in result.rounds),
        "attackers_selected": sum(r["attackers_selected"] for r in result.rounds),
        "seconds": time.perf_counter() - start,
    }


def variant_of(kwargs: dict[str, Any]) -> str:
    """The VARIANTS name of a grid point (a plain attack when it is one)."""
    return next(name for name, kw in VARIANTS.items() if kw == kwargs)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--attacks", nargs="+", choices=list(ATTACKS), default=list(ATTACKS))
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--no-search", action="store_true", help="skip the searched-strength rows")
    p.add_argument("--no-evasive", action="store_true", help="skip the jittered rows")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="also write every run's figures to this file")
    p.add_argument(
        "--load",
        nargs="+",
        metavar="JSON",
        help="print the tables from runs saved with --json instead of running (a later file's "
        "run replaces an earlier one's for the same strategy, attack, share and seed)",
    )
    a = p.parse_args()
    first = a.rates[0]
    wanted = {(att, s) for att in a.attacks for s in a.strategies}
    if not a.no_search:
        wanted |= {
            (variant_of(kw), s)
            for g in SEARCHED.values()
            for kw in g.values()
            for s in a.strategies
        }
    if not a.no_evasive and "flclustering" in a.strategies:
        wanted |= {(v, "flclustering") for v in EVASIVE}
    jobs = [
        (s, att, rate, seed, a.rounds)
        for rate in a.rates
        for att in VARIANTS
        for s in a.strategies
        for seed in a.seeds
        if (att, s) in wanted and not (att == "none" and rate != first)  # clean runs once
    ]
    start = time.perf_counter()
    if a.load:
        saved: dict[tuple[str, str, float, int], dict[str, Any]] = {}
        for path in a.load:
            with open(path) as fh:
                for r in json.load(fh):
                    saved[(r["strategy"], r["attack"], r["rate"], r["seed"])] = r
        runs = [saved[(s, att, rate, seed)] for s, att, rate, seed, _ in jobs]
    else:
        with ProcessPoolExecutor(a.workers) as pool:
            runs = list(pool.map(cell, *zip(*jobs, strict=True)))
    by: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for r in runs:
        rate = first if r["attack"] == "none" else r["rate"]
        by.setdefault((r["attack"], r["strategy"], rate), []).append(r)

    def mean(att: str, s: str, rate: float, key: str = "final") -> float | None:
        got = by.get((att, s, first if att == "none" else rate))
        return None if not got else statistics.fmean(r[key] for r in got)

    took = (
        f"loaded from {', '.join(a.load)}" if a.load else f"in {time.perf_counter() - start:.0f} s"
    )
    print(f"{len(runs)} runs {took}; seeds {a.seeds}")
    for rate in a.rates:
        print(f"\nfinal mean accuracy, {rate:.0%} attackers, mean of {len(a.seeds)} seed(s)\n")
        print("| attack | " + " | ".join(a.strategies) + " |")
        print("|---" * (len(a.strategies) + 1) + "|")
        rows: list[tuple[str, list[tuple[float | None, str]]]] = []
        for att in a.attacks:
            cells = []
            for s in a.strategies:
                acc = mean(att, s, rate)
                note = ""
                if acc is not None and att == "backdoor":
                    note = f" (ASR {mean(att, s, rate, 'backdoor_success_rate'):.2f})"
                cells.append((acc, note))
            rows.append((att, cells))
        if not a.no_search:
            for name, grid in SEARCHED.items():
                cells = []
                for s in a.strategies:
                    tried = [(mean(variant_of(kw), s, rate), label) for label, kw in grid.items()]
                    got = [(acc, label) for acc, label in tried if acc is not None]
                    acc, label = min(got) if got else (None, "")
                    cells.append((acc, f" ({label})" if acc is not None else ""))
                rows.append((name, cells))
        if not a.no_evasive and "flclustering" in a.strategies:
            for v in EVASIVE:
                rows.append((v, [(mean(v, s, rate), "") for s in a.strategies]))
        for name, cells in rows:
            accs = [c for c, _ in cells if c is not None]
            best = max(accs) if accs else None
            shown = [
                "-" if c is None else (f"**{c:.3f}**" if c == best else f"{c:.3f}") + note
                for c, note in cells
            ]
            print(f"| {name} | " + " | ".join(shown) + " |")
    write_json(a.json, runs, indent=1)


if __name__ == "__main__":
    main()
