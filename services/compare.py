"""`flclustering compare`: several strategies (and the centralised baseline) under one set
of settings and seeds, in one table and one figure.

Each run is the ordinary one (`flclustering local`, or `simulate` with `--over grpc`),
written under OUT/runs/STRATEGY-seedN/; the table (compare.csv, compare.md) has each
strategy's final figures as means over the seeds, and compare.png its mean and worst
participant accuracy against rounds.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.experiment import ExperimentConfig, RunSettings, SimulateConfig

CENTRALISED = "centralised"
COLUMNS = ("mean_accuracy", "worst_accuracy", "worst_group_accuracy", "accuracy_std")
HEADERS = ("mean accuracy", "worst participant", "worst group", "std")


def run_one(
    config: ExperimentConfig, strategy: str, seed: int, over: str, out: Path
) -> dict[str, Any]:
    """One run's results (as results.json holds them), written under out."""
    from services.common.report import write_run

    where = out / "runs" / f"{strategy}-seed{seed}"
    if strategy == CENTRALISED:
        from services.centralised import run_centralised

        cfg = config.replace(seed=seed, run={"out": str(where)})
        result = run_centralised(cfg)
    elif over == "grpc":
        from services.simulate import simulate

        groups = {k: getattr(config, k) for k in type(config).model_fields}
        sim = SimulateConfig(**groups).replace(
            strategy=strategy, seed=seed, run=RunSettings(out=str(where)).model_dump()
        )
        return simulate(sim)
    else:
        from services.local import run_local

        cfg = config.replace(strategy=strategy, seed=seed, run={"out": str(where)})
        result = run_local(cfg)
    payload, _ = write_run(where, result)
    return payload


def compare(
    config: ExperimentConfig,
    strategies: Sequence[str],
    seeds: Sequence[int],
    over: str = "local",
    done: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Every (strategy, seed) run's results, by strategy; writes the table and figure."""
    out = Path(config.run.out)
    runs: dict[str, list[dict[str, Any]]] = {}
    for strategy in strategies:
        for seed in seeds:
            results = run_one(config, strategy, seed, over, out)
            runs.setdefault(strategy, []).append(results)
            if done is not None:
                done(strategy, seed, results)
    write_table(out, runs)
    plot(out, runs)
    return runs


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def table_rows(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per strategy: each figure's mean over the seeds (None where absent)."""
    rows = []
    for strategy, results in runs.items():
        row: dict[str, Any] = {"strategy": strategy, "seeds": len(results)}
        for key in COLUMNS:
            row[key] = _mean([r["final"][key] for r in results if key in r["final"]])
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table as Markdown."""
    lines = [
        "| strategy | " + " | ".join(HEADERS) + " |",
        "|---|" + "---|" * len(HEADERS),
    ]
    for row in rows:
        cells = ["-" if row[k] is None else f"{row[k]:.3f}" for k in COLUMNS]
        lines.append(f"| {row['strategy']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(out: Path, runs: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """compare.csv and compare.md."""
    rows = table_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "compare.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["strategy", "seeds", *COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    (out / "compare.md").write_text(markdown(rows))
    return [out / "compare.csv", out / "compare.md"]


def plot(out: Path, runs: dict[str, list[dict[str, Any]]]) -> Path:
    """compare.png: mean and worst participant accuracy against rounds, per strategy (the
    mean over the seeds, their range shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, title in (
        (axes[0], "mean_accuracy", "mean accuracy over participants"),
        (axes[1], "worst_accuracy", "worst participant's accuracy"),
    ):
        for strategy, results in runs.items():
            length = min(len(r["rounds"]) for r in results)
            per_round = [[r["rounds"][i][key] for r in results] for i in range(length)]
            curve = [statistics.fmean(v) for v in per_round]
            style = "--" if strategy == CENTRALISED else "-"
            (line,) = ax.plot(range(length), curve, style, label=strategy)
            if len(results) > 1:  # the seeds' range: how much of a gap is noise
                low, high = [min(v) for v in per_round], [max(v) for v in per_round]
                ax.fill_between(range(length), low, high, color=line.get_color(), alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(loc="lower right")
    seeds = len(next(iter(runs.values()))) if runs else 0
    spread = ", the band their range" if seeds > 1 else ""
    fig.suptitle(f"strategies compared (mean of {seeds} seed(s){spread})")
    fig.tight_layout()
    path = out / "compare.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
