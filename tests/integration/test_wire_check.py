"""The wire check scripts/test runs (`scripts/buf breaking` against proto/baseline) catches
what would break a participant of a past release, names it, and lets additive changes by.

On a scratch copy of proto/ and buf.yaml: each breaking edit must fail the check with a
line naming what changed; the copy as it is, and one with a new field, must pass. buf
comes from scripts/buf (npm ci of the pinned version on first use); without npm or buf
these tests fail, they do not skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BASELINES = sorted((ROOT / "proto" / "baseline").glob("*.binpb"))
CLUSTERER = "flclustering/v1/clusterer.proto"
TENSORS = "flclustering/v1/tensors.proto"


def scratch(tmp_path: Path) -> Path:
    """A copy of the proto module (proto/ with its baselines, and buf.yaml)."""
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def breaking(where: Path, baseline: Path) -> subprocess.CompletedProcess[str]:
    """scripts/buf breaking, as scripts/test runs it, in where."""
    assert shutil.which("npm") or (ROOT / "tools/buf/node_modules/.bin/buf").exists(), (
        "buf is not installed and npm is missing to install it: install Node.js and npm "
        "(scripts/test installs Debian's npm)"
    )
    against = Path("proto") / "baseline" / baseline.name
    return subprocess.run(
        [str(ROOT / "scripts" / "buf"), "breaking", "proto", "--against", str(against)],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=300,
    )


def edit(where: Path, proto: str, old: str, new: str, count: int = 1) -> None:
    path = where / "proto" / proto
    text = path.read_text()
    assert text.count(old) >= count, f"{old!r} is not in {proto}: update this test"
    path.write_text(text.replace(old, new))


def test_there_is_a_baseline_to_check_against():
    assert BASELINES, "proto/baseline holds no release: run scripts/proto_baseline.py"
    for image in BASELINES:
        assert image.with_suffix(".json").exists(), f"{image.name} has no record of its commit"


@pytest.mark.parametrize("baseline", BASELINES, ids=[b.stem for b in BASELINES])
def test_the_protos_as_they_are_pass(tmp_path, baseline):
    done = breaking(scratch(tmp_path), baseline)
    assert done.returncode == 0, done.stdout + done.stderr


def test_an_added_field_and_rpc_pass(tmp_path):
    where = scratch(tmp_path)
    edit(
        where,
        CLUSTERER,
        "  string data_schema = 6;\n",
        "  string data_schema = 6;\n  int32 x = 99;\n",
    )
    edit(
        where,
        CLUSTERER,
        "  rpc GetStatus(GetStatusRequest) returns (GetStatusResponse);\n",
        "  rpc GetStatus(GetStatusRequest) returns (GetStatusResponse);\n"
        "  rpc Ping(GetStatusRequest) returns (GetStatusResponse);\n",
    )
    done = breaking(where, BASELINES[-1])
    assert done.returncode == 0, done.stdout + done.stderr


# (what is edited, in which file, from, to, what buf's message must say)
BREAKS = {
    "renumbered field": (
        CLUSTERER,
        "int64 num_train = 2;",
        "int64 num_train = 20;",
        r'field "2" with name "num_train" on message "JoinRequest" was deleted',
    ),
    "retyped field": (
        CLUSTERER,
        "int64 num_test = 3;",
        "string num_test = 3;",
        r'Field "3" with name "num_test" on message "JoinRequest" changed type from "int64" '
        r'to "string"',
    ),
    "field deleted unreserved": (
        CLUSTERER,
        "  string device = 5;      // device the participant trains on, for operators\n",
        "",
        r'field "5" with name "device" on message "JoinRequest" was deleted without reserving '
        r'the number "5"',
    ),
    "renamed field (the journal's JSON)": (
        TENSORS,
        "string dtype = 2;",
        "string element_type = 2;",
        r'Field "2" on message "TensorSpec" changed name from "dtype" to "element_type"',
    ),
    "renamed RPC": (
        CLUSTERER,
        "rpc GetStatus(",
        "rpc GetState(",
        r'RPC "GetStatus" on service "Clusterer" was deleted',
    ),
    "renamed request message": (
        CLUSTERER,
        "JoinRequest",
        "JoinCall",
        r'RPC "Join" on service "Clusterer" changed request type from '
        r'"flclustering.v1.JoinRequest" to "flclustering.v1.JoinCall"',
    ),
}


@pytest.mark.parametrize("change", sorted(BREAKS))
def test_a_breaking_change_fails_naming_it(tmp_path, change):
    proto, old, new, says = BREAKS[change]
    where = scratch(tmp_path)
    edit(where, proto, old, new, count=1)
    done = breaking(where, BASELINES[-1])
    assert done.returncode != 0, f"buf let a {change} through:\n{done.stdout}{done.stderr}"
    assert re.search(says, done.stdout), done.stdout + done.stderr
