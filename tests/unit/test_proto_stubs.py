"""The committed stubs are exactly what the protos generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerated_stubs_match_committed(tmp_path):
    # In a child process: grpc_tools carries a libprotobuf of its own, and loading it into
    # the test process aborted it later, when tenseal (another copy) ran in the same process.
    code = "import sys; sys.path.insert(0, sys.argv[1]); import gen_proto; "
    code += "gen_proto.generate(__import__('pathlib').Path(sys.argv[2]))"
    made = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "scripts"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    committed = ROOT / "services" / "common" / "pb"

    def sources(root: Path) -> dict[Path, str]:
        return {
            p.relative_to(root): p.read_text()
            for p in root.rglob("*")
            if p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
        }

    fresh, have = sources(tmp_path), sources(committed)
    assert sorted(fresh) == sorted(have)
    stale = [str(k) for k in fresh if fresh[k] != have[k]]
    assert not stale, f"stubs differ from proto/: run python scripts/gen_proto.py ({stale})"
