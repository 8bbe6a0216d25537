"""Codecs (services/common/codecs.py) and the upload check both servers call
(services/common/uploads.py): the registry, what each payload means, kinds, and a decode
against the scheme's definition."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from services.common.codecs import (
    CkksCodec,
    Fp16Codec,
    Int8Codec,
    Payload,
    RawCodec,
    TopKCodec,
    codec_named,
    codec_of_kind,
    federation_codec,
)
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.uploads import check_kind, check_upload, decoded, upload_reader
from services.common.wire import StreamReader, WireError, encode, spec_to_pb
from services.core.ckks import HeKeys
from services.core.errors import ConfigError
from services.core.tensors import TensorSpec, flatten, spec_of

MODEL = (
    TensorSpec("a", (4, 3), torch.float32),
    TensorSpec("steps", (), torch.int64),
    TensorSpec("b", (5,), torch.float32),
)
FLOATS = 17


def weights() -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        a=torch.randn(4, 3, generator=g),
        steps=torch.tensor(7, dtype=torch.int64),
        b=torch.randn(5, generator=g),
    )


def test_the_registry_names_one_codec_per_scheme_and_what_its_payload_means():
    expected = {
        "none": (RawCodec, Payload.WEIGHTS, "weights", True),
        "fp16": (Fp16Codec, Payload.DELTA, "delta:fp16", True),
        "int8": (Int8Codec, Payload.DELTA, "delta:int8", False),
        "topk:0.25": (TopKCodec, Payload.DELTA, "delta:topk:0.25", False),
        "he": (CkksCodec, Payload.WEIGHTED, "he:ckks", False),
    }
    for name, (cls, payload, kind, streamed) in expected.items():
        codec = codec_named(name)
        assert isinstance(codec, cls) and codec.name == name
        assert (codec.payload, codec.kind, codec.streamed) == (payload, kind, streamed)
        if name != "he":
            assert type(codec_of_kind(kind)) is cls and codec_of_kind(kind).name == name
    assert isinstance(federation_codec("int8", "he"), CkksCodec)
    assert isinstance(federation_codec("int8", "none"), Int8Codec)
    with pytest.raises(ConfigError):
        codec_named("zip")
    for kind in ("he:ckks", "delta:none", "delta:zip", "x" * 999):
        with pytest.raises(WireError) as err:
            codec_of_kind(kind)  # in the clear, he:ckks is not a kind
        assert err.value.code == "INVALID_ARGUMENT" and len(str(err.value)) < 200


def test_kinds_are_refused_as_each_server_refused_them():
    int8 = codec_named("int8")
    assert check_kind("delta:int8", int8) is int8
    with pytest.raises(WireError, match="unknown update kind 'delta:zip'"):
        check_kind("delta:zip", int8)
    with pytest.raises(WireError, match=r"updates are 'delta:int8' \(--compression int8\)"):
        check_kind("he:ckks", int8)
    he = CkksCodec()
    with pytest.raises(WireError, match=r"updates are 'he:ckks' \(--secure he\), not 'weights'"):
        check_kind("weights", he)
    with pytest.raises(WireError, match="this aggregator adds encrypted updates"):
        check_kind("delta:zip", he, aggregator=True)
    assert check_kind("delta:topk:0.5", None).name == "topk:0.5"  # the aggregator, in clear


def _stream(
    payload: OrderedDict[str, torch.Tensor], codec_name: str, base: torch.Tensor | None = None
) -> tuple[StreamReader, list[tuple[int, torch.Tensor]]]:
    """A payload through the upload check, the reader and the decode, as the aggregator."""
    codec = codec_named(codec_name)
    spec, chunks, digest = encode(payload)
    header = tensors_pb2.ModelHeader(sender="p", kind=codec.kind, tensors=spec_to_pb(spec))
    upload = check_upload(header, MODEL, None, aggregator=True)
    reader = upload_reader(upload, None, base=base)
    for c in chunks:
        reader.feed(c)
    reader.finish(digest.digest())
    parts = [] if upload.codec.streamed else list(decoded(upload, reader, MODEL))
    return reader, parts


def test_every_clear_codec_round_trips_through_the_upload_check():
    w = weights()
    base = torch.zeros(FLOATS)
    reader, _ = _stream(codec_named("none").encode(w), "none", base)
    assert reader.flat is not None and torch.equal(reader.flat, flatten(w, spec_of(w)))
    delta = torch.linspace(-1, 1, FLOATS)
    for name, tol in (("fp16", 1e-3), ("int8", 1 / 127 + 1e-6), ("topk:1", 0.0)):
        codec = codec_named(name)
        payload = codec.encode(delta, MODEL, torch.Generator().manual_seed(1))
        reader, parts = _stream(payload, name)
        got = reader.flat if codec.streamed else torch.cat([v for _, v in parts])
        assert got is not None and float((got - delta).abs().max()) <= tol, name


def test_content_out_of_range_is_invalid_argument_named_by_its_scheme():
    payload = codec_named("int8").encode(torch.ones(FLOATS), MODEL)
    payload["__scales__"] = torch.zeros_like(payload["__scales__"])
    with pytest.raises(WireError, match=r"^int8 payload: __scales__") as err:
        _stream(payload, "int8")
    assert err.value.code == "INVALID_ARGUMENT"


def test_the_ckks_codec_packs_checks_and_decodes_n_times_w():
    keys = HeKeys.create()
    codec = CkksCodec(keys)
    flat = flatten(weights(), MODEL)
    payload = codec.encode(flat, 3)
    header = tensors_pb2.ModelHeader(kind="he:ckks", tensors=spec_to_pb(spec_of(payload)))
    assert check_upload(header, MODEL, codec, aggregator=True).codec is codec
    assert len(codec.ciphertexts(payload, MODEL)) == 1
    [(at, values)] = list(codec.decode(payload, MODEL))
    assert at == 0 and float((values - 3 * flat).abs().max()) < 1e-3
    other = CkksCodec(HeKeys.create())
    with pytest.raises(WireError) as err:
        other.ciphertexts(payload, MODEL)
    assert err.value.code == "FAILED_PRECONDITION"
