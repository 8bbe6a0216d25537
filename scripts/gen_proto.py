"""Regenerate services/common/pb from proto/ (python scripts/gen_proto.py [OUT_DIR]).

grpc_tools writes imports as `from flclustering.v1 import x_pb2`; they are rewritten to the
package the stubs live in, so the stubs import as `services.common.pb.flclustering.v1`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "services.common.pb"


def generate(out: Path) -> list[Path]:
    """Write the stubs for every proto under proto/ into out; return the files written."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'proto'}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(p for p in out.rglob("*") if p.suffix in (".py", ".pyi")):
        text = path.read_text()
        text = re.sub(
            r"^from flclustering\.v1 import",
            f"from {PACKAGE}.flclustering.v1 import",
            text,
            flags=re.M,
        )
        path.write_text(text)
        written.append(path)
    dirs = [p for p in out.rglob("*") if p.is_dir() and p.name != "__pycache__"]
    for d in [out, *sorted(dirs)]:
        init = d / "__init__.py"
        if not init.exists():
            init.write_text("")
            written.append(init)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "services" / "common" / "pb"
    for p in generate(target):
        print(p.relative_to(target))
