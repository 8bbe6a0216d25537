"""The access rules (services/transport/roles.py) against the methods that exist, and the
gate's deny by default."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import services.common.pb.flclustering.v1 as generated
from services.aggregator.server import policy as aggregator_policy
from services.clusterer.server import policy as clusterer_policy
from services.transport.auth import Authenticator
from services.transport.credentials import ROLES
from services.transport.gate import Policy
from services.transport.roles import (
    AGGREGATOR_SERVICE,
    CLUSTERER_SERVICE,
    OPEN,
    RULES,
    SHARED_SERVICES,
    rules_for,
    service_of,
)
from services.transport.server import new_aio_server, new_server
from services.transport.tls import bind


def _descriptors() -> Iterator[Any]:
    """Every generated module's file descriptor (a new .proto is found without a change
    here), and those of the health and reflection services every server adds."""
    for info in pkgutil.iter_modules(generated.__path__):
        if info.name.endswith("_pb2"):
            yield importlib.import_module(f"{generated.__name__}.{info.name}").DESCRIPTOR
    yield health_pb2.DESCRIPTOR
    yield reflection_pb2.DESCRIPTOR


def _methods() -> set[str]:
    """Every method served, by its full name."""
    return {
        f"/{service.full_name}/{method.name}"
        for descriptor in _descriptors()
        for service in descriptor.services_by_name.values()
        for method in service.methods
    }


def test_the_descriptors_are_found():
    methods = _methods()
    assert f"/{CLUSTERER_SERVICE}/Join" in methods
    assert f"/{AGGREGATOR_SERVICE}/ForwardUpdate" in methods
    assert "/grpc.health.v1.Health/Check" in methods


def test_every_method_has_a_rule():
    missing = sorted(_methods() - RULES.keys())
    assert not missing, f"no rule in services/transport/roles.py for {missing}"


def test_every_rule_names_a_method():
    unknown = sorted(RULES.keys() - _methods())
    assert not unknown, f"rules for methods no .proto declares: {unknown}"


def test_rules_name_known_roles_and_open_methods_have_rules():
    for method, roles in RULES.items():
        assert roles, f"{method}: a rule allows at least one role"
        assert roles <= set(ROLES), f"{method}: unknown role in {sorted(roles)}"
    assert OPEN.issubset(RULES)


def test_each_server_enforces_the_rules_of_what_it_serves():
    for service, policy in (
        (AGGREGATOR_SERVICE, aggregator_policy(64)),
        (CLUSTERER_SERVICE, clusterer_policy(64)),
    ):
        assert dict(policy.roles) == rules_for(service)
        served = {service_of(m) for m in policy.roles}
        assert served == {service, *SHARED_SERVICES}


# ---- deny by default, over a real server -------------------------------------------------

DECLARED = "/test.Echo/Declared"
UNDECLARED = "/test.Echo/Undeclared"


def _echo_sync(request: bytes, context: Any) -> bytes:
    return request


async def _echo_async(request: bytes, context: Any) -> bytes:
    return request


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_method_without_a_rule_is_denied_to_every_caller(kind):
    # No credentials configured: every caller is the development identity, which may call
    # any method that has a rule, and still none without one.
    auth = Authenticator(open_=True)
    policy = Policy(roles={DECLARED: frozenset({"operator"})})
    echo = _echo_sync if kind == "sync" else _echo_async
    handlers = {
        "Declared": grpc.unary_unary_rpc_method_handler(echo),
        "Undeclared": grpc.unary_unary_rpc_method_handler(echo),
    }
    server: Any = new_server(2, auth, policy) if kind == "sync" else new_aio_server(2, auth, policy)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = bind(server, "127.0.0.1", 0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary(DECLARED)(b"hi", timeout=10) == b"hi"
            with pytest.raises(grpc.RpcError) as refused:
                channel.unary_unary(UNDECLARED)(b"hi", timeout=10)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no rule" in refused.value.details()
    finally:
        server.stop(None).wait()
