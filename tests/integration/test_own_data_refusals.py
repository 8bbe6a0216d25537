"""Bad own data gets one line and changes nothing: a participant whose data schema differs
from the federation's is refused at Join with its status and the difference named; a
corrupt image or a missing column stops the participant before it joins, naming the file
or the column, without a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from PIL import Image

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.schema import SchemaSettings
from tests.integration.conftest import META, TOKEN, rpc_code

SAMPLE = {
    "data_kind": "image",
    "sample_shape": [1, 8, 8],
    "class_names": ["a", "b", "c"],
}


def own_federation(federation_factory):
    return federation_factory(
        aggregator_only={"sample": SAMPLE, "dataset": "own"},
        dataset="own",
        model="2nn",
        participants=6,
        sample=SAMPLE,
    )


def join(fed, schema: str, pid: str = "participant-0") -> pb.JoinResponse:
    request = pb.JoinRequest(participant_id=pid, num_train=10, num_test=2, data_schema=schema)
    return fed.stub.Join(request, metadata=META, timeout=10)


def test_a_different_schema_is_refused_at_join_and_nothing_changes(federation_factory):
    fed = own_federation(federation_factory)
    mine = SchemaSettings.build(**SAMPLE)
    other = SchemaSettings.build(**{**SAMPLE, "class_names": ["a", "b", "x"]})
    with pytest.raises(grpc.RpcError) as refused:
        join(fed, other.text())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "class-names" in refused.value.details()
    assert "'x'" in refused.value.details()
    # Nothing sent, an older build or a shard participant: refused, saying so.
    with pytest.raises(grpc.RpcError) as empty:
        join(fed, "")
    assert empty.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "sent no data schema" in empty.value.details()
    # Not a schema at all, or too long: the request is malformed.
    assert rpc_code(lambda: join(fed, '{"data_kind": 3')) == grpc.StatusCode.INVALID_ARGUMENT
    too_long = '{"x": "' + "y" * 20_000 + '"}'
    assert rpc_code(lambda: join(fed, too_long)) == grpc.StatusCode.INVALID_ARGUMENT
    assert fed.status().participants == 0  # no one was admitted
    # The service goes on: the federation's own schema is admitted.
    assert join(fed, mine.text()).participants == 1
    assert fed.status().participants == 1


def test_a_shard_federation_refuses_a_schema(federation_factory):
    fed = federation_factory()
    own = SchemaSettings.build(**SAMPLE)
    with pytest.raises(grpc.RpcError) as refused:
        join(fed, own.text())
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "declares no data schema" in refused.value.details()
    assert join(fed, "").participants == 1


def participant(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLCLUSTERING_")}
    return subprocess.run(
        [sys.executable, "-m", "services.participant", "--auth-token", TOKEN, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )


def image_flags(folder: Path, classes: str = "a,b,c") -> list[str]:
    return [
        *("--dataset", "own", "--model", "2nn", "--participants", "6"),
        *("--data-kind", "image", "--sample-shape", "1,8,8", "--class-names", classes),
        *("--data-dir", str(folder), "--retry-budget-s", "20", "--metrics-port", "0"),
    ]


def image_folder(root: Path) -> Path:
    for c in "abc":
        (root / c).mkdir(parents=True)
        for k in range(5):
            Image.new("L", (8, 8), color=30 * k).save(root / c / f"{k}.png")
    return root


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("participant: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_a_participant_with_another_schema_stops_with_the_refusal(federation_factory, tmp_path):
    fed = own_federation(federation_factory)
    folder = image_folder(tmp_path / "data")
    # Its data fits its own declaration (a superset of its classes), not the federation's.
    line = one_line(
        participant(["--clusterer", fed.address, *image_flags(folder, classes="a,b,c,d")])
    )
    assert "FAILED_PRECONDITION" in line and "class-names" in line, line
    assert fed.status().participants == 0


def test_a_corrupt_image_is_named_before_joining(tmp_path):
    folder = image_folder(tmp_path / "data")
    bad = folder / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really an image" * 10)
    # No clusterer listens there: the data is checked before anything is sent.
    line = one_line(participant(["--clusterer", "127.0.0.1:9", *image_flags(folder)]))
    assert str(bad) in line or "broken.png" in line, line


def test_a_missing_label_column_is_named(tmp_path):
    folder = tmp_path / "table"
    folder.mkdir()
    rows = "".join(f"{k},{k % 3},{k % 2}\n" for k in range(40))
    (folder / "data.csv").write_text("x1,x2,y\n" + rows)
    line = one_line(
        participant(
            [
                *("--clusterer", "127.0.0.1:9", "--dataset", "own", "--model", "2nn"),
                *("--participants", "6", "--data-kind", "table", "--features", "x1,x2"),
                *("--label-column", "diagnosis", "--class-names", "0,1"),
                *("--data-dir", str(folder), "--metrics-port", "0"),
            ]
        )
    )
    assert "diagnosis" in line and "data.csv" in line, line
