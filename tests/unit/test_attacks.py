"""Simulated attacks are what they claim and fire when configured."""

from __future__ import annotations

import pytest
import torch

from services.core.errors import ConfigError
from services.participant.attacks import AttackConfig, apply_model_attack, flip_labels


def test_scaling_fires_every_fifth_round():
    cfg = AttackConfig("scaling", factor=-1, every=5)
    fired = [r for r in range(15) if cfg.fires(r)]
    assert fired == [4, 9, 14]
    w, g = torch.ones(3), torch.zeros(3)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(apply_model_attack(cfg, w, g, 4, gen), -w)
    assert torch.equal(apply_model_attack(cfg, w, g, 3, gen), w)


def test_sign_flip_gaussian_same_value():
    w, g = torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.0])
    gen = torch.Generator().manual_seed(0)
    flip = apply_model_attack(AttackConfig("sign-flip", every=1), w, g, 0, gen)
    assert torch.equal(flip - g, -(w - g))
    noisy = apply_model_attack(AttackConfig("gaussian", every=1, noise_std=5.0), w, g, 0, gen)
    assert not torch.equal(noisy, w)
    same = apply_model_attack(AttackConfig("same-value", every=1, value=7.0), w, g, 0, gen)
    assert torch.equal(same, torch.full((2,), 7.0))


def test_label_flip_is_a_data_attack():
    cfg = AttackConfig("label-flip")
    assert cfg.poisons_data and cfg.fires(0)
    assert flip_labels(torch.tensor([0, 1, 0, 9])).tolist() == [9, 1, 9, 9]
    w = torch.ones(2)
    assert torch.equal(apply_model_attack(cfg, w, w, 0, torch.Generator()), w)


def test_bad_attack_config():
    with pytest.raises(ConfigError):
        AttackConfig("poison")
    with pytest.raises(ConfigError):
        AttackConfig("scaling", every=0)
