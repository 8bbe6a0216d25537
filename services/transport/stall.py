"""Streams that stall are cut, and an aio call's request stream read from a thread.

A silent peer (an upload that stops sending, a download nobody takes) would hold a server
thread or a stream slot for ever: `StallWatch` cancels it after an idle or a total time;
`Cut` ends an aio call from any thread, and `blocking_iter` hands an aio call's request
stream to blocking code on a pool thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, Protocol, TypeVar

import grpc

logger = logging.getLogger(__name__)


T = TypeVar("T")


class Cancellable(Protocol):
    """What StallWatch cuts a stream with: a sync call's context, or an aio call's `Cut`."""

    def cancel(self) -> Any:
        """End the call (CANCELLED)."""


class StallWatch:
    """Cuts streams that stall: an upload whose next message does not come within `idle_s`
    (its handler sees the stream end and refuses the upload), a download whose receiver
    takes no next message within `idle_s` (the server's send blocks meanwhile), or either
    still open after `total_s`, is cancelled, so a silent peer cannot hold a server thread
    or a stream slot.

    One daemon thread checks the watched streams twice a second (`watch`); an aio handler
    writing a stream times its own writes (`send`).
    """

    def __init__(self, idle_s: float, total_s: float) -> None:
        self.idle_s = idle_s
        self.total_s = total_s
        self._lock = threading.Lock()
        self._streams: dict[int, list[Any]] = {}  # id -> [call, started, last, name]
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, messages: Iterator[Any], context: Cancellable, what: str) -> Iterator[Any]:
        """messages, while cancelling the call if the sender stalls."""
        key = self._register(context, what)
        try:
            for msg in messages:
                self._seen(key)
                yield msg
        finally:
            self._forget(key)

    async def awatch(
        self, messages: AsyncIterator[T], cut: Cancellable, what: str
    ) -> AsyncIterator[T]:
        """`watch` for an aio call's request stream read on its loop (`cut`: its `Cut`)."""
        key = self._register(cut, what)
        try:
            async for msg in messages:
                self._seen(key)
                yield msg
        finally:
            self._forget(key)

    def _register(self, call: Cancellable, what: str) -> int:
        key = next(self._ids)
        now = time.monotonic()
        with self._lock:
            self._streams[key] = [call, now, now, what]
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stall-watch", daemon=True)
                self._thread.start()
        return key

    def _seen(self, key: int) -> None:
        with self._lock:
            entry = self._streams.get(key)
            if entry is not None:
                entry[2] = time.monotonic()

    def _forget(self, key: int) -> None:
        with self._lock:
            self._streams.pop(key, None)

    async def send(self, context: Any, messages: Iterable[Any], what: str) -> None:
        """Write messages on an aio call: a write its receiver does not take within `idle_s`,
        or one still due after `total_s`, cuts the call (CANCELLED) and ends the handler.
        aio cannot cancel a call as a sync server does, so its status goes out behind the
        message the receiver has not taken, when it takes it or goes away."""
        loop = asyncio.get_running_loop()
        started = last = loop.time()
        for msg in messages:
            left = min(self.idle_s, started + self.total_s - loop.time())
            try:
                await asyncio.wait_for(context.write(msg), max(left, 0.0))
            except TimeoutError:
                now = loop.time()
                logger.info(
                    "[%s] cut a stalled stream (%.0fs since its last message, %.0fs open)",
                    what,
                    now - last,
                    now - started,
                )
                await Cut(context, loop, f"{what}: the receiver stalled").now()
                return
            last = loop.time()

    def _run(self) -> None:
        while True:
            time.sleep(0.5)
            now = time.monotonic()
            with self._lock:
                stalled = [
                    (k, v)
                    for k, v in self._streams.items()
                    if now - v[2] > self.idle_s or now - v[1] > self.total_s
                ]
                for k, _ in stalled:
                    self._streams.pop(k, None)
            for _, (context, started, last, what) in stalled:
                logger.info(
                    "[%s] cut a stalled stream (%.0fs since its last message, %.0fs open)",
                    what,
                    now - last,
                    now - started,
                )
                context.cancel()


CUT_WAIT_S = 1.0  # how long a handler cutting its own call waits for the status to go out
_CUTTING: set[asyncio.Task[None]] = set()  # cuts under way (a task is only weakly held)


class Cut:
    """Ends an aio call with CANCELLED, from any thread and without blocking (aio has no
    cancel()): the status goes out at once (a peer that stopped sending) or behind the
    message a stalled receiver has not taken; the call's pending read then fails."""

    def __init__(self, context: Any, loop: asyncio.AbstractEventLoop, why: str) -> None:
        self._context = context
        self._loop = loop
        self._why = why
        self._also: list[Callable[[], Any]] = []
        self.done = False  # the call has been cut

    def also(self, end: Callable[[], Any]) -> None:
        """Have the cut call end() too, on the loop (a call made on the cut call's behalf);
        at once if it has been cut already (call on the loop)."""
        if self.done:
            end()
        else:
            self._also.append(end)

    def cancel(self) -> None:
        """Cut the call soon (any thread)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: so is every call
            self._loop.call_soon_threadsafe(self._start)

    async def now(self) -> None:
        """Cut the call from its own handler: the status is set when this returns (sent, or
        queued behind a message the peer does not take)."""
        await asyncio.wait({self._start()}, timeout=CUT_WAIT_S)

    def _start(self) -> asyncio.Task[None]:
        self.done = True
        for end in self._also:
            with contextlib.suppress(Exception):
                end()
        self._also.clear()
        task = asyncio.ensure_future(self._abort())
        _CUTTING.add(task)
        task.add_done_callback(_CUTTING.discard)
        return task

    async def _abort(self) -> None:
        with contextlib.suppress(Exception):  # it ended meanwhile, or its peer went away
            if not self._context.done():
                await self._context.abort(grpc.StatusCode.CANCELLED, self._why)


def blocking_iter(
    messages: AsyncIterator[T], context: Any, loop: asyncio.AbstractEventLoop
) -> Iterator[T]:
    """An aio call's request stream, read one message at a time from a pool thread (the
    loop does the reading). It ends where the stream ends, and where the call was cut."""
    it = messages.__aiter__()

    async def step() -> tuple[bool, Any]:
        try:
            return True, await it.__anext__()
        except StopAsyncIteration:
            return False, None

    while True:
        try:
            pending = asyncio.run_coroutine_threadsafe(step(), loop)
        except RuntimeError:
            return  # the loop has ended, with its server
        try:
            more, msg = _result(pending, loop)
        except Exception:
            if context.done() or loop.is_closed() or not loop.is_running():
                return  # cut, or the server stopped: the reader sees the stream end
            raise
        if not more:
            return
        yield msg


def _result(pending: futures.Future[T], loop: asyncio.AbstractEventLoop) -> T:
    """A loop's answer to a pool thread, given up if the loop stops first."""
    while True:
        try:
            return pending.result(timeout=1.0)
        except TimeoutError:
            if loop.is_closed() or not loop.is_running():
                pending.cancel()
                raise
