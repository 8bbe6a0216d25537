"""Compressed updates: each scheme against its definition on random deltas."""

from __future__ import annotations

import math

import pytest
import torch

from services.core.errors import ConfigError
from services.core.quantise import (
    INDICES,
    SCALES,
    VALUES,
    Compression,
    ErrorFeedback,
    PayloadError,
    decode,
    encode,
    payload_bytes,
)
from services.core.tensors import TensorSpec

SPEC = (
    TensorSpec("conv.weight", (4, 3, 3), torch.float32),
    TensorSpec("steps", (), torch.int64),  # not part of a delta
    TensorSpec("fc.bias", (7,), torch.float32),
)
N = 4 * 3 * 3 + 7


def delta(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, generator=g) * torch.logspace(-3, 0, N)


def test_schemes_parse_and_refuse_in_one_line():
    assert Compression.parse("topk:0.01") == Compression("topk", 0.01)
    assert (
        str(Compression.parse(" int8 ")) == "int8" and Compression.parse("none").kind == "weights"
    )
    assert Compression.parse("topk:0.1").kind == "delta:topk:0.1"
    for bad in ("zip", "topk", "topk:0", "topk:1.5", "topk:nan", "int8:3", ""):
        with pytest.raises(ConfigError):
            Compression.parse(bad)


def test_payload_matches_its_spec_and_sizes():
    for text, wanted in (("fp16", N * 2), ("int8", N + 2 * 4), ("topk:0.25", 11 * 8)):
        scheme = Compression.parse(text)
        payload = encode(delta(), SPEC, scheme, torch.Generator().manual_seed(1))
        count = payload[INDICES].numel() if INDICES in payload else 0
        spec = scheme.payload_spec(SPEC, count)
        assert [(s.name, s.shape, s.dtype) for s in spec] == [
            (k, tuple(v.shape), v.dtype) for k, v in payload.items()
        ]
        assert payload_bytes(payload) == wanted, text
    assert math.ceil(0.25 * N) == 11


def test_fp16_is_the_delta_to_half_precision():
    d = delta()
    back = decode(encode(d, SPEC, Compression("fp16")), SPEC, Compression("fp16"))
    assert torch.allclose(back, d, rtol=1e-3, atol=1e-7)


def test_int8_is_unbiased_and_within_one_step():
    d = delta()
    scheme = Compression("int8")
    g = torch.Generator().manual_seed(2)
    runs = [decode(encode(d, SPEC, scheme, g), SPEC, scheme) for _ in range(2000)]
    first = encode(d, SPEC, scheme, g)
    steps = torch.cat(
        [torch.full((36,), float(first[SCALES][0])), torch.full((7,), float(first[SCALES][1]))]
    )
    assert all(bool(((r - d).abs() <= steps * (1 + 1e-6)).all()) for r in runs)
    mean = torch.stack(runs).mean(0)
    assert bool(((mean - d).abs() <= 0.1 * steps).all())  # unbiased: the mean converges
    assert float(first[SCALES][0]) == pytest.approx(float(d[:36].abs().max()) / 127)


def test_topk_keeps_the_largest_and_error_feedback_loses_nothing():
    scheme = Compression("topk", 0.2)
    d = delta()
    payload = encode(d, SPEC, scheme)
    kept = payload[INDICES].long()
    assert kept.numel() == math.ceil(0.2 * N) and bool((kept[1:] > kept[:-1]).all())
    smallest_kept = float(d[kept].abs().min())
    dropped = torch.ones(N, dtype=torch.bool)
    dropped[kept] = False
    assert float(d[dropped].abs().max()) <= smallest_kept
    assert torch.equal(payload[VALUES], d[kept])
    # Error feedback: what was sent over the rounds plus what is held equals what was due.
    memory, sent, due = ErrorFeedback(), torch.zeros(N), torch.zeros(N)
    for r in range(6):
        step = delta(r)
        due += step
        sent += decode(memory.send(step, SPEC, scheme), SPEC, scheme)
        memory.commit()
    assert memory.residual is not None
    assert torch.allclose(sent + memory.residual, due, atol=1e-6)
    # A payload that was refused (no commit) leaves the memory as it was.
    held = memory.residual.clone()
    memory.send(delta(9), SPEC, scheme)
    assert torch.equal(memory.residual, held)


@pytest.mark.parametrize(
    "scheme,change,needle",
    [
        ("int8", lambda p: p[SCALES].fill_(float("nan")), "finite and positive"),
        ("int8", lambda p: p[SCALES].fill_(-1.0), "finite and positive"),
        ("int8", lambda p: p["fc.bias"].fill_(-128), "[-127, 127]"),
        ("topk:0.2", lambda p: p[INDICES].fill_(3), "strictly increasing"),
        ("topk:0.2", lambda p: p[INDICES].__setitem__(-1, N), "in [0, 43)"),
        ("topk:0.2", lambda p: p[INDICES].__setitem__(0, -1), "in [0, 43)"),
        ("topk:0.2", lambda p: p[VALUES].__setitem__(0, float("inf")), "finite"),
    ],
)
def test_out_of_range_payloads_are_refused(scheme, change, needle):
    c = Compression.parse(scheme)
    payload = encode(delta(), SPEC, c, torch.Generator().manual_seed(0))
    change(payload)
    with pytest.raises(PayloadError, match=None) as err:
        decode(payload, SPEC, c)
    assert needle in str(err.value)


def test_topk_may_not_carry_more_than_its_share():
    c = Compression("topk", 0.1)
    payload = encode(delta(), SPEC, Compression("topk", 0.5))
    with pytest.raises(PayloadError, match="at most 5 of 43"):
        decode(payload, SPEC, c)


@pytest.mark.parametrize("scheme", ["fp16", "int8", "topk:0.5"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_delta_is_refused_not_quietly_repaired(scheme, bad):
    c = Compression.parse(scheme)
    d = delta()
    d[3] = bad
    payload = encode(d, SPEC, c, torch.Generator().manual_seed(0))
    with pytest.raises(PayloadError):
        decode(payload, SPEC, c)


def test_a_tiny_int8_tensor_gets_a_usable_scale():
    d = torch.zeros(N)
    d[0] = 1e-45  # its scale would be 0 in float32
    payload = encode(d, SPEC, Compression("int8"), torch.Generator().manual_seed(0))
    assert bool((payload[SCALES] > 0).all())
    assert decode(payload, SPEC, Compression("int8")).abs().max() <= 1e-44


def test_hostile_headers_and_scheme_names_are_refused_before_any_data():
    from services.common.codecs import payload_spec_of, upload_scheme
    from services.common.pb.flclustering.v1 import tensors_pb2
    from services.common.wire import spec_to_pb
    from services.core.errors import WireError

    def pb_spec(*specs):
        return spec_to_pb([TensorSpec(n, shape, dtype) for n, shape, dtype in specs])

    topk = Compression("topk", 0.1)
    int8 = Compression("int8")
    hostile = [
        (topk, pb_spec((INDICES, (0,), torch.int32), (VALUES, (0,), torch.float32))),
        (topk, pb_spec((INDICES, (5,), torch.int32), (VALUES, (4,), torch.float32))),
        (topk, pb_spec((VALUES, (4,), torch.float32), (INDICES, (4,), torch.int32))),
        (topk, pb_spec((INDICES, (2, 2), torch.int32), (VALUES, (4,), torch.float32))),
        (topk, pb_spec((INDICES, (4,), torch.int64), (VALUES, (4,), torch.float32))),
        (topk, [*pb_spec((INDICES, (4,), torch.int32), (VALUES, (4,), torch.float32))] * 2),
        (int8, pb_spec(("conv.weight", (4, 3, 3), torch.int8), ("fc.bias", (7,), torch.int8))),
        (
            int8,
            pb_spec(
                ("conv.weight", (4, 3, 3), torch.int8),
                ("fc.bias", (7,), torch.int8),
                (SCALES, (3,), torch.float32),
            ),
        ),
    ]
    for scheme, items in hostile:
        with pytest.raises(WireError) as err:
            payload_spec_of(items, SPEC, scheme)
        assert err.value.code == "INVALID_ARGUMENT"
    shape = tensors_pb2.TensorSpec(name=INDICES, dtype="int32", shape=[-1])
    with pytest.raises(WireError):
        payload_spec_of([shape, shape], SPEC, topk)
    for kind in ("delta:" + "9" * 100_000, "delta:none", "delta:", "delta:topk:inf", "x" * 999):
        with pytest.raises(WireError) as err:
            upload_scheme(kind)
        assert len(str(err.value)) < 200
    with pytest.raises(ConfigError) as cerr:
        Compression.parse("topk:" + "1" * 100_000)
    assert len(str(cerr.value)) < 200
