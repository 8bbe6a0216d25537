"""Simulated attacks are what they claim and fire when configured; the registry is the one
source of the --attack choices and every registered attack's hooks do what its name says."""

from __future__ import annotations

import argparse

import pytest
import torch

from services.cli import build_parser
from services.core.errors import ConfigError
from services.participant.__main__ import parser as participant_parser
from services.participant.adversary import ATTACKS, AttackSettings
from services.participant.attacks import Attack, AttackConfig, View, build_attack, flip_labels
from services.participant.backdoor import stamp


def view(round_: int = 0, seed: int = 0, size: int = 15) -> View:
    return View(round_, size, torch.Generator().manual_seed(seed))


def test_scaling_fires_every_fifth_round():
    cfg = AttackConfig("scaling", factor=-1, every=5)
    attack = build_attack(cfg)
    fired = [r for r in range(15) if cfg.fires(r)]
    assert fired == [4, 9, 14]
    assert [r for r in range(15) if attack.crafts_update(r)] == fired
    w, g = torch.ones(3), torch.zeros(3)
    assert torch.equal(attack.on_update(w, g, view(4)), -w)


def test_sign_flip_gaussian_same_value():
    w, g = torch.tensor([2.0, 3.0]), torch.tensor([1.0, 1.0])
    flip = build_attack(AttackConfig("sign-flip", every=1)).on_update(w, g, view())
    assert torch.equal(flip - g, -(w - g))
    gaussian = build_attack(AttackConfig("gaussian", every=1, noise_std=5.0))
    noisy = gaussian.on_update(w, g, view(seed=3))
    assert not torch.equal(noisy, w)
    assert torch.equal(noisy, gaussian.on_update(w, g, view(seed=3)))  # from its own stream
    same = build_attack(AttackConfig("same-value", every=1, value=7.0)).on_update(w, g, view())
    assert torch.equal(same, torch.full((2,), 7.0))


def test_label_flip_is_a_data_attack():
    cfg = AttackConfig("label-flip")
    attack = build_attack(cfg)
    assert cfg.fires(0) and not attack.crafts_update(0)
    assert flip_labels(torch.tensor([0, 1, 0, 9])).tolist() == [9, 1, 9, 9]
    x = torch.zeros(4, 1, 8, 8)
    x2, y2 = attack.on_data(x, torch.tensor([0, 1, 0, 9]), view())
    assert x2 is x and y2.tolist() == [9, 1, 9, 9]
    assert attack.describe() == "label-flip, class 0 as 9"


def test_bad_attack_config():
    with pytest.raises(ConfigError):
        AttackConfig("poison")
    with pytest.raises(ConfigError):
        AttackConfig("scaling", every=0)


def attack_choices(parser: argparse.ArgumentParser) -> list[str]:
    """The --attack names a parser offers (its metavar: pydantic checks the value)."""
    (action,) = [a for a in parser._actions if "--attack" in a.option_strings]
    shown = str(action.metavar)
    assert shown.startswith("{") and shown.endswith("}")
    return shown[1:-1].split(",")


def test_the_registry_is_the_attack_flags_choices():
    top, _ = build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("local", "simulate"):
        assert attack_choices(sub.choices[command]) == list(ATTACKS), command
    assert attack_choices(participant_parser().parser) == list(ATTACKS)
    assert AttackSettings.model_fields["attack"].default in ATTACKS
    for name in ATTACKS:
        attack = build_attack(AttackConfig(name))
        assert isinstance(attack, Attack) and attack.kind == name
        assert attack.describe().startswith(name)
    with pytest.raises(ConfigError, match="unknown attack"):
        ATTACKS["poison"]


def test_only_the_forgers_need_the_services():
    needs = {n for n in ATTACKS if build_attack(AttackConfig(n)).needs_services}
    assert needs == {"he-forged-key", "he-huge"}
    assert all(ATTACKS[n].needs_he for n in needs)


def honest_figures() -> dict[str, float]:
    return {"accuracy": 0.8, "loss": 0.5, "personal_accuracy": 0.7, "personal_loss": 0.6}


# What each attack's hooks do to small tensors: the weights sent (trained w, base b), the
# training labels (y), the figures reported, the pre-training delta and the pooled deltas.
W, B = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 1.0, 1.0])
POOLED = torch.tensor([[1.0, 0.0, 2.0], [3.0, 2.0, 0.0], [2.0, 1.0, 1.0]])
MEAN = POOLED.mean(0)


def check_hooks(name: str) -> None:
    attack = build_attack(AttackConfig(name, every=1, factor=-2.0, value=4.0, lie=1.0))
    x, y = torch.rand(20, 1, 8, 8), torch.arange(20) % 10
    x2, y2 = attack.on_data(x, y, view())
    sent = attack.on_update(W, B, view(size=3)) if attack.crafts_update(0) else W
    figures = attack.on_report(honest_figures(), view())
    pooled = POOLED if attack.pools_pretrain else None
    own = POOLED[0]
    pre = attack.on_pretrain(own, view(), pooled)
    delta = attack.on_pooled(POOLED, view(size=10)) if attack.pools_update else None
    changed_data = not (x2 is x and y2 is y)
    lies = figures != honest_figures()
    if name in ("none", "he-forged-key", "he-huge"):  # the forgers act on ciphertexts only
        assert not changed_data and torch.equal(sent, W) and not lies and pre is own
        assert not attack.crafts_update(0) and not attack.pools_update
    elif name == "scaling":
        assert torch.equal(sent, -2.0 * W) and not changed_data and not lies
    elif name == "sign-flip":
        assert torch.equal(sent, B - (W - B)) and not changed_data
    elif name == "gaussian":
        assert not torch.equal(sent, W) and sent.shape == W.shape and not changed_data
    elif name == "same-value":
        assert torch.equal(sent, torch.full((3,), 4.0))
    elif name == "label-flip":
        assert torch.equal(y2, torch.where(y == 0, 9, y)) and x2 is x
        assert torch.equal(sent, W) and not lies
    elif name == "lying-evaluation":
        assert figures == {**honest_figures(), "accuracy": 1.0, "personal_accuracy": 1.0}
        assert not changed_data and torch.equal(sent, W)
    elif name == "backdoor":
        assert len(y2) > len(y) and (y2[len(y) :] == 0).all()
        torch.testing.assert_close(x2[len(x) :], stamp(x2[len(x) :]))  # triggered copies
        assert torch.allclose((sent - B).norm(), 2.0 * (W - B).norm())  # boost 3, bound 2
        assert not lies
    elif name in ("alie", "ipm", "min-max", "min-sum"):
        assert delta is not None and delta.shape == MEAN.shape
        if name == "ipm":
            torch.testing.assert_close(delta, -0.1 * MEAN)
        else:  # mean + something * -std (ALIE with n = 10, f = 3: z = 0 gives the mean)
            assert torch.all(delta <= MEAN + 1e-6)
        assert not lies and not changed_data and pre is own
    elif name == "cluster-steering":
        torch.testing.assert_close(pre, MEAN)
        assert delta is not None
        torch.testing.assert_close(delta, -MEAN)
        assert figures["accuracy"] == 1.0 and figures["loss"] == 0.5
    elif name in ("adaptive", "adaptive-steering"):
        # mean + gamma * -std, jittered past the near-twin screen
        assert delta is not None and delta.shape == MEAN.shape and not changed_data
        if name == "adaptive":
            assert pre is own and not lies
        else:  # plain steering's pre-training (their mean, jittered) and the lie
            assert not torch.equal(pre, MEAN) and (pre - MEAN).norm() < (own - MEAN).norm()
            assert figures["accuracy"] == 1.0 and figures["loss"] == 0.5
    else:
        raise AssertionError(f"no hook check for attack {name!r}: add one here")


@pytest.mark.parametrize("name", list(ATTACKS))
def test_every_registered_attack_does_what_its_name_says(name):
    check_hooks(name)


def test_a_forger_replaces_the_ciphertexts_in_the_rounds_it_fires():
    class Keys:
        def encrypt(self, flat: torch.Tensor, weight: float = 1.0) -> list[bytes]:
            return [repr((flat.tolist(), weight)).encode()]

    huge = build_attack(AttackConfig("he-huge", every=2))
    keys = Keys()
    w = torch.tensor([-1.0, 2.0])
    assert huge.on_encrypt(keys, w, 4, view(0)) is None  # type: ignore[arg-type]
    assert huge.on_encrypt(keys, w, 4, view(1)) == [repr(([-(2.0**25), 2.0**25], 1.0)).encode()]  # type: ignore[arg-type]
