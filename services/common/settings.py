"""Settings: one frozen, validated definition per group, shared by every command.

Each group is a pydantic model (frozen, unknown keys refused, NaN and infinities refused,
ranges declared on the field). A field's `description` is its `--help` line; its flag,
environment variable and choices are derived from it by `services.common.flags`, so a
setting is declared once and every CLI, settings file and Kubernetes ConfigMap reads the
same thing. A bad value is a ConfigError with one line naming the setting.

Why pydantic: it validates (types, ranges, NaN, choices) and reads and writes JSON in one
place; the flags are a thin table over its fields (see flags.py for why not a CLI library).
"""

from __future__ import annotations

import reprlib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from typing_extensions import Self

from services.core.catalog import DATASET_SHAPES, DATASETS, MODEL_NAMES, fits, is_reference
from services.core.errors import ConfigError
from services.core.schemes import normalised
from services.core.sensitivity import PRIVATE_RULES

if TYPE_CHECKING:
    from services.core.privacy import CentralNoise
from services.core.strategies import STRATEGIES


@dataclass(frozen=True)
class Choice:
    """A field whose value must be one of `names` (a registry's keys); shown in --help."""

    names: tuple[str, ...]

    def __call__(self, value: str) -> str:
        if value not in self.names:
            raise ValueError(f"{value!r} is not one of {', '.join(self.names)}")
        return value


def choice(names: Collection[str]) -> Any:
    """Annotation metadata restricting a str field to names."""
    return AfterValidator(Choice(tuple(names)))


def _none_words(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() in ("auto", "none", ""):
        return None
    return value


def _scheme(value: str) -> str:
    try:
        return normalised(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


def _model_name(value: str) -> str:
    if value in MODEL_NAMES or is_reference(value):
        return value
    raise ValueError(
        f"{cut(value)!r} is not one of {', '.join(MODEL_NAMES)}, nor package.module:factory"
    )


def _empty_none(value: Any) -> Any:
    return None if value == "" else value


def _csv_ints(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(int(p) for p in value.split(",") if p.strip())
    return value


def _metrics_port(value: Any) -> Any:
    """'0'/'off' disables metrics (None); 'auto' picks a free port (-1)."""
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("0", "", "off", "none"):
            return None
        if low == "auto":
            return -1
    if value == 0:
        return None
    return value


OptionalCount = Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(_none_words)]
OptionalPort = Annotated[Annotated[int, Field(ge=0, le=65535)] | None, BeforeValidator(_none_words)]
# Paths and secrets: only an empty value means unset (a token may well be "none").
OptionalStr = Annotated[str | None, BeforeValidator(_empty_none)]
IntList = Annotated[tuple[int, ...], BeforeValidator(_csv_ints)]


def _shape(value: tuple[int, ...]) -> tuple[int, ...]:
    if value and (len(value) != 3 or min(value) < 1):
        raise ValueError("must be three positive integers C,H,W")
    return value


Shape3 = Annotated[IntList, AfterValidator(_shape)]  # C,H,W, or empty: not given
MetricsPort = Annotated[
    Annotated[int, Field(ge=-1, le=65535)] | None, BeforeValidator(_metrics_port)
]
Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[float, Field(gt=0)]


def env_name(field: Any) -> str | None:
    """The explicit environment variable a field declares (json_schema_extra 'env')."""
    extra = field.json_schema_extra
    return extra.get("env") if isinstance(extra, dict) else None


def flag_of(name: str) -> str:
    """The flag of a field name."""
    return "--" + name.replace("_", "-")


_MAX_ERRORS = 5  # a run file may hold thousands of bad entries; the first few are enough
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 40, 40


def cut(value: Any, limit: int = 40) -> str:
    """A value from the user as at most `limit` characters (as str() shows it, for the
    short ones), without rendering a long one whole first (a string of megabytes, a list
    of a million items, an integer of a million digits)."""
    try:
        if isinstance(value, str | bytes | bytearray):
            text = str(value[:limit])
        elif isinstance(value, int) and value.bit_length() > 128:
            text = f"an integer of {value.bit_length():,} bits"
        elif isinstance(value, Mapping | list | tuple | set | frozenset):
            text = _SHORT.repr(value)
        else:
            text = str(value)
    except (ValueError, RecursionError):  # a huge integer inside a collection
        text = f"a {type(value).__name__}"
    return text[:limit]


def one_line(exc: ValidationError, where: Callable[[tuple[str, ...]], str] | None = None) -> str:
    """A pydantic error as one readable line naming each bad setting: by `where(loc)` when
    given (a flag, a variable, a settings file), else by the field's flag. Every value is
    cut before it is shown (a run file's value may be a megabyte), and at most _MAX_ERRORS
    errors are listed."""
    errors = exc.errors(include_url=False, include_context=False)
    parts = []
    for err in errors[:_MAX_ERRORS]:
        loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
        msg = cut(err["msg"].removeprefix("Value error, "), 200)
        if not loc:
            parts.append(msg)
            continue
        got = err.get("input")
        shown = "" if isinstance(got, Mapping) or got is None else f" (got {cut(got)!r})"
        parts.append(f"{where(loc) if where else flag_of(loc[-1])}: {msg}{shown}")
    if len(errors) > _MAX_ERRORS:
        parts.append(f"and {len(errors) - _MAX_ERRORS:,} more")
    return "; ".join(parts)


class Settings(BaseModel):
    """Base of every settings group: frozen, strict about keys, NaN refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def build(cls, **data: Any) -> Self:
        """Validate data into settings; a bad value is one ConfigError line naming it.

        (Not an __init__ override: pydantic would call that for nested groups too and lose
        where in the model the bad value sits.)
        """
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(one_line(exc)) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with some settings changed, validated again.

        A key is a field of this model (a dict for a group merges into it) or, on a model of
        groups, a field of exactly one of its groups: `config.replace(port=0, rounds=3)`.
        """
        data = self.model_dump()
        fields = type(self).model_fields
        for key, value in changes.items():
            current = getattr(self, key, None) if key in fields else None
            if isinstance(current, Settings) and isinstance(value, Mapping):
                data[key] = {**data[key], **value}
            elif key in fields:
                data[key] = value
            else:
                owners = [
                    g
                    for g in fields
                    if isinstance(getattr(self, g), Settings)
                    and key in type(getattr(self, g)).model_fields
                ]
                if len(owners) != 1:
                    raise ConfigError(f"{type(self).__name__} has no single setting {key!r}")
                data[owners[0]][key] = value
        return type(self).build(**data)


class FederationSettings(Settings):
    """What the federation trains, with how many participants, for how long."""

    strategy: Annotated[str, choice(STRATEGIES)] = Field(
        "flclustering", description="how updates become the next global model"
    )
    model: Annotated[str, AfterValidator(_model_name)] = Field(
        "cnn",
        description=f"model architecture: {', '.join(MODEL_NAMES)}, or a user's "
        "package.module:factory (imported by participants, never by the aggregator)",
    )
    dataset: Annotated[str, choice(DATASETS)] = Field(
        "digits", description="dataset (sets the model's input shape and classes)"
    )
    participants: int = Field(30, ge=1, description="participants in the federation")
    rounds: int = Field(30, ge=0, description="global rounds to run")
    select: int = Field(15, ge=1, description="participants selected per round")
    clusters: OptionalCount = Field(
        3, description="number of clusters k, or 'auto' to choose it from the deltas"
    )
    eval_per_cluster: int = Field(
        5, ge=1, description="members per cluster that evaluate the model for the q-weights"
    )
    min_share: float = Field(
        0.5, gt=0, le=1, description="share of selected updates a round needs to be aggregated"
    )
    eval_sample: int = Field(
        1000,
        ge=0,
        description="participants that evaluate each new global model: all up to this many, "
        "else a seeded sample of this many, stratified by cluster (0: always all)",
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="seed of w0, partitions, selection and clustering"
    )
    personalise: bool = Field(
        False,
        description="per-cluster models: each cluster trains and serves its own model (its "
        "robust rule makes it), the global model is their fair merge (clustered strategies)",
    )
    compression: Annotated[str, AfterValidator(_scheme)] = Field(
        "none",
        description="what participants upload: none (float32 weights), or their delta as "
        "fp16, int8 (a scale per tensor, stochastic rounding) or topk:FRACTION (the largest "
        "coordinates, the rest carried to the next round)",
    )
    guard: bool = Field(
        True,
        description="the divergence guard: the aggregator refuses a merge whose weights grow "
        "100-fold or whose step is 50 times the recent ones, and a new model whose accuracy "
        "collapses for most evaluators (down 0.5, to under a quarter) is rolled back "
        "(non-finite models are always refused; false: the rules alone, as the published "
        "comparisons run them)",
    )
    secure: Annotated[str, choice(("none", "he"))] = Field(
        "none",
        description="none, or he: participants upload CKKS-encrypted weights (keys from "
        "flclustering he-keys), the aggregator adds ciphertexts it cannot read; fedavg only "
        "(no defence runs on ciphertexts)",
    )

    @model_validator(mode="after")
    def _he_is_fedavg(self) -> Self:
        """What a sum of ciphertexts can compute: FedAvg of full weights."""
        if self.secure == "he":
            if self.strategy != "fedavg":
                raise ValueError(
                    f"--secure he computes FedAvg on ciphertexts: use --strategy fedavg, not "
                    f"{self.strategy} (robust rules cannot run on what they cannot read)"
                )
            if self.compression != "none":
                raise ValueError("--secure he encrypts full weights: use --compression none")
        return self

    @model_validator(mode="after")
    def _personalise_needs_clusters(self) -> Self:
        if self.personalise and STRATEGIES[self.strategy].grouping != "clusters":
            clustered = [n for n, s in STRATEGIES.items() if s.grouping == "clusters"]
            raise ValueError(
                f"--personalise needs a clustered strategy ({', '.join(clustered)}), "
                f"not {self.strategy}"
            )
        return self

    @model_validator(mode="after")
    def _model_fits_dataset(self) -> Self:
        """A model that cannot read the dataset (a CNN on synthetic's 60 features) fails at
        start-up, not when the aggregator builds w0."""
        known = DATASET_SHAPES.get(self.dataset)
        if known is not None and not fits(self.model, known[0]):
            ok = [m for m in MODEL_NAMES if fits(m, known[0])]
            raise ValueError(
                f"--model {self.model} does not fit --dataset {self.dataset} (feature vectors, "
                f"not images): use {', '.join(ok)}"
            )
        return self


class TrainingSettings(Settings):
    """Local SGD of every participant, and the pre-training that clustering groups."""

    local_epochs: int = Field(2, ge=1, description="local epochs per round")
    batch_size: int = Field(32, ge=1, description="mini-batch size")
    lr: float = Field(0.05, gt=0, description="learning rate of round 0")
    lr_decay: float = Field(0.99, gt=0, le=1, description="learning-rate decay per round")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    pre_steps: int = Field(20, ge=1, description="mini-batch steps of pre-training")
    adjusted: bool = Field(
        True, description="sample adjustment: the same pre-training steps for every participant"
    )

    def lr_at(self, round_: int) -> float:
        """Learning rate of a global round (the seed's exponential decay)."""
        return self.lr * self.lr_decay ** max(0, round_)


class DefenceSettings(Settings):
    """How hard the aggregator defends and how fair its merge is."""

    q: float = Field(0.5, ge=0, description="fairness exponent of the q-weighted merge")
    byzantine_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="share of attackers the robust rule assumes per cluster"
    )
    norm_factor: float = Field(
        3.0,
        gt=1,
        description="reject deltas longer than this times the round's median "
        "(lengths per declared sample)",
    )
    cluster_factor: float = Field(
        3.0, gt=1, description="drop cluster deltas longer than this times their median"
    )
    twin_factor: float = Field(
        0.03,
        gt=0,
        lt=1,
        description="reject deltas closer to another than this times the round's median "
        "distance between deltas (colluders sending one crafted delta)",
    )
    direction_check: bool = Field(
        False,
        description="drop a cluster delta that points against the round's robust centre "
        "(negative cosine): a cluster tipped by colluders",
    )
    clip_median: bool = Field(
        False,
        description="clip every update to the round's median update length before the "
        "defence (FLAME's clipping; central DP clips to --dp-clip instead)",
    )
    recentre: bool = Field(
        False,
        description="clip every cluster delta towards the round's robust centre, to the "
        "median cluster's distance from it",
    )
    mixing: bool = Field(
        False,
        description="nearest-neighbour mixing: each update replaced by the mean of its n - f "
        "nearest before the robust rule (keeps honest but different updates)",
    )


OptionalFraction = Annotated[
    Annotated[float, Field(gt=0, lt=1)] | None, BeforeValidator(_none_words)
]
OptionalPositive = Annotated[Annotated[float, Field(gt=0)] | None, BeforeValidator(_none_words)]


class PrivacySettings(Settings):
    """Differential privacy: central (the aggregator clips and noises the merge) or local
    (each participant trains with DP-SGD), with an accountant and a budget."""

    dp: Annotated[str, choice(("off", "central", "local"))] = Field(
        "off",
        description="off; central: participant-level DP, every update clipped to --dp-clip, "
        "Poisson selection and Gaussian noise on the merge; local: each participant trains "
        "with DP-SGD (per-sample clipping and noise, Opacus) and keeps its own epsilon",
    )
    dp_noise: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="noise multiplier z: the noise's standard deviation over the sensitivity "
        "(central: of the merge; local: of a batch's summed, clipped gradients)",
    )
    dp_clip: float = Field(
        1.0,
        gt=0,
        le=1e6,
        description="L2 bound C (central: of each update, the first round's when adaptive; "
        "local: of each example's gradient)",
    )
    dp_clip_quantile: OptionalFraction = Field(
        None,
        description="central: adapt the bound each round towards this quantile of the update "
        "norms, privately (Andrew et al. 2021; 0.5 is theirs); none: a fixed bound",
    )
    dp_clip_lr: float = Field(
        0.2, gt=0, le=10, description="central, adaptive: the bound's geometric step size"
    )
    dp_count_noise: OptionalPositive = Field(
        None,
        description="central, adaptive: noise of the count of updates within the bound "
        "(none: a twentieth of the expected updates per round, as Andrew et al.)",
    )
    dp_delta: float = Field(1e-5, gt=0, le=0.01, description="the delta epsilon is reported at")
    dp_epsilon: OptionalPositive = Field(
        None,
        description="budget: training stops before a round that would spend more than this "
        "epsilon (central: the federation; local: each participant); none: no budget",
    )

    @property
    def central(self) -> bool:
        return self.dp == "central"

    @property
    def local(self) -> bool:
        return self.dp == "local"

    def mechanism(self, clip: float, expected: Mapping[int, float], generator: Any) -> CentralNoise:
        """A round's central mechanism with these settings: the bound where adaptive
        clipping left it (`clip`), the clusters' expected counts and the noise's torch
        generator (the count noise defaults to a twentieth of the expected updates)."""
        from services.core.privacy import CentralNoise  # torch: only where DP runs

        count_noise = None
        if self.dp_clip_quantile is not None:
            count_noise = self.dp_count_noise or sum(expected.values()) / 20
        return CentralNoise(
            clip,
            self.dp_noise,
            dict(expected),
            generator,
            self.dp_clip_quantile,
            self.dp_clip_lr,
            count_noise,
        )

    @model_validator(mode="after")
    def _adaptive_is_central(self) -> Self:
        if self.dp != "central" and self.dp_clip_quantile is not None:
            raise ValueError("--dp-clip-quantile adapts the central bound: use --dp central")
        return self


class PaceSettings(Settings):
    """How rounds are paced: synchronous, or asynchronous buffered aggregation.

    Synchronous rounds can over-select; asynchronous ones (FedBuff-style) wait for no
    round's slowest device."""

    mode: Annotated[str, choice(("sync", "async"))] = Field(
        "sync",
        description="sync: rounds that wait for the selected (or --round-timeout-s); async: "
        "participants train continuously on the newest model, each cluster's updates are "
        "buffered and every full buffer makes a new version",
    )
    over_select: float = Field(
        0.0,
        ge=0,
        le=4,
        description="sync: select this share more than --select and close the round at the "
        "first --select updates (stragglers' updates are not waited for)",
    )
    buffer_size: OptionalCount = Field(
        None,
        description="async: updates a cluster's buffer holds before it is aggregated, or "
        "'auto': the fewest its robust rule runs on (Krum: more than 2f+2), at least 5",
    )
    max_staleness: int = Field(
        32,
        ge=0,
        le=1000,
        description="async: an update trained from a version more than this many versions "
        "old is refused (the aggregator keeps this many versions to compute deltas: spilled "
        "to files under --memory-budget-mb); with speeds spanning 10x the slowest devices' "
        "updates arrived 22 to 32 versions late on 30 participants in 3 clusters",
    )
    eval_every: int = Field(
        5,
        ge=1,
        description="async: every this many versions the evaluation sample (--eval-sample) "
        "evaluates the newest model; its mean is the history's accuracy",
    )

    @property
    def asynchronous(self) -> bool:
        return self.mode == "async"


class DevicesSettings(Settings):
    """Simulated device heterogeneity, in simulate and local.

    How much slower some participants are, and how often one drops out of a task."""

    speed_spread: float = Field(
        1.0,
        ge=1,
        le=1000,
        description="participants' slowness factors are drawn log-uniformly from [1, this] "
        "(seeded by --seed): a participant waits (factor - 1) times its measured compute "
        "time after training; 1: all alike",
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="probability that a participant drops a task: it trains but never "
        "uploads (a device that went away)",
    )


def check_pace(fed: FederationSettings, privacy: PrivacySettings, pace: PaceSettings) -> None:
    """The combinations paced rounds are defined for (one ValueError line each)."""
    if pace.over_select > 0 and privacy.central:
        raise ValueError(
            "--over-select with --dp central: Poisson sampling decides who trains (and the "
            "accountant counts on it); use one"
        )
    if not pace.asynchronous:
        return
    if pace.over_select > 0:
        raise ValueError("--over-select closes synchronous rounds early: use it with --mode sync")
    if privacy.central:
        raise ValueError(
            "--mode async with --dp central: the accountant counts Poisson-sampled rounds, "
            "which buffered aggregation does not have; use --dp local or --mode sync"
        )
    if fed.secure == "he":
        raise ValueError("--mode async with --secure he is not built: choose one")
    if fed.personalise:
        raise ValueError("--mode async keeps one global model: --personalise is not covered")
    strategy = STRATEGIES[fed.strategy]
    if strategy.grouping == "each" or strategy.needs_losses:
        raise ValueError(
            f"--mode async merges clusters' buffers: --strategy {fed.strategy} is not covered"
        )


class TransportSettings(Settings):
    """Credentials, size limits and deadlines of the calls between services."""

    tls_dir: OptionalStr = Field(
        None,
        description="mutual TLS on every link: directory with ca.crt and this party's "
        "NAME.crt/NAME.key (or tls.crt/tls.key), as `flclustering certs` writes them",
    )
    he_key: OptionalStr = Field(
        None,
        description="--secure he: the CKKS context file from flclustering he-keys "
        "(participants he-secret.ctx, the aggregator he-public.ctx; default: that file in "
        "--tls-dir)",
    )
    auth_token: OptionalStr = Field(
        None,
        description="DEVELOPMENT ONLY: one shared bearer token for every party (no "
        "per-party identity); use --tls-dir in deployments",
    )
    auth_token_file: OptionalStr = Field(
        None, description="read the bearer token from this file (wins over --auth-token)"
    )
    max_update_bytes: int = Field(2 << 30, ge=1, description="largest model stream accepted")
    round_timeout_s: Positive = Field(120.0, description="seconds a round waits for updates")
    eval_timeout_s: Positive = Field(60.0, description="seconds a round waits for evaluations")
    pretrain_timeout_s: Positive = Field(
        300.0, description="seconds to wait for pre-training deltas"
    )
    liveness_s: Positive = Field(
        60.0, description="a participant unheard of for this long is not selected"
    )
    poll_cap_s: Positive = Field(20.0, description="longest GetTask long poll the server holds")
    stream_idle_s: Positive = Field(
        30.0, description="an upload stream silent this long is cut (its sender stalled)"
    )
    stream_max_s: Positive = Field(3600.0, description="an upload stream open this long is cut")

    def token(self) -> str | None:
        """The token from the file (read now) or the flag; a bad file is one ConfigError."""
        if self.auth_token_file:
            try:
                with open(self.auth_token_file, encoding="utf-8") as fh:
                    token = fh.read().strip()
            except OSError as exc:
                raise ConfigError(
                    f"--auth-token-file {self.auth_token_file}: {exc.strerror}"
                ) from None
            if not token:
                raise ConfigError(f"--auth-token-file {self.auth_token_file} is empty")
            return token
        return self.auth_token or None


class ServiceSettings(Settings):
    """Where a process listens, exports metrics and keeps its state."""

    host: str = Field("0.0.0.0", description="address the gRPC server binds")
    port: Port = Field(0, description="gRPC port (0 picks a free one)")
    metrics_host: str = Field("0.0.0.0", description="address /metrics binds")
    metrics_port: MetricsPort = Field(
        None, description="port of /metrics; 0 disables, auto picks a free one"
    )
    ready_file: OptionalStr = Field(
        None, description="write the bound addresses as JSON here once serving"
    )
    health_port: OptionalPort = Field(
        None,
        description="also serve only the health service here, in plain text and on its own "
        "threads (Kubernetes' gRPC probes present no client certificate)",
    )
    grace_s: float = Field(10.0, ge=0, description="seconds in-flight calls get on SIGTERM")
    max_workers: int = Field(16, ge=1, description="gRPC server threads")
    state_dir: OptionalStr = Field(
        None, description="keep state here and resume from it after a restart"
    )
    log_level: Annotated[str, BeforeValidator(lambda v: str(v).upper())] = Field(
        "INFO",
        pattern="^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$",
        description="log level",
        json_schema_extra={"env": "FLCLUSTERING_LOG_LEVEL"},
    )


class ServiceConfig(Settings):
    """The groups every service process runs on: where it listens, how it calls the
    others, and the federation. Each service's config adds its own groups and sets its
    own listening defaults by declaring `service` again (the field keeps its place)."""

    service: ServiceSettings = ServiceSettings()
    transport: TransportSettings = TransportSettings()
    federation: FederationSettings = FederationSettings()
    privacy: PrivacySettings = PrivacySettings()
    pace: PaceSettings = PaceSettings()

    @model_validator(mode="after")
    def _private(self) -> Self:
        check_privacy(self.federation, self.privacy)
        check_pace(self.federation, self.privacy, self.pace)
        return self


def check_privacy(fed: FederationSettings, privacy: PrivacySettings) -> None:
    """The combinations differential privacy is defined for (one ValueError line each)."""
    if privacy.dp == "off":
        return
    if fed.secure == "he":
        raise ValueError(
            f"--dp {privacy.dp} with --secure he needs noise added before encryption "
            "(distributed DP, docs/privacy.md): not built; choose one"
        )
    if privacy.dp == "local" and STRATEGIES[fed.strategy].needs_losses:
        raise ValueError(
            f"--dp local: --strategy {fed.strategy} asks each participant for its loss on "
            "its training data, which DP-SGD does not cover; choose another"
        )
    if privacy.dp != "central":
        return

    def covered(name: str) -> bool:
        s = STRATEGIES[name]
        return s.rule in PRIVATE_RULES and s.grouping != "each" and s.merge != "qffl"

    if not covered(fed.strategy):
        raise ValueError(
            f"--dp central has a derived sensitivity for "
            f"{', '.join(n for n in STRATEGIES if covered(n))}, not {fed.strategy} "
            "(docs/privacy.md)"
        )
    if fed.personalise:
        raise ValueError("--dp central releases one merged model: --personalise is not covered")
