"""`flclustering new DIR`: the task package it writes works as its README says.

The factory imports and builds a model for the run file's sample; every command of the
README parses with the parser of the program it starts (the services' `parser()`, the
`flclustering` sub-commands); the run file is accepted by all three services; init-model
writes w0 from it, which loads and which the aggregator starts from with the factory's
tensors in the factory's order; the example data is what a participant reads under the
run file's schema; an existing non-empty DIR is refused in one line.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from services.aggregator.__main__ import parser as aggregator_parser
from services.cli import build_parser, main
from services.clusterer.__main__ import parser as clusterer_parser
from services.core.factory import call_factory
from services.participant.settings import parser as participant_parser
from services.scaffold import FILES

ROOT = Path(__file__).resolve().parents[2]
CLI = (sys.executable, "-m", "services.cli")  # `flclustering`


def flclustering(*argv: str, cwd: Path) -> Any:
    """`flclustering ARGV` in a child process (this checkout's code)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith(("FLCLUSTERING_", "PARTICIPANT_"))}
    return subprocess.run(
        [*CLI, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder written by `flclustering new`."""
    where = tmp_path_factory.mktemp("scaffold")
    made = flclustering("new", "myfed", cwd=where)
    assert made.returncode == 0, made.stderr
    return where / "myfed"


@pytest.fixture
def importable(task: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The task package importable in this process, as PYTHONPATH=DIR makes it; no
    FLCLUSTERING_* variables from the test's environment."""
    monkeypatch.syspath_prepend(str(task))
    sys.modules.pop("task", None)
    for name in list(os.environ):
        if name.startswith(("FLCLUSTERING_", "PARTICIPANT_", "CLUSTERER_", "AGGREGATOR_")):
            monkeypatch.delenv(name)
    yield task
    sys.modules.pop("task", None)  # imported from a temporary folder: gone after the test


def test_new_writes_the_task_package(task: Path):
    assert {str(p.relative_to(task)) for p in task.rglob("*") if p.is_file()} == set(FILES)
    readme = (task / "README.md").read_text()
    for needed in ("flclustering certs", "init-model", "--initial-model", "--data-dir"):
        assert needed in readme


def test_the_factory_builds_a_model_for_images_and_tables(importable: Path):
    model = call_factory("task:make", (1, 28, 28), 10)
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert call_factory("task:make", (3, 32, 32), 5)(torch.zeros(2, 3, 32, 32)).shape == (2, 5)
    table = call_factory("task:make", (1, 1, 7), 1)  # a table of 7 features, regression
    assert table(torch.zeros(3, 1, 1, 7)).shape == (3, 1)
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_every_service_accepts_the_run_file(importable: Path):
    run = str(importable / "run.yaml")
    participant = participant_parser().parse(["--config", run, "--index", "2", "--data-dir", "d"])
    clusterer = clusterer_parser().parse(["--config", run])
    aggregator = aggregator_parser().parse(["--config", run, "--initial-model", "w0"])
    for config in (participant, clusterer, aggregator):
        assert config.federation.dataset == "own"
        assert config.federation.model == "task:make"
        assert config.sample.declared and config.sample.input_shape == (1, 28, 28)
        assert config.sample.class_names == tuple(str(c) for c in range(10))
    # One schema: what the participant sends at Join is what the clusterer declares.
    assert participant.sample.text() == clusterer.sample.text() == aggregator.sample.text()
    assert clusterer.federation.participants == participant.federation.participants == 3
    assert clusterer.federation.select == 3
    # The aggregator never imports task/: without --initial-model it refuses to start.
    with pytest.raises(SystemExit) as refused:
        aggregator_parser().parse(["--config", run])
    assert refused.value.code == 2


def readme_commands(task: Path) -> list[list[str]]:
    """The README's commands: each line of its bash block that is not a comment, split as
    the shell would ($PWD: the task folder)."""
    (block,) = re.findall(r"```bash\n(.*?)```", (task / "README.md").read_text(), re.S)
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    return [shlex.split(ln.replace("$PWD", str(task))) for ln in lines]


def test_every_readme_command_parses(importable: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(importable)  # the run file and paths are relative to the task folder
    cli, sub = build_parser()
    started = set()
    for argv in readme_commands(importable):
        if argv[0].startswith("PYTHONPATH="):
            assert argv.pop(0) == f"PYTHONPATH={importable}"
        program = argv[:3] if argv[:2] == ["python", "-m"] else argv[:1]
        args = argv[len(program) :]
        if program == ["flclustering"]:
            parsed = cli.parse_args(args)
            if parsed.command in sub:
                sub[parsed.command].from_namespace(parsed)  # the settings validate
        elif program[:2] == ["python", "-m"]:
            parsers = {
                "services.aggregator": aggregator_parser,
                "services.clusterer": clusterer_parser,
                "services.participant": participant_parser,
            }
            parsers[program[2]]().parse(args)
            started.add(program[2])
        else:
            assert argv[:2] == ["python", "example_data.py"], argv
    assert started == {"services.aggregator", "services.clusterer", "services.participant"}


def test_init_model_from_the_run_file_writes_w0_the_aggregator_starts_from(
    importable: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from services.aggregator.server import initial_state
    from services.core.model_file import load_model_file, read_weights

    # As the README runs it (in the task folder, which is on the path), in this process.
    monkeypatch.chdir(importable)
    assert main(["init-model", "--config", "run.yaml", "--out", str(tmp_path / "w0")]) == 0
    weights = read_weights(tmp_path / "w0" / "model.safetensors")
    model = call_factory("task:make", (1, 28, 28), 10)
    assert list(weights) == list(model.state_dict())  # the order uploads follow
    loaded, card = load_model_file(tmp_path / "w0")
    assert card.model == "task:make" and card.input_shape == (1, 28, 28)
    assert loaded(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    run = str(importable / "run.yaml")
    w0 = str(tmp_path / "w0" / "model.safetensors")
    config = aggregator_parser().parse(["--config", run, "--initial-model", w0])
    state = initial_state(config)
    assert [s.name for s in state.spec] == list(model.state_dict())


@pytest.mark.slow  # writes and reads 1,797 images: seconds
def test_the_example_data_is_what_a_participant_reads(
    importable: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from services.participant.sources import open_own_data

    argv = ["example_data.py", str(tmp_path / "data"), "--owners", "3"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(importable / "example_data.py"), run_name="__main__")
    owners = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert owners == ["owner-0", "owner-1", "owner-2"]
    config = participant_parser().parse(["--config", str(importable / "run.yaml")])
    own = open_own_data(tmp_path / "data" / "owner-1", config.sample, workers=0)
    assert own.facts["format"] == "image-folder"
    assert own.facts["n_train"] + own.facts["n_test"] == len(
        list((tmp_path / "data" / "owner-1").rglob("*.png"))
    )
    assert len(own.facts["classes"]) == 10


def test_an_existing_non_empty_directory_is_refused_in_one_line(tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    refused = flclustering("new", "mine", cwd=tmp_path)
    assert refused.returncode == 2
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not empty" in lines[0] and "--force" in lines[0], refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "a-file").write_text("")
    assert main(["new", str(tmp_path / "a-file")]) == 2
    # --force writes the scaffold beside what is there and leaves it alone.
    assert main(["new", str(tmp_path / "mine"), "--force"]) == 0
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "mine" / "run.yaml").is_file()
    # An empty directory is fine as it is.
    (tmp_path / "empty").mkdir()
    assert main(["new", str(tmp_path / "empty")]) == 0


def test_the_documentation_walks_through_the_same_commands(task: Path):
    """docs/own-data.md shows the README's commands (and may add to them)."""
    page = (ROOT / "docs" / "own-data.md").read_text()
    walkthrough = re.findall(r"```bash\n(.*?)```", page, re.S)[0]
    shown = {ln.strip() for ln in walkthrough.splitlines()}
    (block,) = re.findall(r"```bash\n(.*?)```", (task / "README.md").read_text(), re.S)
    for line in block.splitlines():
        if line.strip() and not line.startswith("#"):
            assert line.strip() in shown, line
