"""Who may call each RPC: the one declaration every server's gate and the tests read.

Keyed by the gRPC full method name (`/package.Service/Method`) rather than by the
generated modules of services.common.pb, which sit above this package;
tests/unit/test_roles.py checks the table against the generated descriptors and the health
and reflection services, both ways: a method without a rule, or a rule for no method, fails.

A method missing here is refused to every caller (PERMISSION_DENIED, the Gate's deny by
default), so a new RPC is unreachable until its callers are written down here.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.transport.credentials import ROLES as ALL_ROLES

CLUSTERER_SERVICE = "flclustering.v1.Clusterer"
AGGREGATOR_SERVICE = "flclustering.v1.Aggregator"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
# What every server adds beside its own service (services.transport.server).
SHARED_SERVICES = (HEALTH_SERVICE, REFLECTION_SERVICE)

PARTICIPANT = frozenset({"participant"})
CLUSTERER = frozenset({"clusterer"})
OPERATOR = frozenset({"operator"})
CLUSTERER_OR_OPERATOR = frozenset({"clusterer", "operator"})
ANY_ROLE = frozenset(ALL_ROLES)  # any authenticated caller

HEALTH_CHECK = f"/{HEALTH_SERVICE}/Check"

# method -> the roles that may call it (the development token may call any method listed).
RULES: Mapping[str, frozenset[str]] = {
    # Participants call the participant RPCs (as themselves: the servicer checks ids);
    # status is for operators.
    f"/{CLUSTERER_SERVICE}/Join": PARTICIPANT,
    f"/{CLUSTERER_SERVICE}/GetTask": PARTICIPANT,
    f"/{CLUSTERER_SERVICE}/SubmitUpdate": PARTICIPANT,
    f"/{CLUSTERER_SERVICE}/ReportEvaluation": PARTICIPANT,
    f"/{CLUSTERER_SERVICE}/DownloadModel": PARTICIPANT,
    f"/{CLUSTERER_SERVICE}/GetStatus": OPERATOR,
    # Only the clusterer writes; it and operators read models and the status.
    f"/{AGGREGATOR_SERVICE}/ForwardUpdate": CLUSTERER,
    f"/{AGGREGATOR_SERVICE}/Aggregate": CLUSTERER,
    f"/{AGGREGATOR_SERVICE}/Rollback": CLUSTERER,
    f"/{AGGREGATOR_SERVICE}/GetModel": CLUSTERER_OR_OPERATOR,  # operators export the model
    f"/{AGGREGATOR_SERVICE}/GetAggregatorStatus": CLUSTERER_OR_OPERATOR,
    # Health checks are open (see OPEN). Watch, a stream that holds a thread while it
    # lasts, goes through the gate like every other call; reflection, which lists the
    # services and their messages, is for operators.
    HEALTH_CHECK: ANY_ROLE,
    f"/{HEALTH_SERVICE}/Watch": ANY_ROLE,
    f"/{HEALTH_SERVICE}/List": ANY_ROLE,  # grpcio's servicer answers UNIMPLEMENTED
    f"/{REFLECTION_SERVICE}/ServerReflectionInfo": OPERATOR,
}

# Methods the gate lets through without any credential: Kubernetes probes carry none.
OPEN: frozenset[str] = frozenset({HEALTH_CHECK})

# Limits every server adds to its own (by the method's short name, as the gate counts):
# the few threads streams of these may hold.
COMMON_PER_IDENTITY: Mapping[str, int] = {"Watch": 1}
COMMON_TOTAL: Mapping[str, int] = {"ServerReflectionInfo": 2, "Watch": 4}


def service_of(method: str) -> str:
    """The service a full method name belongs to ("/pkg.Service/Method" -> "pkg.Service")."""
    return method.lstrip("/").rsplit("/", 1)[0]


def rules_for(service: str) -> dict[str, frozenset[str]]:
    """The rules a server of `service` enforces: its own methods', health's and reflection's."""
    served = (service, *SHARED_SERVICES)
    return {method: roles for method, roles in RULES.items() if service_of(method) in served}
