"""Settings: every flag documented with its default; file < environment < flag; one-line
errors that name the flag or variable a bad value came from."""

from __future__ import annotations

import argparse
import json

import pytest

from services.aggregator.__main__ import parser as aggregator_parser
from services.cli import build_parser
from services.clusterer.__main__ import parser as clusterer_parser
from services.common.settings import DefenceSettings, FederationSettings, TrainingSettings
from services.core.errors import ConfigError
from services.participant.__main__ import parser as participant_parser


def parsers() -> dict[str, argparse.ArgumentParser]:
    top, _ = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {
        "clusterer": clusterer_parser().parser,
        "aggregator": aggregator_parser().parser,
        "participant": participant_parser().parser,
        "flclustering": top,
        **{f"flclustering {name}": p for name, p in sub.choices.items()},
    }


@pytest.mark.parametrize("name", sorted(parsers()))
def test_every_flag_says_what_it_does_and_its_default(name):
    parser = parsers()[name]
    # --help and --version print and exit: nothing to default.
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    flags += [a for a in parser._actions if not a.option_strings and a.help and a.nargs == "?"]
    assert flags, name
    for action in flags:
        assert action.help and len(action.help) > 20, (name, action.option_strings)
        assert "(default: " in action.help, (name, action.option_strings, action.help)


def test_file_then_environment_then_flag(tmp_path, monkeypatch):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"federation": {"rounds": 7, "select": 4}, "store": {}}))
    p = clusterer_parser()
    assert p.parse(["--settings", str(settings)]).federation.rounds == 7
    monkeypatch.setenv("FLCLUSTERING_ROUNDS", "8")
    config = p.parse(["--settings", str(settings)])
    assert (config.federation.rounds, config.federation.select) == (8, 4)
    assert p.parse(["--settings", str(settings), "--rounds", "9"]).federation.rounds == 9
    # A group's defaults of the command stay unless something sets them.
    assert config.service.port == 50051 and config.service.max_workers == 256


def test_bad_values_name_their_source(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        aggregator_parser().parse(["--q", "nan"])  # the defence is the aggregator's own
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--q" in err and "finite" in err
    p = clusterer_parser()
    monkeypatch.setenv("CLUSTERER_PORT", "http")
    with pytest.raises(SystemExit):
        p.parse([])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CLUSTERER_PORT" in err


def test_settings_files_must_be_json_objects(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(SystemExit):
        aggregator_parser().parse(["--settings", str(bad)])
    assert "expected an object of settings groups" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        aggregator_parser().parse(["--settings", str(tmp_path / "missing.json")])
    assert "--config" in capsys.readouterr().err  # --settings is its alias


def test_groups_validate_ranges_nan_and_names():
    with pytest.raises(ConfigError, match="--byzantine-fraction"):
        DefenceSettings.build(byzantine_fraction=0.5)
    with pytest.raises(ConfigError, match="--lr"):
        TrainingSettings.build(lr=float("nan"))
    with pytest.raises(ConfigError, match=r"--strategy.*flclustering"):
        FederationSettings.build(strategy="nope")
    with pytest.raises(ConfigError, match="no single setting"):
        FederationSettings().replace(bogus=1)
    assert FederationSettings().replace(clusters="auto").clusters is None


def test_one_learning_rate_schedule():
    t = TrainingSettings(lr=0.1, lr_decay=0.5)
    assert [t.lr_at(r) for r in (-1, 0, 2)] == [0.1, 0.1, 0.025]


def test_settings_file_groups_are_checked_and_named_in_errors(tmp_path, capsys):
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"federaton": {"rounds": 3}}))
    with pytest.raises(SystemExit):
        clusterer_parser().parse(["--settings", str(typo)])
    assert "'federaton' is not a settings group" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"federation": {"rounds": -2}}))
    with pytest.raises(SystemExit):
        clusterer_parser().parse(["--settings", str(bad)])
    assert f"{bad}: federation.rounds" in capsys.readouterr().err


def test_simulate_children_read_the_settings_file_not_the_ambient_environment(monkeypatch):
    from services.simulate import child_environment

    monkeypatch.setenv("FLCLUSTERING_ROUNDS", "30")
    monkeypatch.setenv("CLUSTERER_CLUSTER_METHOD", "kmeans")
    monkeypatch.setenv("PARTICIPANT_ATTACK", "scaling")
    env = child_environment()
    assert not {"FLCLUSTERING_ROUNDS", "CLUSTERER_CLUSTER_METHOD", "PARTICIPANT_ATTACK"} & set(env)
    assert env["PATH"]


def test_experiments_need_a_round_and_two_participants():
    from services.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match="at least 1"):
        ExperimentConfig().replace(rounds=0)
    with pytest.raises(ConfigError, match="at least 2"):
        ExperimentConfig().replace(participants=1)


def test_tokens_are_taken_literally():
    from services.common.settings import TransportSettings

    assert TransportSettings.build(auth_token="none").token() == "none"
    assert TransportSettings.build(auth_token="").token() is None


def test_simulate_hosts_a_process_per_core_of_ten_or_more_in_at_most_eight_processes():
    from services.experiment import HostingSettings

    auto = HostingSettings()
    assert auto.hosted_per_process(30, cores=2) == 15  # one process per core
    assert auto.hosted_per_process(30, cores=16) == 10  # at least 10 each
    assert auto.hosted_per_process(5, cores=2) == 10
    assert auto.hosted_per_process(1000, cores=64) == 125  # eight processes, not a hundred
    assert auto.hosted_per_process(1000, cores=2) == 125  # large: up to 125 per process
    assert auto.hosted_per_process(100000, cores=2) == 12500
    assert HostingSettings(per_process=3).hosted_per_process(30) == 3


def test_simulate_reads_every_services_flags_without_importing_torch():
    """The launcher starts the services at once; importing torch first (2 s of CPU) would
    delay every one of them."""
    import subprocess
    import sys

    code = (
        "import sys, services.cli, services.simulate as s; env = s.child_environment(); "
        "print(len(env) > 0, 'torch' in sys.modules, 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]


def test_the_readmes_seed_commands_are_valid():
    """Every command "From the seeds" shows parses and builds its settings: a renamed or
    misspelt flag, or a value out of range, fails here, not on a reader's machine."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text[text.index("## From the seeds") : text.index("## Decisions")]
    lines = re.findall(r"`((?:flclustering|python -m services\.\w+) [^`]+)`", section)
    lines += [
        line.split(".venv/bin/", 1)[1]
        for line in section.splitlines()
        if line.startswith(".venv/bin/")
    ]
    assert len(lines) >= 10
    top, settings = build_parser()
    services = {
        "clusterer": clusterer_parser(),
        "aggregator": aggregator_parser(),
        "participant": participant_parser(),
    }
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "python":
            service = services[argv[2].split(".")[1]]
            service.from_namespace(service.parser.parse_args(argv[3:]))
            continue
        args = top.parse_args(argv[1:])  # a bad flag exits 2, failing the test
        if args.command in settings:
            settings[args.command].from_namespace(args)
