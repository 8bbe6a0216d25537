"""Compressed updates, the mathematics: quantising a delta and reading it back.

A compressed upload carries the participant's delta (its trained weights minus the model it
started from), encoded as ordinary named tensors (the codecs of services/common/codecs.py
put them on the same wire as weights: header of specs, raw chunks, checksum):

- `fp16`: each float tensor of the delta as float16 (2x fewer bytes).
- `int8`: each float tensor as int8 with one float32 scale per tensor (`__scales__`),
  stochastically rounded so the decoded delta is unbiased (QSGD-style; 4x fewer bytes).
- `topk:F`: the F share of the delta's coordinates largest in magnitude, as sorted int32
  indices (`__indices__`) and float32 values (`__values__`); what is not sent is kept by
  the participant and added to its next delta (error feedback, Stich et al. 2018), so
  nothing is lost, only delayed.

The payload spec is fixed by the model's spec and the scheme (and, for top-k, the count
the header declares, capped by the share: `payload_spec`), so a header is checked like any
other; the content (scales, indices, values) is checked when decoded (`decode_parts`): a
PayloadError for anything out of range, which a receiver answers as INVALID_ARGUMENT.
No gRPC or protobuf here (the learning core's rule).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from services.core.schemes import parse_scheme, scheme_name
from services.core.tensors import TensorSpec, float_specs

SCALES = "__scales__"
INDICES = "__indices__"
VALUES = "__values__"
MAX_INDEX = 2**31 - 1  # int32 indices: deltas of up to 2^31 floats (8 GiB)


class PayloadError(ValueError):
    """A compressed payload whose content is out of range (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Compression:
    """A compression scheme: `none`, `fp16`, `int8` or `topk` with its share of coordinates."""

    scheme: str = "none"
    share: float = 1.0  # topk only

    @staticmethod
    def parse(text: str) -> Compression:
        """`none`, `fp16`, `int8` or `topk:F` with 0 < F <= 1; a ConfigError otherwise."""
        return Compression(*parse_scheme(text))

    def __str__(self) -> str:
        return scheme_name(self.scheme, self.share)

    @property
    def streamed(self) -> bool:
        """Whether the upload's floats lie as the model's do (weights, or the fp16 delta):
        the receiver reads them straight into their place; int8 and top-k decode after."""
        return self.scheme in ("none", "fp16")

    @property
    def kind(self) -> str:
        """The `kind` of an upload's header in this scheme."""
        return "weights" if self.scheme == "none" else f"delta:{self}"

    def max_count(self, floats: int) -> int:
        """Most coordinates a top-k upload of a delta of `floats` values may carry."""
        return max(1, math.ceil(self.share * floats))

    def payload_spec(self, spec: Sequence[TensorSpec], count: int = 0) -> tuple[TensorSpec, ...]:
        """The tensors an upload of this scheme carries for a model of `spec` (top-k:
        `count` coordinates)."""
        floats = float_specs(spec)
        if self.scheme == "fp16":
            return tuple(TensorSpec(s.name, s.shape, torch.float16) for s in floats)
        if self.scheme == "int8":
            ints = [TensorSpec(s.name, s.shape, torch.int8) for s in floats]
            return (*ints, TensorSpec(SCALES, (len(floats),), torch.float32))
        if self.scheme == "topk":
            return (
                TensorSpec(INDICES, (count,), torch.int32),
                TensorSpec(VALUES, (count,), torch.float32),
            )
        return tuple(spec)


def float_sizes(spec: Sequence[TensorSpec]) -> list[int]:
    """Element counts of the float tensors, in order: how the flat delta is cut."""
    return [s.numel for s in float_specs(spec)]


def encode(
    delta: torch.Tensor,
    spec: Sequence[TensorSpec],
    scheme: Compression,
    generator: torch.Generator | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """The payload of a flat float32 delta (on the CPU) in `scheme` (not `none`)."""
    delta = delta.detach().to("cpu", torch.float32).reshape(-1)
    floats = float_specs(spec)
    sizes = [s.numel for s in floats]
    if delta.numel() != sum(sizes):
        raise ValueError(f"a delta of {delta.numel()} values for a model of {sum(sizes)}")
    names = [s.name for s in floats]
    shapes = [s.shape for s in floats]
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    if scheme.scheme == "fp16":
        # Past float16's range a finite coordinate saturates (the norm screen sees such a
        # delta); NaN and Inf stay what they are, for the receiver to refuse.
        clipped = torch.where(torch.isfinite(delta), delta.clamp(-65504.0, 65504.0), delta).to(
            torch.float16
        )
        for name, shape, part in zip(names, shapes, clipped.split(sizes), strict=True):
            out[name] = part.reshape(shape)
        return out
    if scheme.scheme == "int8":
        scales = torch.zeros(len(sizes), dtype=torch.float32)
        for i, (name, shape, part) in enumerate(
            zip(names, shapes, delta.split(sizes), strict=True)
        ):
            top = float(part.abs().max()) if part.numel() else 0.0
            # A scale in float32 as sent; zero (all zeros, or too small for float32) is 1.
            # A non-finite delta gets a NaN scale: the receiver refuses it, as it refuses
            # NaN in float32 weights.
            scale = float(torch.tensor(top / 127.0, dtype=torch.float32))
            if not math.isfinite(top):
                scale = math.nan
            elif scale == 0.0:
                scale = 1.0
            scaled = part / scale
            noise = torch.rand(scaled.shape, generator=generator)
            q = torch.floor(scaled + noise).clamp(-127, 127)  # unbiased stochastic rounding
            out[name] = q.to(torch.int8).reshape(shape)
            scales[i] = scale
        out[SCALES] = scales
        return out
    if scheme.scheme == "topk":
        if delta.numel() > MAX_INDEX:
            raise ValueError(f"top-k indices are int32: at most {MAX_INDEX} values")
        count = min(scheme.max_count(delta.numel()), delta.numel())
        chosen = torch.topk(delta.abs(), count, sorted=False).indices.sort().values
        out[INDICES] = chosen.to(torch.int32)
        out[VALUES] = delta[chosen]
        return out
    raise ValueError(f"nothing to encode in scheme {scheme}")


def decode(
    payload: Mapping[str, torch.Tensor], spec: Sequence[TensorSpec], scheme: Compression
) -> torch.Tensor:
    """The flat float32 delta of a payload (whose tensors match `payload_spec`); a
    PayloadError names what is out of range."""
    parts = [values for _, values in decode_parts(payload, spec, scheme)]
    return torch.cat(parts) if parts else torch.zeros(0)


def decode_parts(
    payload: Mapping[str, torch.Tensor], spec: Sequence[TensorSpec], scheme: Compression
) -> Iterator[tuple[int, torch.Tensor]]:
    """The decoded delta a float tensor at a time, as (flat offset, float32 values), every
    check done before the first part: a receiver writes each part where it goes (a buffer,
    a file) without holding the whole decoded delta twice."""
    floats = float_specs(spec)
    sizes = [s.numel for s in floats]
    names = [s.name for s in floats]
    offsets = [0, *itertools.accumulate(sizes)][:-1]
    if scheme.scheme == "fp16":
        for name in names:
            if not bool(torch.isfinite(payload[name]).all()):
                raise PayloadError(f"fp16 values of {name!r} must be finite")
        return (
            (at, payload[n].reshape(-1).to(torch.float32))
            for n, at in zip(names, offsets, strict=True)
        )
    if scheme.scheme == "int8":
        scales = payload[SCALES].to(torch.float32)
        if not bool(torch.isfinite(scales).all()) or bool((scales <= 0).any()):
            raise PayloadError(f"{SCALES} must be finite and positive")
        if bool((scales > 1e30).any()):
            raise PayloadError(f"{SCALES} must be at most 1e30")
        for name in names:
            if bool((payload[name] == -128).any()):
                raise PayloadError(f"int8 values of {name!r} must be in [-127, 127]")
        return (
            (at, payload[n].reshape(-1).to(torch.float32) * scales[i])
            for i, (n, at) in enumerate(zip(names, offsets, strict=True))
        )
    if scheme.scheme == "topk":
        n = sum(sizes)
        indices = payload[INDICES].reshape(-1).to(torch.int64)
        values = payload[VALUES].reshape(-1).to(torch.float32)
        if indices.numel() != values.numel():
            raise PayloadError("top-k carries as many indices as values")
        if indices.numel() > scheme.max_count(n):
            raise PayloadError(f"top-k may carry at most {scheme.max_count(n)} of {n} values")
        if indices.numel():
            if int(indices[0]) < 0 or int(indices[-1]) >= n:
                raise PayloadError(f"top-k indices must be in [0, {n})")
            if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
                raise PayloadError("top-k indices must be strictly increasing")
        if not bool(torch.isfinite(values).all()):
            raise PayloadError("top-k values must be finite")
        return _scattered(indices, values, sizes, offsets)
    raise PayloadError(f"nothing to decode in scheme {scheme}")


def _scattered(
    indices: torch.Tensor, values: torch.Tensor, sizes: list[int], offsets: list[int]
) -> Iterator[tuple[int, torch.Tensor]]:
    """Sorted sparse coordinates as dense parts, one float tensor at a time."""
    bounds = torch.searchsorted(indices, torch.tensor([*offsets, sum(sizes)]))
    for i, (size, at) in enumerate(zip(sizes, offsets, strict=True)):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        part = torch.zeros(size, dtype=torch.float32)
        part[indices[lo:hi] - at] = values[lo:hi]
        yield at, part


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a payload's data on the wire."""
    return sum(t.numel() * t.element_size() for t in payload.values())


class ErrorFeedback:
    """A participant's top-k memory: what it did not send, added to its next delta.

    Two steps: `send` makes the payload, `commit` (once the upload was accepted) keeps what
    it left out. An upload that was refused (a round that closed, a lost connection) leaves
    the memory as it was: its delta is dropped as any dropped update is."""

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None
        self._next: torch.Tensor | None = None

    def commit(self) -> None:
        """The last payload was accepted: carry what it left out."""
        if self._next is not None:
            self.residual, self._next = self._next, None

    def send(
        self,
        delta: torch.Tensor,
        spec: Sequence[TensorSpec],
        scheme: Compression,
        generator: torch.Generator | None = None,
    ) -> OrderedDict[str, torch.Tensor]:
        """The payload to send for `delta`; with top-k, the residual carried over."""
        if scheme.scheme != "topk":  # nothing carried: encode makes the delta flat float32
            return encode(delta, spec, scheme, generator)
        delta = delta.detach().to("cpu", torch.float32).reshape(-1)
        if self.residual is not None and self.residual.shape == delta.shape:
            delta = delta + self.residual
        payload = encode(delta, spec, scheme, generator)
        self._next = delta - decode(payload, spec, scheme)
        return payload
