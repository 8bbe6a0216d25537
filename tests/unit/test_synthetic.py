"""Synthetic(alpha, beta): each participant's data a pure function of (seed, k, alpha, beta),
generated alone; the generator's distribution; its natural partition and the pairs refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from services.cli import main
from services.core.errors import ConfigError
from services.core.models import DATASET_SHAPES
from services.experiment import ExperimentConfig, SimulateConfig
from services.inprocess import attacker_indices
from services.local import run_local
from services.participant import synthetic
from services.participant.datasets import load_dataset, synthetic_dataset
from services.participant.partition import federation_data, scheme_for, shards_of
from services.simulate import attackers_of

CONFIG = ExperimentConfig().replace(dataset="synthetic", model="mclr", participants=40, seed=5)


def samples(k, seed=0, alpha=1.0, beta=1.0, iid=False):
    return synthetic.participant_samples(k, seed, alpha, beta, iid)


def label_shares(n=100, **kw) -> np.ndarray:
    rows = []
    for k in range(n):
        s = samples(k, **kw)
        y = np.concatenate([s.y_train, s.y_test])
        rows.append(np.bincount(y, minlength=synthetic.CLASSES) / len(y))
    return np.array(rows)


def test_deterministic_for_a_seed():
    a, b, other = samples(3, seed=7), samples(3, seed=7), samples(3, seed=8)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.x_train[:10], other.x_train[:10])
    assert not np.array_equal(samples(4, seed=7).x_test[:5], a.x_test[:5])


def test_a_participant_alone_equals_it_among_others():
    alone = synthetic_dataset([17], seed=2)
    among = synthetic_dataset(range(5, 30), seed=2)
    mine_tr = torch.from_numpy(among.train_owner == 17)
    mine_te = torch.from_numpy(among.test_owner == 17)
    assert torch.equal(among.x_train[mine_tr], alone.x_train)
    assert torch.equal(among.y_train[mine_tr], alone.y_train)
    assert torch.equal(among.x_test[mine_te], alone.x_test)
    assert torch.equal(among.y_test[mine_te], alone.y_test)


def test_a_process_generates_only_its_hosted_participants():
    hosted = range(10, 15)
    mine = federation_data(CONFIG.federation, CONFIG.data, hosted)
    everyone = federation_data(CONFIG.federation, CONFIG.data)
    assert mine.train_owner is not None
    assert set(np.unique(mine.train_owner)) == set(hosted)
    part, full = (
        shards_of(CONFIG.federation, CONFIG.data, mine),
        shards_of(CONFIG.federation, CONFIG.data, everyone),
    )
    assert len(part) == len(full) == 40
    for i in range(40):
        assert part[i].index == i and part[i].group == -1 and full[i].group == -1
        if i not in hosted:
            assert part[i].train.size == 0 and part[i].test.size == 0
            continue
        assert torch.equal(mine.x_train[part[i].train], everyone.x_train[full[i].train])
        assert torch.equal(mine.y_test[part[i].test], everyone.y_test[full[i].test])
    # The natural partition is disjoint and covers every sample.
    assert np.array_equal(
        np.sort(np.concatenate([s.train for s in full])), np.arange(len(everyone.y_train))
    )
    with pytest.raises(ConfigError, match="within --participants 40"):
        federation_data(CONFIG.federation, CONFIG.data, [40])


def test_shapes_dtypes_labels_and_split():
    d = synthetic_dataset(range(12), seed=1)
    assert d.input_shape == DATASET_SHAPES["synthetic"][0] == (1, 1, synthetic.FEATURES)
    assert d.num_classes == DATASET_SHAPES["synthetic"][1] == synthetic.CLASSES
    assert d.x_train.dtype == d.x_test.dtype == torch.float32
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    for y in (d.y_train, d.y_test):
        assert int(y.min()) >= 0 and int(y.max()) < synthetic.CLASSES
    assert d.train_owner is not None and d.test_owner is not None
    assert len(d.train_owner) == len(d.y_train) and len(d.test_owner) == len(d.y_test)
    for k in range(12):
        n_tr, n_te = int((d.train_owner == k).sum()), int((d.test_owner == k).sum())
        assert n_te == round(synthetic.TEST_FRACTION * (n_tr + n_te)) >= 10
    empty = synthetic_dataset([])
    assert empty.x_train.shape == (0, 1, 1, synthetic.FEATURES) and len(empty.y_test) == 0


def test_sizes_are_the_lognormal_capped():
    sizes = [len(s.y_train) + len(s.y_test) for s in map(samples, range(300))]
    assert min(sizes) >= synthetic.MIN_SAMPLES and max(sizes) == synthetic.MAX_SAMPLES
    assert np.median(sizes) < 200  # heavy tailed: most participants are small

    class Huge:
        def lognormal(self, mean: float, sigma: float) -> float:
            return 1e7

    assert synthetic.sample_count(Huge()) == synthetic.MAX_SAMPLES  # type: ignore[arg-type]


def test_features_have_the_generator_covariance():
    big = next(s for s in map(samples, range(300)) if len(s.y_train) > 1500)
    var = big.x_train.astype(np.float64).var(axis=0)
    expected = np.arange(1, synthetic.FEATURES + 1) ** -1.2
    assert np.allclose(var / expected, 1, atol=0.15)
    iid = np.concatenate([samples(k, iid=True).x_train for k in range(30)])
    assert np.abs(iid.mean(axis=0)).max() < 0.1  # synthetic_iid: x ~ N(0, Sigma)


def test_participants_differ_and_iid_does_not():
    def spread(shares: np.ndarray) -> float:  # mean total variation to the pooled shares
        return float(0.5 * np.abs(shares - shares.mean(axis=0)).sum(axis=1).mean())

    one_one, zero_zero = label_shares(alpha=1, beta=1), label_shares(alpha=0, beta=0)
    iid = label_shares(iid=True)
    assert spread(one_one) > 0.6 and spread(iid) < 0.2
    assert spread(zero_zero) < spread(one_one)
    # Feature means spread by beta skew each participant's labels further (paired draws).
    assert zero_zero.max(axis=1).mean() + 0.02 < one_one.max(axis=1).mean()
    # As in the original generator, u_k shifts every class's logit alike: alpha leaves the
    # labels as they are (the heterogeneity is each participant's own W_k, and beta).
    a0, a1 = samples(9, alpha=0.0), samples(9, alpha=1.0)
    assert np.array_equal(a0.x_train, a1.x_train) and np.array_equal(a0.y_train, a1.y_train)


def test_partition_rules():
    assert scheme_for("synthetic", "auto") == "natural"
    assert scheme_for("synthetic", "iid") == "iid"
    assert scheme_for("digits", "auto") == "practical-noniid"
    for scheme in ("noniid", "practical-noniid", "dirichlet"):
        with pytest.raises(ConfigError, match=f"--partition {scheme} does not apply"):
            scheme_for("synthetic", scheme)
    with pytest.raises(ConfigError, match="--partition natural needs"):
        scheme_for("mnist", "natural")
    digits = ExperimentConfig().replace(partition="natural")
    with pytest.raises(ConfigError, match="--partition natural needs"):
        shards_of(digits.federation, digits.data, load_dataset("digits"))
    with pytest.raises(ConfigError, match="generated per participant"):
        load_dataset("synthetic")
    with pytest.raises(ConfigError, match="--model cnn does not fit --dataset synthetic"):
        ExperimentConfig().replace(dataset="synthetic")
    with pytest.raises(ConfigError, match="--synthetic-beta"):
        CONFIG.replace(synthetic_beta=-1)


def test_iid_variant_shares_one_model():
    cfg = CONFIG.replace(partition="iid")
    d = federation_data(cfg.federation, cfg.data, [0, 1])
    s0 = samples(0, seed=5, iid=True)
    assert np.array_equal(d.x_train[: len(s0.y_train)].numpy().reshape(-1, 60), s0.x_train)
    w, b = synthetic.shared_model(5)
    x = np.concatenate([s0.x_train, s0.x_test]).astype(np.float64)
    same = np.argmax(x @ w.T + b, axis=1) == np.concatenate([s0.y_train, s0.y_test])
    assert same.mean() > 0.99  # float32 rounding may flip a near tie


def test_attackers_are_placed_at_random_without_generating_data():
    cfg = SimulateConfig().replace(
        dataset="synthetic", model="mclr", participants=50, attack="scaling", attack_rate=0.2
    )
    chosen = attackers_of(cfg)
    assert len(chosen) == 10
    assert chosen == sorted(attacker_indices(cfg, np.full(50, -1)))
    with pytest.raises(ConfigError, match="does not apply"):
        attackers_of(cfg.replace(partition="dirichlet", attack="none"))


def test_a_local_federation_runs_on_synthetic():
    cfg = CONFIG.replace(participants=6, select=6, rounds=1, clusters=2, pre_steps=2)
    result = run_local(cfg)
    assert result.clustering["purity"] is None  # no ground-truth groups
    assert {c["group"] for c in result.clusters} == {-1}
    assert 0 <= result.final["mean_accuracy"] <= 1


def test_cli_refuses_a_wrong_pair_in_one_line(tmp_path, capsys):
    common = ["--dataset", "synthetic", "--out", str(tmp_path), "--rounds", "1"]
    assert main(["simulate", *common, "--model", "mclr", "--partition", "dirichlet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--partition dirichlet does not apply" in err[0]
    with pytest.raises(SystemExit) as exit_:
        main(["local", *common])  # the default model, a CNN, cannot read 60 features
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "--model cnn does not fit" in err[0]
