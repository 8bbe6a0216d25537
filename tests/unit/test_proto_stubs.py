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
    fresh = {p.relative_to(tmp_path): p.read_text() for p in tmp_path.rglob("*.py*")}
    have = {p.relative_to(committed): p.read_text() for p in committed.rglob("*.py*")}
    assert sorted(fresh) == sorted(have)
    stale = [str(k) for k in fresh if fresh[k] != have[k]]
    assert not stale, f"stubs differ from proto/: run python scripts/gen_proto.py ({stale})"
