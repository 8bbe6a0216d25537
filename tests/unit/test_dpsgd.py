"""DP-SGD on a participant (services/participant/dpsgd.py): clipping, noise, the ledger, the
budget, the model left as it was, learning on digits, and the participant that stops."""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from torch import nn
from torch.utils.data import TensorDataset

from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.settings import PrivacySettings, TrainingSettings
from services.core.accountant import Ledger, Step, epsilon_of
from services.core.models import build_model
from services.core.objectives import CLASSIFICATION
from services.participant.attacks import AttackConfig
from services.participant.datasets import load_dataset
from services.participant.dpsgd import (
    BudgetSpent,
    DpSgd,
    clipped_sum,
    ledger_path,
    load_ledger,
    poisson_sample,
    save_ledger,
    take,
    unsupported,
)
from services.participant.examples import LoaderExamples, Readers, TensorExamples
from services.participant.metrics import ParticipantMetrics
from services.participant.training import Sgd, evaluate, local_train, pre_train_delta

DATA = load_dataset("digits")
# Torch's note that a backward hook fires with no input requiring gradients: every DP-SGD
# step (dpsgd.py filters it in the services; pytest resets the filters for each test).
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as simulated participants train (services/participant/__main__.py):
    per-example gradients are many small operations, which a second thread slows down on
    a busy CPU (measured: 3 DP epochs of digits, 0.8 s on one thread, 2.1 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def private(noise: float = 1.0, clip: float = 1.0, budget: float | None = None) -> PrivacySettings:
    return PrivacySettings(dp="local", dp_noise=noise, dp_clip=clip, dp_epsilon=budget)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear(d: int, classes: int = 2) -> nn.Module:
    """A model whose gradient on an input x is (softmax - onehot) x^T: zero for x = 0.
    Its weights start at zero, so no input saturates the softmax before its first step."""
    layer = nn.Linear(d, classes, bias=False)
    nn.init.zeros_(layer.weight)
    return nn.Sequential(nn.Flatten(), layer)


def weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def test_poisson_batches_have_the_expected_size_and_vary():
    g = gen(1)
    sizes = [len(poisson_sample(1000, 0.05, g)) for _ in range(400)]
    mean = sum(sizes) / len(sizes)
    assert abs(mean - 50) < 2  # 50 +- 0.35 standard errors
    assert len(set(sizes)) > 10  # Poisson, not fixed batches
    idx = poisson_sample(1000, 0.05, g)
    assert torch.equal(idx, idx.unique())  # each example at most once


def test_clipped_sum_against_a_naive_loop():
    g = gen(2)
    samples = [torch.randn(5, 3, 4, generator=g) * 3, torch.randn(5, 7, generator=g)]
    got = clipped_sum(samples, clip=1.5)
    want = [torch.zeros(3, 4), torch.zeros(7)]
    for i in range(5):
        norm = math.sqrt(sum(float(s[i].pow(2).sum()) for s in samples))
        scale = min(1.0, 1.5 / (norm + 1e-6))
        want = [w + scale * s[i] for w, s in zip(want, samples, strict=True)]
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_clipping_bounds_each_examples_contribution():
    """(a) One outlier with a huge gradient among examples with none: a DP-SGD step moves the
    weights by at most lr * C / (expected batch); plain SGD moves them thousands of times
    more."""
    n, batch, d, clip, lr = 64, 8, 10, 1.0, 1.0
    x = torch.zeros(n, d)
    x[5] = 1e4  # its gradient's norm: 0.5 * sqrt(2) * 1e4 * sqrt(d) at the zero weights
    y = torch.zeros(n, dtype=torch.long)
    data = TensorExamples(x, y)
    model = linear(d)
    dp = DpSgd(private(noise=1e-6, clip=clip), n)
    opt = Sgd(model.parameters(), lr=lr, momentum=0.0)
    bound = lr * clip / batch  # the expected batch is rate * n = batch
    moves = []
    g = gen(3)
    for _ in range(40):
        before = weights(model)
        dp.run(model, data, opt, batch, [1], g, CLASSIFICATION)
        moves.append(float((weights(model) - before).norm()))
    assert max(moves) <= bound * 1.001
    assert max(moves) > bound * 0.99  # the outlier was drawn, and clipped to exactly C
    plain = linear(d)
    before = weights(plain)
    local_train(plain, data, TrainingSettings(local_epochs=1, batch_size=batch, lr=lr), 0, g)
    # The outlier's batch alone moves it by its unclipped gradient, about 1e4 / 8.
    assert float((weights(plain) - before).norm()) > 100 * bound


def test_noise_has_standard_deviation_z_c_over_the_expected_batch():
    """(b) Zero gradients (zero inputs): what a step moves is the noise alone, and its
    standard deviation per coordinate is z * C / (expected batch)."""
    n, batch, d, z, clip = 40, 10, 500, 2.0, 0.5
    data = TensorExamples(torch.zeros(n, d), torch.zeros(n, dtype=torch.long))
    want = z * clip / batch
    draws = []
    for seed in range(10):
        model = linear(d)
        dp = DpSgd(private(noise=z, clip=clip), n)
        opt = Sgd(model.parameters(), lr=1.0, momentum=0.0)
        g = gen(100 + seed)
        for _ in range(5):
            before = weights(model)
            dp.run(model, data, opt, batch, [1], g, CLASSIFICATION)
            draws.append(weights(model) - before)
    noise = torch.cat(draws)  # 10 seeds x 5 steps x 1,000 coordinates
    assert abs(float(noise.mean())) < 3 * want / math.sqrt(len(noise))
    assert float(noise.std()) == pytest.approx(want, rel=0.03)


def test_a_step_that_drew_no_example_still_adds_noise():
    """Skipping an empty batch's step would tell that no example was drawn. Batches of
    expected size 1 are empty a third of the time (e^-1)."""
    n, d = 1000, 20
    data = TensorExamples(torch.zeros(n, d), torch.zeros(n, dtype=torch.long))
    model = linear(d)
    dp = DpSgd(private(noise=1.0), n)
    opt = Sgd(model.parameters(), 1.0, 0.0)
    done = dp.run(model, data, opt, 1, [1] * 20, gen(9), CLASSIFICATION)
    assert sum(p.examples == 0 for p in done) >= 3
    assert dp.ledger.steps == [Step(1.0, 1 / n, 20)]
    # Zero gradients: 20 steps of noise, z * C / 1 each, every step's.
    assert float(weights(model).std()) == pytest.approx(math.sqrt(20), rel=0.3)


def test_poisson_batches_read_from_disk_examples():
    """Own images are read by the loader's workers: a Poisson batch is one pass of them."""
    x = torch.arange(30, dtype=torch.float32).reshape(30, 1)
    dataset = TensorDataset(x, torch.arange(30))
    readers = Readers(workers=0)
    first = LoaderExamples(TensorDataset(x[:7], torch.arange(7)), readers=readers)
    second = LoaderExamples(dataset, readers=readers)
    idx = torch.tensor([3, 17, 29])
    bx, by = take(second, idx, torch.device("cpu"))
    assert torch.equal(by, idx) and torch.equal(bx[:, 0], idx.float())
    assert torch.equal(take(first, torch.tensor([6]), torch.device("cpu"))[1], torch.tensor([6]))
    assert take(TensorExamples(x, torch.arange(30)), idx, torch.device("cpu"))[1].tolist() == [
        3,
        17,
        29,
    ]


def test_dp_sgd_on_the_device(device):
    """The model and the examples on the device (CUDA where present), the generator on the
    CPU, as a participant's: the noise is drawn there and moved."""
    model = build_model("cnn", DATA.input_shape, 10).to(device)
    keys = list(model.state_dict())
    data = TensorExamples(DATA.x_train[:64], DATA.y_train[:64]).to(device)
    dp = DpSgd(private(), 64)
    before = weights(model)
    cfg = TrainingSettings(local_epochs=1, batch_size=16, lr=0.05)
    result = local_train(model, data, cfg, 0, gen(10), privacy=dp)
    assert result.steps == 4 and list(model.state_dict()) == keys
    assert torch.isfinite(weights(model)).all() and not torch.equal(weights(model), before)


def test_the_ledger_spends_each_rounds_steps():
    """(c) A round spends local_epochs * ceil(n / B) steps at rate B / n, and epsilon is
    the accountant's of exactly those."""
    n, batch, epochs, z = 50, 16, 2, 1.1
    x, y = DATA.x_train[:n], DATA.y_train[:n]
    model = build_model("2nn", DATA.input_shape, 10)
    dp = DpSgd(private(noise=z), n)
    cfg = TrainingSettings(local_epochs=epochs, batch_size=batch, lr=0.05)
    per_round = epochs * math.ceil(n / batch)
    assert dp.round_plan(cfg) == Step(z, batch / n, per_round)
    g = gen(4)
    for r in (1, 2):
        result = local_train(model, TensorExamples(x, y), cfg, 0, g, privacy=dp)
        assert result.steps == per_round
        assert dp.ledger.steps == [Step(z, batch / n, r * per_round)]
        assert dp.epsilon == pytest.approx(
            epsilon_of([Step(z, batch / n, per_round)] * r, dp.ledger.delta)
        )


def test_the_budget_refuses_the_round_that_would_break_it():
    """(d) A budget between epsilon after 2 rounds and after 3: rounds 1 and 2 train,
    round 3 is refused with the ledger's reason, before any step."""
    n, batch, z = 60, 20, 1.0
    cfg = TrainingSettings(local_epochs=1, batch_size=batch, lr=0.05)
    step = Step(z, batch / n, math.ceil(n / batch))
    e2, e3 = epsilon_of([step] * 2, 1e-5), epsilon_of([step] * 3, 1e-5)
    dp = DpSgd(private(noise=z, budget=(e2 + e3) / 2), n)
    model = build_model("2nn", DATA.input_shape, 10)
    data = TensorExamples(DATA.x_train[:n], DATA.y_train[:n])
    g = gen(5)
    for _ in range(2):
        assert dp.refuses(cfg) == ""
        local_train(model, data, cfg, 0, g, privacy=dp)
    why = dp.refuses(cfg)
    assert why.startswith("the privacy budget is spent") and "--dp-epsilon" in why
    assert f"{e3:.3g}" in why
    before = weights(model)
    with pytest.raises(BudgetSpent, match="privacy budget is spent"):
        local_train(model, data, cfg, 0, g, privacy=dp)
    assert torch.equal(weights(model), before)
    assert dp.epsilon == pytest.approx(e2)


@pytest.mark.parametrize("name", ["cnn", "2nn", "keras-cnn"])
def test_the_model_is_left_as_it_was(name):
    """(e) Same state_dict keys and shapes, no hooks or Opacus attributes left, and it can
    be trained privately again (hooks attached twice would raise)."""
    model = build_model(name, DATA.input_shape, 10)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert unsupported(model, DATA.input_shape) == ""
    dp = DpSgd(private(), 40)
    data = TensorExamples(DATA.x_train[:40], DATA.y_train[:40])
    cfg = TrainingSettings(local_epochs=1, batch_size=10, lr=0.05)
    for _ in range(2):
        local_train(model, data, cfg, 0, gen(6), privacy=dp)
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks
        assert not hasattr(module, "activations") and not hasattr(module, "max_batch_len")
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "_forward_counter")
    # The pre-training delta, privately: the model's length, the model itself untouched,
    # its 3 steps spent (merged with the rounds' 2 x 4 of the same rate).
    before = weights(model)
    delta = pre_train_delta(model, data, gen(7), steps=3, batch_size=10, privacy=dp)
    assert delta.numel() == before.numel() and torch.equal(weights(model), before)
    assert dp.ledger.steps == [Step(1.0, 10 / 40, 2 * 4 + 3)]


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch over nn.LSTM
def test_models_opacus_cannot_do_are_refused_in_one_line():
    why = unsupported(build_model("lstm", DATA.input_shape, 10), DATA.input_shape)
    assert why and "\n" not in why


def test_dp_sgd_learns_digits():
    """(f) With noise z = 1 (epsilon about 3 at delta 1e-5 after 3 epochs), a small MLP
    still learns the digits: far above chance (0.1)."""
    model = build_model("2nn", DATA.input_shape, 10)
    train = TensorExamples(DATA.x_train, DATA.y_train)
    dp = DpSgd(private(noise=1.0, clip=1.0), len(train))
    cfg = TrainingSettings(local_epochs=3, batch_size=64, lr=0.1, momentum=0.9)
    local_train(model, train, cfg, 0, gen(8), privacy=dp)
    _, acc = evaluate(model, TensorExamples(DATA.x_test, DATA.y_test))
    assert acc > 0.6
    assert 1.0 < dp.epsilon < 5.0


def test_the_ledger_survives_a_restart(tmp_path: Path):
    dp = DpSgd(private(noise=1.0, budget=8.0), 100)
    dp._spend(Step(1.0, 0.1, 30))
    path = ledger_path(tmp_path, "participant/0")
    assert path.parent == tmp_path and "/" not in path.name
    assert load_ledger(path) is None
    save_ledger(path, dp.ledger)
    again = DpSgd(private(noise=1.0, budget=8.0), 100, load_ledger(path))
    assert again.epsilon == pytest.approx(dp.epsilon) and again.ledger.budget == 8.0
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a privacy ledger"):
        load_ledger(path)


def test_a_poisoned_set_is_sampled_at_its_own_rate():
    """A backdoor attacker trains on its examples plus triggered copies: the batches are
    drawn, and the steps spent, at the rate of the set it trains on."""
    dp = DpSgd(private(), 10)
    model = linear(4)
    data = TensorExamples(torch.zeros(16, 4), torch.zeros(16, dtype=torch.long))
    dp.run(model, data, Sgd(model.parameters(), 0.1, 0.0), 4, [2], gen(), CLASSIFICATION)
    assert dp.ledger.steps == [Step(1.0, 4 / 16, 2)]
    assert dp.round_plan(TrainingSettings(local_epochs=1, batch_size=4)) == Step(1.0, 0.4, 3)


# ---- the participant service -------------------------------------------------------------
class FakeStub:
    """The clusterer, as far as a participant's run loop needs it: tasks in order, then DONE."""

    def __init__(self, tasks: list[pb.GetTaskResponse]) -> None:
        self.tasks = list(tasks)

    def Join(self, request: Any, **_: Any) -> pb.JoinResponse:
        return pb.JoinResponse()

    def GetTask(self, request: Any, **_: Any) -> pb.GetTaskResponse:
        return self.tasks.pop(0) if self.tasks else pb.GetTaskResponse(kind=pb.TASK_KIND_DONE)


def participant(tmp_path: Path, budget: float, tasks: list[pb.GetTaskResponse]) -> Any:
    from services.participant.worker import LocalData, Participant, WorkerSettings

    n = 200
    local = LocalData(
        TensorExamples(DATA.x_train[:n], DATA.y_train[:n]),
        TensorExamples(DATA.x_test[:50], DATA.y_test[:50]),
        DATA.input_shape,
        10,
    )
    settings = WorkerSettings(
        "2nn",
        torch.device("cpu"),
        None,
        privacy=private(noise=1.0, budget=budget),
        state_dir=str(tmp_path),
    )
    w0 = OrderedDict(build_model("2nn", DATA.input_shape, 10).state_dict())
    store = SimpleNamespace(get=lambda *a, **k: w0)
    registry = CollectorRegistry()
    p = Participant(
        0,
        "participant-0",
        local,
        settings,
        FakeStub(tasks),  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
        AttackConfig(),
        threading.Event(),
        ParticipantMetrics(registry),
    )
    sent: list[tuple[int, dict[str, float]]] = []
    p._send = lambda kind, rnd, version, weights, metrics: sent.append((rnd, metrics))  # type: ignore[method-assign,assignment]
    return p, sent, registry


def train_task(round_: int) -> pb.GetTaskResponse:
    return pb.GetTaskResponse(
        kind=pb.TASK_KIND_TRAIN,
        round=round_,
        training=pb.TrainingSettings(epochs=1, batch_size=50, lr=0.05, momentum=0.9),
    )


def test_a_participant_stops_when_its_budget_is_spent(tmp_path, caplog):
    """Rounds 0 and 1 train (epsilon logged, exported, kept in --state-dir, sent instead of
    the training loss); then the next round would break the budget: it says so and leaves.
    Restarted from its ledger, it refuses its first task and leaves at once."""
    step = Step(1.0, 50 / 200, 4)
    e2, e3 = epsilon_of([step] * 2, 1e-5), epsilon_of([step] * 3, 1e-5)
    budget = (e2 + e3) / 2
    p, sent, registry = participant(tmp_path, budget, [train_task(r) for r in range(5)])
    with caplog.at_level(logging.INFO, logger="services.participant.worker"):
        p.run()
    assert [r for r, _ in sent] == [0, 1]
    assert all("train_loss" not in m for _, m in sent)
    assert sent[1][1]["dp_epsilon"] == pytest.approx(e2)
    gauge = registry.get_sample_value("flclustering_participant_dp_epsilon", {"participant": "0"})
    assert gauge == pytest.approx(e2)
    lines = [r.getMessage() for r in caplog.records]
    assert any("round 1 trained with DP-SGD: epsilon" in line for line in lines)
    leaving = [line for line in lines if "stops training and leaves" in line]
    assert len(leaving) == 1 and "privacy budget is spent" in leaving[0]
    kept = load_ledger(ledger_path(tmp_path, "participant-0"))
    assert kept == Ledger(1e-5, budget, [Step(1.0, 0.25, 8)])

    caplog.clear()
    again, sent_again, _ = participant(tmp_path, budget, [train_task(2), train_task(3)])
    assert again.dp.epsilon == pytest.approx(e2)
    with caplog.at_level(logging.INFO, logger="services.participant.worker"):
        again.run()
    assert sent_again == []
    assert any("stops training and leaves" in r.getMessage() for r in caplog.records)


def test_a_participants_pre_training_delta_is_private_too(tmp_path):
    """The pre-training delta leaves the participant as its weights do: DP-SGD's steps,
    spent and kept; a budget too small for them: it leaves before pre-training."""
    task = pb.GetTaskResponse(
        kind=pb.TASK_KIND_PRETRAIN, training=pb.TrainingSettings(adjusted=True, pre_steps=5)
    )
    p, sent, _ = participant(tmp_path, 50.0, [task])
    p.run()
    assert [r for r, _ in sent] == [-1]
    assert p.dp.ledger.steps == [Step(1.0, 32 / 200, 5)]
    kept = load_ledger(ledger_path(tmp_path, "participant-0"))
    assert kept is not None and kept.steps == p.dp.ledger.steps
    small = epsilon_of([Step(1.0, 32 / 200, 5)], 1e-5) / 2
    (tmp_path / "other").mkdir()
    q, sent, _ = participant(tmp_path / "other", small, [task])
    q.run()
    assert sent == [] and q.dp.ledger.steps == [] and q.spent


def test_participant_settings_refuse_q_ffl_with_local_dp(capsys):
    from services.participant.settings import parser

    with pytest.raises(SystemExit):
        parser().parse(["--dp", "local", "--strategy", "qffl"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dp local" in err and "qffl" in err
    assert parser().parse(["--dp", "local", "--state-dir", "x"]).service.state_dir == "x"


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # functorch over nn.LSTM
def test_a_model_opacus_cannot_do_stops_the_participant_at_start(tmp_path):
    from services.core.errors import ConfigError
    from services.participant.__main__ import check_private
    from services.participant.settings import parser
    from services.participant.worker import LocalData

    data = TensorExamples(DATA.x_train[:10], DATA.y_train[:10])
    local = LocalData(data, data, DATA.input_shape, 10)
    config = parser().parse(["--dp", "local", "--model", "2nn", "--state-dir", str(tmp_path / "s")])
    check_private(config, local, torch.device("cpu"))
    assert (tmp_path / "s").is_dir()
    config = parser().parse(["--dp", "local", "--model", "lstm"])
    with pytest.raises(ConfigError, match="Opacus cannot compute per-example gradients") as exc:
        check_private(config, local, torch.device("cpu"))
    assert "\n" not in str(exc.value)
