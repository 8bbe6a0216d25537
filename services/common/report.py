"""Writing a run's results: results.json, rounds.csv and the research code's three plots."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROUND_COLUMNS = (
    "round",
    "mean_accuracy",
    "mean_loss",
    "accuracy_std",
    "worst_accuracy",
    "duration_s",
    "rejected",
)


def write_results(out: Path, results: Mapping[str, Any]) -> list[Path]:
    """Write results.json, rounds.csv, accuracy.png, loss.png and std.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "rounds.csv"]
    written[0].write_text(json.dumps(results, indent=2, default=float) + "\n")
    rounds: Sequence[Mapping[str, Any]] = results["rounds"]
    columns = list(ROUND_COLUMNS) + sorted({k for r in rounds for k in r} - set(ROUND_COLUMNS))
    with written[1].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rounds:
            writer.writerow({k: r.get(k, "") for k in columns})
    written += plot_rounds(out, rounds)
    return written


def plot_rounds(out: Path, rounds: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Mean accuracy, mean loss and accuracy standard deviation over rounds, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rounds]
    paths = []
    for key, name, label in (
        ("mean_accuracy", "accuracy.png", "mean test accuracy"),
        ("mean_loss", "loss.png", "mean test loss"),
        ("accuracy_std", "std.png", "std of accuracy across participants"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, [r[key] for r in rounds], marker="o", markersize=3)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths
