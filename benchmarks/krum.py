"""Krum's cost against one Gram-matrix matmul and a naive pairwise loop, in the same run.

Goal: `krum/matmul ratio` of 1.5 or less (Krum is the Gram product plus O(n^2) work).

    python benchmarks/krum.py [--n 50] [--d 1000000] [--repeats 9] [--device cpu|cuda]
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from script import parser  # beside this script

from services.core.robust import krum


def naive_krum(x: torch.Tensor, f: int) -> int:
    """Krum with a Python loop over pairs: the baseline the Gram product replaces."""
    n = x.shape[0]
    dist = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d = float(((x[i] - x[j]) ** 2).sum())
            dist[i][j] = dist[j][i] = d
    scores = [sum(sorted(dist[i][:i] + dist[i][i + 1 :])[: n - f - 2]) for i in range(n)]
    return min(range(n), key=scores.__getitem__)


def timed(fns: list[Callable[[], object]], repeats: int, sync: Callable[[], None]) -> list[float]:
    """Median wall time of each fn over `repeats` rounds after one warm-up, the fns taking
    turns within each round so that a slow spell of the machine falls on all of them."""
    for fn in fns:
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--d", type=int, default=1_000_000)
    p.add_argument("--f", type=int, default=10)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d, generator=gen).to(device)

    t_matmul, t_krum = timed([lambda: x @ x.T, lambda: krum(x, args.f)], args.repeats, sync)
    start = time.perf_counter()
    naive = naive_krum(x, args.f)
    t_naive = time.perf_counter() - start
    assert naive == krum(x, args.f).kept[0], "Krum disagrees with the naive loop"

    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"n={args.n} updates of d={args.d:,} float32, f={args.f}")
    print(f"gram matmul  {t_matmul * 1e3:9.2f} ms")
    print(f"krum         {t_krum * 1e3:9.2f} ms")
    print(f"naive loop   {t_naive * 1e3:9.2f} ms  ({t_naive / t_krum:.1f}x slower than krum)")
    print(f"krum/matmul ratio: {t_krum / t_matmul:.2f}")


if __name__ == "__main__":
    main()
