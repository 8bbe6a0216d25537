"""Weights on the wire: round trips at any chunking, and each malformation's status code."""

from __future__ import annotations

from collections import OrderedDict

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from services.common.pb.flclustering.v1 import aggregator_pb2, clusterer_pb2, tensors_pb2
from services.common.streams import build_stream, part_of, read_all
from services.common.wire import TRAILER_TAG, StreamReader, check_header_spec, encode, read_frame
from services.core.errors import WireError
from services.core.tensors import flatten, spec_of


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


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300))
def test_framed_streams_are_the_messages_serialized(chunk):
    """A framed upload is byte for byte what protobuf serializes, so a relay can pass it on
    as ForwardUpdateRequest; data is read in place, the rest parsed."""
    w = sample_weights()
    h = tensors_pb2.ModelHeader(sender="p", kind="weights")
    msgs = list(build_stream(clusterer_pb2.SubmitUpdateRequest, h, h, w, chunk_bytes=chunk))
    framed = list(
        build_stream(clusterer_pb2.SubmitUpdateRequest, h, h, w, chunk_bytes=chunk, framed=True)
    )
    assert framed == [m.SerializeToString() for m in msgs]
    for raw, m in zip(framed[1:-1], msgs[1:-1], strict=True):
        assert bytes(read_frame(raw)) == m.data
        forwarded = aggregator_pb2.ForwardUpdateRequest.FromString(raw)
        assert forwarded.data == m.data  # the same bytes as the aggregator's message
    assert read_frame(framed[-1]) is None and read_frame(framed[-1], TRAILER_TAG) is not None
    got = read_all(framed, lambda hdr: StreamReader(spec_of(w)), clusterer_pb2.SubmitUpdateRequest)
    assert torch.equal(got.reader.flat, flatten(w, spec_of(w)))


def test_frames_in_another_layout_are_parsed_and_garbage_is_invalid():
    msg = clusterer_pb2.SubmitUpdateRequest(data=b"abc")
    raw = msg.SerializeToString()
    assert part_of(raw, clusterer_pb2.SubmitUpdateRequest)[0] == "data"
    padded = raw + b"\x12\x01z"  # the field twice: protobuf keeps the last, read_frame none
    assert read_frame(padded) is None
    part, value = part_of(padded, clusterer_pb2.SubmitUpdateRequest)
    assert (part, bytes(value)) == ("data", b"z")
    with pytest.raises(WireError) as err:
        part_of(b"\xff\xff\xff", clusterer_pb2.SubmitUpdateRequest)
    assert err.value.code == "INVALID_ARGUMENT"


def test_minus_stores_the_delta_in_the_given_buffer():
    w = OrderedDict(a=torch.randn(1000), b=torch.randn(10).half())
    spec = spec_of(w)
    base = torch.randn(1010)
    out = torch.full((1010,), 7.0)
    _, data, digest = stream(w, chunk=37)
    reader = StreamReader(spec, out=lambda n: out, minus=base)
    for c in data:
        reader.feed(c)
    reader.finish(digest)
    assert reader.flat is out
    torch.testing.assert_close(out, flatten(w, spec) - base)


def stream(w, chunk=16):
    spec, chunks, digest = encode(w, chunk_bytes=chunk)
    data = list(chunks)
    return spec, data, digest.digest()


def fed(spec, chunks):
    """A reader of spec that has read chunks."""
    reader = StreamReader(spec)
    for c in chunks:
        reader.feed(c)
    return reader


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
    with pytest.raises(WireError) as err:
        fed(spec, data[:-1]).finish(sha)
    assert err.value.code == "DATA_LOSS"
    reader = fed(spec, data)
    with pytest.raises(WireError) as err:
        reader.finish(b"\x00" * 16)
    assert err.value.code == "DATA_LOSS" and "checksum" in str(err.value)
    with pytest.raises(WireError) as err:  # a SHA-256 where the XXH3-128 belongs
        reader.finish(b"\x00" * 32)
    assert err.value.code == "INVALID_ARGUMENT" and "xxh3_128" in str(err.value)


def test_oversize_is_resource_exhausted():
    spec, data, _sha = stream(sample_weights())
    with pytest.raises(WireError) as err:
        StreamReader(spec, max_bytes=10)
    assert err.value.code == "RESOURCE_EXHAUSTED"
    with pytest.raises(WireError) as err:
        fed(spec, data).feed(b"\x00" * 4)
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


def test_the_clusterer_re_encodes_other_layouts_and_refuses_a_second_header():
    """What the clusterer passes on must read the same at the aggregator: a data message
    in another valid layout is re-encoded, a header after the first is refused."""
    from services.clusterer.server import ClustererServicer

    padded = clusterer_pb2.SubmitUpdateRequest(data=b"abc").SerializeToString() + b"\x12\x01z"
    forwarded = aggregator_pb2.ForwardUpdateRequest.FromString(ClustererServicer._canonical(padded))
    assert forwarded.data == b"z"  # what protobuf itself reads from the padded message
    header = clusterer_pb2.SubmitUpdateRequest(header=tensors_pb2.ModelHeader(sender="p"))
    with pytest.raises(WireError) as err:
        ClustererServicer._canonical(header.SerializeToString())
    assert err.value.code == "INVALID_ARGUMENT" and "one header" in str(err.value)
