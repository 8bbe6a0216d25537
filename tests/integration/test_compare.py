"""`flclustering centralised` and `flclustering compare`: the baseline and the table."""

from __future__ import annotations

import csv
import json

from services.cli import main

SMALL = ["--participants", "9", "--select", "6", "--rounds", "3"]


def test_centralised_trains_on_pooled_data_with_the_federations_budget(tmp_path, capsys):
    out = tmp_path / "central"
    assert main(["centralised", *SMALL, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["centralised"] is True
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # Each round processes the examples a federation round would: select/participants of
    # the pooled data, local_epochs times.
    pooled = rounds[0]["examples"] * 9 / (6 * 2)
    assert all(abs(r["examples"] - rounds[0]["examples"]) <= 1 for r in rounds) and pooled > 100
    assert results["final"]["mean_accuracy"] >= 0.85  # pooled data learns fast
    assert set(results["final"]["group_accuracy"]) == {"0", "1", "2"}
    assert (out / "model.safetensors").exists() and (out / "accuracy.png").exists()
    assert "final: mean accuracy" in capsys.readouterr().out


def test_compare_writes_one_table_and_one_figure(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--strategies", "fedavg,flclustering", "--centralised", "--seeds", "1,2"]
    assert main([*argv, *SMALL, "--out", str(out)]) == 0
    with (out / "compare.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["strategy"] for r in rows] == ["fedavg", "flclustering", "centralised"]
    assert all(r["seeds"] == "2" for r in rows)
    figures = {r["strategy"]: float(r["mean_accuracy"]) for r in rows}
    # Each row is the mean of its runs' final accuracy.
    for strategy in figures:
        finals = [
            json.loads((out / "runs" / f"{strategy}-seed{s}" / "results.json").read_text())[
                "final"
            ]["mean_accuracy"]
            for s in (1, 2)
        ]
        assert abs(figures[strategy] - sum(finals) / 2) < 1e-9
    assert figures["centralised"] >= max(figures["fedavg"], figures["flclustering"])
    table = (out / "compare.md").read_text()
    assert table.startswith("| strategy | mean accuracy | worst participant |")
    assert "| centralised |" in table and table in capsys.readouterr().out
    assert (out / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_compare_refuses_unknown_strategies(tmp_path, capsys):
    assert main(["compare", "--strategies", "fedavg,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--strategies: unknown nope" in err[0]
