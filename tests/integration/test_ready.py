"""The clusterer says it serves (its ready file, its "serving" log line) only once the
global model of version 0 is there: a participant that downloads it at that moment never
meets NOT_FOUND (it did once in about eight starts when the ready file came first)."""

from __future__ import annotations

import json

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.streams import read_model
from services.transport.client import channel
from tests.integration.test_kill_services import META, Process

STARTS = 20


def test_version_0_is_served_the_moment_the_ready_file_appears(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"federation": {"participants": 2, "seed": 0}}))
    aggregator = Process(
        "aggregator", ["services.aggregator", "--settings", str(settings)], tmp_path
    )
    aggregator.start()
    clusterer = Process("clusterer", ["services.clusterer", "--settings", str(settings)], tmp_path)
    try:
        aggregator_addr = ["--aggregator", aggregator.address]
        clusterer.args += aggregator_addr
        sizes = []
        for _ in range(STARTS):
            clusterer.address = ""  # a new port each time: no old process answers
            clusterer.start()  # returns the moment the ready file exists
            stub = pb_grpc.ClustererStub(channel(clusterer.address))
            header, weights = read_model(
                stub.DownloadModel(pb.DownloadModelRequest(model_version=0), metadata=META)
            )
            assert header.model_version == 0
            sizes.append(sum(t.numel() for t in weights.values()))
            clusterer.stop()
        assert len(sizes) == STARTS and len(set(sizes)) == 1 and sizes[0] > 0
    finally:
        clusterer.stop()
        aggregator.stop()
