"""Run files: `flclustering config` prints one, `--config FILE` reads it (JSON or YAML),
flags override it, and a finished run's results.json re-runs that run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from services.cli import build_parser
from services.experiment import SimulateConfig


def cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parsed(*argv: str) -> SimulateConfig:
    parser, settings = build_parser()
    return settings["simulate"].from_namespace(parser.parse_args(["simulate", *argv]))


def test_config_prints_the_defaults_as_a_run_file_in_json_and_yaml(tmp_path):
    printed = cli("config")
    assert printed.returncode == 0, printed.stderr
    document = json.loads(printed.stdout)
    assert document["federation"]["rounds"] == SimulateConfig().federation.rounds
    assert "auth_token" not in document["transport"]  # only the command's flags, no secrets
    as_yaml = cli("config", "local", "--format", "yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    local = yaml.safe_load(as_yaml.stdout)
    assert "hosting" not in local and local["federation"] == document["federation"]
    # Edited and read back, as JSON and as YAML; a flag still wins over the file.
    document["federation"].update(participants=9, select=6)
    (tmp_path / "run.json").write_text(json.dumps(document))
    local["federation"].update(participants=12, rounds=4)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(local))
    from_json = parsed("--config", str(tmp_path / "run.json"), "--select", "3")
    assert (from_json.federation.participants, from_json.federation.select) == (9, 3)
    from_yaml = parsed("--config", str(tmp_path / "run.yaml"))
    assert (from_yaml.federation.participants, from_yaml.federation.rounds) == (12, 4)
    assert parsed("--settings", str(tmp_path / "run.json")).federation.participants == 9


@pytest.mark.parametrize(
    ("content", "name", "needle"),
    [
        (None, "missing.json", "No such file"),
        ("a: [1", "bad.yaml", "not YAML"),
        ("{", "bad.json", "not JSON"),
        ('{"rounds": 3}', "flat.json", "'rounds' is not a settings group"),
        ("training:\n  lr: -1\n", "neg.yml", "training.lr"),
        ("- 1\n- 2\n", "list.yaml", "expected an object of settings groups"),
        ("!!python/object/apply:os.system ['true']\n", "evil.yaml", "not YAML"),
    ],
)
def test_bad_run_files_are_one_line(tmp_path, content, name, needle):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    proc = cli("local", "--config", str(path), "--rounds", "1", timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_a_finished_runs_results_rerun_it(tmp_path):
    """The config block of results.json is a run file: fed back (with only --out changed),
    the simulation selects the same participants in its first round and ends alike."""
    (tmp_path / "run.json").write_text(cli("config").stdout)
    document = json.loads((tmp_path / "run.json").read_text())
    document["federation"].update(participants=9, select=6, rounds=2, seed=4)
    (tmp_path / "run.json").write_text(json.dumps(document))
    first = cli("simulate", "--config", str(tmp_path / "run.json"), "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["config"]["federation"]["participants"] == 9
    assert len(results["rounds"]) == 2
    again = cli(
        "simulate", "--config", str(tmp_path / "a" / "results.json"), "--out", str(tmp_path / "b")
    )
    assert again.returncode == 0, again.stderr[-2000:]
    rerun = json.loads((tmp_path / "b" / "results.json").read_text())

    def first_selection(run: str) -> dict[str, int]:
        history = json.loads((tmp_path / run / "state" / "clusterer" / "history.json").read_text())
        return history["history"][0]["selection"]

    assert first_selection("b") == first_selection("a")
    assert len(first_selection("a")) == 6
    assert rerun["final"]["mean_accuracy"] == pytest.approx(results["final"]["mean_accuracy"])
