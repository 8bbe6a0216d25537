"""Deterministic partitions of a dataset over N participants.

Every participant computes the whole partition from (labels, scheme, N, seed) and keeps only
its own shard: the partition is a pure function, so no server hands data out and all
participants agree without talking. Index computations only, so this is cheap even for
thousands of participants.

Disjointness: `iid`, `noniid` and `dirichlet` give disjoint train and disjoint test shards.
`practical-noniid` draws each participant's samples from its group's pool like the research
code does, so shards of different participants may overlap (a participant never holds a
sample twice).

`rotated-groups` (the clustered-FL benchmark of IFCA and CFL): samples split as in `iid`,
participants assigned to k <= 4 groups, and group g's images (train and test) rotated by
g x 90 degrees: the labels mean the same everywhere but the inputs differ by group, so one
global model must serve k input distributions.

`--group-sizes 20,8,2` sets how many participants each group of `practical-noniid` and
`rotated-groups` has (a minority group: few participants, so little data); by default the
participants are spread evenly.

`natural`: the dataset says who owns each sample, and a shard is what its participant owns.
`synthetic` is partitioned so by its generator (each participant draws from its own
distribution; no ground-truth groups, so every group is -1), and only so: with it,
`--partition` is `natural` (Synthetic(alpha, beta)) or `iid` (FedProx's synthetic_iid: the
same distribution for everyone), and `auto` (the default) means `natural`. For any other
dataset `auto` means `practical-noniid`, and `natural` is refused. A wrong pair is one
ConfigError line (`scheme_for`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from services.common.settings import FederationSettings
from services.core.errors import ConfigError
from services.core.registry import Registry

if TYPE_CHECKING:  # settings.py imports this module for the partition names
    from services.participant.datasets import Dataset
    from services.participant.settings import DataSettings

# The research code's practical-noniid sizes for MNIST (60,000 train / 10,000 test).
PRACTICAL_MAX_TRAIN = 2000
PRACTICAL_TRAIN_RATIO = 10  # smallest : largest = 1 : 10
PRACTICAL_OTHER_PER_2000 = 100
PRACTICAL_TEST = 400
PRACTICAL_TEST_OTHER = 20


@dataclass(frozen=True)
class Shard:
    """One participant's share: indices into the train and test sets, and its true group."""

    index: int
    train: np.ndarray
    test: np.ndarray
    group: int = -1  # ground-truth group (practical-noniid, rotated-groups); -1 if none
    rotation: int = 0  # quarter turns applied to the participant's images (rotated-groups)


def label_groups(num_classes: int, k: int) -> list[list[int]]:
    """Split labels into k disjoint groups; the last takes the remainder.

    10 classes, k=3 -> {0,1,2}, {3,4,5}, {6,7,8,9}; k=5 -> pairs (docs/algorithm.md, section 1).
    """
    if not 1 <= k <= num_classes:
        raise ConfigError(f"groups must be between 1 and {num_classes}, got {k}")
    size = num_classes // k
    groups = [list(range(g * size, (g + 1) * size)) for g in range(k)]
    groups[-1].extend(range(k * size, num_classes))
    return groups


def _rng(seed: int, scheme: str) -> np.random.Generator:
    # Separate streams per scheme so adding one does not change another's draws.
    return np.random.default_rng([seed, sum(map(ord, scheme))])


def _iid(y_train: np.ndarray, y_test: np.ndarray, n: int, rng: np.random.Generator) -> list[Shard]:
    tr = np.array_split(rng.permutation(len(y_train)), n)
    te = np.array_split(rng.permutation(len(y_test)), n)
    return [Shard(i, np.sort(tr[i]), np.sort(te[i])) for i in range(n)]


def noniid_labels(n: int, num_classes: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Two distinct labels per participant, each label held by about 2n / C participants."""
    perm = rng.permutation(num_classes)
    pairs = []
    for i in range(n):
        shift = 1 + (i // num_classes) % (num_classes - 1)
        a = perm[i % num_classes]
        b = perm[(i % num_classes + shift) % num_classes]
        pairs.append((int(a), int(b)))
    return pairs


def _split_by_holders(
    y: np.ndarray, holders: dict[int, list[int]], rng: np.random.Generator, n: int
) -> list[list[np.ndarray]]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for label, who in holders.items():
        idx = rng.permutation(np.flatnonzero(y == label))
        for chunk, p in zip(np.array_split(idx, len(who)), who, strict=True):
            parts[p].append(chunk)
    return parts


def _noniid(
    y_train: np.ndarray, y_test: np.ndarray, n: int, num_classes: int, rng: np.random.Generator
) -> list[Shard]:
    pairs = noniid_labels(n, num_classes, rng)
    holders: dict[int, list[int]] = {}
    for i, pair in enumerate(pairs):
        for label in pair:
            holders.setdefault(label, []).append(i)
    tr = _split_by_holders(y_train, holders, rng, n)
    te = _split_by_holders(y_test, holders, rng, n)
    return [
        Shard(i, np.sort(np.concatenate(tr[i])), np.sort(np.concatenate(te[i]))) for i in range(n)
    ]


def practical_sizes(train_pool: int, test_pool: int) -> tuple[int, int, int, int, int]:
    """(min train, max train, others in train, test, others in test) scaled to the pools.

    The research sizes (200-2,000 + 100 others; 400 + 20 test) are capped by the smallest
    group pool, keeping the 1:10 imbalance and the share of other groups' samples.
    """
    max_train = min(PRACTICAL_MAX_TRAIN, train_pool)
    min_train = max(1, max_train // PRACTICAL_TRAIN_RATIO)
    other_train = max(1, round(max_train * PRACTICAL_OTHER_PER_2000 / PRACTICAL_MAX_TRAIN))
    n_test = min(PRACTICAL_TEST, test_pool)
    other_test = max(1, round(n_test * PRACTICAL_TEST_OTHER / PRACTICAL_TEST))
    return min_train, max_train, other_train, n_test, other_test


def assign_groups(
    n: int, k: int, sizes: Sequence[int] | None, rng: np.random.Generator
) -> np.ndarray:
    """Each participant's group: spread evenly (sizes None), or `sizes[g]` participants in
    group g; in a seeded random order either way."""
    if sizes is None:
        return rng.permutation(np.arange(n) % k)
    return rng.permutation(np.repeat(np.arange(k), sizes))


def _practical(
    y_train: np.ndarray,
    y_test: np.ndarray,
    n: int,
    num_classes: int,
    k: int,
    rng: np.random.Generator,
    sizes: Sequence[int] | None = None,
) -> list[Shard]:
    groups = label_groups(num_classes, k)
    in_group_tr = [np.flatnonzero(np.isin(y_train, g)) for g in groups]
    in_group_te = [np.flatnonzero(np.isin(y_test, g)) for g in groups]
    min_tr, max_tr, other_tr, n_te, other_te = practical_sizes(
        min(len(p) for p in in_group_tr), min(len(p) for p in in_group_te)
    )
    assignment = assign_groups(n, k, sizes, rng)
    shards = []
    for i in range(n):
        g = int(assignment[i])
        out_tr = np.flatnonzero(~np.isin(y_train, groups[g]))
        out_te = np.flatnonzero(~np.isin(y_test, groups[g]))
        size = int(rng.integers(min_tr, max_tr + 1))
        train = np.concatenate(
            [
                rng.choice(in_group_tr[g], size, replace=False),
                rng.choice(out_tr, min(other_tr, len(out_tr)), replace=False),
            ]
        )
        test = np.concatenate(
            [
                rng.choice(in_group_te[g], n_te, replace=False),
                rng.choice(out_te, min(other_te, len(out_te)), replace=False),
            ]
        )
        shards.append(Shard(i, np.sort(train), np.sort(test), g))
    return shards


ROTATIONS = 4  # quarter turns: at most four distinct rotated groups


def _rotated(
    y_train: np.ndarray,
    y_test: np.ndarray,
    n: int,
    k: int,
    rng: np.random.Generator,
    sizes: Sequence[int] | None = None,
) -> list[Shard]:
    if not 1 <= k <= ROTATIONS:
        raise ConfigError(f"rotated-groups has 1 to {ROTATIONS} groups (quarter turns), got {k}")
    if n > len(y_test):
        raise ConfigError(f"rotated-groups: {n} participants but only {len(y_test)} test samples")
    shards = _iid(y_train, y_test, n, rng)
    assignment = assign_groups(n, k, sizes, rng)
    return [
        replace(s, group=int(g), rotation=int(g)) for s, g in zip(shards, assignment, strict=True)
    ]


def _dirichlet(
    y_train: np.ndarray,
    y_test: np.ndarray,
    n: int,
    num_classes: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int,
    tries: int = 100,
) -> list[Shard]:
    if alpha <= 0:
        raise ConfigError(f"dirichlet alpha must be positive, got {alpha}")
    for _ in range(tries):
        props = rng.dirichlet(np.full(n, alpha), size=num_classes)  # (C, n)
        tr = _split_by_props(y_train, props, rng, n)
        if min(len(t) for t in tr) >= min_size:
            te = _split_by_props(y_test, props, rng, n)
            return [Shard(i, tr[i], te[i]) for i in range(n)]
    raise ConfigError(
        f"dirichlet(alpha={alpha}) could not give each of {n} participants {min_size} train "
        f"samples in {tries} draws; raise alpha or lower the number of participants"
    )


def _split_by_props(
    y: np.ndarray, props: np.ndarray, rng: np.random.Generator, n: int
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in range(props.shape[0]):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = (np.cumsum(props[c])[:-1] * len(idx)).astype(int)
        for i, chunk in enumerate(np.split(idx, cuts)):
            parts[i].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def partition(
    y_train: np.ndarray,
    y_test: np.ndarray,
    scheme: str,
    num_participants: int,
    seed: int,
    num_classes: int | None = None,
    groups: int = 3,
    alpha: float = 0.5,
    group_sizes: Sequence[int] | None = None,
) -> list[Shard]:
    """All participants' shards for a partition scheme, deterministic from the seed.

    `group_sizes` (participants per group; their count is the number of groups) applies to
    the grouped schemes only."""
    y_train = np.asarray(y_train)
    y_test = np.asarray(y_test)
    n = num_participants
    c = int(num_classes if num_classes is not None else max(y_train.max(), y_test.max()) + 1)
    if n < 1:
        raise ConfigError(f"number of participants must be at least 1, got {n}")
    rng = _rng(seed, scheme)
    if group_sizes is not None:
        sizes = [int(v) for v in group_sizes]
        if scheme not in GROUPED:
            raise ConfigError(
                f"--group-sizes applies to {' and '.join(GROUPED)}, not to --partition {scheme}"
            )
        if not sizes or min(sizes) < 1 or sum(sizes) != n:
            raise ConfigError(
                f"--group-sizes must be positive and add up to --participants {n}, got "
                f"{','.join(map(str, sizes))}"
            )
        return GROUPED[scheme](y_train, y_test, n, c, len(sizes), rng, sizes)
    if scheme in GROUPED:
        return GROUPED[scheme](y_train, y_test, n, c, groups, rng)
    return PARTITIONS[scheme](y_train, y_test, n, c, groups, alpha, rng)


def _checked_iid(
    y_train: np.ndarray, y_test: np.ndarray, n: int, c: int, groups: int, alpha: float, rng: Any
) -> list[Shard]:
    if n > len(y_test):
        raise ConfigError(f"iid: {n} participants but only {len(y_test)} test samples")
    return _iid(y_train, y_test, n, rng)


def _checked_noniid(
    y_train: np.ndarray, y_test: np.ndarray, n: int, c: int, groups: int, alpha: float, rng: Any
) -> list[Shard]:
    if c < 2:
        raise ConfigError("noniid needs at least 2 classes")
    return _noniid(y_train, y_test, n, c, rng)


def _sized_dirichlet(
    y_train: np.ndarray, y_test: np.ndarray, n: int, c: int, groups: int, alpha: float, rng: Any
) -> list[Shard]:
    min_size = max(1, min(10, len(y_train) // (2 * n)))
    return _dirichlet(y_train, y_test, n, c, alpha, rng, min_size)


# Every scheme takes (y_train, y_test, n, classes, groups, alpha, rng).
PARTITIONS: Registry[Callable[..., list[Shard]]] = Registry(
    "partition",
    {
        "iid": _checked_iid,
        "noniid": _checked_noniid,
        "practical-noniid": lambda ytr, yte, n, c, groups, alpha, rng: _practical(
            ytr, yte, n, c, groups, rng
        ),
        "rotated-groups": lambda ytr, yte, n, c, groups, alpha, rng: _rotated(
            ytr, yte, n, groups, rng
        ),
        "dirichlet": _sized_dirichlet,
    },
)
# The schemes with ground-truth groups: (y_train, y_test, n, classes, k, rng, sizes=None).
GROUPED: dict[str, Callable[..., list[Shard]]] = {
    "practical-noniid": _practical,
    "rotated-groups": lambda ytr, yte, n, c, k, rng, sizes=None: _rotated(
        ytr, yte, n, k, rng, sizes
    ),
}


# Datasets whose samples are generated per participant, and the schemes they take.
GENERATED = {"synthetic": ("natural", "iid")}
# What --partition accepts: the label partitions, `natural`, and `auto`.
PARTITION_CHOICES = ("auto", *PARTITIONS, "natural")


def scheme_for(dataset: str, scheme: str) -> str:
    """The partition scheme a dataset is split by (`auto` resolved); a pair that cannot
    work is a ConfigError."""
    own = GENERATED.get(dataset)
    if own is not None:
        if scheme == "auto":
            return own[0]
        if scheme not in own:
            raise ConfigError(
                f"--partition {scheme} does not apply to --dataset {dataset}: its participants "
                f"come from its generator; use {' or '.join(own)} (or auto)"
            )
        return scheme
    if scheme == "auto":
        return "practical-noniid"
    if scheme == "natural":
        raise ConfigError(
            f"--partition natural needs a dataset whose samples belong to participants "
            f"({', '.join(GENERATED)}); split --dataset {dataset} by {', '.join(PARTITIONS)}"
        )
    return scheme


def federation_data(
    federation: FederationSettings,
    data_settings: DataSettings,
    hosted: Iterable[int] | None = None,
) -> Dataset:
    """The data a process of the federation needs: a named dataset loaded whole, or, for a
    generated one (synthetic), only the `hosted` participants' samples (every participant's
    when None), so a process hosting a few of many participants generates just those."""
    from services.participant.datasets import load_dataset, synthetic_dataset  # torch

    scheme = scheme_for(federation.dataset, data_settings.partition)
    if federation.dataset not in GENERATED:
        return load_dataset(federation.dataset, data_settings.data_dir, data_settings.download)
    n = federation.participants
    who = range(n) if hosted is None else sorted(set(hosted))
    if any(not 0 <= k < n for k in who):
        raise ConfigError(f"hosted participants must lie within --participants {n}")
    return synthetic_dataset(
        who,
        federation.seed,
        data_settings.synthetic_alpha,
        data_settings.synthetic_beta,
        iid=scheme == "iid",
    )


def owner_shards(train_owner: np.ndarray, test_owner: np.ndarray, n: int) -> list[Shard]:
    """The natural partition: each of n participants' shard is the samples it owns (empty
    for participants whose data was not generated here); no groups."""
    for owner in (train_owner, test_owner):
        if owner.size and not (owner.min() >= 0 and owner.max() < n):
            raise ConfigError(f"the dataset's samples belong to participants outside 0..{n - 1}")

    def split(owner: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(owner, kind="stable")
        return np.split(order, np.cumsum(np.bincount(owner, minlength=n))[:-1])

    tr, te = split(train_owner), split(test_owner)
    return [Shard(i, tr[i], te[i]) for i in range(n)]


def shards_of(
    federation: FederationSettings, data_settings: DataSettings, data: Dataset
) -> list[Shard]:
    """Every participant's shard for the federation's settings (each participant computes
    the whole partition from the shared seed and keeps its own). A generated dataset is
    split by its owners: a participant whose samples were not generated gets an empty shard."""
    scheme = scheme_for(federation.dataset, data_settings.partition)
    if data.train_owner is not None and data.test_owner is not None:
        return owner_shards(data.train_owner, data.test_owner, federation.participants)
    if federation.dataset in GENERATED or scheme == "natural":
        raise ConfigError(f"{data.name}: the dataset does not say who owns its samples")
    return partition(
        data.y_train.numpy(),
        data.y_test.numpy(),
        scheme,
        federation.participants,
        federation.seed,
        data.num_classes,
        data_settings.groups,
        data_settings.alpha,
        data_settings.group_sizes,
    )


def shard_tensors(data: Dataset, shard: Shard) -> tuple[Any, Any, Any, Any]:
    """A participant's (x_train, y_train, x_test, y_test), its images rotated as its shard
    says (rotated-groups; square images only)."""
    x_train, x_test = data.x_train[shard.train], data.x_test[shard.test]
    if shard.rotation % ROTATIONS:
        h, w = x_train.shape[-2:]
        if h != w:
            raise ConfigError(f"rotated-groups needs square images, {data.name} has {h}x{w}")
        x_train = x_train.rot90(shard.rotation, dims=(-2, -1)).contiguous()
        x_test = x_test.rot90(shard.rotation, dims=(-2, -1)).contiguous()
    return x_train, data.y_train[shard.train], x_test, data.y_test[shard.test]
