"""The backdoor attack (model replacement) against its definition, and its success rate."""

from __future__ import annotations

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from services.core.errors import ConfigError
from services.experiment import ExperimentConfig
from services.local import run_local
from services.participant.adversary import AttackConfig, AttackSettings
from services.participant.attacks import View, build_attack
from services.participant.backdoor import (
    boosted,
    poison,
    replacement,
    stamp,
    success_rate,
    trigger_sides,
    trigger_size,
)


def test_the_trigger_is_a_checkerboard_in_the_corner_and_nothing_else_changes():
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = stamp(x)
    s = trigger_size(8, 8)
    assert s == 2 and trigger_size(28, 28) == 3 and trigger_size(32, 32) == 4
    hi, lo = float(x.max()), float(x.min())
    for i in range(5):
        corner = out[i, 0, -2:, -2:]
        assert corner.tolist() == [[hi, lo], [lo, hi]]
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[:, :, -2:, -2:] = False
    assert torch.equal(out[rest], x[rest])
    assert not torch.equal(out, x) and stamp(x).equal(out)  # deterministic, x untouched
    with pytest.raises(ConfigError):
        stamp(torch.zeros(3, 8, 8))


def test_on_vectors_the_trigger_is_a_strip_of_the_last_features():
    """Synthetic and tabular inputs are (n, 1, 1, features): a square trigger does not fit
    (the robustness grid's backdoor on `synthetic` crashed on it)."""
    x = torch.randn(4, 1, 1, 60, generator=torch.Generator().manual_seed(2))
    assert trigger_sides(1, 60) == (1, 7) and trigger_sides(28, 28) == (3, 3)
    out = stamp(x)
    hi, lo = float(x.max()), float(x.min())
    assert out[:, 0, 0, -7:].tolist() == [[hi, lo, hi, lo, hi, lo, hi]] * 4
    assert torch.equal(out[..., :-7], x[..., :-7])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(60, 3))
    rate = success_rate(model, x, torch.tensor([0, 1, 2, 1]), target=1)
    assert 0.0 <= rate <= 1.0


def test_poison_keeps_the_clean_data_and_adds_triggered_copies_labelled_target():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 1, 8, 8, generator=gen)
    y = torch.arange(40) % 4
    xp, yp = poison(x, y, target=0, share=0.5, generator=gen)
    assert torch.equal(xp[:40], x) and torch.equal(yp[:40], y)
    added = xp[40:]
    assert len(added) == 15 and (yp[40:] == 0).all()  # half of the 30 of classes 1-3
    # every copy is a triggered sample of another class: its clean pixels match one of them
    others = x[y != 0]
    for a in added:
        match = (others[:, :, :6, :6] == a[:, :6, :6]).flatten(1).all(1)
        assert int(match.sum()) == 1
        # the checkerboard: the batch's brightest and darkest values
        assert a[0, -1, -1] >= a.max() - 1e-6 and a[0, -1, -2] <= a.min() + 1e-6
    with pytest.raises(ConfigError):
        poison(x, y, 0, 0.0, gen)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=20),
    st.floats(0.1, 50),
    st.floats(0, 100),
)
def test_replacement_is_the_boosted_delta_within_the_norm_bound(values, boost, bound):
    delta = torch.tensor(values)
    got = replacement(delta, boost, bound)
    want = delta.double() * boost  # the naive definition
    length = float(want.norm())
    if length > bound:
        want = want * (bound / length) if bound > 0 else torch.zeros_like(want)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    assert float(got.norm()) <= bound * (1 + 1e-5) + 1e-6


class CornerDetector(torch.nn.Module):
    """Predicts class 3 when the bottom-right pixel is bright, else class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = (x[:, 0, -1, -1] > 0.5).float()
        logits = torch.zeros(len(x), 5)
        logits[:, 3] = bright
        logits[:, 1] = 1 - bright
        return logits + self.w * 0


def test_success_rate_counts_triggered_inputs_of_other_classes_sent_to_the_target():
    x = torch.rand(50, 1, 8, 8) * 0.4  # dark images: the trigger's corner is the bright max
    x[0, 0, 3, 3] = 1.0
    y = torch.arange(50) % 5
    detector = CornerDetector()
    assert success_rate(detector, x, y, target=3) == 1.0
    assert success_rate(detector, x, y, target=1) == 0.0  # the trigger sends them to 3
    assert success_rate(detector, x[y == 3], y[y == 3], target=3) == 0.0  # none of others


def test_settings_and_bad_values():
    cfg = AttackSettings(attack="backdoor", attack_target=7).config()
    attack = build_attack(cfg)
    assert cfg.backdoors and cfg.every == 1 and attack.crafts_update(0)
    assert not attack.pools_update
    assert attack.describe() == "backdoor, target 7, boost n, norm bound 2.0, every 1 rounds"
    w = torch.ones(3)  # boosted by the round's size (4), no longer than 2x its own length
    sent = attack.on_update(w, torch.zeros(3), View(0, 4, torch.Generator()))
    torch.testing.assert_close(sent, boosted(w, 4, 2.0))
    torch.testing.assert_close(sent, 2.0 * w)
    for bad in (
        {"target": -1},
        {"poison_share": 0.0},
        {"boost": 0.0},
        {"norm_bound": -1.0},
        {"jitter": -0.5},
    ):
        with pytest.raises(ConfigError):
            AttackConfig("backdoor", **bad)
    with pytest.raises(ConfigError, match="not one of the dataset's 10 classes"):
        AttackConfig("backdoor", target=10).check_classes(10)


@pytest.mark.slow  # runs federations: see tests/conftest.py
def test_flclustering_keeps_the_backdoor_out_where_fedavg_learns_it():
    """20% backdoor attackers (boosted 2x, every round): FedAvg's model obeys the trigger,
    flclustering's does not and keeps its accuracy."""
    torch.set_num_threads(2)
    runs = {}
    for strategy in ("fedavg", "flclustering"):
        cfg = ExperimentConfig().replace(
            strategy=strategy, rounds=15, attack="backdoor", attack_rate=0.2
        )
        runs[strategy] = run_local(cfg).final
    assert runs["fedavg"]["backdoor_success_rate"] > 0.5, runs
    assert runs["flclustering"]["backdoor_success_rate"] <= 0.05, runs
    assert runs["flclustering"]["mean_accuracy"] >= 0.93, runs
