"""Interceptors as pure wrappers of method handlers, one code path for both kinds of server.

Each interceptor (the Gate, `ParseInterceptor`, the metrics, the clusterer's relay) is one
`wrap(handler, method)` (`Wrapping`), served to a sync server as a grpc.ServerInterceptor and
to an aio server through `AioInterceptor`: around a coroutine function or an async generator
it puts async wrappers, around anything else sync ones (`rewrap`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import grpc

SHAPES = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_BUILD: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}
Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap(
    handler: Any,
    *,
    call: Wrap,
    stream: Wrap,
    acall: Wrap,
    astream: Wrap,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """handler, its behaviour wrapped by the wrapper that fits it: `call` around a sync
    function answering once, `stream` around a sync function answering with an iterator,
    `acall` around a coroutine function (one answer, or a stream written with
    context.write) and `astream` around an async generator. What a wrapper returns must be
    of the same kind (an aio server runs coroutines on its loop, the rest in its pool)."""
    shape = next(s for s in SHAPES if getattr(handler, s) is not None)
    fn = getattr(handler, shape)
    if inspect.isasyncgenfunction(fn):
        wrapped = astream(fn)
    elif inspect.iscoroutinefunction(fn):
        wrapped = acall(fn)
    else:
        wrapped = stream(fn) if shape.endswith("_stream") else call(fn)
    return _BUILD[shape](
        wrapped, request_deserializer or handler.request_deserializer, handler.response_serializer
    )


class Wrapping(grpc.ServerInterceptor):
    """An interceptor as one pure function: `wrap(handler, method)`, the handler a method is
    served by given the one that would serve it (None: no such method). It intercepts for
    a sync server as it is and for an aio server through `AioInterceptor`; either way one
    wrapped handler per method is built, on the method's first call, and reused."""

    def __init__(self) -> None:
        self._wrapped: dict[str, Any] = {}

    def wrap(self, handler: Any, method: str) -> Any:
        """The handler to serve `method` with instead of `handler`."""
        raise NotImplementedError

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        done = self._wrapped.get(details.method)
        if done is None:
            done = self.wrap(continuation(details), details.method)
            if done is not None:
                self._wrapped[details.method] = done
        return done


class AioInterceptor(grpc.aio.ServerInterceptor):
    """A `Wrapping` intercepting for an aio server."""

    def __init__(self, wrapping: Wrapping) -> None:
        self.wrapping = wrapping
        self._wrapped: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        done = self._wrapped.get(details.method)
        if done is None:
            done = self.wrapping.wrap(await continuation(details), details.method)
            if done is not None:
                self._wrapped[details.method] = done
        return done
