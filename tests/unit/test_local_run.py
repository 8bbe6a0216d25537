"""The learning core end to end, in one process, on real digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.cli import main
from services.core.errors import ConfigError
from services.experiment import ExperimentConfig
from services.local import run_local
from services.participant.attacks import choose_attackers


@pytest.mark.slow  # runs federations: see tests/conftest.py
def test_flclustering_learns_and_clusters_correctly():
    result = run_local(ExperimentConfig().replace(rounds=10, seed=3))
    accs = [r["mean_accuracy"] for r in result.rounds]
    assert result.clustering["purity"] >= 0.9
    assert accs[-1] >= 0.75 and accs[-1] > accs[0] + 0.3
    assert result.final["accuracy_std"] < 0.2


@pytest.mark.slow  # runs federations: see tests/conftest.py
def test_resnet18_learns_in_federation():
    # With BatchNorm this run ended at 0.17 with purity 0.50 (averaged running statistics);
    # GroupNorm and zero-initialised residual branches learn at the default learning rate.
    config = ExperimentConfig().replace(model="resnet18", participants=12, select=6, rounds=3)
    result = run_local(config)
    accs = [r["mean_accuracy"] for r in result.rounds]
    assert result.clustering["purity"] == 1.0
    assert accs[-1] >= 0.4 and accs[-1] > accs[0] + 0.15


@pytest.mark.slow  # runs federations: see tests/conftest.py
def test_defence_holds_where_fedavg_collapses():
    # Attackers (30%, spread over the groups) send their negated model every 2nd round;
    # the last round is an attack round.
    # The rules alone (the divergence guard would roll fedavg's attack rounds back too).
    common = dict(rounds=10, attack="scaling", attack_rate=0.3, attack_every=2, seed=1, guard=False)
    defended = run_local(ExperimentConfig().replace(strategy="flclustering", **common))
    plain = run_local(ExperimentConfig().replace(strategy="fedavg", **common))
    assert sum(r["attackers_selected"] for r in defended.rounds) > 0
    assert sum(r["rejected_attackers"] for r in defended.rounds) > 0
    # Attackers fire every 2nd round (rounds 1, 3, ...), and the figures know which.
    fired = [r["round"] for r in defended.rounds if r["attack_fired"]]
    assert fired and all(r % 2 == 1 for r in fired)
    assert all(sum(r["rejected_by"].values()) == r["rejected"] for r in defended.rounds)
    assert sum(r["rejected_by"]["norm"] for r in defended.rounds) > 0
    assert defended.final["mean_accuracy"] >= 0.7
    assert plain.final["mean_accuracy"] <= defended.final["mean_accuracy"] - 0.3


def test_attackers_spread_per_group():
    groups = np.repeat([0, 1, 2], 10)
    chosen = choose_attackers(groups, 0.3, "per-group", np.random.default_rng(0))
    assert len(chosen) == 9
    assert np.bincount(groups[sorted(chosen)]).tolist() == [3, 3, 3]


def test_bad_config():
    with pytest.raises(ConfigError, match="strategy"):
        ExperimentConfig().replace(strategy="nope")
    with pytest.raises(ConfigError, match="--attack-rate"):
        ExperimentConfig().replace(attack_rate=1.5)
    with pytest.raises(ConfigError, match="rounds"):
        ExperimentConfig().replace(rounds=float("nan"))


def test_cli_writes_results(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["local", "--rounds", "2", "--participants", "9", "--select", "6", "--out", str(out)]
    code = main(argv)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert len(results["clusters"]) == 9
    # per ground-truth group: the mean of its participants' accuracies, and the worst group
    final, last = results["final"], results["rounds"][-1]
    groups = {c["participant"]: c["group"] for c in results["clusters"]}
    assert set(final["group_accuracy"]) == {"0", "1", "2"}
    assert final["worst_group_accuracy"] == min(final["group_accuracy"].values())
    assert final["group_accuracy"] == last["group_accuracy"]
    assert len(set(groups.values())) == 3
    for name in ("rounds.csv", "accuracy.png", "loss.png", "std.png"):
        assert (out / name).stat().st_size > 0
    assert "worst group" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["local", "--rounds", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--rounds" in err
    code = main(["local", "--dataset", "mnist", "--data-dir", str(tmp_path), "--download", "false"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err


@pytest.mark.slow  # runs federations: see tests/conftest.py
def test_compressed_updates_cost_their_bytes_and_keep_the_accuracy():
    """int8 deltas: about a quarter of float32's bytes each round (one scale per tensor
    beside one byte a value), and the same accuracy within 2 points."""
    plain = run_local(ExperimentConfig().replace(rounds=8, seed=2))
    packed = run_local(ExperimentConfig().replace(rounds=8, seed=2, compression="int8"))
    floats, tensors = 31_050, 8  # the digits CNN: 8 float tensors
    for p, c in zip(plain.rounds, packed.rounds, strict=True):
        sent = len(c["selection"])
        assert p["upload_bytes"] == 4 * floats * len(p["selection"])
        assert c["upload_bytes"] == (floats + 4 * tensors) * sent
    assert abs(packed.final["mean_accuracy"] - plain.final["mean_accuracy"]) <= 0.02
    assert packed.final["mean_accuracy"] >= 0.85


@pytest.mark.parametrize("attack", ["adaptive", "adaptive-steering"])
@pytest.mark.parametrize(
    "strategy",
    [
        "fedavg",
        "median",
        "trimmed-mean",
        "multi-krum",
        "krum",
        "flclustering",
        "flclustering-fedavg",
    ],
)
def test_defence_aware_attacks_run_under_every_strategy(strategy, attack):
    config = ExperimentConfig().replace(
        strategy=strategy,
        attack=attack,
        attack_rate=0.3,
        attack_knowledge="omniscient",
        model="2nn",
        rounds=4,
        partition="dirichlet",
        alpha=0.3,
    )
    records = run_local(config).rounds
    assert len(records) == 4
    # Fair selection may pass over steered colluders in four rounds: they fire when chosen.
    assert any(r["attack_fired"] for r in records) or attack == "adaptive-steering"
    assert all(r["rejected_attackers"] <= r["attackers_selected"] for r in records)
