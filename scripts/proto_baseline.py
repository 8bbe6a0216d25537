"""Write the wire baseline of a release (python scripts/proto_baseline.py VERSION).

`buf breaking` (scripts/test) compares proto/ against the descriptor set of the last
release, so a change that would break a participant of that release fails the tests. The
descriptor set is built by protoc from grpcio-tools, the compiler the stubs come from, out
of proto/ as it is in the work tree: run this at the release commit, with nothing changed.
Beside it go the release's services/ packaged (`git archive` of the commit, gzipped without
a name or time) and a record of the version, the commit and the package's sha256: the
old-participant test (tests/integration/test_compatibility.py) runs that package, and checks
it against the commit where the clone has it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "proto" / "baseline"


def write(version: str) -> tuple[Path, Path]:
    """Write flclustering-VERSION.binpb, the packaged services/ and the record; return the
    descriptor set's and the record's paths."""
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
    tar = subprocess.run(
        ["git", "archive", "--format=tar", commit, "services"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    package = BASELINE / f"flclustering-{version}-services.tar.gz"
    package.write_bytes(gzip.compress(tar, compresslevel=9, mtime=0))
    record = BASELINE / f"flclustering-{version}.json"
    entry = {
        "version": version,
        "commit": commit,
        "protos": protos,
        "package": {
            "file": package.name,
            "sha256": hashlib.sha256(package.read_bytes()).hexdigest(),
        },
    }
    record.write_text(json.dumps(entry, indent=2) + "\n")
    return image, record


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python scripts/proto_baseline.py VERSION")
    for path in write(sys.argv[1]):
        print(path.relative_to(ROOT))
