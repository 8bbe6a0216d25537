"""Write the wire baseline of a release (python scripts/proto_baseline.py VERSION).

`buf breaking` (scripts/test) compares proto/ against the descriptor set of the last
release, so a change that would break a participant of that release fails the tests. The
descriptor set is built by protoc from grpcio-tools, the compiler the stubs come from, out
of proto/ as it is in the work tree: run this at the release commit, with nothing changed.
Beside it goes a record of the version and the commit, which the old-participant test
(tests/integration/test_compatibility.py) checks the code out from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "proto" / "baseline"


def write(version: str) -> tuple[Path, Path]:
    """Write flclustering-VERSION.binpb and its record; return both paths."""
    from grpc_tools import protoc

    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "proto", ":!proto/baseline"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if dirty:
        raise SystemExit(f"proto/ has uncommitted changes; commit or stash them first:\n{dirty}")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    BASELINE.mkdir(parents=True, exist_ok=True)
    image = BASELINE / f"flclustering-{version}.binpb"
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        "--include_imports",
        f"--descriptor_set_out={image}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    record = BASELINE / f"flclustering-{version}.json"
    record.write_text(
        json.dumps({"version": version, "commit": commit, "protos": protos}, indent=2) + "\n"
    )
    return image, record


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/proto_baseline.py VERSION")
    for path in write(sys.argv[1]):
        print(path.relative_to(ROOT))
