"""Writing a run's results: results.json, rounds.csv and its figures."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from services.common.figures import LAYERS
from services.common.settings import DevicesSettings, FederationSettings
from services.core.devices import speed_factors
from services.core.record import RoundRecord

ROUND_COLUMNS = (
    "round",
    "mean_accuracy",
    "mean_loss",
    "accuracy_std",
    "worst_accuracy",
    "duration_s",
    "rejected",
)


class Experiment(Protocol):
    """What devices_block reads of a run's settings (local's and simulate's alike)."""

    @property
    def federation(self) -> FederationSettings: ...

    @property
    def devices(self) -> DevicesSettings: ...


def devices_block(config: Experiment) -> dict[str, Any]:
    """results.json's devices block, the same from simulate and local: the simulated
    devices' spread and dropout, and each participant's slowness factor (3 places)."""
    fed, devices = config.federation, config.devices
    factors = speed_factors(fed.participants, devices.speed_spread, fed.seed)
    return {
        "speed_spread": devices.speed_spread,
        "dropout": devices.dropout,
        "factors": [round(float(f), 3) for f in factors],
    }


def write_results(out: Path, results: Mapping[str, Any]) -> list[Path]:
    """Write results.json, rounds.csv and the figures (accuracy, defences, loss, std).
    The rounds are RoundRecords or their dicts."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "rounds.csv"]
    rounds = round_rows(results["rounds"])
    results = {**results, "rounds": rounds}
    written[0].write_text(json.dumps(results, indent=2, default=float) + "\n")
    columns = list(ROUND_COLUMNS) + sorted({k for r in rounds for k in r} - set(ROUND_COLUMNS))
    with written[1].open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rounds:
            writer.writerow({k: r.get(k, "") for k in columns})
    written += plot_rounds(out, rounds)
    return written


def write_run(out: Path, result: Any) -> tuple[dict[str, Any], list[Path]]:
    """Write an in-process run (`flclustering local`, `centralised`, a run of `compare`):
    its results as write_results does, and its final model file when it has a card.
    Returns the results written and the paths of results.json, rounds.csv and figures."""
    from services.core.model_file import write_model_file

    payload = {
        "config": result.config,
        "rounds": result.rounds,
        "clusters": result.clusters,
        "clustering": result.clustering,
        "final": result.final,
    }
    if getattr(result, "privacy", None):  # differential privacy's ledger and stop
        payload["privacy"] = result.privacy
    if getattr(result, "devices", None):  # simulated devices: factors and the clock's scale
        payload["devices"] = result.devices
    written = write_results(out, payload)
    if result.card is not None:
        write_model_file(out, result.weights, result.card)
    return payload, written


def round_rows(rounds: Sequence[RoundRecord | Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rounds as the JSON-able dicts results.json and rounds.csv hold."""
    return [r.to_dict() if isinstance(r, RoundRecord) else r for r in rounds]


def plot_rounds(out: Path, rounds: Sequence[Mapping[str, Any]]) -> list[Path]:
    """The run's story, one PNG each: accuracy.png (mean, worst participant, each cluster,
    the rounds in which simulated attackers fired shaded), defences.png (the updates each
    defence layer rejected per round), loss.png and std.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rounds]
    paths = [out / "accuracy.png", out / "defences.png"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    fired = [r["round"] for r in rounds if r.get("attack_fired")]
    for i, rnd in enumerate(fired):
        ax.axvspan(
            rnd - 0.5,
            rnd + 0.5,
            color="red",
            alpha=0.12,
            lw=0,
            label="attackers fired" if i == 0 else None,
        )
    clusters = sorted({int(c) for r in rounds for c in r.get("cluster_accuracy", {})})
    for c in clusters:
        per = [_get(r.get("cluster_accuracy", {}), c) for r in rounds]
        ax.plot(x, per, lw=1, alpha=0.7, label=f"cluster {c}")
    ax.plot(x, [r["mean_accuracy"] for r in rounds], "k-", lw=2, marker="o", ms=3, label="mean")
    ax.plot(x, [r["worst_accuracy"] for r in rounds], "k--", lw=1.5, label="worst participant")
    if any("personal_mean_accuracy" in r for r in rounds):
        ax.plot(
            x,
            [float(r.get("personal_mean_accuracy", math.nan)) for r in rounds],
            "b-",
            lw=1.5,
            label="mean, cluster models",
        )
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title("accuracy of the global model over participants")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8.5, 3.5))
    bottom = [0] * len(rounds)
    for layer in LAYERS:
        counts = [int(r.get("rejected_by", {}).get(layer, 0)) for r in rounds]
        ax.bar(x, counts, bottom=bottom, label=layer)
        bottom = [b + n for b, n in zip(bottom, counts, strict=True)]
    if fired:
        ax.plot(fired, [max(bottom) + 0.5] * len(fired), "rv", ms=5, label="attackers fired")
    ax.set_xlabel("round")
    ax.set_ylabel("updates rejected")
    ax.set_title("updates each defence layer rejected")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)

    for key, name, label in (
        ("mean_loss", "loss.png", "mean test loss"),
        ("accuracy_std", "std.png", "std of accuracy across participants"),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x, [r[key] for r in rounds], marker="o", markersize=3)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        paths.append(out / name)
    return paths


def _get(values: Mapping[Any, float], cluster: int) -> float:
    """A cluster's value from a map whose keys JSON may have made strings (NaN: none)."""
    got = values.get(cluster, values.get(str(cluster)))
    return math.nan if got is None else float(got)
