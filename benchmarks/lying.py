"""Lying evaluators against the fair merge: how far liars move the cluster weights.

The fair merge weighs cluster c by acc_c^-q, and acc_c is what c's evaluators report. This
benchmark trains a real federation in process (`flclustering local`, digits,
practical-noniid, flclustering) for a few rounds, has every participant evaluate the global
model on its own test split (the honest reports), then replaces the reports of the liars
(the same draw as `--attack lying-evaluation --attack-rate R`) by 0 or by 1 and computes
the weights the next merge would use, with two estimators of acc_c measured in this run:

- `planned` (before): the median over the evaluators `plan_round` draws (up to
  `--eval-per-cluster`, 5, per selected cluster);
- `members` (now): the median over every member of the cluster that evaluated the model
  when it was published, plus the planned evaluators.

It prints the honest weights, and per setting and lie the largest change of any cluster's
weight (the shift). Settings: one liar among 6 (three clusters of 2), one among 9 (three
of 3), 30% liars among 30 spread over the groups (3 in each cluster of 10), and 30% placed
at random. The goal is a shift of at most 0.02.

    python benchmarks/lying.py [--seeds 1 2 3] [--rounds 3]

What no estimator can do: in a cluster of two evaluators, one honest and one lying, the
reports {0.2, 1.0} are what a cluster served at 0.2 with a liar saying 1.0 sends, and what a
cluster served at 1.0 with a liar saying 0.2 sends: any rule that does not know who lies
is wrong by at least 0.4 in one of the two. Only more evaluators of the cluster's own data
help (a median is exact while liars are fewer than half of them), and the weights of the
fair merge are no more robust than the smallest cluster's evaluators are many.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from script import parser  # beside this script

SETTINGS: dict[str, dict[str, Any]] = {
    "1 liar of 6 (3 x 2)": {"participants": 6, "select": 6, "rate": 1 / 6},
    "1 liar of 9 (3 x 3)": {"participants": 9, "select": 9, "rate": 1 / 9},
    "30% of 30, per group": {"participants": 30, "select": 15, "rate": 0.3},
    "30% of 30, random": {"participants": 30, "select": 15, "rate": 0.3, "placement": "random"},
}
LIES = (0.0, 1.0)
GOAL = 0.02


def weights(accuracy: dict[int, float], clusters: dict[int, int], selected: dict[int, int]):
    """The fair merge's cluster weights from per-participant reports (merge.accuracy_merge)."""
    from services.core.merge import floored, q_weights
    from services.core.plan import group_accuracy

    acc = group_accuracy(accuracy, clusters, selected)
    cs = sorted(acc)
    w = q_weights(floored([acc[c] for c in cs]), 0.5)
    return dict(zip(cs, w.tolist(), strict=True))


def setting(name: str, seed: int, rounds: int) -> dict[str, Any]:
    """Honest weights and the shifts of every lie under both estimators, for one seed."""
    import torch

    from services.core.models import build_model
    from services.core.plan import plan_round
    from services.core.strategies import get_strategy
    from services.experiment import ExperimentConfig
    from services.inprocess import attacker_indices, build_participants
    from services.local import run_local
    from services.participant.examples import TensorExamples
    from services.participant.partition import federation_data
    from services.participant.training import evaluate

    torch.set_num_threads(1)
    s = SETTINGS[name]
    cfg = ExperimentConfig().replace(
        strategy="flclustering",
        participants=s["participants"],
        select=s["select"],
        rounds=rounds,
        seed=seed,
        attack="lying-evaluation",
        attack_rate=s["rate"],
        attack_placement=s.get("placement", "per-group"),
    )
    honest_cfg = cfg.replace(attack="none", attack_rate=0.0)
    result = run_local(honest_cfg)  # the honest federation: its model and its clusters
    clusters = {c["participant"]: c["cluster"] for c in result.clusters}
    data = federation_data(cfg.federation, cfg.data)
    people = build_participants(cfg, data)
    liars = attacker_indices(cfg, np.array([p.group for p in people]))
    model = build_model(cfg.federation.model, data.input_shape, data.num_classes)
    model.load_state_dict(result.weights)
    honest = {p.index: evaluate(model, TensorExamples(p.x_test, p.y_test))[1] for p in people}
    rng = np.random.default_rng(seed)
    fed = cfg.federation
    plan = plan_round(
        get_strategy("flclustering"), clusters, rounds, fed.select, fed.eval_per_cluster, rng
    )
    wanted = set(plan.selected.values())
    members = [p for p, c in clusters.items() if c in wanted]
    pools = {"planned": list(plan.evaluators), "members": sorted({*members, *plan.evaluators})}
    out: dict[str, Any] = {"liars": len(liars), "honest": {}, "shift": {}}
    for estimator, pool in pools.items():
        base = weights({p: honest[p] for p in pool}, clusters, plan.selected)
        out["honest"][estimator] = base
        for lie in LIES:
            told = {p: (lie if p in liars else honest[p]) for p in pool}
            got = weights(told, clusters, plan.selected)
            shift = max(abs(got.get(c, 0.0) - base.get(c, 0.0)) for c in {*base, *got})
            out["shift"][(estimator, lie)] = shift
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--rounds", type=int, default=3, help="honest rounds before the reports")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    a = p.parse_args()
    start = time.perf_counter()
    print("| setting | liars | lie | planned (before): worst shift | members (now) | goal |")
    print("|---|---|---|---|---|---|")
    every = {name: [setting(name, seed, a.rounds) for seed in a.seeds] for name in a.settings}
    for name, runs in every.items():
        for lie in LIES:
            before = max(r["shift"][("planned", lie)] for r in runs)
            now = max(r["shift"][("members", lie)] for r in runs)
            mark = "met" if now <= GOAL else "missed"
            liars = "/".join(str(r["liars"]) for r in runs)
            print(f"| {name} | {liars} | {lie:g} | {before:.3f} | {now:.3f} | {mark} |")
    print()
    print("honest weights (seed, setting, estimator):")
    for name, runs in every.items():
        for seed, r in zip(a.seeds, runs, strict=True):
            for est, w in r["honest"].items():
                shown = ", ".join(f"{c}: {v:.3f}" for c, v in sorted(w.items()))
                print(f"  seed {seed}, {name}, {est}: {shown}")
    print(f"\ntook {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
