"""Streams of weight chunks over gRPC: building them, and reading them with validation.

Every stream is `header, data*, trailer` in a message whose oneof is named `part`; the same
code serves participant uploads, forwarding to the aggregator and model downloads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.tensors import TensorSpec, unflatten
from services.common.wire import (
    CHUNK_BYTES,
    StreamReader,
    WireError,
    encode,
    invalid,
    nbytes,
    spec_from_pb,
    spec_to_pb,
)


def fill_header(header: tensors_pb2.ModelHeader, spec: tuple[TensorSpec, ...]) -> None:
    """Put the tensor specs and total byte count into a model header."""
    del header.tensors[:]
    header.tensors.extend(spec_to_pb(spec))
    header.total_bytes = sum(nbytes(s) for s in spec)


def build_stream(
    cls: Callable[..., Any],
    header: Any,
    model_header: tensors_pb2.ModelHeader,
    weights: Mapping[str, torch.Tensor],
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[Any]:
    """Messages `cls(header=...)`, `cls(data=...)`..., `cls(trailer=...)` for the weights.

    `model_header` is the ModelHeader inside `header` (the same object when the stream's
    header is a ModelHeader); its tensor specs and size are filled in here.
    """
    spec, chunks, digest = encode(weights, chunk_bytes)
    fill_header(model_header, spec)
    yield cls(header=header)
    for c in chunks:
        yield cls(data=c)
    yield cls(trailer=tensors_pb2.ModelTrailer(sha256=digest.digest()))


def encoded_stream(
    cls: Callable[..., Any],
    header: tensors_pb2.ModelHeader,
    chunks: Iterable[bytes],
    sha256: bytes,
) -> Iterator[Any]:
    """Messages for bytes already encoded (a cached model served many times)."""
    yield cls(header=header)
    for c in chunks:
        yield cls(data=c)
    yield cls(trailer=tensors_pb2.ModelTrailer(sha256=sha256))


@dataclass
class Received:
    """What a validated stream delivered."""

    header: Any = None
    reader: StreamReader | None = None
    complete: bool = False


def validated(
    messages: Iterable[Any], on_header: Callable[[Any], StreamReader], received: Received
) -> Iterator[Any]:
    """Yield each message of a stream after validating it; fills `received` as it goes.

    `on_header` checks the header and returns the reader for the bytes. Raises WireError:
    INVALID_ARGUMENT for a stream not starting with one header, DATA_LOSS for a stream that
    ends before its trailer (truncated) or whose checksum is wrong.
    """
    it = iter(messages)
    first = next(it, None)
    if first is None or first.WhichOneof("part") != "header":
        raise invalid("a weights stream must start with a header")
    received.header = first.header
    received.reader = on_header(first.header)
    yield first
    for msg in it:
        part = msg.WhichOneof("part")
        if part == "data":
            received.reader.feed(msg.data)
        elif part == "trailer":
            received.reader.finish(msg.trailer.sha256)
            received.complete = True
            yield msg
            break
        else:
            raise invalid("a weights stream carries exactly one header")
        yield msg
    if not received.complete:
        raise WireError("DATA_LOSS", "stream ended before its trailer: the upload was truncated")
    if next(it, None) is not None:
        raise invalid("data after the trailer")


def read_all(messages: Iterable[Any], on_header: Callable[[Any], StreamReader]) -> Received:
    """Consume and validate a whole stream."""
    received = Received()
    for _ in validated(messages, on_header, received):
        pass
    return received


def read_model(
    messages: Iterable[Any], max_bytes: int | None = None
) -> tuple[Any, OrderedDict[str, torch.Tensor]]:
    """Download a whole model stream into named tensors (the header's spec defines them)."""
    spec_box: list[tuple[TensorSpec, ...]] = []

    def on_header(header: tensors_pb2.ModelHeader) -> StreamReader:
        spec = spec_from_pb(header.tensors)
        spec_box.append(spec)
        return StreamReader(spec, keep=True, max_bytes=max_bytes)

    got = read_all(messages, on_header)
    assert got.reader is not None and got.reader.flat is not None
    weights = unflatten(got.reader.flat, spec_box[0], got.reader.others)
    return got.header, weights


def read_encoded(
    messages: Iterable[Any], max_bytes: int | None = None
) -> tuple[tensors_pb2.ModelHeader, list[bytes], bytes]:
    """Validate a model stream and keep it encoded (header, chunks, checksum) to serve again."""
    chunks: list[bytes] = []
    received = Received()

    def on_header(header: tensors_pb2.ModelHeader) -> StreamReader:
        return StreamReader(spec_from_pb(header.tensors), keep=False, max_bytes=max_bytes)

    sha = b""
    for msg in validated(messages, on_header, received):
        part = msg.WhichOneof("part")
        if part == "data":
            chunks.append(msg.data)
        elif part == "trailer":
            sha = msg.trailer.sha256
    return received.header, chunks, sha
