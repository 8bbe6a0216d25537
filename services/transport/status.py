"""Domain errors as gRPC statuses, mapped once for every server.

Servicers raise the project's typed errors (services.core.errors) and stay thin: `@rpc`
turns each into the status it maps to (`STATUS_OF`, `status_for`) with one short log line,
and `bounded` keeps whatever a caller sent from growing a status detail or a log line.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc

from services.core.errors import (
    AuthError,
    CapacityError,
    ConfigError,
    FLClusteringError,
    ForbiddenError,
    NotFoundError,
    SpecMismatchError,
    StateError,
    WireError,
)

logger = logging.getLogger(__name__)


STATUS_OF: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (ForbiddenError, grpc.StatusCode.PERMISSION_DENIED),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (StateError, grpc.StatusCode.FAILED_PRECONDITION),
    (SpecMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code a domain error maps to."""
    if isinstance(exc, WireError):
        return getattr(grpc.StatusCode, exc.code)
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


F = TypeVar("F", bound=Callable[..., Any])

MAX_DETAILS = 400  # characters of an error message sent back or logged


def bounded(message: str, limit: int = MAX_DETAILS) -> str:
    """A message cut to `limit` characters: whatever a caller sent, an error quoting it
    stays a short status detail and a short log line."""
    return message if len(message) <= limit else message[: limit - 14] + " ...(truncated)"


def _refusal(name: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a domain error ends a call with, logged as one `[name]` line."""
    code = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("[%s] internal error", name)
        return code, f"internal error: {type(exc).__name__}"
    message = bounded(str(exc))
    logger.info("[%s] %s: %s", name, code.name, message)
    return code, message


def rpc(name: str) -> Callable[[F], F]:
    """Decorate a servicer method: domain errors become statuses with a `[name]` log line.

    Works for unary and server-streaming methods (generators) alike, sync or async (an
    aio call already ended, e.g. a stream cut, keeps the status it has).
    """

    def wrap(fn: F) -> F:
        def fail(context: grpc.ServicerContext, exc: BaseException) -> None:
            context.abort(*_refusal(name, exc))

        async def afail(context: Any, exc: BaseException) -> None:
            code, message = _refusal(name, exc)
            if not context.done():
                await context.abort(code, message)

        if inspect.isasyncgenfunction(fn):

            @functools.wraps(fn)
            async def agen(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async with contextlib.aclosing(fn(self, request, context)) as it:
                        async for item in it:
                            yield item
                except FLClusteringError as exc:
                    await afail(context, exc)

            return agen  # type: ignore[return-value]

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def coro(self: Any, request: Any, context: Any) -> Any:
                try:
                    return await fn(self, request, context)
                except FLClusteringError as exc:
                    await afail(context, exc)
                    return None

            return coro  # type: ignore[return-value]

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from fn(self, request, context)
                except FLClusteringError as exc:
                    fail(context, exc)

            return gen  # type: ignore[return-value]

        @functools.wraps(fn)
        def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return fn(self, request, context)
            except FLClusteringError as exc:
                fail(context, exc)

        return unary  # type: ignore[return-value]

    return wrap
