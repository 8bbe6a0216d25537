"""kill -9 of the clusterer or the aggregator at any phase, then a restart (as Kubernetes
does): the federation still completes, one model version per round, no round skipped or
repeated, every update the aggregator acknowledged aggregated in its round.

Real processes (`python -m services.aggregator`, `services.clusterer`,
`services.participant`), real SIGKILLs, both services with --state-dir; each restart
reuses the killed process's command, port and state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.transport.client import call_metadata, channel
from tests.processes import stop

TOKEN = "some-token"
META = call_metadata(TOKEN)
ROUNDS = 4
SETTINGS = {
    "federation": {
        "strategy": "flclustering",
        "participants": 6,
        "select": 6,
        "rounds": ROUNDS,
        "clusters": 3,  # the three ground-truth groups, two participants each: all selected
        "eval_per_cluster": 2,
        "seed": 0,
    },
    "training": {"local_epochs": 1, "pre_steps": 10},
    "transport": {
        "round_timeout_s": 60.0,
        "eval_timeout_s": 60.0,
        "pretrain_timeout_s": 60.0,
        "liveness_s": 300.0,
        "poll_cap_s": 5.0,
    },
}
REJOIN = "unknown to the clusterer"  # a participant's log line when it had to join again


@dataclass
class Process:
    """One service or participant process, restartable with the same command and port."""

    name: str
    args: list[str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    address: str = ""
    starts: int = 0

    @property
    def ready(self) -> Path:
        return self.workdir / f"{self.name}.ready"

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, wait: bool = True) -> None:
        """Start (again, on the port the first start bound) and wait for the ready file."""
        self.ready.unlink(missing_ok=True)
        port = self.address.rsplit(":", 1)[1] if self.address else "0"
        flags = ["--ready-file", str(self.ready), "--metrics-port", "0"]
        if self.name in ("aggregator", "clusterer"):
            flags += ["--host", "127.0.0.1", "--port", port]
        env = {**os.environ, "FLCLUSTERING_AUTH_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        with self.log.open("ab") as fh:
            fh.write(f"---- start {self.starts}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.args, *flags],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait for the ready file; keep the bound gRPC address."""
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            assert time.monotonic() < deadline, f"{self.name} did not start: {self.tail()}"
            time.sleep(0.05)
        self.address = json.loads(self.ready.read_text()).get("grpc", self.address)

    def kill(self) -> None:
        """SIGKILL: no handler, no grace period, no flush."""
        assert self.proc is not None and self.proc.poll() is None, self.tail()
        self.proc.kill()
        self.proc.wait()

    def signal(self, sig: signal.Signals) -> None:
        """Send a signal (SIGSTOP freezes, SIGCONT thaws)."""
        assert self.proc is not None and self.proc.poll() is None, self.tail()
        self.proc.send_signal(sig)

    def stop(self) -> None:
        """Terminate (then kill) if still running (thawed first)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        if self.proc is not None and self.proc.poll() is None:
            stop(self.proc, signal.SIGTERM, 3)

    def tail(self, lines: int = 15) -> str:
        """The end of the process's log (for failure messages)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


# When to kill, from both services' status: True now, False not yet, None the moment passed.
Check = Callable[[pb.GetStatusResponse, agg_pb.GetAggregatorStatusResponse], bool | None]


def _pretraining(c: pb.GetStatusResponse, a: agg_pb.GetAggregatorStatusResponse) -> bool | None:
    """Pre-training: the clusterer is collecting deltas."""
    if c.phase == "pretraining":
        return True
    return None if c.phase not in ("", "waiting") else False


def _round_0(c: pb.GetStatusResponse, a: agg_pb.GetAggregatorStatusResponse) -> bool | None:
    """Round 0 is training (its tasks are out)."""
    if a.open_round > 0 or c.history:
        return None
    return c.phase == "training"


def _training(c: pb.GetStatusResponse, a: agg_pb.GetAggregatorStatusResponse) -> bool | None:
    """Round 0 is training and the aggregator holds at least one acknowledged update."""
    return _round_0(c, a) and a.pending_updates >= 1


def _aggregating(c: pb.GetStatusResponse, a: agg_pb.GetAggregatorStatusResponse) -> bool | None:
    """A round from 1 on closed: the clusterer is aggregating, or the aggregator has just
    answered and the round is not recorded yet."""
    if len(c.history) >= ROUNDS:
        return None
    closing = c.phase == "aggregating" or a.open_round == c.round + 1
    return c.round >= 1 and len(c.history) == c.round and closing


def _post_evaluating(c: pb.GetStatusResponse, a: agg_pb.GetAggregatorStatusResponse) -> bool | None:
    """A round from 2 on is aggregated and its new model is being evaluated (a short
    phase: a later round is a second chance)."""
    if len(c.history) >= ROUNDS:
        return None
    aggregated = a.open_round == c.round + 1 and len(c.history) == c.round
    return c.round >= 2 and c.phase == "evaluating" and aggregated


PHASES: dict[str, Check] = {
    "pretraining": _pretraining,
    "training": _training,
    "aggregating": _aggregating,
    "post-evaluating": _post_evaluating,
}
# Phases held open by freezing the straggler (SIGSTOP) when they begin: the others' deltas
# or updates come in while the clusterer waits for its, then the service dies.
HELD = {"pretraining": _pretraining, "training": _round_0}


@dataclass
class Federation:
    """The processes of a small federation and stubs to watch them: participants 0-4 in
    one process, participant 5 alone in another (`straggler`), so that freezing it
    (SIGSTOP) holds a round open with the others' updates acknowledged."""

    workdir: Path
    aggregator: Process
    clusterer: Process
    participants: Process
    straggler: Process
    kills: list[str] = field(default_factory=list)
    _stubs: tuple[pb_grpc.ClustererStub, agg_grpc.AggregatorStub] | None = None

    def processes(self) -> tuple[Process, ...]:
        return (self.aggregator, self.clusterer, self.participants, self.straggler)

    def stubs(self) -> tuple[pb_grpc.ClustererStub, agg_grpc.AggregatorStub]:
        """Stubs on fresh channels after every restart (no reconnect backoff to wait out)."""
        if self._stubs is None:
            self._stubs = (
                pb_grpc.ClustererStub(channel(self.clusterer.address)),
                agg_grpc.AggregatorStub(channel(self.aggregator.address)),
            )
        return self._stubs

    def observe(
        self,
    ) -> tuple[pb.GetStatusResponse | None, agg_pb.GetAggregatorStatusResponse | None]:
        """Both services' status (None for one that does not answer right now)."""
        clusterer, aggregator = self.stubs()
        c = a = None
        with contextlib.suppress(grpc.RpcError):
            c = clusterer.GetStatus(pb.GetStatusRequest(), metadata=META, timeout=5)
        with contextlib.suppress(grpc.RpcError):
            a = aggregator.GetAggregatorStatus(
                agg_pb.GetAggregatorStatusRequest(), metadata=META, timeout=5
            )
        if c is not None and c.phase == "failed":
            raise AssertionError(f"federation failed: {c.error}\n{self.tails()}")
        return c, a

    def wait(self, when: str, check: Check, timeout: float = 180.0) -> tuple[Any, Any]:
        """Poll until check says now (True); fail if its moment passed (None)."""
        deadline = time.monotonic() + timeout
        while True:
            c, a = self.observe()
            if c is not None and a is not None:
                hit = check(c, a)
                if hit is None:
                    raise AssertionError(
                        f"missed {when}: clusterer {c.phase} round {c.round}, "
                        f"{len(c.history)} rounds done; aggregator round {a.open_round}"
                    )
                if hit:
                    return c, a
            assert time.monotonic() < deadline, f"{when} not reached:\n{self.tails()}"
            time.sleep(0.01)

    def kill_when(self, service: Process, when: str) -> None:
        """SIGKILL service once the phase `when` is observed and restart it at once (with
        the straggler frozen meanwhile for the phases it can hold open)."""
        hold = when in HELD
        if hold:
            self.wait(when, HELD[when])
            self.straggler.signal(signal.SIGSTOP)
        c, a = self.wait(when, PHASES[when])
        if hold:
            self.settle()
        service.kill()
        self.kills.append(
            f"{service.name}@{when}: {c.phase} r{c.round}, aggregator round {a.open_round} "
            f"with {a.pending_updates} pending"
        )
        service.start()
        self._stubs = None
        if hold:
            self.straggler.signal(signal.SIGCONT)

    def settle(self) -> None:
        """Let the unfrozen participants' deltas or updates come in: five updates
        acknowledged (all six are selected), or a moment for the deltas."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            c, a = self.observe()
            if c is not None and c.phase == "pretraining":
                time.sleep(1.5)
                return
            if a is not None and a.pending_updates >= 5:
                return
            time.sleep(0.05)

    def wait_done(self, timeout: float = 240.0) -> pb.GetStatusResponse:
        """The clusterer's final status once the federation is done."""
        c, _ = self.wait("done", lambda c, a: c.done, timeout)
        return c

    def tails(self) -> str:
        return "\n".join(f"== {p.name}\n{p.tail()}" for p in self.processes())


def start_federation(workdir: Path, given: dict[str, Any] | None = None) -> Federation:
    """Aggregator, clusterer (both with a state directory) and six participants."""
    workdir.mkdir(parents=True, exist_ok=True)
    settings = workdir / "settings.json"
    settings.write_text(json.dumps(given or SETTINGS))
    common = ["--settings", str(settings)]
    aggregator = Process(
        "aggregator",
        ["services.aggregator", *common, "--state-dir", str(workdir / "state" / "aggregator")],
        workdir,
    )
    aggregator.start()
    clusterer = Process(
        "clusterer",
        [
            "services.clusterer",
            *common,
            "--aggregator",
            aggregator.address,
            "--state-dir",
            str(workdir / "state" / "clusterer"),
        ],
        workdir,
    )
    clusterer.start()

    def participants(name: str, index: int, count: int) -> Process:
        args = ["services.participant", *common, "--clusterer", clusterer.address]
        flags = ["--index", str(index), "--count", str(count), "--device", "cpu"]
        return Process(name, [*args, *flags], workdir)

    many, straggler = participants("participants", 0, 5), participants("straggler", 5, 1)
    many.start(wait=False)
    straggler.start()
    many.wait_ready()
    return Federation(workdir, aggregator, clusterer, many, straggler)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Callable[[], Federation]]:
    started: list[Federation] = []

    def make() -> Federation:
        fed = start_federation(tmp_path / "run")
        started.append(fed)
        return fed

    yield make
    for fed in started:
        for p in fed.processes():
            p.stop()


def assert_complete(fed: Federation) -> None:
    """One model version per round, every round once, every acknowledged update in."""
    final = fed.wait_done()
    _, agg = fed.observe()
    assert agg is not None
    context = f"kills: {fed.kills}"
    assert [h.round for h in final.history] == list(range(ROUNDS)), context
    assert [h.model_version for h in final.history] == list(range(1, ROUNDS + 1)), context
    assert (agg.model_version, agg.open_round, agg.pending_updates) == (ROUNDS, ROUNDS, 0)
    exported = json.loads((fed.workdir / "state" / "clusterer" / "history.json").read_text())
    for record in exported["history"]:
        assert not record["abandoned"], (record, context)
        assert record["received"] == record["updates"] == record["selected"], (record, context)
    assert len(exported["members"]) == 6
    assert final.participants == 6 and final.purity >= 0.99


@pytest.mark.parametrize("service", ["clusterer", "aggregator"])
def test_kill_9_at_every_phase_and_restart(federation, service):
    """SIGKILL one service at pre-training, at training with an update acknowledged, at
    aggregation and at post-round evaluation; after each restart the run goes on."""
    fed = federation()
    target = getattr(fed, service)
    for when in PHASES:
        fed.kill_when(target, when)
    assert_complete(fed)
    assert target.starts == 1 + len(PHASES)
    if service == "clusterer":
        # Membership is restored: no participant was told NOT_FOUND and had to join again.
        for p in (fed.participants, fed.straggler):
            assert REJOIN not in p.log.read_text(errors="replace")
