"""Clustering 10,000 and 100,000 pre-training deltas (sketch dimension 2,048) on this machine.

Synthetic deltas: k=3 well-separated Gaussian groups (50/30/20%) in float32, plus a few
absurd rows that screening must refuse, seeded. Each size runs `group_deltas` (screening
and clustering) in its own process, so its peak RSS is its own. As a baseline measured in
the same run, a size the exact path can afford (--baseline, default 4,000) is clustered
both exactly (every row through Ward) and the default way (a fitted sample, the rest to
the nearest centre); the speed-up and the agreement of the two labellings are printed.
Times exclude importing scipy and scikit-learn (once per process).
Purity on the real digits deltas (the exact path, below the sampling threshold) is checked
by tests/unit/test_clustering.py.

Goal: 10,000 in 10 s or less, 100,000 in 2 minutes or less, peak RSS under 4 GB. Ends with
`clustering: 10000 in X.X s, 100000 in Y.Y s`.

    python benchmarks/clustering.py [--sizes 10000 100000] [--d 2048] [--baseline 4000]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from script import parser  # beside this script

from services.common.figures import purity
from services.core.clustering import FIT_SAMPLE, group_deltas
from services.transport.lifecycle import memory_bytes

SHARES = (0.5, 0.3, 0.2)
ABSURD = 0.001  # share of rows a thousand times too long (screened out)


def deltas(n: int, d: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """n float32 rows around len(SHARES) centres, built a block at a time (no n x d
    temporaries), with ABSURD of them scaled by 1,000 and one NaN row."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(SHARES), d, generator=gen)  # ~64 apart; groups ~45 across
    truth = torch.multinomial(torch.tensor(SHARES), n, True, generator=gen)
    x = torch.empty(n, d)
    for start in range(0, n, 4096):
        rows = slice(start, min(n, start + 4096))
        x[rows] = torch.randn(rows.stop - start, d, generator=gen).add_(centres[truth[rows]])
    bad = torch.randperm(n, generator=gen)[: max(1, int(ABSURD * n))]
    x[bad] *= 1000.0
    x[bad[0], 0] = float("nan")
    return x, truth.numpy()


def peak_rss() -> int:
    """Peak resident memory of this process in bytes since the last reset (VmHWM)."""
    found = memory_bytes("self")
    return found if found is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one(n: int, d: int, k: int, method: str, seed: int, fit_sample: int, labels: str) -> None:
    """Child process: build the deltas, cluster them, print one JSON line."""
    for module in ("scipy.cluster.hierarchy", "sklearn.cluster", "sklearn.metrics"):
        importlib.import_module(module)  # once per process: not part of the time

    x, truth = deltas(n, d, seed)
    with contextlib.suppress(OSError):  # the peak while clustering, not building the data
        Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    fit, res = group_deltas(x, k, method, seed, fit_sample=fit_sample)
    seconds = time.perf_counter() - start
    keep = fit.numpy()
    if labels:
        np.save(labels, res.assignment, allow_pickle=False)
    out = {
        "n": n,
        "seconds": seconds,
        "rss": peak_rss(),
        "data": x.numel() * x.element_size(),
        "purity": purity(res.assignment, truth[keep]),
        "k": res.k,
        "score": res.score,
        "sampled": res.sampled,
        "refused": int((~keep).sum()),
    }
    print(json.dumps(out), flush=True)


def run(a: argparse.Namespace, n: int, fit_sample: int, labels: str = "") -> dict[str, Any]:
    """One size in its own process."""
    cmd = [sys.executable, __file__, "--one", str(n), "--d", str(a.d), "--k", str(a.k)]
    cmd += ["--method", a.method, "--seed", str(a.seed), "--fit-sample", str(fit_sample)]
    cmd += ["--labels", labels] if labels else []
    done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def describe(r: dict[str, Any]) -> str:
    fitted = f"a {r['sampled']}-row sample" if r["sampled"] else "every row"
    return (
        f"{r['seconds']:6.1f} s, peak RSS {r['rss'] / 2**30:.2f} GB "
        f"(deltas {r['data'] / 2**30:.2f} GB), purity {r['purity']:.3f}, k={r['k']}, "
        f"silhouette {r['score']:.3f}, fitted on {fitted}, {r['refused']} refused"
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--method", default="hierarchical", choices=["hierarchical", "kmeans"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fit-sample", type=int, default=FIT_SAMPLE)
    p.add_argument("--baseline", type=int, default=4000, help="size timed exactly too (0: skip)")
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--labels", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        one(a.one, a.d, a.k, a.method, a.seed, a.fit_sample, a.labels)
        return
    print(
        f"{a.k} separated Gaussian groups ({'/'.join(f'{s:.0%}' for s in SHARES)}) in {a.d} "
        f"dims, float32, {ABSURD:.1%} absurd rows; {a.method}, k={a.k}, seed {a.seed}, "
        f"exact up to {a.fit_sample} rows"
    )
    if a.baseline:
        with tempfile.TemporaryDirectory() as tmp:
            exact = run(a, a.baseline, a.baseline, f"{tmp}/exact.npy")
            fast = run(a, a.baseline, a.fit_sample, f"{tmp}/fast.npy")
            agree = purity(np.load(f"{tmp}/fast.npy"), np.load(f"{tmp}/exact.npy"))
        print(f"n={a.baseline} exact:   {describe(exact)}")
        print(f"n={a.baseline} sampled: {describe(fast)}")
        print(
            f"n={a.baseline}: sampled/exact speed-up {exact['seconds'] / fast['seconds']:.1f}x, "
            f"labels agree on {agree:.1%} of rows"
        )
    times = []
    for n in a.sizes:
        r = run(a, n, a.fit_sample)
        print(f"n={n}: {describe(r)}")
        times.append((n, r["seconds"]))
    print("clustering: " + ", ".join(f"{n} in {t:.1f} s" for n, t in times))


if __name__ == "__main__":
    main()
