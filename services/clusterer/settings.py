"""Settings of the clusterer service: the shared groups plus its own."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator
from typing_extensions import Self

from services.common.schema import SchemaSettings, check_federation
from services.common.settings import (
    OptionalPort,
    OptionalStr,
    ServiceConfig,
    ServiceSettings,
    Settings,
    TrainingSettings,
    choice,
)
from services.common.version import UNVERSIONED, parse
from services.core.catalog import CLUSTER_METHODS


class ClusteringSettings(Settings):
    """Where the aggregator is, how participants are clustered, TLS for edge participants."""

    aggregator: str = Field(
        "aggregator:50052",
        description="host:port of the aggregator",
        json_schema_extra={"env": "AGGREGATOR_ADDR"},
    )
    max_participants: int = Field(
        10_000, ge=1, description="members admitted at most; further joins: RESOURCE_EXHAUSTED"
    )
    cluster_method: Annotated[str, choice(CLUSTER_METHODS)] = Field(
        "hierarchical", description="how pre-training deltas are clustered"
    )
    min_cluster: int | None = Field(
        None,
        ge=1,
        le=1_000_000,
        description="clusters of fewer members are absorbed by the nearest (default: the "
        "fewest updates the strategy's rule runs on, 5 for flclustering, at most half of "
        "an even share of the participants; 1: none, to serve a smaller group on its own, "
        "undefended)",
    )
    participant_tokens: OptionalStr = Field(
        None,
        description="JSON {participant id: sha256 of its token's secret} (`flclustering "
        "tokens`): participants that cannot hold certificates authenticate with these",
    )
    tls_port: OptionalPort = Field(
        None,
        description="also serve server-side TLS here, for edge participants with tokens",
    )
    tls_cert: OptionalStr = Field(None, description="PEM certificate chain of the TLS port")
    tls_key: OptionalStr = Field(None, description="PEM private key of the TLS port")
    min_participant_version: str = Field(
        UNVERSIONED,
        description="the oldest participant release admitted; an older one is refused at "
        f"Join (FAILED_PRECONDITION, saying to upgrade); one that sends none is {UNVERSIONED}",
    )

    @field_validator("min_participant_version")
    @classmethod
    def _a_version(cls, value: str) -> str:
        parse(value)  # ValueError: pydantic names the flag
        return value


class ClustererConfig(ServiceConfig):
    """Everything the clusterer runs on; one frozen value built at start-up."""

    service: ServiceSettings = ServiceSettings(port=50051, metrics_port=9101, max_workers=256)
    training: TrainingSettings = TrainingSettings()
    clustering: ClusteringSettings = ClusteringSettings()
    sample: SchemaSettings = SchemaSettings()  # own data: what every participant must send

    @model_validator(mode="after")
    def _own_has_schema(self) -> Self:
        check_federation(self.federation.dataset, self.sample)
        return self

    @model_validator(mode="after")
    def _tls_complete(self) -> Self:
        c = self.clustering
        if c.tls_port is not None and not (c.tls_cert and c.tls_key):
            raise ValueError("--tls-port needs --tls-cert and --tls-key")
        return self
