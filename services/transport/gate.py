"""The gate in front of every handler: authentication, authorisation and admission.

A `Policy` says which roles may call which method (the rules of services.transport.roles;
a method without one is refused to everyone) and how many calls of a method one identity,
one role and everyone together may have in flight; the `Gate` applies it to each call
(UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED) and sets the caller the handler
reads (services.transport.auth.caller).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import grpc

from services.transport.auth import CALLER, Authenticator
from services.transport.credentials import Identity
from services.transport.interceptors import Wrapping, rewrap
from services.transport.roles import COMMON_PER_IDENTITY, COMMON_TOTAL, OPEN
from services.transport.status import bounded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Policy:
    """Which roles may call which method (by its full name, `/package.Service/Method`, as
    services.transport.roles declares them), and how many calls of a method (by its short
    name) one identity and everyone together may have in flight (beyond:
    RESOURCE_EXHAUSTED).

    Deny by default: a method without a rule in `roles` is refused to every caller, the
    development token included (PERMISSION_DENIED). Those in `open` are let through
    without a credential (health checks: probes carry none).
    """

    roles: Mapping[str, frozenset[str]] = dataclass_field(default_factory=dict)
    open: frozenset[str] = OPEN
    per_identity: Mapping[str, int] = dataclass_field(default_factory=dict)
    default_per_identity: int = 8
    total: Mapping[str, int] = dataclass_field(default_factory=dict)
    # method -> role -> calls that role may have in flight together: a secondary reader
    # (operators exporting the model) cannot take the slots the main one (the clusterer)
    # needs when `total` leaves room for both.
    per_role: Mapping[str, Mapping[str, int]] = dataclass_field(default_factory=dict)


class _Admission:
    """Counts calls in flight per (identity, method) and per method."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._lock = threading.Lock()
        self._mine: dict[tuple[str, str, str], int] = {}
        self._all: dict[str, int] = {}
        self._roles: dict[tuple[str, str], int] = {}

    def enter(self, who: Identity, method: str) -> str | None:
        """Take a slot; None, or why there is none."""
        p = self._policy
        key = (who.role, who.name, method)
        limit = p.per_identity.get(method, p.default_per_identity)
        total = p.total.get(method)
        role_limit = p.per_role.get(method, {}).get(who.role)
        with self._lock:
            mine = self._mine.get(key, 0)
            if not who.is_dev and mine >= limit:
                return f"{who.name} already has {mine} {method} call(s) in flight (limit {limit})"
            if total is not None and self._all.get(method, 0) >= total:
                return f"the server is handling {total} {method} calls: try again shortly"
            role_key = (method, who.role)
            if role_limit is not None and self._roles.get(role_key, 0) >= role_limit:
                return (
                    f"{who.role}s have {role_limit} {method} call(s) in flight: try again shortly"
                )
            self._mine[key] = mine + 1
            self._all[method] = self._all.get(method, 0) + 1
            self._roles[role_key] = self._roles.get(role_key, 0) + 1
        return None

    def leave(self, who: Identity, method: str) -> None:
        """Give the slot back."""
        key = (who.role, who.name, method)
        with self._lock:
            left = self._mine.get(key, 1) - 1
            if left:
                self._mine[key] = left
            else:
                self._mine.pop(key, None)
            self._all[method] = self._all.get(method, 1) - 1
            role_key = (method, who.role)
            self._roles[role_key] = self._roles.get(role_key, 1) - 1


class Gate(Wrapping):
    """Authentication, authorisation and admission in front of every handler: who calls,
    whether its role may call this method, and whether it (or everyone) has too many such
    calls in flight. The handler then reads the caller with `caller()`."""

    def __init__(self, authenticator: Authenticator, policy: Policy) -> None:
        super().__init__()
        self._auth = authenticator
        self._policy = policy = Policy(
            roles=policy.roles,
            open=policy.open,
            per_identity={**COMMON_PER_IDENTITY, **policy.per_identity},
            default_per_identity=policy.default_per_identity,
            total={**COMMON_TOTAL, **policy.total},
            per_role=policy.per_role,
        )
        self._admission = _Admission(policy)

    def _decide(self, context: Any, full_method: str) -> Identity | tuple[grpc.StatusCode, str]:
        """The caller, once it may make this call (a slot taken), or the refusal."""
        method = short_name(full_method)
        who = self._auth.identity(context)
        if who is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "no valid credential (client certificate or bearer token)",
            )
        roles = self._policy.roles.get(full_method)
        if roles is None:
            logger.warning("[%s] PERMISSION_DENIED: no rule says who may call it", method)
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method} is refused to every caller: no rule says who may call it "
                "(services/transport/roles.py)",
            )
        if not who.is_dev and who.role not in roles:
            logger.info("[%s] PERMISSION_DENIED: %s %s", method, who.role, who.name)
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"{who.role} {who.name!r} may not call {method} "
                f"(allowed: {', '.join(sorted(roles))})",
            )
        refused = self._admission.enter(who, method)
        if refused is not None:
            logger.info("[%s] RESOURCE_EXHAUSTED: %s", method, bounded(refused))
            return grpc.StatusCode.RESOURCE_EXHAUSTED, bounded(refused)
        return who

    def _admit(self, context: grpc.ServicerContext, full_method: str) -> Identity:
        """The caller, once it may make this call (else the call is aborted)."""
        decided = self._decide(context, full_method)
        if isinstance(decided, Identity):
            return decided
        context.abort(*decided)
        raise AssertionError("unreachable")  # abort raises

    async def _admit_async(self, context: Any, full_method: str) -> Identity:
        """The same for an aio call."""
        decided = self._decide(context, full_method)
        if isinstance(decided, Identity):
            return decided
        await context.abort(*decided)
        raise AssertionError("unreachable")  # abort raises

    def wrap(self, handler: Any, full_method: str) -> Any:
        if handler is None or full_method in self._policy.open:
            return handler
        method = short_name(full_method)
        admit, admit_async, leave = self._admit, self._admit_async, self._admission.leave

        def call(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Any:
                who = admit(context, full_method)
                token = CALLER.set(who)
                try:
                    return fn(request, context)
                finally:
                    CALLER.reset(token)
                    leave(who, method)

            return run

        def acall(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Any) -> Any:
                who = await admit_async(context, full_method)
                token = CALLER.set(who)
                try:
                    return await fn(request, context)
                finally:
                    CALLER.reset(token)
                    leave(who, method)

            return run

        def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                who = admit(context, full_method)
                release = _once(lambda: leave(who, method))
                # gRPC does not close the response iterator of a cancelled call: the slot
                # is given back when the call ends, whatever happens to the generator.
                context.add_callback(release)
                it: Any = None
                try:
                    token = CALLER.set(who)
                    try:
                        it = iter(fn(request, context))
                    finally:
                        CALLER.reset(token)
                    while True:
                        token = CALLER.set(who)
                        try:
                            item = next(it, _END)
                        finally:
                            CALLER.reset(token)
                        if item is _END:
                            return
                        yield item
                finally:
                    if it is not None and hasattr(it, "close"):
                        token = CALLER.set(who)  # the handler's cleanup runs as its caller
                        try:
                            it.close()
                        finally:
                            CALLER.reset(token)
                    release()

            return run

        def astream(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def run(request: Any, context: Any) -> AsyncIterator[Any]:
                who = await admit_async(context, full_method)
                release = _once(lambda: leave(who, method))
                # aio closes the generator of a cancelled call only when it is collected:
                # the slot is given back when the call's task ends.
                context.add_done_callback(lambda _: release())
                it: Any = None
                try:
                    token = CALLER.set(who)
                    try:
                        it = fn(request, context).__aiter__()
                    finally:
                        CALLER.reset(token)
                    while True:
                        token = CALLER.set(who)
                        try:
                            item = await it.__anext__()
                        except StopAsyncIteration:
                            return
                        finally:
                            CALLER.reset(token)
                        yield item
                finally:
                    if it is not None:
                        token = CALLER.set(who)
                        try:
                            await it.aclose()
                        finally:
                            CALLER.reset(token)
                    release()

            return run

        return rewrap(handler, call=call, stream=stream, acall=acall, astream=astream)


_END = object()


def short_name(full_method: str) -> str:
    """A method's short name ("/pkg.Service/Method" -> "Method", at most 64 characters): what
    the limits count by and the log lines and refusals say."""
    return full_method.rsplit("/", 1)[-1][:64]


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """fn, run by the first call only (from whichever thread makes it)."""
    lock = threading.Lock()
    done = False

    def run() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        fn()

    return run
