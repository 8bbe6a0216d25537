"""gRPC message size limits, the same on every channel and server.

In the transport, apart from services.common.wire (which needs torch), so that processes
that only speak the protocol (`flclustering simulate`, benchmarks/load.py) set the same
limits without it.
"""

from __future__ import annotations

MAX_CLUSTERS = 4096  # cluster ids (and accuracies per round) any RPC may carry
CHUNK_BYTES = 2 << 20  # 2 MiB of data per message (the cap is 4 MiB)
MAX_MESSAGE_BYTES = 4 << 20  # gRPC message cap set on every channel and server
# The channel and server options that enforce it (anything larger is refused).
MESSAGE_LIMITS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
