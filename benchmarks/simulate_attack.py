"""The headline robustness figures, through `flclustering simulate` (real processes, gRPC).

For each seed: flclustering and fedavg, clean and under the scaling attack (30% of the
participants, per-group placement, send their negated model every 5th round; the last
round is an attack round), the rules alone (`--guard false`: the divergence guard, which
would roll the attack rounds back for both, is measured by benchmarks/guard.py).
Prints final mean accuracy per run and the means over seeds.

    python benchmarks/simulate_attack.py [--seeds 0 1 2] [--rounds 30]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from script import parser  # beside this script

ATTACK = ["--attack", "scaling", "--attack-rate", "0.3"]
RULES = ["--guard", "false"]  # the rules alone: the divergence guard is benchmarks/guard.py's


def run(out: Path, flags: list[str]) -> tuple[float, float]:
    """(final mean accuracy, seconds) of one simulation."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "services.cli", "simulate", "--out", str(out), *flags],
        check=True,
        capture_output=True,
    )
    final = json.loads((out / "results.json").read_text())["final"]["mean_accuracy"]
    return float(final), time.perf_counter() - start


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    cases = {
        "flclustering clean": ["--strategy", "flclustering"],
        "flclustering attacked": ["--strategy", "flclustering", *ATTACK],
        "fedavg clean": ["--strategy", "fedavg"],
        "fedavg attacked": ["--strategy", "fedavg", *ATTACK],
    }
    finals: dict[str, list[float]] = {c: [] for c in cases}
    print(f"{'case':<24} {'seed':>4} {'final':>6} {'seconds':>7}")
    for seed in a.seeds:
        for case, flags in cases.items():
            acc, secs = run(
                tmp / f"{case.replace(' ', '-')}-{seed}",
                [*flags, *RULES, "--seed", str(seed), "--rounds", str(a.rounds)],
            )
            finals[case].append(acc)
            print(f"{case:<24} {seed:>4} {acc:>6.3f} {secs:>7.0f}", flush=True)
    print()
    for case, accs in finals.items():
        print(
            f"{case:<24} mean {statistics.fmean(accs):.3f}  ({', '.join(f'{x:.3f}' for x in accs)})"
        )
    fl = statistics.fmean(finals["flclustering clean"]) - statistics.fmean(
        finals["flclustering attacked"]
    )
    fa = statistics.fmean(finals["fedavg clean"]) - statistics.fmean(finals["fedavg attacked"])
    print(f"attack costs flclustering {fl * 100:.1f} points, fedavg {fa * 100:.1f} points")


if __name__ == "__main__":
    main()
