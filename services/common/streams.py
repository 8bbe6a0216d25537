"""Streams of weight chunks over gRPC: building them, and reading them with validation.

Every stream is `header, data*, trailer` in a message whose oneof is named `part`; the same
code serves participant uploads, forwarding to the aggregator and model downloads. Streams
that carry a model's bytes may travel as serialized messages (bytes, through stubs and
handlers with identity serializers: `transport.client.raw_requests` and `raw_responses`,
`transport.server.add_servicer`): a data message is then read in place (`wire.read_frame`) and
only headers and trailers are parsed, and a relay passes the messages on without decoding
them. Both sides accept either form.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.wire import (
    StreamReader,
    encode,
    nbytes,
    read_frame,
    spec_from_pb,
    spec_to_pb,
)
from services.core.errors import WireError, invalid
from services.core.tensors import TensorSpec, unflatten
from services.transport.limits import CHUNK_BYTES

Part = tuple[str | None, Any]  # ("header" | "data" | "trailer" | None, its value)


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
    framed: bool = False,
) -> Iterator[Any]:
    """Messages `cls(header=...)`, `cls(data=...)`..., `cls(trailer=...)` for the weights.

    `model_header` is the ModelHeader inside `header` (the same object when the stream's
    header is a ModelHeader); its tensor specs and size are filled in here. `framed`: the
    messages serialized (bytes, for a stub with an identity serializer), each data message
    built with one copy of the weights' bytes and no protobuf object.
    """
    spec, chunks, digest = encode(weights, chunk_bytes, framed=framed)
    fill_header(model_header, spec)
    first = cls(header=header)
    yield first.SerializeToString() if framed else first
    for c in chunks:
        yield c if framed else cls(data=c)
    last = cls(trailer=tensors_pb2.ModelTrailer(xxh3_128=digest.digest()))
    yield last.SerializeToString() if framed else last


def part_of(message: Any, cls: Any = None) -> Part:
    """What one stream message carries. A serialized message (bytes) is parsed as `cls`,
    except data, which is read in place; unparseable bytes are INVALID_ARGUMENT."""
    if isinstance(message, (bytes, memoryview)):
        data = read_frame(message)
        if data is not None:
            return "data", data
        assert cls is not None, "serialized messages need their class"
        try:
            message = cls.FromString(message)
        except Exception as exc:
            name = getattr(cls, "__name__", "stream")
            why = f"the request is not a valid {name} message ({type(exc).__name__})"
            raise invalid(why) from None
    part = message.WhichOneof("part")
    return part, getattr(message, part) if part else None


@dataclass
class Received:
    """What a validated stream delivered."""

    header: Any = None
    reader: StreamReader | None = None
    complete: bool = False


def validated(
    messages: Iterable[Any],
    on_header: Callable[[Any], StreamReader],
    received: Received,
    cls: Any = None,
) -> Iterator[Part]:
    """Yield what each message of a stream carries after validating it; fills `received`.

    Messages are protobuf objects or, with `cls`, serialized ones (`part_of`). `on_header`
    checks the header and returns the reader for the bytes. Raises WireError:
    INVALID_ARGUMENT for a stream not starting with one header, DATA_LOSS for a stream that
    ends before its trailer (truncated) or whose checksum is wrong.
    """
    it = iter(messages)
    first = next(it, None)
    part, value = part_of(first, cls) if first is not None else (None, None)
    if part != "header":
        raise invalid("a weights stream must start with a header")
    received.header = value
    received.reader = on_header(value)
    yield part, value
    for msg in it:
        part, value = part_of(msg, cls)
        if part == "data":
            received.reader.feed(value)
        elif part == "trailer":
            received.reader.finish(value.xxh3_128)
            received.complete = True
            yield part, value
            break
        else:
            raise invalid("a weights stream carries exactly one header")
        yield part, value
    if not received.complete:
        raise WireError("DATA_LOSS", "stream ended before its trailer: the upload was truncated")
    if next(it, None) is not None:
        raise invalid("data after the trailer")


def read_all(
    messages: Iterable[Any],
    on_header: Callable[[Any], StreamReader],
    cls: Any = None,
) -> Received:
    """Consume and validate a whole stream (serialized messages: of class `cls`)."""
    received = Received()
    for _ in validated(messages, on_header, received, cls):
        pass
    return received


def read_model(
    messages: Iterable[Any], max_bytes: int | None = None, cls: Any = None
) -> tuple[Any, OrderedDict[str, torch.Tensor]]:
    """Download a whole model stream into named tensors (the header's spec defines them);
    serialized messages are of class `cls`."""
    spec_box: list[tuple[TensorSpec, ...]] = []

    def on_header(header: tensors_pb2.ModelHeader) -> StreamReader:
        spec = spec_from_pb(header.tensors)
        spec_box.append(spec)
        return StreamReader(spec, keep=True, max_bytes=max_bytes)

    got = read_all(messages, on_header, cls)
    assert got.reader is not None and got.reader.flat is not None
    # The flat buffer is this call's own: the tensors are views of it, not a second copy.
    weights = unflatten(got.reader.flat, spec_box[0], got.reader.others, share=True)
    return got.header, weights


def read_encoded(
    messages: Iterable[Any], cls: Any, max_bytes: int | None = None
) -> tuple[tensors_pb2.ModelHeader, list[bytes]]:
    """Validate a model stream of serialized `cls` messages and keep them as they came, to
    be served again untouched (every stream message type of the protocol encodes header,
    data and trailer alike): the header and the messages."""
    kept: list[bytes] = []
    received = Received()

    def on_header(header: tensors_pb2.ModelHeader) -> StreamReader:
        return StreamReader(spec_from_pb(header.tensors), keep=False, max_bytes=max_bytes)

    def keeping() -> Iterator[bytes]:
        for raw in messages:
            kept.append(bytes(raw))
            yield raw

    for _ in validated(keeping(), on_header, received, cls):
        pass
    return received.header, kept
