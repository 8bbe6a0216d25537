"""Every command that takes `--config FILE`, as a real process, refuses a hostile run file
(YAML alias bombs, 100,000-deep YAML and JSON) in one line with exit status 2: no
traceback, in about the time and memory it takes to refuse a harmless bad value.

The yardstick of each command is the same command given a valid run file with a bad value
(`federation.rounds: -1`), refused while parsing too. A hostile file may cost at most
1 s of CPU time and 100 MB of peak memory more (the alias bomb cost 42 s and 3 GB before
it was refused, the deep files a RecursionError). Wall time gets 1 s more plus the
yardstick's own jitter: the clusterer and the participant import torch before parsing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.aggregator.__main__ import parser as aggregator_parser
from services.cli import build_parser
from services.clusterer.__main__ import parser as clusterer_parser
from services.participant.settings import parser as participant_parser

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "aggregator": ["-m", "services.aggregator"],
    "clusterer": ["-m", "services.clusterer"],
    "participant": ["-m", "services.participant"],
    **{
        f"flclustering {name}": ["-m", "services.cli", name]
        for name in ("simulate", "local", "centralised", "compare", "export", "init-model")
    },
}

ANCHORS = "a0: &a0 [1,1,1,1,1,1,1,1,1]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)
)
ALIASES = "YAML anchors and aliases are not allowed in a run file (&a0 at line 1)"
DEEP = "nested deeper than 32 levels (line 1)"
# name: (file name, content, what the refusal says)
HOSTILE = {
    "alias bomb as a value": ("value.yaml", ANCHORS + "federation: {rounds: *a9}\n", ALIASES),
    "alias bomb as an unknown field": ("field.yaml", ANCHORS + "federation: {x: *a9}\n", ALIASES),
    "alias bomb as an unknown group": ("group.yaml", ANCHORS + "bogus: *a9\n", ALIASES),
    "deep YAML": ("deep.yaml", "[" * 100_000 + "]" * 100_000 + "\n", DEEP),
    "deep JSON": ("deep.json", "[" * 100_000 + "]" * 100_000, DEEP),
}
YARDSTICK = '{"federation": {"rounds": -1}}\n'

# The children read no settings from this environment: only the run file.
ENV = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("FLCLUSTERING_", "CLUSTERER_", "AGGREGATOR_", "PARTICIPANT_"))
}


@dataclass(frozen=True)
class Finished:
    code: int
    stderr: str
    wall_s: float
    cpu_s: float
    peak_mb: float


def run(argv: list[str], timeout: float = 120) -> Finished:
    """Run python with argv to its end; its own rusage (os.wait4), not its siblings'."""
    with tempfile.TemporaryFile() as err:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=ROOT,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    return Finished(
        proc.returncode, text, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runfiles")
    paths = {}
    for name, (file_name, content, _) in {
        **HOSTILE,
        "yardstick": ("ok.json", YARDSTICK, ""),
    }.items():
        paths[name] = folder / file_name
        paths[name].write_text(content)
    return paths


@pytest.fixture(scope="module")
def yardsticks(files: dict[str, Path]) -> dict[str, Finished]:
    """Per command, its refusal of the valid run file's bad value, measured when first
    needed."""

    class Lazy(dict[str, Finished]):
        def __missing__(self, command: str) -> Finished:
            done = run([*COMMANDS[command], "--config", str(files["yardstick"])])
            assert done.code == 2 and "federation.rounds" in done.stderr, done.stderr[-2000:]
            self[command] = done
            return done

    return Lazy()


def test_these_are_all_the_commands_that_take_a_run_file():
    top, _ = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    taking = {
        f"flclustering {n}"
        for n, p in sub.choices.items()
        if "--config" in p._option_string_actions
    }
    services = {
        "aggregator": aggregator_parser().parser,
        "clusterer": clusterer_parser().parser,
        "participant": participant_parser().parser,
    }
    assert all("--config" in p._option_string_actions for p in services.values())
    assert taking | set(services) == set(COMMANDS)


@pytest.mark.parametrize("hostile", list(HOSTILE))
@pytest.mark.parametrize("command", list(COMMANDS))
def test_hostile_run_files_are_one_line_quickly(command, hostile, files, yardsticks):
    path = files[hostile]
    done = run([*COMMANDS[command], "--config", str(path)])
    assert done.code == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    last = [line for line in done.stderr.splitlines() if line.strip()][-1]
    assert f"--config {path}: {HOSTILE[hostile][2]}" in last, last
    yardstick = yardsticks[command]
    assert done.cpu_s < yardstick.cpu_s + 1.0, (done, yardstick)
    assert done.wall_s < yardstick.wall_s * 1.5 + 1.0, (done, yardstick)
    assert done.peak_mb < yardstick.peak_mb + 100, (done, yardstick)
