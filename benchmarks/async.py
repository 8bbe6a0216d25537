"""Asynchronous buffered aggregation against the best synchronous rounds, on slow devices.

Real processes (`flclustering simulate`: aggregator, clusterer, participant processes over
gRPC), wall clock. 30 participants on digits whose slowness factors span 10x
(`--speed-spread 10`: log-uniform in [1, 10]; a participant waits (factor - 1) times its
measured compute before it uploads, a real delay), and the same with 20% of the training
tasks dropped (`--dropout 0.2`). Every participant evaluates (`--eval-sample 0`): every
round in rounds, every --eval-every versions in async mode.

Cases:
- sync: --select 15, every selected update waited for (--round-timeout-s caps a round
  with a dropout);
- sync, over-selected: 50% and 100% more selected, the round closes at the first 15;
- async: --mode async, buffers of 5 per cluster (the fewest Multi-Krum runs on at a 20%
  Byzantine share), --max-staleness 32 (the default: the slowest devices' updates count).
For each: the wall time until the mean accuracy first reaches 0.95 (from the start of
round 0 or of the first buffer, after the same pre-training and clustering, to the moment
the model that reached it was made), and the final accuracy. The best synchronous case is
the one with the shortest time. Then async under attack (20% attackers, scaling and ALIE):
its final accuracy against its clean run.

Ends with `async: time to 0.95 sync X s, async Y s, speedup Z.ZZ` (the 10x-spread case).

    python benchmarks/async.py [--seed 0] [--out benchmarks/results/async.json]

About 8 minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from script import parser  # beside this script

TARGET = 0.95
COMMON = [
    "--participants", "30",
    "--strategy", "flclustering",
    "--eval-sample", "0",
    "--speed-spread", "10",
    "--round-timeout-s", "20",
]  # fmt: skip
SYNC = ["--rounds", "20"]
ASYNC = ["--mode", "async", "--rounds", "150", "--eval-every", "3"]
CASES: dict[str, list[str]] = {
    "sync": SYNC,
    "sync, over-select 50%": [*SYNC, "--over-select", "0.5"],
    "sync, over-select 100%": [*SYNC, "--over-select", "1.0"],
    "async": ASYNC,
}
ATTACKS = {
    "scaling": ["--attack", "scaling", "--attack-rate", "0.2"],
    "alie": ["--attack", "alie", "--attack-rate", "0.2"],
}


def simulate(out: Path, flags: list[str]) -> dict[str, Any]:
    """results.json of one simulation (its wall time added)."""
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "simulate", "--out", str(out), *flags],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"simulate {' '.join(flags)} failed:\n{done.stderr[-2000:]}")
    results: dict[str, Any] = json.loads((out / "results.json").read_text())
    results["wall_s"] = time.perf_counter() - began
    return results


def made_at(rounds: list[dict[str, Any]]) -> dict[int, float]:
    """When each model version was made (Unix time): a round's version before its
    evaluation (the publish phase), an async version when its buffer was flushed."""
    out: dict[int, float] = {}
    first = rounds[0]
    out[0] = first["finished_at"] - first["duration_s"]
    for r in rounds:
        publish = r.get("phases", {}).get("publish", 0.0) if "evaluated_version" not in r else 0
        out[int(r["model_version"])] = r["finished_at"] - publish
    return out


def time_to(rounds: list[dict[str, Any]], target: float) -> float | None:
    """Seconds from the start of training until the model that first reached `target`
    mean accuracy was made (None: never)."""
    made = made_at(rounds)
    for r in rounds:
        if r["mean_accuracy"] >= target:
            version = int(r.get("evaluated_version", r["model_version"]))
            return made[version] - made[0]
    return None


def summary(results: dict[str, Any]) -> dict[str, Any]:
    rounds = results["rounds"]
    return {
        "time_to_target_s": time_to(rounds, TARGET),
        "final": results["final"]["mean_accuracy"],
        "versions": len(rounds),
        "train_s": rounds[-1]["finished_at"] - made_at(rounds)[0],
        "wall_s": results["wall_s"],
        "staleness_mean": (
            sum(r.get("staleness_mean", 0.0) for r in rounds) / len(rounds)
            if "evaluated_version" in rounds[0]
            else None
        ),
    }


def show(name: str, s: dict[str, Any]) -> None:
    t = s["time_to_target_s"]
    reached = f"{t:7.1f}" if t is not None else "  never"
    print(
        f"{name:<34} {reached} {s['final']:>6.3f} {s['versions']:>8} {s['train_s']:>7.1f}",
        flush=True,
    )


def setting(tmp: Path, label: str, extra: list[str], seed: int) -> dict[str, dict[str, Any]]:
    """Every case under one setting; their summaries."""
    print(f"\n{label}")
    print(f"{'case':<34} {'to 0.95':>7} {'final':>6} {'versions':>8} {'train s':>7}")
    out = {}
    for case, flags in CASES.items():
        folder = tmp / f"{label}-{case}".replace(" ", "-").replace(",", "").replace("%", "")
        s = summary(simulate(folder, [*COMMON, *extra, *flags, "--seed", str(seed)]))
        show(case, s)
        out[case] = s
    return out


def best_sync(cases: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The synchronous case with the shortest time to the target (reached ones first)."""
    syncs = {c: s for c, s in cases.items() if c.startswith("sync")}
    return min(
        syncs.items(),
        key=lambda kv: (kv[1]["time_to_target_s"] is None, kv[1]["time_to_target_s"] or 0),
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="async-bench-"))
    figures: dict[str, Any] = {"seed": a.seed, "target": TARGET}
    figures["spread 10x"] = spread = setting(tmp, "speeds spanning 10x", [], a.seed)
    figures["spread 10x, 20% dropouts"] = setting(
        tmp, "speeds spanning 10x, 20% of tasks dropped", ["--dropout", "0.2"], a.seed
    )
    print("\nasync under attack (20% attackers, speeds spanning 10x)")
    clean = spread["async"]["final"]
    attacked = {}
    for name, flags in ATTACKS.items():
        s = summary(
            simulate(tmp / f"attack-{name}", [*COMMON, *ASYNC, *flags, "--seed", str(a.seed)])
        )
        attacked[name] = s
        print(
            f"  {name:<10} final {s['final']:.3f}, {(clean - s['final']) * 100:.1f} points "
            f"below the clean run's {clean:.3f}",
            flush=True,
        )
    figures["async attacked"] = attacked
    for label in ("spread 10x", "spread 10x, 20% dropouts"):
        cases = figures[label]
        name, sync = best_sync(cases)
        t_sync, t_async = sync["time_to_target_s"], cases["async"]["time_to_target_s"]
        ratio = t_sync / t_async if t_sync and t_async else float("nan")
        print(
            f"{label}: best synchronous is {name!r}; final accuracy sync {sync['final']:.3f}, "
            f"async {cases['async']['final']:.3f}; speedup {ratio:.2f}"
        )
        figures[label]["best sync"] = name
    if a.out:
        a.out.write_text(json.dumps(figures, indent=1))
    name, sync = best_sync(spread)
    t_sync, t_async = sync["time_to_target_s"], spread["async"]["time_to_target_s"]
    ratio = t_sync / t_async if t_sync and t_async else float("nan")
    ts = f"{t_sync:.1f}" if t_sync else "never"
    ta = f"{t_async:.1f}" if t_async else "never"
    print(f"async: time to {TARGET} sync {ts} s, async {ta} s, speedup {ratio:.2f}")


if __name__ == "__main__":
    main()
