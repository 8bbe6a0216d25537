"""A round within a memory budget: deltas in files, read back in column blocks, give the
aggregate that the same round computed in memory gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.aggregator.state import AggregatorState, PendingUpdate, RoundClose
from services.aggregator.store import (
    MB,
    DeltaStore,
    DiskRow,
    RowFile,
    safetensors_row,
    write_safetensors,
)
from services.common.settings import DefenceSettings
from services.common.wire import StreamReader, encode
from services.core.errors import ConfigError
from services.core.rounds import aggregate_round
from services.core.rows import MatrixRows, scan
from services.core.strategies import STRATEGIES
from services.core.tensors import TensorSpec

DEFENCE = DefenceSettings(byzantine_fraction=0.2)


def round_of(n: int = 12, d: int = 301, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A base model and n deltas in two clusters: honest ones near two centres, one scaled
    attacker per cluster, one row with a NaN."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(d, generator=gen)
    centres = 0.1 * torch.randn(2, d, generator=gen)
    deltas = torch.stack([centres[i % 2] + 0.01 * torch.randn(d, generator=gen) for i in range(n)])
    deltas[0] *= -40.0
    deltas[5] *= 30.0
    deltas[7, 11] = float("nan")
    return base, deltas


def half_on_disk(deltas: torch.Tensor, tmp_path) -> list[torch.Tensor | DiskRow]:
    """Every other row written to a file (as a budget would leave it), the rest in memory."""
    rows: list[torch.Tensor | DiskRow] = []
    for i, row in enumerate(deltas):
        if i % 2:
            sink = RowFile(tmp_path / f"row{i}.f32", row.numel())
            sink.write(0, row.numpy())
            rows.append(sink.close())
        else:
            rows.append(row.clone())
    return rows


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_a_round_read_in_blocks_from_files_equals_the_round_in_memory(name, tmp_path, device):
    """Every strategy: the same rejections, cluster weights and next model (float
    tolerance) when the rows come in 16-column blocks, half of them from files."""
    strategy = STRATEGIES[name]
    base, deltas = round_of()
    clusters = [i % 2 for i in range(len(deltas))]
    samples = list(range(10, 10 + len(deltas)))
    losses = [0.5 + 0.1 * i for i in range(len(deltas))]
    acc = {0: 0.9, 1: 0.6}
    want = aggregate_round(base, deltas, clusters, samples, strategy, 3, acc, DEFENCE, losses, 0.1)
    store = DeltaStore(deltas.shape[1], block_bytes=16 * 4 * len(deltas))
    rows = store.rows(half_on_disk(deltas, tmp_path), device)
    assert rows.width == 16
    got = aggregate_round(
        base.to(device), rows, clusters, samples, strategy, 3, acc, DEFENCE, losses, 0.1
    )
    assert got.defence.rejected_updates == want.defence.rejected_updates
    assert 7 in got.defence.rejected_updates  # the NaN row
    assert got.defence.rejected_clusters == want.defence.rejected_clusters
    assert got.cluster_weights == pytest.approx(want.cluster_weights)
    torch.testing.assert_close(got.global_weights.cpu(), want.global_weights, rtol=1e-5, atol=1e-6)
    assert not torch.equal(want.global_weights, base)


def test_passes_over_the_rows_reuse_one_block_buffer_and_overlapping_ones_do_not_share(
    tmp_path,
):
    """A pass assembles its blocks in the buffer the previous pass used (its pages are
    mapped already); two passes at once each get their own; every block holds its rows'
    columns whatever the buffer held before (another round's rows included)."""
    cpu = torch.device("cpu")
    _, deltas = round_of(n=8, d=101)
    store = DeltaStore(101, block_bytes=16 * 4 * 8)

    def check(rows, blocks):
        for start, block in blocks:
            want = deltas[:, start : start + block.shape[1]]
            assert torch.equal(block.nan_to_num(7.0), want.nan_to_num(7.0))

    rows = store.rows(half_on_disk(deltas, tmp_path), cpu)
    first = [(s, b.clone()) for s, b in rows.blocks()]
    check(rows, first)
    held = [b for _, b in rows.blocks()]  # one pass after the other: the same buffer
    again = [b for _, b in rows.blocks()]
    pointers = {b.untyped_storage().data_ptr() for b in held + again}
    assert len(pointers) == 1
    outer, inner = rows.blocks(), rows.blocks()  # at once: a buffer each
    (s1, b1), (s2, b2) = next(outer), next(inner)
    assert b1.untyped_storage().data_ptr() != b2.untyped_storage().data_ptr()
    check(rows, [(s1, b1), (s2, b2)])
    outer.close()
    inner.close()
    other = store.rows([d * 3 for d in deltas], cpu)  # the next round's rows, same buffer
    list(other.blocks())
    check(rows, [(s, b.clone()) for s, b in rows.blocks()])


def test_the_scan_gives_the_gram_matrix_and_finite_rows():
    _, deltas = round_of(d=50)
    found = scan(MatrixRows(deltas, width=7))
    finite = [i != 7 for i in range(len(deltas))]
    assert found.finite.tolist() == finite
    ok = torch.tensor(finite)
    want = deltas[ok].double() @ deltas[ok].double().T
    torch.testing.assert_close(found.gram[ok][:, ok].double(), want, rtol=1e-5, atol=1e-5)


def test_a_norm_that_overflows_is_not_a_non_finite_row():
    """Finiteness comes from the Gram diagonal; a finite row whose squared norm overflows
    float32 is read again and stays finite, rows with one Inf or NaN entry are not."""
    deltas = torch.randn(4, 30)
    deltas[1, 5] = 1e30  # finite, squared: inf
    deltas[2, 29] = float("inf")
    deltas[3, 0] = float("nan")
    for width in (None, 7):
        found = scan(MatrixRows(deltas, width=width))
        assert found.finite.tolist() == [True, True, False, False]
        assert not torch.isfinite(found.gram[1, 1])


def test_deltas_past_the_budget_go_to_files_and_come_back():
    numel = 50_000  # 200 KB a model: two copies and 6 KB of blocks leave room for 3 deltas
    store = DeltaStore(numel, budget_mb=1, block_bytes=1024)
    places = [store.place() for _ in range(5)]
    assert [isinstance(p, torch.Tensor) for p in places] == [True, True, True, False, False]
    assert all(str(store.directory) in str(p.row.path) for p in places[3:])
    store.release(places, round_closed=True)
    assert not list(store.directory.glob("delta-*"))  # files of released rows are deleted
    again = [store.place() for _ in range(4)]  # the three buffers again, then a file
    assert {p.data_ptr() for p in again[:3]} == {p.data_ptr() for p in places[:3]}
    assert isinstance(again[3], RowFile)
    with pytest.raises(ConfigError, match="below what a round of this model needs"):
        DeltaStore(200_000, budget_mb=1)
    assert MB == 1 << 20


def test_an_upload_received_into_a_file_equals_one_received_into_memory(tmp_path):
    spec = (TensorSpec("w", (3, 1000), torch.float32), TensorSpec("b", (7,), torch.float16))
    weights = {"w": torch.randn(3, 1000), "b": torch.randn(7).half()}
    base = torch.randn(3007)
    _, chunks, digest = encode(weights, chunk_bytes=999)  # elements split across chunks
    data = list(chunks)
    readers = [
        StreamReader(spec, minus=base),
        StreamReader(spec, minus=base, out=lambda n: RowFile(tmp_path / "d.f32", n)),
    ]
    for r in readers:
        for c in data:
            r.feed(c)
        r.finish(digest.digest())
    in_memory, in_file = readers
    assert isinstance(in_file.sink, RowFile) and in_file.flat is None
    torch.testing.assert_close(in_file.sink.close().load(), in_memory.flat, rtol=0, atol=0)


def test_safetensors_written_in_pieces_are_read_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    row = RowFile(tmp_path / "r.f32", 10)
    row.write(0, np.arange(10, dtype=np.float32))
    disk = row.close()
    tensors = {"delta": disk, "n": torch.tensor([3, 4]), "h": torch.ones(2, 2).bfloat16()}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"who": "a"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["delta"], torch.arange(10, dtype=torch.float32))
    assert torch.equal(back["n"], tensors["n"]) and torch.equal(back["h"], tensors["h"])
    torch.testing.assert_close(safetensors_row(tmp_path / "x.safetensors").load(), back["delta"])


def test_a_budgeted_aggregator_keeps_old_versions_in_files_and_survives_a_restart(tmp_path):
    """With a budget that holds two deltas in memory, a round of five aggregates as the
    unbudgeted state does; old versions and w0 are files; a crash before Aggregate restores
    the round's updates (in place in their persisted files) and gives the same model."""
    numel = 50_000
    w0 = {"w": torch.randn(numel)}
    gen = torch.Generator().manual_seed(1)
    deltas = {who: 0.01 * torch.randn(numel, generator=gen) for who in "abcde"}

    def budgeted(spill: str) -> AggregatorState:
        store = DeltaStore(numel, 1, tmp_path / spill, block_bytes=20_000)
        return AggregatorState(w0, store=store)

    free, tight = AggregatorState(w0), budgeted("spill")
    for s in (free, tight):
        for who, delta in deltas.items():
            place = s.buffer(numel)
            if isinstance(place, RowFile):
                place.write(0, delta.numpy())
                place = place.close()
            else:
                place.copy_(delta)
            s.begin_update(who, 0, 0)
            update = PendingUpdate(who, ord(who) % 2, 10, place)
            if s is tight:
                s.persist(update, 0, tmp_path / "state")
            s.end_update(update, 0)
    assert sum(isinstance(u.delta, DiskRow) for u in tight.pending.values()) == 3
    restored = budgeted("spill-after-restart")
    assert restored.restore(tmp_path / "state") and sorted(restored.pending) == list("abcde")
    strategy = STRATEGIES["flclustering"]
    for s in (free, tight, restored):
        report = s.aggregate(RoundClose(0, strategy, {}, DEFENCE, 0.05))
        assert report.updates == 5 and report.version == 1
    torch.testing.assert_close(tight.versions[1], free.versions[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(restored.versions[1], free.versions[1], rtol=1e-5, atol=1e-7)
    assert isinstance(tight.versions[0], DiskRow) and isinstance(free.versions[0], torch.Tensor)
    assert torch.equal(tight.weights(0)[1]["w"], w0["w"])
    assert not list((tmp_path / "spill").glob("delta-*"))  # the round's files are gone


def test_files_are_read_and_written_in_pieces(tmp_path, monkeypatch):
    """Reads and writes loop until done (one call moves at most ~2 GiB on Linux)."""
    from services.aggregator import store

    monkeypatch.setattr(store, "IO_BYTES", 12)  # three floats a call
    values = np.arange(10, dtype=np.float32)
    sink = RowFile(tmp_path / "r.f32", 10)
    sink.write(0, values)
    row = sink.close()
    assert torch.equal(row.load(), torch.from_numpy(values))
    part = np.empty(4, dtype=np.float32)
    row.read(5, part)
    assert part.tolist() == [5, 6, 7, 8, 9][:4]


def test_spare_buffers_are_as_many_as_the_last_round_used():
    store = DeltaStore(100)
    round_ = [store.place() for _ in range(3)]
    refused = [store.place() for _ in range(5)]  # a burst of uploads that were refused
    store.release(round_, round_closed=True)
    store.release(refused)
    assert len(store._spare) == 3
    store.release([torch.empty(7)])  # not a delta of this model: never handed out
    assert all(b.numel() == 100 for b in store._spare)
