"""Real servers on port 0 and real channels: the federation's parts started in-process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from services.aggregator.server import AggregatorService
from services.aggregator.server import build_service as build_aggregator
from services.aggregator.settings import AggregatorConfig
from services.clusterer.server import ClustererService
from services.clusterer.server import build_service as build_clusterer
from services.clusterer.settings import ClustererConfig
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.participant.__main__ import run
from services.participant.settings import ParticipantConfig
from services.transport.client import call_metadata, channel

TOKEN = "test-token"
META = call_metadata(TOKEN)
# `simulate` flags of a small FedAvg federation on IID data, every participant selected
# each round, in two processes: what the attacks and the guards are watched on.
SMALL_FEDAVG = (
    "--strategy",
    "fedavg",
    "--partition",
    "iid",
    "--participants",
    "6",
    "--select",
    "6",
    "--per-process",
    "3",
)


@dataclass
class Federation:
    """Running aggregator and clusterer, with stubs that carry the token."""

    aggregator: AggregatorService
    clusterer: ClustererService
    agg_stub: agg_grpc.AggregatorStub
    stub: pb_grpc.ClustererStub
    address: str
    workers: list[tuple[threading.Thread, threading.Event]]

    def status(self) -> pb.GetStatusResponse:
        # wait_for_ready: across a clusterer restart the channel reconnects instead of failing.
        return self.stub.GetStatus(
            pb.GetStatusRequest(), metadata=META, timeout=30, wait_for_ready=True
        )

    def wait_for(
        self, check: Callable[[pb.GetStatusResponse], bool], timeout: float
    ) -> pb.GetStatusResponse:
        """Poll the clusterer's status until check passes (fails the test on timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if check(s):
                return s
            if s.phase == "failed":
                raise AssertionError(f"federation failed: {s.error}")
            time.sleep(0.1)
        raise AssertionError(f"timed out; last status phase={s.phase} round={s.round}")

    def add_participants(self, index: int, count: int, **overrides: Any) -> None:
        """Host participants in a thread, talking real gRPC to the clusterer."""
        config = ParticipantConfig().replace(
            **{
                "clusterer": self.address,
                "participants": 6,
                "index": index,
                "count": count,
                "device": "cpu",
                "auth_token": TOKEN,
                "poll_wait_s": 2.0,
                **overrides,
            }
        )
        stop = threading.Event()
        t = threading.Thread(target=run, args=(config, stop), daemon=True)
        t.start()
        self.workers.append((t, stop))


@pytest.fixture
def federation_factory() -> Iterator[Callable[..., Federation]]:
    started: list[Federation] = []

    def make(
        aggregator_only: dict[str, Any] | None = None, **clusterer_overrides: Any
    ) -> Federation:
        # The experiment's settings both services have (the strategy above all: the
        # aggregator owns the defence policy and the clusterer checks they agree).
        agg_config = AggregatorConfig().replace(
            host="127.0.0.1", port=0, auth_token=TOKEN, **(aggregator_only or {})
        )
        groups = (type(agg_config.federation), type(agg_config.training))
        shared = {
            k: v for k, v in clusterer_overrides.items() if any(k in g.model_fields for g in groups)
        }
        agg = build_aggregator(agg_config.replace(**shared))
        agg.server.start()
        config = ClustererConfig().replace(
            host="127.0.0.1",
            port=0,
            aggregator=f"127.0.0.1:{agg.port}",
            auth_token=TOKEN,
            **clusterer_overrides,
        )
        clu = build_clusterer(config)
        clu.server.start()
        clu.coordinator.start()
        clu.await_initial_model()  # as ClustererService.start: version 0 served from now
        address = f"127.0.0.1:{clu.port}"
        fed = Federation(
            agg,
            clu,
            agg_grpc.AggregatorStub(channel(f"127.0.0.1:{agg.port}")),
            pb_grpc.ClustererStub(channel(address)),
            address,
            [],
        )
        started.append(fed)
        return fed

    yield make
    for fed in started:
        for _, stop in fed.workers:
            stop.set()
        fed.clusterer.coordinator.shutdown()
        fed.clusterer.server.stop(0).wait()
        fed.aggregator.server.stop(0).wait()
        for t, _ in fed.workers:
            t.join(timeout=10)


def rpc_code(fn: Callable[[], Any]) -> grpc.StatusCode:
    """Call fn and return the status code it failed with (OK if it did not fail)."""
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
