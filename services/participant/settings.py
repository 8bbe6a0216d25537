"""Settings of a participant process: the shared groups plus its data and its own."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator
from typing_extensions import Self

from services.common.flags import Group, SettingsParser
from services.common.schema import SchemaSettings, check_federation
from services.common.settings import (
    DevicesSettings,
    IntList,
    OptionalStr,
    ServiceConfig,
    Settings,
    choice,
)
from services.participant.adversary import AttackSettings
from services.participant.partition import PARTITION_CHOICES


class DataSettings(Settings):
    """Where the data lives and how it is split among participants."""

    data_dir: str = Field(
        "data",
        description="directory of the dataset files; --dataset own: this participant's own "
        "data (an image folder, IDX or CIFAR files, a CSV or Parquet table, a datasets folder)",
    )
    loader_workers: int = Field(
        2, ge=0, le=32, description="own images: processes that read and transform them"
    )
    download: bool = Field(True, description="download a missing dataset into --data-dir")
    partition: Annotated[str, choice(PARTITION_CHOICES)] = Field(
        "auto",
        description="how the data is split among participants (auto: natural for synthetic, "
        "practical-noniid otherwise)",
    )
    groups: int = Field(
        3, ge=1, description="ground-truth groups of practical-noniid and rotated-groups"
    )
    group_sizes: IntList | None = Field(
        None,
        description="participants per ground-truth group, e.g. 20,8,2 (sets the number of "
        "groups; practical-noniid and rotated-groups)",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration of the dirichlet split")
    synthetic_alpha: float = Field(
        1.0, ge=0, description="synthetic: spread of the participants' models, u_k ~ N(0, alpha)"
    )
    synthetic_beta: float = Field(
        1.0, ge=0, description="synthetic: spread of the participants' features, B_k ~ N(0, beta)"
    )


class ParticipantSettings(Settings):
    """Which participants this process hosts, against which clusterer, on which device."""

    clusterer: str = Field(
        "clusterer:50051",
        description="host:port of the clusterer",
        json_schema_extra={"env": "CLUSTERER_ADDR"},
    )
    index: int = Field(0, ge=0, description="index of the (first) hosted participant")
    count: int = Field(1, ge=1, description="host this many participants (index, index+1, ...)")
    device: str = Field("auto", description="auto, cpu or cuda[:n]")
    poll_wait_s: float = Field(10.0, gt=0, le=300, description="seconds a task poll waits")
    retry_budget_s: float = Field(
        900.0, gt=0, description="seconds to keep retrying an unreachable clusterer, then fail"
    )
    attack_indices: IntList | None = Field(
        None, description="SIMULATION ONLY: hosted indices that attack (none given: every one)"
    )
    tls_ca: OptionalStr = Field(
        None, description="PEM CA certificate: connect to the clusterer over TLS"
    )
    tls_server_name: OptionalStr = Field(
        None, description="name the clusterer's certificate is issued for, if not its address"
    )
    linger: bool = Field(
        False, description="after the federation is done keep serving /metrics until SIGTERM"
    )


class ParticipantConfig(ServiceConfig):
    """Everything a participant process runs on."""

    data: DataSettings = DataSettings()
    adversary: AttackSettings = AttackSettings()
    participant: ParticipantSettings = ParticipantSettings()
    sample: SchemaSettings = SchemaSettings()
    devices: DevicesSettings = DevicesSettings()  # simulated heterogeneity (simulate)

    @model_validator(mode="after")
    def _own_data(self) -> Self:
        check_federation(self.federation.dataset, self.sample)
        if self.federation.dataset == "own":
            if self.participant.count != 1:
                raise ValueError("--dataset own: one participant per process (--count 1)")
            if self.adversary.attack != "none":
                raise ValueError(
                    "--attack is a simulation, over shards of a named dataset; not with "
                    "--dataset own"
                )
        return self

    @model_validator(mode="after")
    def _attack_simulable(self) -> Self:
        # A participant process sees its own colluders' updates only, never the others'.
        why = self.adversary.services_refuse()
        if why:
            raise ValueError(why)
        return self

    @model_validator(mode="after")
    def _hosted_within_federation(self) -> Self:
        p = self.participant
        if p.index + p.count > self.federation.participants:
            raise ValueError(
                f"--index {p.index} --count {p.count} must lie within "
                f"--participants {self.federation.participants}"
            )
        return self


DESCRIPTION = "`python -m services.participant`: one or several participants against a clusterer."
# The participant's flags (here, apart from its torch-importing __main__, so that simulate
# can read every service's flags cheaply).
GROUPS = (
    Group(
        "service",
        "PARTICIPANT_",
        # state_dir: --dp local keeps each participant's privacy ledger there.
        only=("metrics_host", "metrics_port", "ready_file", "state_dir", "log_level"),
    ),
    Group("transport", only=("tls_dir", "auth_token", "auth_token_file", "he_key")),
    # strategy: only to check --secure he against it (encrypted updates are FedAvg's).
    Group("federation", only=("model", "dataset", "participants", "seed", "strategy", "secure")),
    Group("data"),
    # Every attack setting but who attacks (the share and the placement are the
    # federation's: simulate draws them and passes --attack-indices).
    Group(
        "adversary",
        "PARTICIPANT_",
        only=(
            "attack",
            "attack_factor",
            "attack_every",
            "attack_z",
            "attack_epsilon",
            "attack_perturbation",
            "attack_lie",
            "attack_target",
            "attack_poison_share",
            "attack_boost",
            "attack_norm_bound",
            "attack_jitter",
            "attack_fit",
        ),
    ),
    Group("participant", "PARTICIPANT_"),
    Group("sample"),
    Group("privacy", only=("dp", "dp_noise", "dp_clip", "dp_delta", "dp_epsilon")),
    Group("devices"),
)


def parser() -> SettingsParser:
    """The participant's flags, from its settings groups."""
    return SettingsParser.command(
        "python -m services.participant", DESCRIPTION, ParticipantConfig, GROUPS
    )
