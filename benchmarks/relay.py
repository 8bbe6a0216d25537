"""The yardstick of benchmarks/transport.py: a bare two-hop grpcio relay, nothing else.

`python benchmarks/relay.py sink` and `python benchmarks/relay.py middle SINK_PORT` each
print their port and serve until killed. The sink counts the bytes of a stream of raw
messages (no deserializer) and answers the count; the middle forwards each message
untouched (identity serializers) to the sink as it arrives. Same server kinds as the
pipeline it is compared with (the clusterer's asyncio server in the middle, the
aggregator's thread-pool server at the end), the same message limits and no TLS, as in the
pipeline run. `send(port, chunks)` pushes one stream through and returns the count.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc

from services.transport.limits import MESSAGE_LIMITS

SERVICE = "bench.Relay"
METHOD = f"/{SERVICE}/Push"


def _handlers(push: object) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(push)}
    )


def sink() -> None:
    """Count the bytes of each stream; answer the count as 8 little-endian bytes."""

    def push(messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return sum(len(m) for m in messages).to_bytes(8, "little")

    server = grpc.server(futures.ThreadPoolExecutor(4), options=MESSAGE_LIMITS)
    server.add_generic_rpc_handlers([_handlers(push)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


async def middle(sink_port: int) -> None:
    """Forward every stream to the sink, message by message, untouched."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{sink_port}", options=MESSAGE_LIMITS)
    forward = channel.stream_unary(METHOD)

    async def push(messages: object, context: object) -> bytes:
        return await forward(messages)

    server = grpc.aio.server(options=MESSAGE_LIMITS)
    server.add_generic_rpc_handlers([_handlers(push)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def connect(port: int) -> grpc.Channel:
    """A channel to the relay at `port` (kept open across streams, as the pipeline's is)."""
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=MESSAGE_LIMITS)


def send(channel: grpc.Channel, chunks: Iterable[bytes]) -> int:
    """One stream of `chunks` through the relay; the byte count the sink saw."""
    return int.from_bytes(channel.stream_unary(METHOD)(iter(chunks), timeout=600), "little")


if __name__ == "__main__":
    if sys.argv[1:2] == ["sink"]:
        sink()
    elif sys.argv[1:2] == ["middle"] and len(sys.argv) == 3:
        asyncio.run(middle(int(sys.argv[2])))
    else:
        raise SystemExit("usage: relay.py sink | relay.py middle SINK_PORT")
