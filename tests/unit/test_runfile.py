"""Run files (`--config FILE`) are read within limits: no YAML anchors or aliases, at most
1 MiB, at most 32 deep, at most 10,000 YAML values; each refusal is one line, fast, and
quotes no value of the file before cutting it. Run files and results.json still read."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.clusterer.__main__ import parser as clusterer_parser
from services.common import runfile
from services.common.runfile import MAX_BYTES, MAX_DEPTH, RunFileError, load_run_file
from services.experiment import SimulateConfig

# Nine levels of nine aliases each: 9^10 values once anything walks it.
ANCHORS = "a0: &a0 [1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)
BOMBS = {
    "a field's value": ANCHORS + "federation: {rounds: *a9}\n",
    "an unknown field of a known group": ANCHORS + "federation: {bogus: *a9}\n",
    "an unknown group": ANCHORS + "bogus: *a9\n",
}
DEEP = 100_000


def refusal(capsys: pytest.CaptureFixture[str], path: Path, command: str = "clusterer") -> str:
    """The one stderr line of a command refusing the run file (within a second)."""
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exc:
        if command == "clusterer":
            clusterer_parser().parse(["--config", str(path)])
        else:
            parser, settings = build_parser()
            settings[command].from_namespace(parser.parse_args([command, "--config", str(path)]))
    elapsed = time.perf_counter() - started
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err, err[:1000]
    assert elapsed < 1.0, elapsed
    return err


def simulate_config(path: Path) -> SimulateConfig:
    parser, settings = build_parser()
    config = settings["simulate"].from_namespace(
        parser.parse_args(["simulate", "--config", str(path)])
    )
    assert isinstance(config, SimulateConfig)
    return config


@pytest.fixture(params=["CSafeLoader", "SafeLoader"])
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each YAML parser there is: libyaml's when built in, and PyYAML's own."""
    chosen = getattr(yaml, request.param, None)
    # PyYAML's wheels carry libyaml: a build without it fails here rather than skipping.
    assert chosen is not None, f"no {request.param} in this PyYAML (built without libyaml?)"
    monkeypatch.setattr(runfile, "_safe_loader", lambda: chosen)


@pytest.mark.usefixtures("loader")
@pytest.mark.parametrize("use", sorted(BOMBS))
def test_yaml_alias_bombs_are_refused_before_they_expand(tmp_path, capsys, use):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMBS[use])
    err = refusal(capsys, path)
    assert "YAML anchors and aliases are not allowed in a run file (&a0 at line 1)" in err


@pytest.mark.usefixtures("loader")
def test_any_anchor_or_alias_is_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  rounds: 3\ntraining: &t {lr: 0.1}\n")
    with pytest.raises(RunFileError, match=r"\(&t at line 3\)"):
        load_run_file(str(path))
    path.write_text("federation:\n  rounds: *r\n")  # an alias alone: refused as one too
    with pytest.raises(RunFileError, match=r"\(\*r at line 2\)"):
        load_run_file(str(path))


@pytest.mark.usefixtures("loader")
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.yaml", "[" * DEEP + "]" * DEEP + "\n"),
        ("deep-lines.yaml", "[\n" * DEEP + "]\n" * DEEP),
        ("deep-block.yaml", "".join(f"{' ' * i}k:\n" for i in range(40)) + " " * 40 + "k: 1\n"),
        ("deep.json", "[" * DEEP + "]" * DEEP),
        ("deep-object.json", '{"a": ' * DEEP + "1" + "}" * DEEP),
    ],
)
def test_deep_files_are_one_line_not_a_recursion_error(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert f"nested deeper than {MAX_DEPTH} levels" in refusal(capsys, path)


def test_json_depth_counts_brackets_outside_strings_only():
    at_limit = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert runfile.json_depth_error(at_limit) is None
    assert runfile.json_depth_error("[" + at_limit + "]") is not None
    assert runfile.json_depth_error(json.dumps({"a": "[[[{{{" * 100, "b": '\\"[[[' * 50})) is None
    assert runfile.json_depth_error('"[' + "[" * 100) is None  # an unterminated string


@pytest.mark.parametrize("name", ["big.json", "big.yaml"])
def test_files_over_a_mebibyte_are_refused(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text("{}" + " " * MAX_BYTES)
    assert f"larger than a run file's limit of {MAX_BYTES:,} bytes" in refusal(capsys, path)


@pytest.mark.usefixtures("loader")
def test_a_mebibyte_of_flat_list_is_refused_within_a_second(tmp_path, capsys):
    n = MAX_BYTES // 2 - 100
    as_json = tmp_path / "flat.json"
    as_json.write_text('{"federation": {"rounds": [' + ",".join(["1"] * n) + "]}}")
    err = refusal(capsys, as_json)
    assert "federation.rounds: Input should be a valid integer (got '[1, 1, 1" in err
    assert len(err) < 500
    as_yaml = tmp_path / "flat.yaml"
    as_yaml.write_text("federation: {bogus: [" + ",".join(["1"] * n) + "]}\n")
    assert "more than 10,000 values (line 1)" in refusal(capsys, as_yaml)


def test_values_are_cut_before_they_are_quoted(tmp_path, capsys):
    path = tmp_path / "long.json"
    path.write_text(json.dumps({"federation": {"strategy": "x" * 900_000}}))
    assert len(refusal(capsys, path)) < 600
    path.write_text(json.dumps({"federation": {f"k{i}": i for i in range(60_000)}}))
    assert "'k0' is not a setting of the federation group" in refusal(capsys, path)
    path.write_text(json.dumps({"x" * 500_000: {}}))
    assert f"{'x' * 40}' is not a settings group" in refusal(capsys, path)
    yaml_path = tmp_path / "ints.yaml"  # hex: an integer past str()'s 4,300-digit limit
    yaml_path.write_text(f"federation: {{rounds: [0x{'f' * 10_000}, 1], seed: x}}\n")
    assert "a value longer than 4,096 characters (line 1)" in refusal(capsys, yaml_path)
    yaml_path.write_text(f"federation: {{rounds: [0x{'f' * 3_000}, 1], seed: x}}\n")
    assert "federation.rounds[0]: an integer of more than 64 bits" in refusal(capsys, yaml_path)
    yaml_path.write_text(f"service: {{port: 0x{'f' * 3_000}}}\n")
    assert "service.port: an integer of more than 64 bits" in refusal(capsys, yaml_path)
    yaml_path.write_text("federation: {seed: !!int ''}\n")  # a constructor's own error
    assert "not YAML (IndexError" in refusal(capsys, yaml_path)


def test_other_refusals_stay_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"federation": {"strategy": "caf\xe9"}}')
    assert "not UTF-8 text (byte 32)" in refusal(capsys, path)
    path = tmp_path / "date.yaml"
    path.write_text("federation: {rounds: 2020-13-45}\n")  # the constructor's ValueError
    assert "not YAML (ValueError: month must be in 1..12)" in refusal(capsys, path)
    path = tmp_path / "keys.yaml"
    path.write_text("federation: {1: 2}\n")
    assert "1' is not a setting of the federation group" in refusal(capsys, path)


def test_run_files_in_json_and_yaml_still_read(tmp_path):
    document: dict[str, Any] = {
        "federation": {"rounds": 4, "participants": 12, "select": 6, "strategy": "fedavg"},
        "training": {"lr": 0.02},
        "hosting": {},
    }
    (tmp_path / "run.json").write_text(json.dumps(document, indent=2))
    (tmp_path / "run.yml").write_text(yaml.safe_dump(document))
    for name in ("run.json", "run.yml"):
        config = simulate_config(tmp_path / name)
        assert (config.federation.rounds, config.federation.select) == (4, 6)
        assert config.training.lr == 0.02


def results_json(config: SimulateConfig, rounds: int) -> str:
    """A results.json as `flclustering simulate` writes it (config first, then rounds)."""
    one_round = {
        "round": 0,
        "mean_accuracy": 0.5,
        "cluster_accuracy": {str(c): 0.5 for c in range(3)},
        "rejected_by": {"non-finite": 0, "norm": 0, "near-twin": 0, "robust-rule": 0},
        "selection": {str(p): p % 3 for p in range(15)},
    }
    results = {
        "config": config.model_dump(mode="json", exclude={"transport": {"auth_token"}}),
        "rounds": [{**one_round, "round": r} for r in range(rounds)],
        "clusters": [{"participant": f"p-{i}", "cluster": 0} for i in range(30)],
        "final": {"mean_accuracy": 0.5},
    }
    return json.dumps(results, indent=2) + "\n"


@pytest.mark.parametrize("rounds", [3, 2_000])
def test_a_results_json_still_reads_as_its_config_block(tmp_path, rounds):
    """A long run's results.json is over the limit: its config block, which comes first,
    is read from the start of the file."""
    ran = SimulateConfig().replace(rounds=rounds, participants=9, select=6, seed=4)
    path = tmp_path / "results.json"
    path.write_text(results_json(ran, rounds))
    assert (path.stat().st_size > MAX_BYTES) == (rounds > 1_000)
    started = time.perf_counter()
    config = simulate_config(path)
    assert time.perf_counter() - started < 1.0
    assert (config.federation.rounds, config.federation.select) == (rounds, 6)
    assert config.model_dump(exclude={"transport": {"auth_token"}}) == ran.model_dump(
        exclude={"transport": {"auth_token"}}
    )


def test_only_a_results_json_may_be_longer(tmp_path, capsys):
    long_list = ",\n".join(["1"] * (MAX_BYTES // 2))
    path = tmp_path / "results.json"
    path.write_text('{"config": {"federation": {}}, "round": [' + long_list + "]}")
    assert "larger than a run file's limit" in refusal(capsys, path, "simulate")
    path.write_text('{"config": {"federation": [' + long_list + "]}, rounds: []}")
    assert "larger than a run file's limit" in refusal(capsys, path, "simulate")
    path.write_text('{"config": ' + "[" * 100 + long_list)
    assert "nested deeper than 32 levels" in refusal(capsys, path, "simulate")
