"""The committed stubs are exactly what the protos generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerated_stubs_match_committed(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.generate(tmp_path)
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
