"""Robustness grid: settings x strategies x attacks x attacker shares x knowledge x seeds,
in-process (`flclustering local`, 30 participants, guard off: the rules alone).

A run's accuracy is the mean of its last 5 rounds' mean accuracy (every participant's test
split, the truth whatever attackers report; one round swings by +-3 points on Dirichlet
shards); the final round's mean and worst accuracy are kept too, and for the backdoor the
mean of the last 5 rounds' success rate (triggered test inputs of other classes classified
as the target). Colluding attacks (alie, ipm, min-max, min-sum, cluster-steering, their
jittered and fitted forms, adaptive, adaptive-steering) run once per knowledge mode (`own`: the
colluders pool their own honest deltas; `omniscient`: everyone's); the others run once and
count for both. The clean run ("none") runs once per setting, strategy and seed. An attack or
setting the installed ExperimentConfig does not accept is skipped with one line (without
attack_knowledge, `own` runs as the installed attacks do and `omniscient` is skipped).

`--grid full`: seeds 0 1 2 and every strength. `--grid quick`: seed 0, the settings of
QUICK_SETTINGS and per family the strength in QUICK (the worst found so far: update QUICK
from the full grid's JSON), jittered and fitted forms against flclustering only (the
near-twin screen and cluster check they evade are its own); about an hour on 2 cores.
Prints per setting, knowledge mode and share a table of strategies (clean accuracy, worst
under attack and what caused it, the largest backdoor success rate) with flclustering's
goals, then a summary per setting; `--detail` adds every attack x strategy table.

    python benchmarks/robustness.py [--grid quick|full] [--settings ...] [--strategies ...]
        [--attacks ...] [--rates 0.2 0.3] [--knowledge own omniscient] [--seeds ...]
        [--rounds 30] [--workers 2] [--dry-run] [--detail] [--json FILE] [--resume FILE]
        [--load FILE ...]

`--resume FILE` skips the runs already in FILE and appends each new one as it finishes (the
full grid takes hours: run it across sessions); `--load` prints the tables from saved runs
(a later file's run replaces an earlier one's of the same key). The files of the earlier
benchmark (benchmarks/results/robustness-*.json) have another shape and are not read.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from script import parser, write_json  # beside this script

SETTINGS: dict[str, dict[str, Any]] = {
    "iid": {"partition": "iid"},
    "practical-noniid": {"partition": "practical-noniid"},
    # 1,347 digits cannot give 30 Dirichlet(0.1) shards 10 samples each: 20 participants.
    "dirichlet-0.1": {"partition": "dirichlet", "alpha": 0.1, "participants": 20},
    "dirichlet-0.3": {"partition": "dirichlet", "alpha": 0.3},
    "dirichlet-1.0": {"partition": "dirichlet", "alpha": 1.0},
    "rotated": {"partition": "rotated-groups"},
    "digits28-dirichlet-0.3": {"dataset": "digits28", "partition": "dirichlet", "alpha": 0.3},
    # As docs/decisions.md runs it: vectors, so the 2NN; its participants own their samples.
    "synthetic": {
        "dataset": "synthetic",
        "partition": "natural",
        "model": "2nn",
        "participants": 60,
        "clusters": 2,
    },
}
# Seconds per run of 30 rounds, two runs at once on 2 cores (measured; for the estimate).
SECONDS = {
    "dirichlet-0.1": 15.0,
    "dirichlet-0.3": 15.0,
    "digits28-dirichlet-0.3": 120.0,
    "synthetic": 20.0,
}
SECONDS_DEFAULT = 9.0
QUICK_SETTINGS = ("practical-noniid", "dirichlet-0.3", "rotated")
STRATEGIES = ("fedavg", "median", "trimmed-mean", "multi-krum", "flclustering")
BASELINES = ("fedavg", "median", "trimmed-mean")  # flclustering's clean goal: the best of them

JITTER = 0.1
# Attack families: strength label -> config keys ("" for an attack with one strength).
NON_COLLUDING = ("scaling", "sign-flip", "gaussian", "label-flip", "backdoor", "lying-evaluation")
FAMILIES: dict[str, dict[str, dict[str, Any]]] = {
    **{name: {"": {"attack": name}} for name in NON_COLLUDING},
    "alie": {
        "z from n, f": {"attack": "alie"},
        **{f"z {z:g}": {"attack": "alie", "attack_z": z} for z in (1.0, 2.0, 4.0)},
    },
    "ipm": {f"eps {e:g}": {"attack": "ipm", "attack_epsilon": e} for e in (0.1, 0.5, 2.0, 10.0)},
    **{name: {"": {"attack": name}} for name in ("min-max", "min-sum", "cluster-steering")},
}
# The colluding attacks' evasive forms: jittered past the near-twin screen, and fitted
# (jittered, and shortened to the longest the rehearsed defence keeps whole: colluders who
# know its thresholds; against a defence without any, the jittered form).
EVASIVE = {
    "jittered": {"attack_jitter": JITTER},
    "fitted": {"attack_jitter": JITTER, "attack_fit": True},
}
FAMILIES.update(
    {
        f"{name}-{form}": {label: {**kw, **extra} for label, kw in FAMILIES[name].items()}
        for form, extra in EVASIVE.items()
        for name in ("alie", "ipm", "min-max", "min-sum", "cluster-steering")
    }
)
FAMILIES.update({name: {"": {"attack": name}} for name in ("adaptive", "adaptive-steering")})
COLLUDING = frozenset(FAMILIES) - set(NON_COLLUDING)
# The quick grid's strength per family: the worst of the full grid so far (practical-noniid,
# table of docs/benchmarks.md: alie z 4 and ipm eps 10 hurt FedAvg and the robust
# means most). Update from the full grid's JSON.
QUICK = {
    **{f"alie{form}": "z 4" for form in ("", *(f"-{f}" for f in EVASIVE))},
    **{f"ipm{form}": "eps 10" for form in ("", *(f"-{f}" for f in EVASIVE))},
}
KNOWLEDGE = ("own", "omniscient")
BOTH = "-"  # the knowledge of a run that has none (clean, non-colluding): counts for both


def variant(family: str, label: str) -> str:
    """A grid point's name: the family, then its strength when it has several."""
    return f"{family} {label}" if label else family


VARIANTS = {variant(f, lab): (f, kw) for f, grid in FAMILIES.items() for lab, kw in grid.items()}


def config_keys(setting: str, name: str, rate: float, knowledge: str) -> dict[str, Any]:
    """The ExperimentConfig keys of one grid point (`name` a VARIANTS name or "none")."""
    keys = dict(SETTINGS[setting])
    if name != "none":
        keys.update(attack_rate=rate, **VARIANTS[name][1])
    if knowledge != BOTH:
        keys["attack_knowledge"] = knowledge
    return keys


def accepted(keys: dict[str, Any], knowledge: str) -> tuple[dict[str, Any] | None, str]:
    """The keys the installed ExperimentConfig takes for this point (None and why if none):
    without attack_knowledge, `own` is what the installed colluding attacks do."""
    from services.core.errors import ConfigError
    from services.experiment import ExperimentConfig

    tries = [keys]
    if knowledge == "own":
        tries.append({k: v for k, v in keys.items() if k != "attack_knowledge"})
    why = ""
    for candidate in tries:
        try:
            ExperimentConfig().replace(**candidate)
            return candidate, ""
        except ConfigError as exc:
            why = str(exc).splitlines()[0]
    return None, why


def run_one(job: dict[str, Any], keys: dict[str, Any], rounds: int) -> dict[str, Any]:
    """One run's figures: last-5-round means, the final round, rejections, seconds."""
    import torch

    from services.experiment import ExperimentConfig
    from services.local import run_local

    torch.set_num_threads(1)
    cfg = ExperimentConfig().replace(
        strategy=job["strategy"], rounds=rounds, seed=job["seed"], guard=False, **keys
    )
    start = time.perf_counter()
    result = run_local(cfg)
    tail = result.rounds[-5:]
    asr = [r["backdoor_success_rate"] for r in tail if r.get("backdoor_success_rate") is not None]
    return {
        **job,
        "acc": statistics.fmean(r["mean_accuracy"] for r in tail),
        "final": result.rounds[-1]["mean_accuracy"],
        "worst": result.rounds[-1]["worst_accuracy"],
        "backdoor_success_rate": statistics.fmean(asr) if asr else None,
        "rejected_attackers": sum(r["rejected_attackers"] for r in result.rounds),
        "attackers_selected": sum(r["attackers_selected"] for r in result.rounds),
        "rounds": rounds,
        "seconds": time.perf_counter() - start,
    }


Key = tuple[str, str, str, float, str, int]


def key(r: dict[str, Any]) -> Key:
    """What identifies a run: setting, strategy, attack, share, knowledge, seed."""
    return (r["setting"], r["strategy"], r["attack"], r["rate"], r["knowledge"], r["seed"])


def grid(a: Any) -> list[dict[str, Any]]:
    """The grid's runs, as job dicts, before the installed config is asked about them."""
    quick = a.grid == "quick"
    names = [
        variant(f, lab)
        for f in a.attacks
        if f != "none"
        for lab in FAMILIES[f]
        if not quick or len(FAMILIES[f]) == 1 or lab == QUICK.get(f, next(iter(FAMILIES[f])))
    ]
    jobs = []
    for setting in a.settings:
        for strategy in a.strategies:
            for seed in a.seeds:
                base = {"setting": setting, "strategy": strategy, "seed": seed}
                if "none" in a.attacks:
                    jobs.append({**base, "attack": "none", "rate": 0.0, "knowledge": BOTH})
                for rate in a.rates:
                    for name in names:
                        family = VARIANTS[name][0]
                        evasive = family.endswith(tuple(f"-{form}" for form in EVASIVE))
                        if quick and evasive and strategy != "flclustering":
                            continue
                        for k in a.knowledge if family in COLLUDING else [BOTH]:
                            jobs.append({**base, "attack": name, "rate": rate, "knowledge": k})
    return jobs


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def tables(runs: list[dict[str, Any]], a: Any) -> None:
    """Per setting, knowledge and share: strategies against their worst attack, goals; then
    the summary per setting; with --detail every attack x strategy table."""
    cells: dict[tuple[str, str, str, float, str], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["setting"], r["strategy"], r["attack"], r["rate"], r["knowledge"]), [])
        cells[(r["setting"], r["strategy"], r["attack"], r["rate"], r["knowledge"])].append(r)

    def mean(setting: str, s: str, att: str, rate: float, k: str, field: str = "acc") -> Any:
        got = cells.get((setting, s, att, rate, k)) or cells.get((setting, s, att, rate, BOTH))
        vals = [r[field] for r in got or [] if r[field] is not None]
        return statistics.fmean(vals) if vals else None

    def attacked(setting: str, s: str, rate: float, k: str) -> dict[str, float]:
        names = sorted({r["attack"] for r in runs if r["attack"] != "none"})
        got = {n: mean(setting, s, n, rate, k) for n in names}
        return {n: v for n, v in got.items() if v is not None}

    settings = [s for s in SETTINGS if any(r["setting"] == s for r in runs)]
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in runs)]
    rates = sorted({r["rate"] for r in runs if r["attack"] != "none"})
    modes = [k for k in KNOWLEDGE if any(r["knowledge"] in (k, BOTH) for r in runs)]
    summary: dict[tuple[str, str], tuple[float, str]] = {}
    for setting in settings:
        for k in modes:
            if not any(r["knowledge"] == k for r in runs if r["setting"] == setting) and k != "own":
                continue  # no colluding run in this mode: its table is the own one's
            for rate in rates:
                print(f"\n### {setting}, {rate:.0%} attackers, knowledge {k}\n")
                print("| strategy | clean | worst under attack | backdoor ASR (max) |")
                print("|---|---|---|---|")
                for s in strategies:
                    clean = mean(setting, s, "none", 0.0, BOTH)
                    hit = attacked(setting, s, rate, k)
                    worst = min(hit.items(), key=lambda kv: kv[1]) if hit else None
                    asr = [
                        r["backdoor_success_rate"]
                        for r in runs
                        if (r["setting"], r["strategy"], r["rate"]) == (setting, s, rate)
                        and r["backdoor_success_rate"] is not None
                    ]
                    shown = "-" if worst is None else f"{worst[1]:.3f} ({worst[0]})"
                    print(f"| {s} | {fmt(clean)} | {shown} | {fmt(max(asr) if asr else None)} |")
                    if worst is not None:
                        old = summary.get((setting, s))
                        if old is None or worst[1] < old[0]:
                            summary[(setting, s)] = (worst[1], f"{worst[0]}, {rate:.0%}, {k}")
                    if s == "flclustering":
                        goals(setting, rate, k, clean, hit, asr, mean, attacked)
                if a.detail:
                    detail(setting, rate, k, strategies, runs, mean)
    print("\n### summary: worst accuracy under attack per setting (any share, any knowledge)\n")
    print("| setting | " + " | ".join(strategies) + " |")
    print("|---" * (len(strategies) + 1) + "|")
    for setting in settings:
        row = [summary.get((setting, s)) for s in strategies]
        texts = ["-" if c is None else f"{c[0]:.3f} ({c[1]})" for c in row]
        print(f"| {setting} | " + " | ".join(texts) + " |")


def goals(
    setting: str,
    rate: float,
    k: str,
    clean: float | None,
    hit: dict[str, float],
    asr: list[float],
    mean: Any,
    attacked: Any,
) -> None:
    """flclustering's goal line: clean gap, worst drop, margin over FedAvg, backdoor ASR."""
    parts = []

    def mark(label: str, value: float | None, ok: bool, goal: str) -> None:
        verdict = "n/a" if value is None else ("met" if ok else "missed")
        parts.append(f"{label} {fmt(value)} ({goal}: {verdict})")

    base = [mean(setting, b, "none", 0.0, BOTH) for b in BASELINES]
    best = max((v for v in base if v is not None), default=None)
    gap = None if clean is None or best is None else clean - best
    mark("clean gap", gap, gap is not None and gap >= -0.01, ">= -0.01")
    drop = None if clean is None or not hit else clean - min(hit.values())
    bound = 0.03 if rate <= 0.2 + 1e-9 else 0.05
    mark("worst drop", drop, drop is not None and drop <= bound, f"<= {bound:.2f}")
    fedavg = attacked(setting, "fedavg", rate, k)
    margins = {n: v - fedavg[n] for n, v in hit.items() if n in fedavg}
    margin = min(margins.values()) if margins else None
    mark("margin over fedavg", margin, margin is not None and margin >= 0, ">= 0")
    top = max(asr) if asr else None
    mark("backdoor ASR", top, top is not None and top <= 0.05, "<= 0.05")
    print(f"\nflclustering goals: {'; '.join(parts)}\n")


def detail(
    setting: str, rate: float, k: str, strategies: list[str], runs: list[dict[str, Any]], mean: Any
) -> None:
    """Every attack x strategy cell of one setting, share and knowledge mode."""
    names = sorted({r["attack"] for r in runs if r["attack"] != "none"})
    print(f"\nall attacks, {setting}, {rate:.0%}, knowledge {k}\n")
    print("| attack | " + " | ".join(strategies) + " |")
    print("|---" * (len(strategies) + 1) + "|")
    for n in ["none", *names]:
        r = 0.0 if n == "none" else rate
        row = [mean(setting, s, n, r, BOTH if n == "none" else k) for s in strategies]
        if any(v is not None for v in row):
            print(f"| {n} | " + " | ".join(fmt(v) for v in row) + " |")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--grid", choices=("quick", "full"), default="quick")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    p.add_argument("--attacks", nargs="+", choices=["none", *FAMILIES], default=["none", *FAMILIES])
    p.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.3])
    p.add_argument("--knowledge", nargs="+", choices=KNOWLEDGE, default=list(KNOWLEDGE))
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 (quick), 0 1 2 (full)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dry-run", action="store_true", help="print the number of runs only")
    p.add_argument("--detail", action="store_true", help="also every attack x strategy table")
    p.add_argument("--json", help="also write every run's figures to this file")
    p.add_argument("--resume", help="skip the runs in this file; append each new one to it")
    p.add_argument("--load", nargs="+", metavar="JSON", help="print the tables, run nothing")
    a = p.parse_args()
    quick = a.grid == "quick"
    a.settings = a.settings or list(QUICK_SETTINGS if quick else SETTINGS)
    a.seeds = a.seeds if a.seeds is not None else ([0] if quick else [0, 1, 2])
    if a.load:
        saved: dict[Key, dict[str, Any]] = {}
        for path in a.load:
            with open(path) as fh:
                saved.update((key(r), r) for r in json.load(fh))
        print(f"{len(saved)} runs loaded from {', '.join(a.load)}")
        tables(list(saved.values()), a)
        return
    jobs = grid(a)
    keys: dict[tuple[str, str, str], dict[str, Any] | None] = {}
    skipped: dict[str, set[str]] = {}  # why -> the attacks (knowledge) it skips
    todo: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for job in jobs:
        point = (job["setting"], job["attack"], job["knowledge"])
        if point not in keys:
            wanted = config_keys(job["setting"], job["attack"], job["rate"], job["knowledge"])
            keys[point], why = accepted(wanted, job["knowledge"])
            if keys[point] is None:
                skipped.setdefault(why, set()).add(f"{job['attack']} ({job['knowledge']})")
        if keys[point] is not None:
            rate_keys = {**keys[point]}  # type: ignore[dict-item]
            if job["attack"] != "none":
                rate_keys["attack_rate"] = job["rate"]
            todo.append((job, rate_keys))
    for why, what in skipped.items():
        print(f"skipped, {why}: {', '.join(sorted(what))}")
    done: list[dict[str, Any]] = []
    if a.resume and os.path.exists(a.resume):
        with open(a.resume) as fh:
            done = json.load(fh)
    have = {key(r) for r in done}
    runnable = len(todo)
    todo = [(j, kw) for j, kw in todo if key(j) not in have]
    per_run = [SECONDS.get(j["setting"], SECONDS_DEFAULT) * a.rounds / 30 for j, _ in todo]
    estimate = sum(per_run) / max(1, min(a.workers, os.cpu_count() or 1))
    print(
        f"{a.grid} grid: {len(todo)} runs to do ({len(jobs)} in the grid, "
        f"{runnable - len(todo)} done, {len(jobs) - runnable} skipped); about "
        f"{estimate / 3600:.1f} h with {a.workers} workers"
    )
    if a.dry_run:
        return
    start = time.perf_counter()
    failed: list[str] = []
    with ProcessPoolExecutor(a.workers) as pool:
        jobs_of: dict[Future[dict[str, Any]], dict[str, Any]] = {
            pool.submit(run_one, j, kw, a.rounds): j for j, kw in todo
        }
        pending: set[Future[dict[str, Any]]] = set(jobs_of)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                try:
                    done.append(f.result())
                except Exception as exc:  # one run's failure must not end hours of grid
                    j = jobs_of[f]
                    failed.append(
                        f"{j['setting']} {j['strategy']} {j['attack']} {j['rate']:g} "
                        f"{j['knowledge']} seed {j['seed']}: {type(exc).__name__}: {exc}"
                    )
                    print(f"[failed] {failed[-1]}", flush=True)
                    continue
                if a.resume:
                    write_json(a.resume, done, indent=1)
                r = done[-1]
                print(
                    f"[{len(done) - len(have)}/{len(todo)}] {r['setting']} {r['strategy']} "
                    f"{r['attack']} {r['rate']:g} {r['knowledge']} seed {r['seed']}: "
                    f"{r['acc']:.3f} ({r['seconds']:.0f} s)",
                    flush=True,
                )
    print(f"{len(todo)} runs in {time.perf_counter() - start:.0f} s")
    write_json(a.json, done, indent=1)
    tables(done, a)
    if failed:  # not saved: --resume runs them again
        print(f"{len(failed)} runs failed:", *failed, sep="\n  ")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
