"""An update's upload, checked: the one place both servers take an upload's rules from.

The clusterer checks a header before it calls the aggregator; the aggregator checks it
again (it is reachable on its own) and reads the content. Both call, in this order:

1. `check_update_header`: who sent it, how many samples, its metrics;
2. `check_upload`: the kind against the scheme the receiver takes (`check_kind`), the
   tensors the header lists against what that scheme sends for the model (names, shapes,
   dtypes: the codec's `check`) and, where given, their size;
3. for the bytes (the aggregator): `upload_reader` (finite values, byte count, checksum:
   services/common/wire.py's StreamReader), then `decoded` for the content a codec checks
   (scales, indices), or `content_checked` around an encrypted upload's ciphertexts; each
   refusal INVALID_ARGUMENT.

Errors are WireError with the gRPC status they map to; the messages are the ones operators
and tests know.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from services.common.codecs import (
    CONTENT_ERRORS,
    CkksCodec,
    Codec,
    Parts,
    Payload,
    codec_of_kind,
)
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.wire import (
    MAX_SAMPLES,
    Sink,
    StreamReader,
    check_id,
    checked_size,
    invalid,
)
from services.core.tensors import TensorSpec, unflatten

MAX_METRICS = 16  # entries of an update's metrics map


def check_update_header(header: tensors_pb2.ModelHeader) -> None:
    """The scalar fields of an uploaded model's header: who, how many samples, its metrics.

    A metric value feeds the aggregation (q-FFL reads loss_before), so a NaN or a flood of
    entries is refused here rather than failing the round later.
    """
    check_id(header.sender, "sender")
    if not 0 <= header.num_samples <= MAX_SAMPLES:
        raise invalid(f"num_samples must be in [0, {MAX_SAMPLES}]")
    if len(header.metrics) > MAX_METRICS:
        raise invalid(f"at most {MAX_METRICS} metrics per update, got {len(header.metrics)}")
    for key, value in header.metrics.items():
        check_id(key, "a metric name")
        if not math.isfinite(value) or value < 0:
            raise invalid(f"metric {key[:64]!r} must be finite and non-negative, got {value}")


def check_kind(kind: str, takes: Codec | None, aggregator: bool = False) -> Codec:
    """The codec of an upload's header kind, if the receiver takes it; INVALID_ARGUMENT
    otherwise.

    `takes`: the one codec of the federation (the clusterer's; the aggregator's under
    --secure he, which adds ciphertexts only), or None for any codec in the clear (the
    aggregator's otherwise: the clusterer in front of it checked the federation's). The
    clusterer names an unknown kind as such before it names the scheme it takes."""
    if takes is None:
        return codec_of_kind(kind)
    if kind == takes.kind:
        return takes
    if aggregator:
        raise invalid(
            f"this aggregator adds encrypted updates ({takes.setting}): kind "
            f"{takes.kind!r}, not {kind[:32]!r}"
        )
    codec_of_kind(kind, CkksCodec())  # an unknown kind is INVALID_ARGUMENT
    raise invalid(
        f"this federation's updates are {takes.kind!r} ({takes.setting}), not {kind[:32]!r}"
    )


@dataclass(frozen=True)
class Upload:
    """An upload whose header was checked: its codec and the tensors its stream carries."""

    codec: Codec
    spec: tuple[TensorSpec, ...]


def check_upload(
    header: tensors_pb2.ModelHeader,
    model: Sequence[TensorSpec],
    takes: Codec | None,
    max_bytes: int | None = None,
    aggregator: bool = False,
) -> Upload:
    """An update's header against the scheme the receiver takes (`check_kind`) and the
    model (the codec's `check`), before any data; with `max_bytes`, its size too
    (RESOURCE_EXHAUSTED over it)."""
    codec = check_kind(header.kind, takes, aggregator)
    spec = codec.check(header.tensors, model)
    if max_bytes is not None:
        checked_size(spec, max_bytes)
    return Upload(codec, spec)


def upload_reader(
    upload: Upload,
    max_bytes: int | None,
    out: Callable[[int], torch.Tensor | Sink] | None = None,
    base: torch.Tensor | None = None,
) -> StreamReader:
    """The reader of an upload's bytes: a streamed payload's floats go to `out` (weights
    less `base`, the model they came from: the delta), the others are kept to be decoded."""
    streamed = upload.codec.streamed
    return StreamReader(
        upload.spec,
        max_bytes=max_bytes,
        out=out if streamed else None,
        minus=base if upload.codec.payload is Payload.WEIGHTS else None,
    )


@contextmanager
def content_checked(codec: Codec) -> Iterator[None]:
    """Content a codec refuses (out of range, not this federation's ciphertexts) as
    INVALID_ARGUMENT, starting with what it is ("int8 payload: ...")."""
    try:
        yield
    except CONTENT_ERRORS as exc:
        raise invalid(f"{codec.content}: {exc}") from None


def decoded(upload: Upload, reader: StreamReader, model: Sequence[TensorSpec]) -> Parts:
    """A validated upload's decoded values a float tensor at a time (every check done
    before the first part), for a receiver to write where they go."""
    assert reader.flat is not None
    payload = unflatten(reader.flat, reader.spec, reader.others, share=True)
    with content_checked(upload.codec):
        return upload.codec.decode(payload, model)
