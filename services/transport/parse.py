"""Request bodies that do not parse are INVALID_ARGUMENT, not INTERNAL.

gRPC answers a deserializer that raises with INTERNAL and a traceback in the log; the
`ParseInterceptor` (innermost on every server) turns an unparseable body into one
INVALID_ARGUMENT status and one log line instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc

from services.core.errors import invalid
from services.transport.interceptors import Wrapping, rewrap

logger = logging.getLogger(__name__)


class _Unparseable:
    """What a request that is not a valid message deserializes to (instead of raising,
    which gRPC answers with INTERNAL and a traceback in the log)."""

    def __init__(self, method: str, exc: Exception) -> None:
        self.error = invalid(f"the request is not a valid {method} message ({type(exc).__name__})")


class ParseInterceptor(Wrapping):
    """Unparseable request bodies are INVALID_ARGUMENT, logged as one line.

    Innermost, so the handler it wraps is the servicer's own.
    """

    def wrap(self, handler: Any, full_method: str) -> Any:
        if handler is None or handler.request_deserializer is None:
            return handler
        method = full_method.rsplit("/", 1)[-1][:64]
        deserialize = handler.request_deserializer

        def parse(data: bytes) -> Any:
            try:
                return deserialize(data)
            except Exception as exc:
                return _Unparseable(method, exc)

        def refused(request: Any) -> str | None:
            if not isinstance(request, _Unparseable):
                return None
            logger.info("[%s] INVALID_ARGUMENT: %s", method, request.error)
            return str(request.error)

        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            why = refused(request)
            if why is not None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
            return request

        async def checked_async(request: Any, context: Any) -> Any:
            why = refused(request)
            if why is not None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
            return request

        # A stream of requests: for one answer (an upload) an unparseable message is a
        # domain error its handler maps like any other; for a stream of answers, an abort.
        def messages(it: Iterator[Any]) -> Iterator[Any]:
            for request in it:
                if isinstance(request, _Unparseable):
                    raise request.error
                yield request

        async def messages_async(it: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in it:
                if isinstance(request, _Unparseable):
                    raise request.error
                yield request

        def aborting(it: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            for request in it:
                yield checked(request, context)

        async def aborting_async(it: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for request in it:
                yield await checked_async(request, context)

        if handler.request_streaming:
            answers = handler.response_streaming

            def call(fn: Callable[..., Any]) -> Callable[..., Any]:
                return lambda it, c: fn(messages(it), c)

            def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
                return lambda it, c: fn(aborting(it, c), c)

            def acall(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def run(it: AsyncIterator[Any], c: Any) -> Any:
                    return await fn(aborting_async(it, c) if answers else messages_async(it), c)

                return run

            def astream(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def run(it: AsyncIterator[Any], c: Any) -> AsyncIterator[Any]:
                    async with contextlib.aclosing(fn(aborting_async(it, c), c)) as out:
                        async for item in out:
                            yield item

                return run

        else:

            def call(fn: Callable[..., Any]) -> Callable[..., Any]:
                return lambda r, c: fn(checked(r, c), c)

            stream = call

            def acall(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def run(request: Any, c: Any) -> Any:
                    return await fn(await checked_async(request, c), c)

                return run

            def astream(fn: Callable[..., Any]) -> Callable[..., Any]:
                async def run(request: Any, c: Any) -> AsyncIterator[Any]:
                    checked_request = await checked_async(request, c)
                    async with contextlib.aclosing(fn(checked_request, c)) as out:
                        async for item in out:
                            yield item

                return run

        return rewrap(
            handler,
            call=call,
            stream=stream,
            acall=acall,
            astream=astream,
            request_deserializer=parse,
        )
