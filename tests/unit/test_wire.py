"""Weights on the wire: round trips at any chunking, and each malformation's status code."""

from __future__ import annotations

from collections import OrderedDict

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from services.common.tensors import flatten, spec_of
from services.common.wire import StreamReader, WireError, check_header_spec, encode


def sample_weights() -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return OrderedDict(
        w=torch.randn(7, 5, generator=gen),
        h=torch.randn(3, generator=gen).to(torch.float16),
        b=torch.randn(4, generator=gen).to(torch.bfloat16),
        d=torch.randn(2, 2, generator=gen).double(),
        steps=torch.tensor(12345678901, dtype=torch.int64),
    )


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 200))
def test_round_trip_at_any_chunk_size(chunk):
    w = sample_weights()
    spec, chunks, digest = encode(w, chunk_bytes=chunk)
    reader = StreamReader(spec)
    for c in chunks:
        assert len(c) <= chunk
        reader.feed(c)
    reader.finish(digest.digest())
    assert torch.equal(reader.flat, flatten(w, spec_of(w)))
    assert torch.equal(reader.others["steps"], w["steps"])


def stream(w, chunk=16):
    spec, chunks, digest = encode(w, chunk_bytes=chunk)
    data = list(chunks)
    return spec, data, digest.digest()


def test_non_finite_is_invalid_argument():
    w = sample_weights()
    w["w"][3, 2] = float("nan")
    spec, data, _sha = stream(w)
    reader = StreamReader(spec)
    with pytest.raises(WireError) as err:
        for c in data:
            reader.feed(c)
    assert err.value.code == "INVALID_ARGUMENT" and "'w'" in str(err.value)


def test_truncated_and_corrupted_are_data_loss():
    spec, data, sha = stream(sample_weights())
    reader = StreamReader(spec)
    for c in data[:-1]:
        reader.feed(c)
    with pytest.raises(WireError) as err:
        reader.finish(sha)
    assert err.value.code == "DATA_LOSS"
    reader = StreamReader(spec)
    for c in data:
        reader.feed(c)
    with pytest.raises(WireError) as err:
        reader.finish(b"\x00" * 32)
    assert err.value.code == "DATA_LOSS" and "checksum" in str(err.value)


def test_oversize_is_resource_exhausted():
    spec, data, _sha = stream(sample_weights())
    with pytest.raises(WireError) as err:
        StreamReader(spec, max_bytes=10)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    reader = StreamReader(spec)
    for c in data:
        reader.feed(c)
    with pytest.raises(WireError) as err:
        reader.feed(b"\x00" * 4)
    assert err.value.code == "RESOURCE_EXHAUSTED"


def test_header_checks_name_shape_dtype():
    w = sample_weights()
    expected = spec_of(w)
    renamed = OrderedDict(("x" if k == "w" else k, v) for k, v in w.items())
    with pytest.raises(WireError, match="unknown tensor"):
        check_header_spec(spec_of(renamed), expected)
    reshaped = OrderedDict(w, w=w["w"].reshape(5, 7))
    with pytest.raises(WireError, match="shape"):
        check_header_spec(spec_of(reshaped), expected)
    retyped = OrderedDict(w, w=w["w"].double())
    with pytest.raises(WireError, match="dtype"):
        check_header_spec(spec_of(retyped), expected)
