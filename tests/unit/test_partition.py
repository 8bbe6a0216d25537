"""Partitions: deterministic, disjoint where they should be, with the specified labels and sizes."""

from __future__ import annotations

import numpy as np
import pytest

from services.core.errors import ConfigError
from services.participant.datasets import load_dataset
from services.participant.partition import (
    label_groups,
    partition,
    practical_sizes,
    shard_tensors,
)

DATA = load_dataset("digits")
YTR = DATA.y_train.numpy()
YTE = DATA.y_test.numpy()


def all_shards(scheme, n=20, seed=7, **kw):
    return partition(YTR, YTE, scheme, n, seed, 10, **kw)


@pytest.mark.parametrize(
    "scheme", ["iid", "noniid", "practical-noniid", "rotated-groups", "dirichlet"]
)
def test_deterministic_and_per_participant(scheme):
    a = all_shards(scheme)
    b = all_shards(scheme)
    c = all_shards(scheme, seed=8)
    for sa, sb in zip(a, b, strict=True):
        assert np.array_equal(sa.train, sb.train) and np.array_equal(sa.test, sb.test)
    assert any(not np.array_equal(sa.train, sc.train) for sa, sc in zip(a, c, strict=True))
    assert [s.index for s in a] == list(range(20))


@pytest.mark.parametrize("scheme", ["iid", "noniid", "rotated-groups", "dirichlet"])
def test_disjoint_schemes(scheme):
    shards = all_shards(scheme)
    for split, total in (("train", len(YTR)), ("test", len(YTE))):
        idx = np.concatenate([getattr(s, split) for s in shards])
        assert len(idx) == len(set(idx.tolist())), f"{scheme} {split} shards overlap"
        assert len(idx) == total  # every sample is used once


def test_iid_sizes_balanced():
    sizes = [len(s.train) for s in all_shards("iid")]
    assert max(sizes) - min(sizes) <= 1


def test_noniid_two_labels_each():
    shards = all_shards("noniid", n=30)
    counts = np.zeros(10, dtype=int)
    for s in shards:
        labels = set(YTR[s.train].tolist())
        assert len(labels) == 2
        assert set(YTE[s.test].tolist()) <= labels
        counts[list(labels)] += 1
    assert counts.max() - counts.min() <= 1  # labels spread evenly


def test_label_groups():
    assert label_groups(10, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert label_groups(10, 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    with pytest.raises(ConfigError):
        label_groups(10, 11)


def test_practical_noniid_groups_and_sizes():
    n = 30
    shards = all_shards("practical-noniid", n=n, groups=3)
    groups = label_groups(10, 3)
    assert sorted(np.bincount([s.group for s in shards]).tolist()) == [10, 10, 10]
    pool_tr = min(int(np.isin(YTR, g).sum()) for g in groups)
    pool_te = min(int(np.isin(YTE, g).sum()) for g in groups)
    lo, hi, other, n_te, other_te = practical_sizes(pool_tr, pool_te)
    assert hi == pool_tr and lo == hi // 10 and other == round(hi / 20)
    own_sizes = []
    for s in shards:
        mine = np.isin(YTR[s.train], groups[s.group])
        assert len(np.unique(s.train)) == len(s.train)  # no sample held twice
        assert lo <= mine.sum() <= hi
        assert (~mine).sum() == other  # the other groups' extra samples
        own_sizes.append(int(mine.sum()))
        mine_te = np.isin(YTE[s.test], groups[s.group])
        assert mine_te.sum() == n_te and (~mine_te).sum() == other_te
    assert max(own_sizes) / min(own_sizes) > 3  # sizes are imbalanced


def test_practical_sizes_match_research_on_mnist_scale():
    assert practical_sizes(18000, 3000) == (200, 2000, 100, 400, 20)


def test_dirichlet_small_alpha_is_skewed():
    shards = all_shards("dirichlet", n=10, alpha=0.1)
    dominant = [np.bincount(YTR[s.train], minlength=10).max() / len(s.train) for s in shards]
    assert np.mean(dominant) > 0.5
    with pytest.raises(ConfigError):
        all_shards("dirichlet", alpha=0)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="unknown partition"):
        all_shards("bogus")
    with pytest.raises(ConfigError):
        all_shards("iid", n=0)


def test_rotated_groups_rotate_each_groups_images_by_its_quarter_turns():
    shards = all_shards("rotated-groups", n=12, groups=4)
    assert sorted(np.bincount([s.group for s in shards]).tolist()) == [3, 3, 3, 3]
    for s in shards:
        assert s.rotation == s.group
        x_train, y_train, x_test, y_test = shard_tensors(DATA, s)
        clean = DATA.x_train[s.train]
        # quarter turns counter-clockwise: turning back gives the original images
        assert x_train.shape == clean.shape
        assert np.array_equal(np.rot90(x_train.numpy(), -s.rotation, axes=(2, 3)), clean.numpy())
        assert np.array_equal(y_train.numpy(), YTR[s.train])
        assert np.array_equal(
            np.rot90(x_test.numpy(), -s.rotation, axes=(2, 3)), DATA.x_test[s.test].numpy()
        )
        assert np.array_equal(y_test.numpy(), YTE[s.test])
    # every label in every group (the groups differ by their inputs, not their labels)
    assert all(len(np.unique(YTR[s.train])) >= 8 for s in shards)


@pytest.mark.parametrize("scheme", ["practical-noniid", "rotated-groups"])
def test_group_sizes_set_how_many_participants_each_group_has(scheme):
    shards = all_shards(scheme, n=30, group_sizes=(20, 8, 2))
    assert np.bincount([s.group for s in shards]).tolist() == [20, 8, 2]
    even = all_shards(scheme, n=30)
    assert np.bincount([s.group for s in even]).tolist() == [10, 10, 10]


def test_bad_group_settings():
    with pytest.raises(ConfigError, match="add up to --participants 30"):
        all_shards("rotated-groups", n=30, group_sizes=(20, 8))
    with pytest.raises(ConfigError, match="not to --partition iid"):
        all_shards("iid", n=30, group_sizes=(10, 10, 10))
    with pytest.raises(ConfigError, match="1 to 4 groups"):
        all_shards("rotated-groups", n=30, groups=5)
    with pytest.raises(ConfigError, match="positive"):
        all_shards("practical-noniid", n=30, group_sizes=(0, 20, 10))
