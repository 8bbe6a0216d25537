"""Hundreds of participants held in GetTask long polls at once on a real clusterer.

A waiting poll holds no server thread (the clusterer's server is asyncio): while 300 wait,
a health check and an operator's GetStatus answer at once; the polls are answered when the
federation gives their participants a task, and the rest with WAIT once their wait_s ends.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.transport.client import channel

from .conftest import META, Federation, rpc_code

C = grpc.StatusCode
WAITING = 300
WAIT_S = 8.0


def pid(i: int) -> str:
    return f"poller-{i:04d}"


def settled(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


@pytest.fixture
def fed(federation_factory: Callable[..., Federation]) -> Federation:
    """A fedavg federation that starts once WAITING + 1 members joined, and admits no more:
    at most WAITING + 1 polls wait at once."""
    return federation_factory(
        strategy="fedavg",
        participants=WAITING + 1,
        max_participants=WAITING + 1,
        select=20,
        rounds=1,
        metrics_port=None,
    )


def test_hundreds_of_waiting_polls_leave_health_and_status_prompt(fed: Federation) -> None:
    stubs = [pb_grpc.ClustererStub(channel(fed.address)) for _ in range(4)]
    ids = [pid(i) for i in range(WAITING)]
    joins = [
        stubs[i % 4].Join.future(pb.JoinRequest(participant_id=p), metadata=META, timeout=30)
        for i, p in enumerate(ids)
    ]
    for f in joins:
        f.result()
    began = time.monotonic()
    polls = [
        stubs[i % 4].GetTask.future(
            pb.GetTaskRequest(participant_id=p, wait_s=WAIT_S), metadata=META, timeout=30
        )
        for i, p in enumerate(ids)
    ]
    answered_at: dict[int, float] = {}
    for i, f in enumerate(polls):
        f.add_done_callback(lambda _, i=i: answered_at.setdefault(i, time.monotonic()))
    polls_ = fed.clusterer.servicer.polls
    try:
        settled(lambda: polls_.waiting == WAITING, 5)
        assert not any(f.done() for f in polls)

        # Health (no credential) and an operator's status answer at once meanwhile.
        health = health_pb2_grpc.HealthStub(channel(fed.address))
        check, took = timed(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1))
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert took < 1.0, took
        status, took = timed(
            lambda: fed.stub.GetStatus(pb.GetStatusRequest(), metadata=META, timeout=1)
        )
        assert (status.phase, status.members_total) == ("waiting", WAITING)
        assert took < 1.0, took

        # Answered at once: a NaN wait, and a stranger (NOT_FOUND).
        nan = pb.GetTaskRequest(participant_id=ids[0], wait_s=math.nan)
        quick, took = timed(lambda: fed.stub.GetTask(nan, metadata=META, timeout=5))
        assert (quick.kind, quick.next_poll_s) == (pb.TASK_KIND_WAIT, 0.0) and took < 1.0
        stranger = pb.GetTaskRequest(participant_id="nobody", wait_s=WAIT_S)
        assert rpc_code(lambda: fed.stub.GetTask(stranger, metadata=META, timeout=5)) == (
            C.NOT_FOUND
        )

        # At the limit (one waiting poll per admissible member) a poll answers at once,
        # busy, with a hint when to ask again; a poll whose caller gives up stops waiting.
        extra = fed.stub.GetTask.future(
            pb.GetTaskRequest(participant_id=ids[0], wait_s=WAIT_S), metadata=META, timeout=30
        )
        settled(lambda: polls_.waiting == WAITING + 1, 5)
        busy, took = timed(
            lambda: fed.stub.GetTask(
                pb.GetTaskRequest(participant_id=ids[1], wait_s=WAIT_S), metadata=META, timeout=5
            )
        )
        assert (busy.kind, busy.next_poll_s) == (pb.TASK_KIND_WAIT, 2.0) and took < 1.0
        extra.cancel()
        settled(lambda: polls_.waiting == WAITING, 5)

        # The last member joins: the round starts and its selected members' polls answer.
        fed.stub.Join(pb.JoinRequest(participant_id=pid(WAITING)), metadata=META, timeout=10)
        triggered = time.monotonic()
        answers = [f.result() for f in polls]  # no error: a task or WAIT
    finally:
        for f in polls:
            f.cancel()
    assert triggered - began < WAIT_S - 2  # the checks above left time for tasks to come
    tasks = [i for i, a in enumerate(answers) if a.kind != pb.TASK_KIND_WAIT]
    idle = [i for i, a in enumerate(answers) if a.kind == pb.TASK_KIND_WAIT]
    # The selected got their task as soon as the round gave it, the rest waited it out.
    assert tasks and all(
        answers[i].kind in (pb.TASK_KIND_TRAIN, pb.TASK_KIND_EVALUATE) for i in tasks
    )
    assert all(answered_at[i] - triggered < 2.0 for i in tasks)
    assert len(idle) >= WAITING - 20 - 1
    assert all(answers[i].next_poll_s == 0.0 for i in idle)
    waited = [answered_at[i] - began for i in idle]
    assert min(waited) >= WAIT_S - 0.5 and max(waited) < WAIT_S + 3, (min(waited), max(waited))
    assert polls_.waiting == 0


def test_stopping_answers_waiting_polls_and_both_health_ports_say_not_serving(
    federation_factory: Callable[..., Federation],
) -> None:
    """SIGTERM's steps: NOT_SERVING (a Watch on the main port and a Check on the plain
    health port both see it: one source of truth), then on_stop answers the waiting polls
    at once, so the server drains without waiting them out."""
    fed = federation_factory(strategy="fedavg", participants=5, health_port=0, metrics_port=None)
    clu = fed.clusterer
    assert clu.health_server is not None
    clu.health_server.start()
    ids = [pid(i) for i in range(3)]
    for p in ids:
        fed.stub.Join(pb.JoinRequest(participant_id=p), metadata=META, timeout=10)
    polls = [
        fed.stub.GetTask.future(
            pb.GetTaskRequest(participant_id=p, wait_s=15), metadata=META, timeout=30
        )
        for p in ids
    ]
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    watch = health_pb2_grpc.HealthStub(channel(fed.address)).Watch(
        health_pb2.HealthCheckRequest(), metadata=META, timeout=30
    )
    assert next(watch).status == serving
    settled(lambda: clu.servicer.polls.waiting == len(ids), 5)

    clu.health.enter_graceful_shutdown()
    assert next(watch).status == not_serving
    plain = health_pb2_grpc.HealthStub(channel(f"127.0.0.1:{clu.health_port}"))
    assert plain.Check(health_pb2.HealthCheckRequest(), timeout=5).status == not_serving
    watch.cancel()

    started = time.monotonic()
    clu.on_stop()
    answers = [f.result() for f in polls]
    assert time.monotonic() - started < 2.0
    assert all(a.kind == pb.TASK_KIND_WAIT and a.next_poll_s > 0 for a in answers)
    assert clu.servicer.polls.waiting == 0
