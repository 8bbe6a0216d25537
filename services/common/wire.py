"""Model weights on the wire: a header of tensor specs, raw little-endian chunks, a checksum.

Nothing is pickled. The reader validates as bytes arrive: the header against the expected
spec (names, dtypes, shapes, total size) before any data, every float element for
finiteness chunk by chunk, the byte count against the header, and the checksum at the end.
It can keep the float tensors as one flat float32 vector (the form robust rules take) or
only check them while the bytes are forwarded (the clusterer's case), so no service holds
more than it needs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from xxhash import xxh3_128

from services.common.pb.flclustering.v1 import tensors_pb2
from services.core.errors import WireError, invalid
from services.core.tensors import TensorSpec
from services.transport.credentials import valid_name
from services.transport.limits import CHUNK_BYTES

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,  # compressed updates (services/common/codecs.py)
    "bool": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}


MAX_ID_LENGTH = 64  # participant ids, evaluation ids, metric names
MAX_SAMPLES = 1 << 40


def check_id(value: str, what: str) -> None:
    """An id (participant, evaluation, metric): 1-64 characters of A-Za-z0-9._- (they name
    files, labels and log lines); INVALID_ARGUMENT otherwise, quoting a short prefix."""
    if not valid_name(value):
        raise invalid(
            f"{what} must be 1-{MAX_ID_LENGTH} characters of A-Za-z0-9._- "
            f"(got {value[:32]!r}{'...' if len(value) > 32 else ''})"
        )


def element_size(dtype: torch.dtype) -> int:
    """Bytes per element (read for every chunk: no tensor is made to find out)."""
    return dtype.itemsize


def nbytes(spec: TensorSpec) -> int:
    """Bytes of one tensor."""
    return spec.numel * element_size(spec.dtype)


def spec_to_pb(spec: Sequence[TensorSpec]) -> list[tensors_pb2.TensorSpec]:
    """Tensor specs as protobuf messages."""
    return [tensors_pb2.TensorSpec(name=s.name, dtype=NAMES[s.dtype], shape=s.shape) for s in spec]


def spec_from_pb(items: Sequence[tensors_pb2.TensorSpec]) -> tuple[TensorSpec, ...]:
    """Tensor specs from protobuf messages; unknown dtypes or bad shapes are INVALID_ARGUMENT."""
    out = []
    for t in items:
        if t.dtype not in DTYPES:
            raise invalid(f"tensor {t.name!r} has unsupported dtype {t.dtype!r}")
        if any(d < 0 for d in t.shape):
            raise invalid(f"tensor {t.name!r} has a negative dimension {list(t.shape)}")
        out.append(TensorSpec(t.name, tuple(int(d) for d in t.shape), DTYPES[t.dtype]))
    return tuple(out)


def check_header_tensors(
    items: Sequence[tensors_pb2.TensorSpec], expected: Sequence[TensorSpec]
) -> None:
    """An upload's header lists exactly the model's tensors. The count is compared first:
    a header listing 300,000 specs costs one comparison, not seconds of conversion."""
    if len(items) != len(expected):
        raise invalid(f"the header lists {len(items)} tensors, the model has {len(expected)}")
    check_header_spec(spec_from_pb(items), expected)


def check_header_spec(got: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    """The header must list exactly the expected tensors, in order, with their dtypes and shapes."""
    want = {s.name: s for s in expected}
    names = [s.name for s in got]
    if len(set(names)) != len(names):
        raise invalid("tensor names repeat in the header")
    unknown = [n for n in names if n not in want]
    if unknown:
        raise invalid(f"unknown tensor name(s) {', '.join(map(repr, unknown[:3]))}")
    missing = [s.name for s in expected if s.name not in set(names)]
    if missing:
        raise invalid(f"missing tensor(s) {', '.join(map(repr, missing[:3]))}")
    for g in got:
        e = want[g.name]
        if g.dtype != e.dtype:
            raise invalid(
                f"tensor {g.name!r} has dtype {NAMES[g.dtype]}, expected {NAMES[e.dtype]}"
            )
        if g.shape != e.shape:
            raise invalid(f"tensor {g.name!r} has shape {list(g.shape)}, expected {list(e.shape)}")
    if names != [s.name for s in expected]:
        raise invalid("tensors are not in the model's order")


def _to_bytes(t: torch.Tensor) -> bytes | memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
    arr = t.numpy()
    if arr.dtype.byteorder == ">":
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    return arr.reshape(-1).view(np.uint8).data


DIGEST_BYTES = 16  # XXH3-128
DATA_TAG = 0x12  # field 2 (data), length-delimited: the same in every stream message
TRAILER_TAG = 0x1A  # field 3 (trailer)


def varint(n: int) -> bytes:
    """n as a protobuf base-128 varint."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def data_frame_prefix(n: int) -> bytes:
    """What precedes n data bytes in a serialized stream message whose part is `data`."""
    return bytes((DATA_TAG,)) + varint(n)


def read_frame(raw: bytes | memoryview, tag: int = DATA_TAG) -> memoryview | None:
    """The payload of a serialized stream message that is exactly one `tag` field (how every
    protobuf library encodes a oneof set to it), as a view of `raw` (no copy); None for any
    other encoding, which the caller parses as a message."""
    if len(raw) < 2 or raw[0] != tag:
        return None
    n = shift = 0
    at = 1
    while at < len(raw) and at <= 10:
        b = raw[at]
        n |= (b & 0x7F) << shift
        at += 1
        if not b & 0x80:
            return memoryview(raw)[at:] if at + n == len(raw) else None
        shift += 7
    return None


def encode(
    weights: Mapping[str, torch.Tensor],
    chunk_bytes: int = CHUNK_BYTES,
    framed: bool = False,
) -> tuple[tuple[TensorSpec, ...], Iterator[bytes], xxh3_128]:
    """The spec, an iterator of data chunks, and the hash those chunks feed as they go.

    The hash's digest is complete once the iterator is exhausted, so a sender streams the
    chunks and then sends `digest()` as the trailer without a second pass. `framed` chunks
    are whole serialized stream messages (`data_frame_prefix` + the bytes), sent as they
    are by a stub with an identity serializer: each chunk is one copy of the tensors' bytes.
    """
    spec = tuple(TensorSpec(k, tuple(v.shape), v.dtype) for k, v in weights.items())
    digest = xxh3_128()

    def chunks() -> Iterator[bytes]:
        pieces: list[bytes | memoryview] = []
        pending = 0

        def emit() -> bytes:
            for piece in pieces:
                digest.update(piece)
            head: list[bytes | memoryview] = [data_frame_prefix(pending)] if framed else []
            return b"".join(head + pieces)

        for t in weights.values():
            view = memoryview(_to_bytes(t)).cast("B")
            start = 0
            while start < len(view):
                take = min(chunk_bytes - pending, len(view) - start)
                pieces.append(view[start : start + take])
                pending += take
                start += take
                if pending == chunk_bytes:
                    yield emit()
                    pieces, pending = [], 0
        if pending:
            yield emit()

    return spec, chunks(), digest


class Sink(Protocol):
    """Takes a stream's float32 values as they arrive (`StreamReader(out=...)`)."""

    def write(self, first: int, values: np.ndarray) -> None:
        """Store the values from flat element `first` on."""
        ...


def checked_size(spec: Sequence[TensorSpec], max_bytes: int | None) -> int:
    """The bytes a stream of `spec` carries; RESOURCE_EXHAUSTED over `max_bytes`."""
    total = sum(nbytes(s) for s in spec)
    if max_bytes is not None and total > max_bytes:
        raise WireError(
            "RESOURCE_EXHAUSTED",
            f"model of {total:,} bytes is over the limit of {max_bytes:,} bytes",
        )
    return total


@dataclass
class _Slot:
    spec: TensorSpec
    start: int  # byte offset in the stream
    flat_offset: int  # element offset in the flat float32 vector (floats only)


class StreamReader:
    """Validates (and optionally keeps) a stream of tensor bytes against a spec.

    Feed chunks with `feed`, then `finish(digest)`. Errors are WireError with the status
    code they map to: INVALID_ARGUMENT for malformed content, DATA_LOSS for truncation and
    checksum mismatches, RESOURCE_EXHAUSTED for streams larger than declared or allowed.
    """

    def __init__(
        self,
        spec: Sequence[TensorSpec],
        keep: bool = True,
        max_bytes: int | None = None,
        out: Callable[[int], torch.Tensor | Sink] | None = None,
        minus: torch.Tensor | None = None,
    ) -> None:
        """`out(n)`: where to keep the n float elements (a reused buffer saves the page
        faults of a fresh one: a third of a receiver's CPU), or a `Sink` that takes them
        chunk by chunk (a file); a new tensor by default.
        `minus`: a flat float32 vector subtracted as the values are stored, so `flat` holds
        the delta against it without a second pass over the model."""
        self.spec = tuple(spec)
        self.total = checked_size(self.spec, max_bytes)
        self.keep = keep
        self.received = 0
        self._hash = xxh3_128()
        self._slots: list[_Slot] = []
        start = flat = 0
        for s in self.spec:
            self._slots.append(_Slot(s, start, flat))
            start += nbytes(s)
            if s.dtype.is_floating_point:
                flat += s.numel
        self.flat: torch.Tensor | None = None
        self.sink: Sink | None = None
        if keep:
            place = torch.empty(flat, dtype=torch.float32) if out is None else out(flat)
            if isinstance(place, torch.Tensor):
                self.flat = place
            else:
                self.sink = place
        self._flat_np = self.flat.numpy() if self.flat is not None else None
        self._scratch: np.ndarray | None = None  # converted values on their way to a sink
        self._minus_np = None
        if minus is not None and keep:
            if minus.shape != (flat,) or minus.dtype != torch.float32:
                raise ValueError(f"minus must be float32 of shape {(flat,)}")
            self._minus_np = minus.detach().cpu().numpy()
        self.others: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._other_bytes: dict[str, bytearray] = {}
        self._slot = 0
        self._carry = b""  # bytes of an element split across chunks

    def feed(self, data: bytes | memoryview) -> None:
        """Consume the next chunk of bytes."""
        if self.received + len(data) > self.total:
            raise WireError(
                "RESOURCE_EXHAUSTED",
                f"stream carries more than the {self.total:,} bytes its header declares",
            )
        self._hash.update(data)
        buf = memoryview(self._carry + data) if self._carry else memoryview(data)
        pos = self.received - len(self._carry)
        self.received += len(data)
        self._carry = b""
        while len(buf) and self._slot < len(self._slots):
            slot = self._slots[self._slot]
            end = slot.start + nbytes(slot.spec)
            take = min(len(buf), end - pos)
            esize = element_size(slot.spec.dtype)
            whole = take - (take % esize) if pos + take < end else take
            if whole:
                self._consume(slot, pos, buf[:whole])
            if whole < take:
                self._carry = bytes(buf[whole:take])
                return
            buf = buf[take:]
            pos += take
            if pos == end:
                self._slot += 1

    def _consume(self, slot: _Slot, pos: int, data: memoryview) -> None:
        s = slot.spec
        if not s.dtype.is_floating_point:
            if self.keep:
                self._other_bytes.setdefault(s.name, bytearray()).extend(data)
            return
        if s.dtype == torch.bfloat16:
            bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
            values = bits.view(np.float32)
        else:
            np_dtype = {torch.float32: "<f4", torch.float64: "<f8", torch.float16: "<f2"}[s.dtype]
            values = np.frombuffer(data, dtype=np_dtype)  # a view: no copy
        if not np.isfinite(values).all():
            raise invalid(f"tensor {s.name!r} contains NaN or Inf")
        if self._flat_np is None and self.sink is None:
            return
        esize = element_size(s.dtype)
        first = slot.flat_offset + (pos - slot.start) // esize
        end = first + values.size
        if self._flat_np is not None:
            target = self._flat_np[first:end]
        else:
            if self._scratch is None or self._scratch.size < values.size:
                self._scratch = np.empty(values.size, dtype=np.float32)
            target = self._scratch[: values.size]
        if self._minus_np is None:
            target[:] = values  # converts to float32 in place
        else:
            np.subtract(values, self._minus_np[first:end], out=target)
        if self.sink is not None:
            self.sink.write(first, target)

    def finish(self, digest: bytes) -> None:
        """Check the byte count and the checksum; assemble the non-float tensors."""
        if self.received < self.total:
            raise WireError(
                "DATA_LOSS",
                f"stream ended after {self.received:,} of {self.total:,} declared bytes",
            )
        if len(digest) != DIGEST_BYTES:
            raise invalid(
                f"the trailer must carry the {DIGEST_BYTES}-byte XXH3-128 digest of the data "
                f"(field xxh3_128), got {len(digest)} bytes"
            )
        if self._hash.digest() != digest:
            raise WireError("DATA_LOSS", "checksum mismatch: the bytes were corrupted in transit")
        for s in self.spec:
            if not s.dtype.is_floating_point and self.keep:
                raw = bytes(self._other_bytes.get(s.name, b""))
                if raw:
                    t = torch.frombuffer(bytearray(raw), dtype=s.dtype)
                else:
                    t = torch.empty(0, dtype=s.dtype)
                self.others[s.name] = t.reshape(s.shape).clone()
