"""A service's process: start, announce where it listens, serve until a signal, stop.

`serve_main` is every service's main(): it builds and starts the service, writes the ready
file launchers and tests wait for, serves until SIGTERM or SIGINT, then says NOT_SERVING and
stops within the grace period. A start-up failure is one line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from grpc_health.v1 import health

from services.core.errors import FLClusteringError
from services.transport.lifecycle import exit_with_parent, freeze_heap, limit_malloc_arenas

logger = logging.getLogger(__name__)


class Serving(Protocol):
    """A server as a service starts and stops it: grpc.Server or AioServer."""

    def start(self) -> None:
        """Start serving."""

    def stop(self, grace: float | None) -> Any:
        """Stop within grace seconds; something whose wait() returns once stopped."""


def _wait_for_handler(stop: threading.Event) -> None:
    """Block the main thread until a signal handler sets stop.

    The kernel may deliver a process's signal to any of its threads, and CPython runs the
    Python handler only when the main thread next runs bytecode: blocked in stop.wait(), it
    would never see a signal that landed on one of the server's threads. The signal's C
    handler also writes to the wakeup fd, on whichever thread it runs, so the main thread
    waits on that instead."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    try:
        while not stop.is_set():
            os.read(r, 512)  # a signal arrived: its handler runs before the next check
    finally:
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)


def serve_until_signal(
    server: Serving,
    health_servicer: health.HealthServicer,
    grace_s: float,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Block until SIGTERM/SIGINT; then NOT_SERVING, stop within the grace period, clean up."""
    stop = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        logger.info("signal %s: shutting down (grace %.0fs)", signum, grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    _wait_for_handler(stop)
    health_servicer.enter_graceful_shutdown()
    if on_stop is not None:
        on_stop()
    server.stop(grace_s).wait()


def write_ready_file(path: str | None, addresses: dict[str, str]) -> None:
    """Atomically write the service's bound addresses as JSON (for launchers and tests)."""
    if not path:
        return
    target = Path(path)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(addresses))
    tmp.replace(target)


def ready_addresses(
    host: str, port: int, metrics_host: str | None = None, metrics_port: int | None = None
) -> dict[str, str]:
    """The addresses a ready file lists (wildcard hosts written as 127.0.0.1)."""

    def local(h: str) -> str:
        return "127.0.0.1" if h in ("0.0.0.0", "::", "") else h

    out = {"grpc": f"{local(host)}:{port}"}
    if metrics_port is not None and metrics_host is not None:
        out["metrics"] = f"{local(metrics_host)}:{metrics_port}"
    return out


class ServeConfig(Protocol):
    """What `serve_main` reads of a service's settings (the ServiceSettings of
    services.common.settings, which sits above this package)."""

    @property
    def log_level(self) -> str:
        """The logging level's name."""

    @property
    def host(self) -> str:
        """The address the gRPC server binds."""

    @property
    def metrics_host(self) -> str:
        """The address /metrics binds."""

    @property
    def ready_file(self) -> str | None:
        """Where to write the bound addresses once serving (None: nowhere)."""

    @property
    def grace_s(self) -> float:
        """Seconds in-flight calls get on SIGTERM."""


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Service(Protocol):
    """A built service: a gRPC server (not started), its port, health and /metrics."""

    @property
    def server(self) -> Serving:
        """Its gRPC server."""

    port: int
    health: health.HealthServicer
    metrics_port: int | None

    def start(self) -> None:
        """Start serving."""

    def on_stop(self) -> None:
        """Called on SIGTERM, before the server stops."""


def serve_main(name: str, settings: ServeConfig, build: Callable[[], Service]) -> int:
    """A service's main(): build and start it, announce where it listens, serve until
    SIGTERM. A start-up failure (port taken, file missing) is one line and exit status 2."""
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT)
    limit_malloc_arenas()  # before the servers' threads exist
    try:
        service = build()
        freeze_heap()
        service.start()
    except FLClusteringError as exc:
        sys.stderr.write(f"{name}: error: {exc}\n")
        return 2
    exit_with_parent()
    ready = ready_addresses(
        settings.host, service.port, settings.metrics_host, service.metrics_port
    )
    health_port = getattr(service, "health_port", None)
    if health_port is not None:
        ready["health"] = ready_addresses(settings.host, health_port)["grpc"]
    logger.info("%s serving on %s", name, ready)
    write_ready_file(settings.ready_file, ready)
    serve_until_signal(service.server, service.health, settings.grace_s, service.on_stop)
    return 0
