"""Releases on the wire: a participant of a past release, run from that release's own code,
trains with the current aggregator and clusterer over mutual TLS; one older than the
clusterer accepts is refused at Join with one line saying to upgrade it.

The past release is every one recorded in proto/baseline (its version and commit, written
by scripts/proto_baseline.py). Its code is the packaged copy beside the record
(`flclustering-VERSION-services.tar.gz`, `git archive` of the release's services/, its
sha256 in the record), so a shallow clone runs this too; where the clone has the release's
commit, the package is checked file by file against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.version import Version

from services.aggregator.server import AggregatorService
from services.aggregator.server import build_service as build_aggregator
from services.aggregator.settings import AggregatorConfig
from services.clusterer.server import ClustererService
from services.clusterer.server import build_service as build_clusterer
from services.clusterer.settings import ClustererConfig
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import clusterer_pb2_grpc as pb_grpc
from services.common.version import version
from services.transport.client import channel
from services.transport.credentials import load_tls, participant_id, write_kit

from ..processes import stop

ROOT = Path(__file__).resolve().parents[2]
RECORDS = sorted(
    (ROOT / "proto" / "baseline").glob("flclustering-*.json"),
    key=lambda r: Version(json.loads(r.read_text())["version"]),
)
PARTICIPANTS = 3
# What the services read from the environment; a participant process starts without it.
SERVICE_ENV = ("FLCLUSTERING_", "PARTICIPANT_", "CLUSTERER_", "AGGREGATOR_")


def release_code(record: Path, dest: Path) -> Path:
    """The services/ of the release `record` names, extracted under dest (returned): its
    packaged copy, refused unless its sha256 is the one the record states."""
    release = json.loads(record.read_text())
    package = record.parent / release["package"]["file"]
    data = package.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == release["package"]["sha256"], (
        f"{package.name} has sha256 {digest}, not the {release['package']['sha256']} that "
        f"{record.name} records"
    )
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        archive.extractall(dest, filter="data")
    return dest


def files_of(archive: tarfile.TarFile) -> dict[str, bytes]:
    return {
        m.name: archive.extractfile(m).read()  # type: ignore[union-attr]
        for m in archive.getmembers()
        if m.isfile()
    }


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.stem)
def test_packaged_release_is_the_release_commit(record: Path) -> None:
    """The packaged copy holds exactly the release commit's services/, where this clone has
    the commit (a shallow clone checks only the sha256, in release_code)."""
    release = json.loads(record.read_text())
    git = shutil.which("git")
    assert git, "git is needed to compare the packaged release with its commit"
    found = subprocess.run(
        [git, "cat-file", "-e", f"{release['commit']}^{{commit}}"], cwd=ROOT, capture_output=True
    )
    package = (record.parent / release["package"]["file"]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as archive:
        packaged = files_of(archive)
    assert any(name.startswith("services/participant/") for name in packaged)
    if found.returncode != 0:  # shallow: the sha256 in the record is the check
        assert hashlib.sha256(package).hexdigest() == release["package"]["sha256"]
        return
    tar = subprocess.run(
        [git, "archive", "--format=tar", release["commit"], "services"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert files_of(archive) == packaged


def participants_of(tree: Path, address: str, kit: Path, index: int, count: int) -> Any:
    """A participant process of the code in tree (its services/ and nothing else)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_ENV)}
    env["PYTHONPATH"] = str(tree)
    where = subprocess.run(
        [sys.executable, "-c", "import services; print(services.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(tree), f"the participant would run {where}, not {tree}"
    args = ["--clusterer", address, "--tls-dir", str(kit), "--index", str(index)]
    args += ["--count", str(count), "--participants", str(PARTICIPANTS), "--strategy", "fedavg"]
    args += ["--device", "cpu", "--poll-wait-s", "2", "--log-level", "WARNING"]
    return subprocess.Popen(
        [sys.executable, "-m", "services.participant", *args],
        cwd=tree,  # `python -m` puts the working directory first on sys.path
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Federation:
    """The current aggregator and clusterer on mutual TLS, and the kit of identities."""

    kit: Path
    aggregator: AggregatorService
    clusterer: ClustererService

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.clusterer.port}"

    def status(self) -> pb.GetStatusResponse:
        stub = pb_grpc.ClustererStub(channel(self.address, client=load_tls(self.kit, "operator")))
        return stub.GetStatus(pb.GetStatusRequest(), timeout=30)

    def aggregator_status(self) -> agg_pb.GetAggregatorStatusResponse:
        ch = channel(f"127.0.0.1:{self.aggregator.port}", client=load_tls(self.kit, "operator"))
        return agg_grpc.AggregatorStub(ch).GetAggregatorStatus(
            agg_pb.GetAggregatorStatusRequest(), timeout=30
        )


@pytest.fixture
def federation(tmp_path) -> Iterator[Callable[..., Federation]]:
    """Start a fedavg federation of PARTICIPANTS, 2 rounds, with clusterer settings."""
    started: list[Federation] = []

    def make(**clusterer: Any) -> Federation:
        kit = tmp_path / "kit"
        write_kit(kit, [participant_id(i) for i in range(PARTICIPANTS)])
        shared = {"strategy": "fedavg", "participants": PARTICIPANTS, "select": PARTICIPANTS}
        shared |= {"rounds": 2, "tls_dir": str(kit), "host": "127.0.0.1", "port": 0}
        agg = build_aggregator(AggregatorConfig().replace(metrics_port=None, **shared))
        agg.server.start()
        clu = build_clusterer(
            ClustererConfig().replace(
                aggregator=f"127.0.0.1:{agg.port}", metrics_port=None, **shared, **clusterer
            )
        )
        clu.server.start()
        clu.coordinator.start()
        clu.await_initial_model()
        fed = Federation(kit, agg, clu)
        started.append(fed)
        return fed

    yield make
    for fed in started:
        fed.clusterer.coordinator.shutdown()
        fed.clusterer.server.stop(0).wait()
        fed.aggregator.server.stop(0).wait()


@pytest.mark.parametrize("record", RECORDS, ids=[r.stem for r in RECORDS])
def test_participants_of_a_past_release_train_with_the_current_services(
    record, federation, tmp_path
):
    old = release_code(record, tmp_path / "old")
    fed = federation()
    # Two members run the past release's code, one the current code.
    procs = [
        participants_of(old, fed.address, fed.kit, 0, 2),
        participants_of(ROOT, fed.address, fed.kit, 2, 1),
    ]
    try:
        deadline = time.monotonic() + 300
        while not (status := fed.status()).done:
            assert status.phase != "failed", status.error
            for p in procs:
                assert p.poll() is None, f"a participant process exited: {p.stderr.read()}"
            assert time.monotonic() < deadline, f"not done in 300 s: phase {status.phase}"
            time.sleep(0.5)
        for p in procs:
            p.wait(60)
            assert p.returncode == 0, p.stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                stop(p, 15, 10)
    assert [h.round for h in status.history] == [0, 1]
    # Every member, the old ones included, sent its update and evaluated, every round.
    assert all(h.received == h.selected == PARTICIPANTS for h in status.history)
    assert all(h.evaluated == PARTICIPANTS for h in status.history)
    assert all(0.0 < h.mean_accuracy <= 1.0 for h in status.history)
    assert sorted(c.participant_id for c in status.clusters) == [
        participant_id(i) for i in range(PARTICIPANTS)
    ]
    assert status.model_version == 2
    assert status.version == version()
    agg = fed.aggregator_status()
    assert agg.model_version == 2 and agg.version == version()


def test_a_participant_older_than_the_clusterer_accepts_is_told_to_upgrade(federation, tmp_path):
    # The oldest release there is: it sends no version, which the clusterer takes as 0.1.0.
    old = release_code(RECORDS[0], tmp_path / "old")
    fed = federation(min_participant_version="99.0")
    proc = participants_of(old, fed.address, fed.kit, 0, 1)
    try:
        proc.wait(180)
    finally:
        if proc.poll() is None:
            stop(proc, 15, 10)
    err = proc.stderr.read()
    assert proc.returncode == 2, err
    assert "Traceback" not in err, err
    assert err.splitlines()[-1] == (
        f"participant: error: {participant_id(0)}: the clusterer refused to admit it "
        "(FAILED_PRECONDITION): participant 0.1.0 is older than the oldest this federation "
        "accepts (99.0): upgrade the participant"
    )
    assert fed.status().participants == 0
