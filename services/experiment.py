"""An experiment: the settings groups that define a federation run, shared by
`flclustering local` (in one process) and `flclustering simulate` (as services).

Both commands build their flags from these groups, and `simulate` hands them to the
processes it starts as one settings file, so the two run the same experiment.
"""

from __future__ import annotations

import math
import os
from typing import ClassVar

from pydantic import Field, model_validator
from typing_extensions import Self

from services.clusterer.settings import ClusteringSettings
from services.common.flags import Group
from services.common.schema import SchemaSettings, check_federation
from services.common.settings import (
    DefenceSettings,
    DevicesSettings,
    FederationSettings,
    OptionalCount,
    PaceSettings,
    PrivacySettings,
    Settings,
    TrainingSettings,
    TransportSettings,
    check_pace,
    check_privacy,
)
from services.participant.adversary import ATTACKS, AttackSettings
from services.participant.settings import DataSettings


class RunSettings(Settings):
    """Where the run trains and writes its results."""

    device: str = Field("auto", description="auto, cpu or cuda[:n] (participants' device)")
    out: str = Field("runs/local", description="directory of results.json, rounds.csv, plots")


MAX_PROCESSES = 8  # participant processes simulate starts unless --per-process says
PER_PROCESS_MAX = 125  # participants per process before another process is started


class HostingSettings(Settings):
    """How `flclustering simulate` hosts the federation on this machine."""

    per_process: OptionalCount = Field(
        None,
        description="participants hosted by each process, or 'auto': one process per "
        "core (at most 8: each imports its own torch), at least 10 participants each",
    )
    aggregator_port: int = Field(0, ge=0, le=65535, description="aggregator port (0: any free)")
    clusterer_port: int = Field(0, ge=0, le=65535, description="clusterer port (0: any free)")
    metrics: bool = Field(True, description="every service serves /metrics on a loopback port")
    serve: bool = Field(False, description="keep the services up after the last round")

    def hosted_per_process(self, participants: int, cores: int | None = None) -> int:
        """Participants per process: as asked, else one process per core, more when a
        process would host over PER_PROCESS_MAX, at most MAX_PROCESSES, and at least 10
        participants each.

        A process's participants train under one GIL, so processes beyond the cores add
        mostly their cost: seconds of CPU and about 500 MB each to import torch. On 2 cores
        the default 30 participants finish a simulate in 17.7 s in two processes against
        19.5 s in three (means of 7 paired runs, two faster in every pair). Large
        federations keep up to PER_PROCESS_MAX per process (the 1,000-participant run).
        """
        if self.per_process is not None:
            return self.per_process
        cores = cores or len(os.sched_getaffinity(0))
        wanted = max(cores, math.ceil(participants / PER_PROCESS_MAX))
        processes = max(1, min(MAX_PROCESSES, wanted))
        return max(10, math.ceil(participants / processes))


class ExperimentConfig(Settings):
    """Everything a run depends on; recorded with its results."""

    own_data: ClassVar[bool] = False  # whether the command can use --dataset own

    federation: FederationSettings = FederationSettings()
    training: TrainingSettings = TrainingSettings()
    defence: DefenceSettings = DefenceSettings()
    data: DataSettings = DataSettings()
    adversary: AttackSettings = AttackSettings()
    clustering: ClusteringSettings = ClusteringSettings()
    run: RunSettings = RunSettings()
    sample: SchemaSettings = SchemaSettings()
    privacy: PrivacySettings = PrivacySettings()
    pace: PaceSettings = PaceSettings()
    devices: DevicesSettings = DevicesSettings()

    @model_validator(mode="after")
    def _runnable(self) -> Self:
        if self.federation.dataset == "own" and not self.own_data:
            raise ValueError(
                "--dataset own is each owner's own data: start the services with it "
                "(docs/own-data.md); local, simulate, compare and centralised run on shards "
                "of a named dataset"
            )
        check_federation(self.federation.dataset, self.sample)
        check_privacy(self.federation, self.privacy)
        check_pace(self.federation, self.privacy, self.pace)
        if self.federation.rounds < 1 or self.federation.participants < 2:
            raise ValueError("a run needs --rounds of at least 1 and --participants of at least 2")
        if ATTACKS[self.adversary.attack].needs_he and self.federation.secure != "he":
            raise ValueError(
                f"--attack {self.adversary.attack} forges encrypted updates: add --secure he"
            )
        return self


class InitModelConfig(ExperimentConfig):
    """What `flclustering init-model` needs: the model, what a sample is, where to write."""

    own_data: ClassVar[bool] = True

    run: RunSettings = RunSettings(out="initial-model")


INIT_MODEL_GROUPS = (
    Group("federation", only=("model", "dataset", "seed")),
    Group("data", only=("data_dir",)),
    Group("sample"),
    Group("run", only=("out",)),
)


class SimulateConfig(ExperimentConfig):
    """An experiment and how `flclustering simulate` hosts it."""

    run: RunSettings = RunSettings(out="runs/simulate")
    transport: TransportSettings = TransportSettings()
    hosting: HostingSettings = HostingSettings()

    @model_validator(mode="after")
    def _services_can_simulate(self) -> Self:
        # Participant processes never see one another's updates: omniscient colluders are
        # simulated in one process only (`flclustering local`).
        why = self.adversary.services_refuse()
        if why:
            raise ValueError(why)
        return self


class CentralisedConfig(ExperimentConfig):
    """The centralised baseline: an experiment trained on pooled data."""

    run: RunSettings = RunSettings(out="runs/centralised")


class CompareConfig(ExperimentConfig):
    """The experiment `flclustering compare` runs with each strategy."""

    run: RunSettings = RunSettings(out="runs/compare")


class ExportConfig(ExperimentConfig):
    """What `flclustering export` needs: the model and dataset the services run (for the
    card), credentials, and where to write."""

    run: RunSettings = RunSettings(out="model")
    transport: TransportSettings = TransportSettings()
    own_data: ClassVar[bool] = True


EXPORT_GROUPS = (
    Group("federation", only=("model", "dataset")),
    Group("data", only=("data_dir", "download")),
    Group("transport", only=("tls_dir", "auth_token", "auth_token_file", "he_key")),
    Group("run", only=("out",)),
    Group("sample"),
)


# The settings file simulate writes for its processes carries these groups.
EXPERIMENT_GROUPS = (
    "federation",
    "training",
    "defence",
    "data",
    "adversary",
    "clustering",
    "privacy",
    "pace",
    "devices",
)

LOCAL_GROUPS = (
    Group("federation"),
    Group("training"),
    Group("defence"),
    Group("data"),
    Group("adversary"),
    Group("clustering", only=("cluster_method", "min_cluster")),
    Group("privacy"),
    Group("pace"),
    Group("devices"),
    Group("run"),
)
SIMULATE_GROUPS = (
    *LOCAL_GROUPS,
    Group("transport", only=("round_timeout_s", "eval_timeout_s", "pretrain_timeout_s")),
    Group("hosting"),
)
