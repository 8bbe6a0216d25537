"""Who attacks, how and when (simulations only): the registry of attacks, their settings and
the draw of attackers.

Apart from the attacks' hooks (services.participant.attacks.Attack and its subclasses, over
tensors), so that the settings and `flclustering simulate` do not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import Field

from services.common.settings import Settings, choice
from services.core.errors import ConfigError
from services.core.registry import Registry

# What stops a forged encrypted update is the participants' verdicts and the rollback.
_ROLLBACK = "participants refuse the model, the clusterer rolls it back"
_A = "services.participant.attacks"


@dataclass(frozen=True)
class Registered:
    """An attack as the settings know it, before torch is imported: where its `Attack`
    class lives (built by `services.participant.attacks.build_attack` when a participant
    starts) and what the settings, `flclustering local` and `simulate` must know of it."""

    factory: str  # "module:Class", the class of its hooks (services.participant.attacks.Attack)
    every_round: bool = False  # fires every round by default (else every LOUD_EVERY-th)
    data: bool = False  # a data attack: fires in every round, whatever --attack-every
    needs_he: bool = False  # forges encrypted updates: --secure he only
    # Simulated by the services only (`flclustering local` refuses it): why, or "".
    needs_services: str = ""


# THE registry of attacks: the one source of the --attack choices (in this order) and of
# the class `build_attack` makes for each. Adding an attack: its class (in one of the
# modules named here, or a new one), its line here, its test (docs/contributing.md).
ATTACKS: Registry[Registered] = Registry(
    "attack",
    {
        "none": Registered(f"{_A}:NoAttack"),
        "scaling": Registered(f"{_A}:Scaling"),
        "label-flip": Registered(f"{_A}:LabelFlip", data=True),
        "sign-flip": Registered(f"{_A}:SignFlip"),
        "gaussian": Registered(f"{_A}:Gaussian"),
        "same-value": Registered(f"{_A}:SameValue"),
        # Colluders craft one delta from their honest ones (services/participant/
        # collusion.py): small steps, close to the honest updates, every round by default.
        # cluster-steering also crafts the pre-training delta (to be clustered together)
        # and lies.
        "alie": Registered("services.participant.collusion:Alie", every_round=True),
        "ipm": Registered("services.participant.collusion:Ipm", every_round=True),
        "min-max": Registered("services.participant.collusion:MinMax", every_round=True),
        "min-sum": Registered("services.participant.collusion:MinSum", every_round=True),
        "cluster-steering": Registered(
            "services.participant.collusion:ClusterSteering", every_round=True
        ),
        # Defence-aware (adaptive): the colluders run the defence in their heads and send
        # the strongest delta it keeps; adaptive-steering also lands its pre-training delta
        # where the clustering groups it with honest participants, and lies.
        "adaptive": Registered("services.participant.collusion:Adaptive", every_round=True),
        "adaptive-steering": Registered(
            "services.participant.collusion:AdaptiveSteering", every_round=True
        ),
        "backdoor": Registered("services.participant.backdoor:Backdoor", every_round=True),
        "lying-evaluation": Registered(f"{_A}:LyingEvaluation"),
        # --secure he only: an update the aggregator cannot read and so cannot screen.
        # he-forged-key encrypts under a key of the attacker's own, tagged with the
        # federation's key (the sum decrypts to noise); he-huge encrypts values near CKKS's
        # range under the right key. Participants refuse the model either makes; the
        # clusterer rolls it back (services/participant/forging.py).
        "he-forged-key": Registered(
            "services.participant.forging:ForgedKey",
            every_round=True,
            needs_he=True,
            needs_services=_ROLLBACK,
        ),
        "he-huge": Registered(
            "services.participant.forging:Huge",
            every_round=True,
            needs_he=True,
            needs_services=_ROLLBACK,
        ),
    },
)
PLACEMENTS = ("per-group", "random")
PERTURBATIONS = ("std", "unit", "sign")  # min-max / min-sum: the direction from the mean
# What colluders know: their own honest deltas (own), or every honest update of the round and
# the defence's settings (omniscient: the literature's standard, `flclustering local` only).
KNOWLEDGE = ("own", "omniscient")
OMNISCIENT_LOCAL_ONLY = (
    "--attack-knowledge omniscient: the attackers see every participant's update of the "
    "round, which only flclustering local can simulate (a participant process never sees "
    "another's update); use --attack-knowledge own"
)
LOUD_EVERY = 5  # model attacks that a norm screen sees fire every 5th round by default


@dataclass(frozen=True)
class AttackConfig:
    """Which attack, how strong, and in which rounds."""

    kind: str = "none"
    factor: float = -1.0  # scaling: weights times factor; the research code sends -w
    every: int = 5  # model attacks fire in rounds r with (r + 1) % every == 0
    noise_std: float = 1.0  # gaussian
    value: float = 0.0  # same-value: every weight set to this
    flip_from: int = 0  # label flip: this class is relabelled as flip_to
    flip_to: int = 9
    z: float | None = None  # alie: None derives z from the round's size and the colluders
    epsilon: float = 0.1  # ipm: the colluders send -epsilon times their mean delta
    perturbation: str = "std"  # min-max, min-sum: the direction away from the mean
    lie: float = 0.0  # lying-evaluation, cluster-steering: the accuracy always reported
    target: int = 0  # backdoor: triggered inputs are to be classified as this class
    poison_share: float = 0.5  # backdoor: share of other classes' samples copied triggered
    boost: float | None = None  # backdoor: delta times this (None: the round's n, eta = 1)
    norm_bound: float = 2.0  # backdoor: at most this times the unboosted delta's length
    jitter: float = 0.0  # colluders: own noise, times the median distance of their deltas
    knowledge: str = "own"  # colluders: their own honest deltas, or all (omniscient)
    fit: bool = False  # colluders: shorten the crafted delta until the defence keeps it

    def __post_init__(self) -> None:
        if self.kind not in ATTACKS:
            raise ConfigError(f"unknown attack {self.kind!r}; choose one of {', '.join(ATTACKS)}")
        if self.every < 1:
            raise ConfigError(f"attack period must be at least 1 round, got {self.every}")
        if self.perturbation not in PERTURBATIONS:
            raise ConfigError(
                f"unknown perturbation {self.perturbation!r}; choose one of "
                f"{', '.join(PERTURBATIONS)}"
            )
        if not 0.0 <= self.lie <= 1.0:
            raise ConfigError(f"a reported accuracy lies in [0, 1], got {self.lie}")
        if self.target < 0:
            raise ConfigError(f"the backdoor's target class must be >= 0, got {self.target}")
        if not 0.0 < self.poison_share <= 1.0:
            raise ConfigError(f"the poisoned share lies in (0, 1], got {self.poison_share}")
        if self.boost is not None and not 0.0 < self.boost < 1e6:
            raise ConfigError(f"the backdoor's boost lies in (0, 1e6), got {self.boost}")
        if not 0.0 <= self.norm_bound < 1e6:
            raise ConfigError(f"the backdoor's norm bound lies in [0, 1e6), got {self.norm_bound}")
        if not 0.0 <= self.jitter < 1e3:
            raise ConfigError(f"the colluders' jitter lies in [0, 1e3), got {self.jitter}")
        if self.knowledge not in KNOWLEDGE:
            raise ConfigError(
                f"unknown attack knowledge {self.knowledge!r}; choose one of {', '.join(KNOWLEDGE)}"
            )

    def check_classes(self, num_classes: int) -> None:
        """ConfigError when the backdoor's target is not a class of the dataset."""
        if self.backdoors and self.target >= num_classes:
            raise ConfigError(
                f"the backdoor's target class {self.target} is not one of the dataset's "
                f"{num_classes} classes (0-{num_classes - 1})"
            )

    @property
    def registered(self) -> Registered:
        """The attack's entry in the registry."""
        return ATTACKS[self.kind]

    @property
    def backdoors(self) -> bool:
        """Whether the attackers train a trigger in (its success rate is measured)."""
        return self.kind == "backdoor"

    def fires(self, round_: int) -> bool:
        """Whether the attack fires in this round (data attacks fire always)."""
        if self.kind == "none":
            return False
        return self.registered.data or (round_ + 1) % self.every == 0


def choose_attackers(
    groups: np.ndarray, rate: float, placement: str, rng: np.random.Generator
) -> set[int]:
    """round(rate * N) attackers, spread evenly over true groups (per-group) or at random."""
    n = len(groups)
    count = round(rate * n)
    if count == 0:
        return set()
    if placement == "random" or (groups < 0).all():
        return {int(i) for i in rng.choice(n, count, replace=False)}
    chosen: list[int] = []
    members = [rng.permutation(np.flatnonzero(groups == g)).tolist() for g in np.unique(groups)]
    while len(chosen) < count:
        for m in members:
            if m and len(chosen) < count:
                chosen.append(m.pop())
    return set(chosen)


class AttackSettings(Settings):
    """SIMULATION ONLY: which participants attack, how and when."""

    attack: Annotated[str, choice(ATTACKS)] = Field("none", description="attack to simulate")
    attack_rate: float = Field(
        0.0, ge=0, lt=1, description="share of participants that attack (simulations)"
    )
    attack_factor: float = Field(-1.0, description="scaling attack: weights times this")
    attack_every: int | None = Field(
        None,
        ge=1,
        description="model attacks fire every this many rounds (default: 5 for scaling, "
        "sign-flip, gaussian and same-value, every round for the colluding ones and backdoor)",
    )
    attack_z: float | None = Field(
        None, description="alie: z (default: from the round's size and the colluders)"
    )
    attack_epsilon: float = Field(0.1, description="ipm: colluders send -epsilon x their mean")
    attack_perturbation: Annotated[str, choice(PERTURBATIONS)] = Field(
        "std", description="min-max, min-sum: direction from the mean (std, unit, sign)"
    )
    attack_lie: float = Field(
        0.0, ge=0, le=1, description="lying-evaluation: the accuracy attackers report"
    )
    attack_target: int = Field(
        0, ge=0, le=100_000, description="backdoor: the class triggered inputs are sent to"
    )
    attack_poison_share: float = Field(
        0.5, gt=0, le=1, description="backdoor: share of other classes' samples copied triggered"
    )
    attack_boost: float | None = Field(
        None,
        gt=0,
        lt=1e6,
        description="backdoor: delta times this (default: participants per round, eta = 1)",
    )
    attack_norm_bound: float = Field(
        2.0,
        ge=0,
        lt=1e6,
        description="backdoor: boosted delta at most this times the unboosted one's length",
    )
    attack_jitter: float = Field(
        0.0,
        ge=0,
        lt=1e3,
        description="colluding attacks: each colluder adds its own noise of this times the "
        "median distance between the colluders' honest deltas (0: all send one delta)",
    )
    attack_knowledge: Annotated[str, choice(KNOWLEDGE)] = Field(
        "own",
        description="colluding attacks: craft from the colluders' own honest deltas (own), "
        "or from every participant's and knowing the defence (omniscient: local only)",
    )
    attack_fit: bool = Field(
        False,
        description="colluding attacks: shorten the crafted delta to the longest that the "
        "defence, rehearsed on the deltas the colluders know, keeps (its thresholds known)",
    )
    attack_placement: Annotated[str, choice(PLACEMENTS)] = Field(
        "per-group", description="spread attackers over the true groups, or at random"
    )

    def config(self) -> AttackConfig:
        """The attack as the participant applies it."""
        every = self.attack_every
        if every is None:
            every = 1 if ATTACKS[self.attack].every_round else LOUD_EVERY
        return AttackConfig(
            self.attack,
            self.attack_factor,
            every,
            z=self.attack_z,
            epsilon=self.attack_epsilon,
            perturbation=self.attack_perturbation,
            lie=self.attack_lie,
            target=self.attack_target,
            poison_share=self.attack_poison_share,
            boost=self.attack_boost,
            norm_bound=self.attack_norm_bound,
            jitter=self.attack_jitter,
            knowledge=self.attack_knowledge,
            fit=self.attack_fit,
        )

    def services_refuse(self) -> str:
        """Why the services cannot simulate these settings (omniscient attackers), or ""."""
        return OMNISCIENT_LOCAL_ONLY if self.attack_knowledge == "omniscient" else ""
