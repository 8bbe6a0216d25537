"""Fair global merges: q-weights, weighted merges and the q-FFL baseline."""

from __future__ import annotations

from dataclasses import replace

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from services.core.errors import ConfigError
from services.core.merge import (
    MERGES,
    MergeInputs,
    floored,
    local_steps,
    merge,
    q_weights,
    qffl_merge,
    weighted_merge,
)


def seed_formula(accs, q):
    """The research code's weights, written out as it states them."""
    a = [0.1 if x == 0 else x for x in accs]
    raw = [x ** (-q) for x in a]
    return [r / sum(raw) for r in raw]


@given(
    st.lists(st.just(0.0) | st.floats(1e-6, 1), min_size=1, max_size=12),
    st.sampled_from([0.0, 0.5, 1.0, 2.0]),
)
def test_q_weights_sum_to_one_and_match_seed(accs, q):
    w = q_weights(accs, q)
    assert abs(float(w.sum()) - 1) < 1e-9
    assert torch.allclose(w, torch.tensor(seed_formula(accs, q), dtype=torch.float64))


def test_worse_served_clusters_weigh_more():
    w = q_weights([0.9, 0.5, 0.2], 0.5)
    assert w[2] > w[1] > w[0]
    # Hand-computed: 0.9^-.5=1.0541, 0.5^-.5=1.4142, 0.2^-.5=2.2361; sum 4.7044
    assert torch.allclose(
        w, torch.tensor([0.22406, 0.30062, 0.47532], dtype=torch.float64), atol=1e-4
    )
    assert torch.allclose(
        q_weights([0.9, 0.5, 0.2], 0.0), torch.full((3,), 1 / 3, dtype=torch.float64)
    )


def test_zero_accuracy_counts_as_point_one():
    assert torch.allclose(q_weights([0.0, 0.1]), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_q_weights_reject_bad_accuracies():
    for bad in ([], [1.5], [-0.1], [float("nan")]):
        with pytest.raises(ConfigError):
            q_weights(bad)


def test_merges(device):
    m = torch.tensor([[0.0, 2.0], [2.0, 4.0]], device=device)
    g = torch.zeros(2, device=device)

    def close(got, want):
        assert got.device.type == device.type
        torch.testing.assert_close(got.cpu(), torch.tensor(want))

    def inputs(round_, acc):
        return MergeInputs(g, {0: m[0], 1: m[1]}, m, [0, 1], round_, acc, q=1.0)

    new, weights = merge("mean", inputs(3, {0: 1.0, 1: 0.25}))
    close(new, [1.0, 3.0])
    assert weights == {0: 0.5, 1: 0.5}
    close(weighted_merge(m, [0.25, 0.75]), [1.5, 3.5])
    new, weights = merge("accuracy", inputs(3, {0: 1.0, 1: 0.5}))  # weights 1:2
    close(new, [4 / 3, 10 / 3])
    assert weights[1] == pytest.approx(2 / 3)
    _, weights = merge("accuracy", inputs(3, {0: 1.0, 1: 0.25}))  # floored at 0.5: 1:2 too
    assert weights[1] == pytest.approx(2 / 3)
    new, _ = merge("accuracy", inputs(0, {0: 1.0, 1: 0.25}))  # round 0: the plain mean
    close(new, [1.0, 3.0])
    new, _ = merge("qffl", MergeInputs(g, {}, m, [0, 1], 3, {}, losses=[1.0, 3.0], lr=0.5))
    want = qffl_merge(torch.zeros(2), m.cpu(), [1.0, 3.0], lr=0.5)  # the local models are m
    close(new, want.tolist())
    with pytest.raises(ConfigError):
        weighted_merge(m, [0.5, 0.6])
    with pytest.raises(ConfigError, match="unknown merge"):
        MERGES["median-of-means"]


@given(
    st.lists(st.integers(1, 200), min_size=2, max_size=2),
    st.lists(st.floats(0.01, 5), min_size=2, max_size=2),
)
def test_qffl_with_local_steps_reads_a_delta_as_one_step_of_lr_times_s(steps, losses):
    """L = 1 / (lr x mean S): the published step with the rate lr x S (naive reference)."""
    m = torch.tensor([[1.0, -2.0, 0.5], [0.5, 1.0, -1.0]])
    g = torch.zeros(3)
    new, _ = merge(
        "qffl", MergeInputs(g, {}, m, [0, 1], 3, {}, losses=losses, lr=0.05, steps=steps)
    )
    want = qffl_merge(g, m, losses, lr=0.05 * (sum(steps) / 2))
    torch.testing.assert_close(new, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="step count"):
        merge("qffl", MergeInputs(g, {}, m, [0, 1], 3, {}, losses=losses, steps=[0, 3]))


@given(st.lists(st.floats(0, 1), min_size=1, max_size=9))
def test_floored_accuracies_are_at_least_half_the_upper_median(accs):
    got = floored(accs)
    med = sorted(accs)[len(accs) // 2]  # naive reference
    assert got == [a if a >= 0.5 * med else 0.5 * med for a in accs]


def test_a_group_of_liars_gains_at_most_2_to_the_q_in_the_fair_merge():
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    inputs = MergeInputs(torch.zeros(2), {0: m[0], 1: m[1], 2: m[2]}, m, [0, 1, 2], 3, {})
    lying = replace(inputs, cluster_accuracy={0: 0.0, 1: 0.95, 2: 0.9})
    _, weights = merge("accuracy", lying)
    # floored at half the median (0.9): 2^q = 1.41 times the median group, not 0.1^-q = 3.2
    assert weights[0] / weights[2] == pytest.approx(2**0.5)
    honest = replace(inputs, cluster_accuracy={0: 0.6, 1: 0.95, 2: 0.9})  # not floored
    _, weights = merge("accuracy", honest)
    assert weights[0] / weights[2] == pytest.approx((0.6 / 0.9) ** -0.5)


def test_local_steps_count_batches_per_epoch():
    assert local_steps([1, 32, 33, 2000], 2, 32) == [2, 2, 4, 126]


def test_qffl_with_q0_is_the_mean_of_local_models(device):
    g = torch.zeros(3, device=device)
    local = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], device=device)
    torch.testing.assert_close(qffl_merge(g, local, [0.5, 2.0], q=0.0, lr=0.1), local.mean(0))


def test_qffl_pulls_towards_high_loss_participants(device):
    g = torch.zeros(2, device=device)
    local = torch.tensor([[1.0, 0.0], [0.0, 1.0]], device=device)
    out = qffl_merge(g, local, [0.2, 2.0], q=1.0, lr=0.1)
    assert out[1] > out[0] > 0
