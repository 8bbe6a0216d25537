"""The one retry helper: only the policy's codes, bounded by attempts and by time."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from services.transport.client import IDEMPOTENT, RetryPolicy, with_retries


class Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def failing(code: grpc.StatusCode, times: int):
    calls = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise Failure(code)
        return "ok"

    return fn, calls


def test_retries_unavailable_then_succeeds():
    fn, calls = failing(grpc.StatusCode.UNAVAILABLE, 3)
    policy = RetryPolicy(attempts=5, base_s=0.001, cap_s=0.01)
    assert with_retries(fn, "t", policy, random.Random(0)) == "ok"
    assert len(calls) == 4


def test_deadline_is_retried_only_for_idempotent_calls():
    fn, calls = failing(grpc.StatusCode.DEADLINE_EXCEEDED, 1)
    with pytest.raises(Failure):
        with_retries(fn, "t", RetryPolicy(base_s=0.001))
    assert len(calls) == 1
    fn, calls = failing(grpc.StatusCode.DEADLINE_EXCEEDED, 1)
    fast = RetryPolicy(attempts=3, base_s=0.001, codes=IDEMPOTENT.codes)
    assert with_retries(fn, "t", fast) == "ok"


def test_attempts_and_time_budget_bound_the_retries():
    fn, calls = failing(grpc.StatusCode.UNAVAILABLE, 100)
    with pytest.raises(Failure):
        with_retries(fn, "t", RetryPolicy(attempts=3, base_s=0.001))
    assert len(calls) == 3
    fn, calls = failing(grpc.StatusCode.UNAVAILABLE, 10**6)
    start = time.monotonic()
    with pytest.raises(Failure):
        with_retries(fn, "t", RetryPolicy(attempts=10**6, base_s=0.05, cap_s=0.05, budget_s=0.5))
    assert time.monotonic() - start < 1.0 and len(calls) > 3


def test_a_stop_ends_the_wait():
    fn, _ = failing(grpc.StatusCode.UNAVAILABLE, 10**6)
    stop = threading.Event()
    stop.set()
    start = time.monotonic()
    with pytest.raises(Failure):
        with_retries(fn, "t", RetryPolicy(attempts=100, base_s=5, cap_s=5), stop=stop)
    assert time.monotonic() - start < 1.0
