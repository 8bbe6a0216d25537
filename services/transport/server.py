"""Building servers: the thread-pool server, the asyncio server, servicers, health.

Two kinds of server are built here. `new_server` is grpc's thread-pool server, where a call
holds a thread while it lasts (the aggregator's: its one caller is the clusterer).
`new_aio_server` is an asyncio server on an event loop of its own (`AioServer`, the
clusterer's): a call waiting for something (a long poll) is a coroutine, not a thread, so
thousands can wait while health checks and status calls answer at once; blocking work goes
to its thread pool with asyncio.to_thread, which carries the caller along (`caller()`).
Both carry the same limits and interceptors (the Gate, then `ParseInterceptor` innermost),
the health service and reflection (`add_health_and_reflection`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.transport.auth import Authenticator
from services.transport.gate import Gate, Policy
from services.transport.interceptors import AioInterceptor, Wrapping
from services.transport.limits import MESSAGE_LIMITS
from services.transport.parse import ParseInterceptor
from services.transport.tls import bind

SERVER_OPTIONS: list[tuple[str, Any]] = [
    *MESSAGE_LIMITS,
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]

T = TypeVar("T")


def new_server(
    max_workers: int,
    authenticator: Authenticator,
    policy: Policy,
    interceptors: Sequence[Wrapping] = (),
) -> grpc.Server:
    """A thread-pool server with message limits, keepalive settings and the Gate."""
    chain = [*interceptors, Gate(authenticator, policy)]
    chain.append(ParseInterceptor())  # innermost: its deserializers are the ones used
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=SERVER_OPTIONS,
        interceptors=chain,
    )


def new_aio_server(
    max_workers: int,
    authenticator: Authenticator,
    policy: Policy,
    interceptors: Sequence[Wrapping] = (),
    max_pending: int = 1000,
) -> AioServer:
    """An asyncio server on a loop of its own, with message limits, keepalive settings and
    the Gate; its handlers' blocking work runs on max_workers threads.

    gRPC cancels calls that arrive while `max_pending` wait to be taken up (and some from
    half that on), answering CANCELLED, which clients do not retry: a server that
    thousands of clients call at once (all woken by one broadcast) needs a deep queue."""
    chain = [*interceptors, Gate(authenticator, policy), ParseInterceptor()]
    options = [
        *SERVER_OPTIONS,
        ("grpc.server.max_pending_requests", max_pending),
        ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending),
    ]
    return AioServer(max_workers, [AioInterceptor(w) for w in chain], options)


# Threads for short blocking work (a journaled state change, a status page): one GIL runs
# one at a time, and a burst of a thousand reports spread over hundreds of threads only
# makes every thread, the health port's included, queue longer for it (a p99 health check
# of 0.7 s with 256 threads at 10,000 participants).
QUICK_WORKERS = 8


async def on_pool(pool: futures.Executor | None, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on `pool` (None: the loop's default executor), carrying the caller's
    context: asyncio.to_thread on a chosen pool."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        pool, functools.partial(ctx.run, fn, *args)
    )


class AioServer:
    """A grpc.aio server on an event loop that runs in a daemon thread of its own, with the
    shape of grpc.Server where the rest of a service meets it: ports are bound from any
    thread, `start()`, and `stop(grace)` returns what `.wait()` waits on. Short blocking
    work goes to a few threads, the loop's default executor (asyncio.to_thread); work that
    holds a thread for long (an upload streamed through, `on_pool(server.pool, ...)`) to
    max_workers threads, also the server's migration pool (sync handlers, if any)."""

    def __init__(
        self,
        max_workers: int,
        interceptors: Sequence[grpc.aio.ServerInterceptor],
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self.pool = futures.ThreadPoolExecutor(max_workers, thread_name_prefix="grpc-worker")
        self.quick = futures.ThreadPoolExecutor(
            min(QUICK_WORKERS, max_workers), thread_name_prefix="grpc-quick"
        )
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.quick)
        self._ended = threading.Event()
        self._stopping = False
        self._lock = threading.Lock()
        self._closers: list[Callable[[], Awaitable[Any]]] = []
        threading.Thread(target=self._run, name="grpc-aio", daemon=True).start()
        self.server: grpc.aio.Server = self.call(
            lambda: grpc.aio.server(
                migration_thread_pool=self.pool, interceptors=interceptors, options=options
            )
        )

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()
            self._ended.set()

    def call(self, fn: Callable[[], T]) -> T:
        """fn() run on the loop's thread (where the aio server's objects live)."""
        answer: futures.Future[T] = futures.Future()

        def run() -> None:
            try:
                answer.set_result(fn())
            except BaseException as exc:
                answer.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return answer.result()

    def add_insecure_port(self, address: str) -> int:
        """Bind a plain-text port (0 picks one); the port bound."""
        return self.call(lambda: self.server.add_insecure_port(address))

    def add_secure_port(self, address: str, creds: grpc.ServerCredentials) -> int:
        """Bind a TLS port; the port bound."""
        return self.call(lambda: self.server.add_secure_port(address, creds))

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Serve these handlers (what generated add_*_to_server functions call)."""
        self.call(lambda: self.server.add_generic_rpc_handlers(handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        """Serve these handlers by method name (generated code calls this too)."""
        self.call(lambda: self.server.add_registered_method_handlers(service, handlers))

    def start(self) -> None:
        """Start serving."""
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, give those in flight `grace` seconds (None: as long as they
        take), cancel the rest; then end the loop. The event is set once it has ended."""
        with self._lock:
            if self._stopping or self.loop.is_closed():
                return self._ended
            self._stopping = True
        stopping = asyncio.run_coroutine_threadsafe(self._stop(grace), self.loop)
        stopping.add_done_callback(lambda _: self._end())
        return self._ended

    def on_stop(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Have `stop` await close() on the loop once the server has stopped (a channel the
        handlers used)."""
        self._closers.append(close)

    async def _stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
        for close in self._closers:
            with contextlib.suppress(Exception):
                await close()

    def _end(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.pool.shutdown(wait=False)
        self.quick.shutdown(wait=False)


class _AioHealth(health_pb2_grpc.HealthServicer):
    """The health service on an aio server, answered from a (thread-safe, sync)
    HealthServicer: the one the plain health port serves and SIGTERM marks NOT_SERVING, so
    both ports always say the same."""

    def __init__(self, servicer: health.HealthServicer) -> None:
        self._servicer = servicer

    async def Check(self, request: Any, context: Any) -> Any:
        """The status now (NOT_FOUND for an unknown service); a lock held for a lookup."""
        return self._servicer.Check(request, context)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """The status now and each change, until the call ends."""
        loop = asyncio.get_running_loop()
        changes: asyncio.Queue[Any] = asyncio.Queue()
        closers: list[Callable[[], None]] = []

        def send(response: Any) -> None:  # from whichever thread sets a status
            with contextlib.suppress(RuntimeError):  # the loop is closed: the call too
                loop.call_soon_threadsafe(changes.put_nowait, response)

        class Registration:  # what the servicer calls to say how to stop sending
            add_callback = closers.append

        self._servicer.Watch(request, Registration(), send)
        try:
            while (response := await changes.get()) is not None:
                yield response
        finally:
            for close in closers:
                close()


def add_servicer(
    add: Callable[[Any, Any], None],
    servicer: Any,
    server: Any,
    raw_requests: Sequence[str] = (),
    raw_responses: Sequence[str] = (),
) -> None:
    """`add(servicer, server)` (a generated add_*Servicer_to_server), with the methods named
    in `raw_requests` given their requests serialized (bytes, no deserializer): an upload
    read in place (streams.part_of) or relayed untouched, not parsed and copied per chunk;
    those in `raw_responses` answer with serialized messages (a cached model's)."""
    captured: list[tuple[str, dict[str, Any]]] = []

    class Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass  # the same dict reaches add_registered_method_handlers

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            captured.append((service, handlers))

    add(servicer, Capture())
    for service, handlers in captured:
        for name in raw_requests:
            handlers[name] = handlers[name]._replace(request_deserializer=None)
        for name in raw_responses:
            handlers[name] = handlers[name]._replace(response_serializer=None)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


def add_health_and_reflection(
    server: grpc.Server | AioServer, service_names: Sequence[str]
) -> health.HealthServicer:
    """The standard health service (SERVING for '' and each service) and server reflection.

    The servicer returned is the one source of truth of the status: an aio server answers
    from it too, and `serve_health` serves it on its own port."""
    servicer = health.HealthServicer()
    for name in ("", *service_names):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    names = (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
    if isinstance(server, AioServer):
        aio = server.server

        def add() -> None:
            health_pb2_grpc.add_HealthServicer_to_server(_AioHealth(servicer), aio)
            reflection.enable_server_reflection(names, aio)  # the asyncio servicer

        server.call(add)
    else:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection(names, server)
    return servicer


def serve_health(
    servicer: health.HealthServicer, host: str, port: int | None
) -> tuple[grpc.Server | None, int | None]:
    """A plain-text server with nothing but the health service (the same servicer, so it
    says NOT_SERVING when the service shuts down) on threads of its own; None when port
    is None."""
    if port is None:
        return None, None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=SERVER_OPTIONS)
    check = grpc.unary_unary_rpc_method_handler(
        servicer.Check,
        request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
    )
    # Check only: a Watch stream would hold one of its two threads for as long as it lasts.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(health.SERVICE_NAME, {"Check": check}),)
    )
    return server, bind(server, host, port)
