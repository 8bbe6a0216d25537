"""A service's main thread sees SIGTERM whichever of its threads the kernel delivers it to."""

from __future__ import annotations

import signal
import threading
import time

from services.transport.serving import _wait_for_handler


def test_a_signal_delivered_to_another_thread_wakes_the_main_thread() -> None:
    """CPython runs a Python signal handler only on the main thread, when it next runs
    bytecode: a main thread blocked in Event.wait() never notices a signal that landed on
    one of the server's threads (the orphaned clusterer of a killed `simulate`)."""
    stop = threading.Event()
    main = threading.get_ident()
    rescued: list[bool] = []

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    def deliver_elsewhere() -> None:
        time.sleep(0.2)
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)  # this thread, not main
        if not stop.wait(5):  # still blocked: wake the main thread itself, and fail
            rescued.append(True)
            signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        helper = threading.Thread(target=deliver_elsewhere, daemon=True)
        helper.start()
        started = time.monotonic()
        _wait_for_handler(stop)
        took = time.monotonic() - started
        helper.join(10)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not rescued and took < 2.0, took
