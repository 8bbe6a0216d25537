"""Local training, pre-training deltas and evaluation on real digits."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from services.common.settings import TrainingSettings
from services.core.models import build_model
from services.participant.datasets import load_dataset
from services.participant.examples import TensorExamples
from services.participant.partition import partition
from services.participant.training import Sgd, evaluate, local_train, pre_train_delta

DATA = load_dataset("digits")


def shard(index=0, n=3):
    s = partition(DATA.y_train.numpy(), DATA.y_test.numpy(), "iid", n, 0, 10)[index]
    return DATA.x_train[s.train], DATA.y_train[s.train], DATA.x_test[s.test], DATA.y_test[s.test]


def test_local_training_raises_test_accuracy():
    x, y, xt, yt = shard()
    model = build_model("cnn", DATA.input_shape, 10, seed=0)
    loss0, acc0 = evaluate(model, TensorExamples(xt, yt))
    result = local_train(
        model,
        TensorExamples(x, y),
        TrainingSettings(local_epochs=5, lr=0.1, momentum=0.9),
        0,
        torch.Generator().manual_seed(0),
    )
    loss1, acc1 = evaluate(model, TensorExamples(xt, yt))
    assert acc0 < 0.3
    assert acc1 >= 0.7 and acc1 > acc0 + 0.4
    assert loss1 < loss0
    assert result.examples == 5 * len(y) and result.steps == 5 * -(-len(y) // 32)


def test_pre_train_delta_steps_are_fixed_when_adjusted():
    model = build_model("2nn", DATA.input_shape, 10, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = DATA.x_train, DATA.y_train
    small = pre_train_delta(
        model, TensorExamples(x[:64], y[:64]), torch.Generator().manual_seed(1), steps=10
    )
    large = pre_train_delta(model, TensorExamples(x, y), torch.Generator().manual_seed(1), steps=10)
    full = pre_train_delta(
        model, TensorExamples(x, y), torch.Generator().manual_seed(1), adjusted=False
    )
    # The model itself is untouched.
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    # Same number of steps: comparable lengths; a full epoch on all data: a much longer one.
    ratio = float(large.norm() / small.norm())
    assert 0.5 < ratio < 2.0
    assert float(full.norm()) > 1.5 * float(large.norm())


def test_lr_decays_per_round():
    cfg = TrainingSettings(lr=0.1, lr_decay=0.5)
    assert cfg.lr_at(0) == 0.1 and cfg.lr_at(2) == 0.025


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_matches_torch_sgd_bit_for_bit(momentum: float) -> None:
    """The hand-written SGD (no torch._dynamo import) must be torch.optim.SGD exactly."""
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    theirs = copy.deepcopy(ours)
    initial = copy.deepcopy(ours)
    mine = Sgd(ours.parameters(), lr=0.05, momentum=momentum)
    ref = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(5):
        for model, opt in ((ours, mine), (theirs, ref)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0].weight, initial[0].weight)  # it did train


@pytest.mark.parametrize("dim", [-1, (1 << 16) + 1, (1 << 31) - 1])
def test_a_participant_refuses_a_hostile_sketch_size(dim: int) -> None:
    """A task asking for an absurd sketch is refused before anything is allocated."""
    from types import SimpleNamespace

    from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
    from services.core.errors import StateError
    from services.participant.worker import Participant

    task = pb.GetTaskResponse(
        kind=pb.TASK_KIND_PRETRAIN, training=pb.TrainingSettings(sketch_dim=dim)
    )
    with pytest.raises(StateError, match="sketch"):
        Participant.pretrain(SimpleNamespace(), task)  # type: ignore[arg-type]
