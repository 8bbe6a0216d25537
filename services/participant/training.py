"""Local training, pre-training deltas and evaluation on a participant's own data.

Pure in the sense that matters here: every function takes the model, the examples (tensors
in memory or files read by a DataLoader: services.participant.examples), the settings, the
task's objective (classification or regression: services.core.objectives) and a seeded
generator, and returns results; nothing global is read or written.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from services.common.settings import TrainingSettings
from services.core.objectives import CLASSIFICATION, Objective, Tally
from services.core.tensors import flatten, spec_of
from services.participant.dpsgd import DpSgd
from services.participant.examples import Examples, index_batches

batches = index_batches  # the shuffled index batches of one epoch (tests and benchmarks)


@dataclass(frozen=True)
class TrainResult:
    """What one call of local training did."""

    loss: float  # mean training loss over the last epoch
    examples: int  # examples processed (all epochs)
    steps: int
    seconds: float


class Sgd:
    """SGD with heavy-ball momentum: the arithmetic of torch.optim.SGD(lr, momentum), no
    dampening, Nesterov or weight decay, so results are bit-identical to it.

    Written out because constructing any torch.optim optimizer imports torch._dynamo: about
    2 s of CPU in every participant process, more than the local training of a small model.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, momentum: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.momentum = momentum
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients (always by setting them to None)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update from the gradients the last backward pass left."""
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-self.lr)


def _sgd(model: nn.Module, lr: float, momentum: float) -> Sgd:
    return Sgd(model.parameters(), lr=lr, momentum=momentum)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def local_train(
    model: nn.Module,
    data: Examples,
    config: TrainingSettings,
    round_: int,
    generator: torch.Generator,
    objective: Objective = CLASSIFICATION,
    privacy: DpSgd | None = None,
) -> TrainResult:
    """Train `model` in place for `config.local_epochs` epochs on data, on its device.

    With `privacy`, DP-SGD (services.participant.dpsgd): each epoch ceil(n / B) Poisson
    batches of expected size B, per-example clipping and noise, the steps spent in its
    ledger (dpsgd.BudgetSpent, before any step, when they would break its budget)."""
    if len(data) == 0:
        raise ValueError("no training examples")
    device = _device_of(model)
    opt = _sgd(model, config.lr_at(round_), config.momentum)
    model.train()
    start = time.perf_counter()
    if privacy is not None:
        passes = [-(-len(data) // config.batch_size)] * config.local_epochs
        done = privacy.run(model, data, opt, config.batch_size, passes, generator, objective)
        return TrainResult(
            done[-1].loss_sum / len(data),
            sum(p.examples for p in done),
            sum(p.steps for p in done),
            time.perf_counter() - start,
        )
    steps = examples = 0
    epoch_loss = 0.0
    for _ in range(config.local_epochs):
        total = 0.0
        for x, y in data.batches(config.batch_size, device, generator):
            opt.zero_grad(set_to_none=True)
            loss = objective.loss(model(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(y)
            steps += 1
            examples += len(y)
        epoch_loss = total / len(data)
    return TrainResult(epoch_loss, examples, steps, time.perf_counter() - start)


def pre_train_batches(
    examples: int, adjusted: bool, steps: int, epochs: int, batch_size: int
) -> int:
    """Mini-batches pre-training runs: `steps` when adjusted, else `epochs` full passes."""
    return steps if adjusted else epochs * -(-examples // batch_size)


def pre_train_delta(
    model: nn.Module,
    data: Examples,
    generator: torch.Generator,
    adjusted: bool = True,
    steps: int = 20,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.9,
    objective: Objective = CLASSIFICATION,
    privacy: DpSgd | None = None,
) -> torch.Tensor:
    """The pre-training delta w_i - w0 that clustering groups (docs/algorithm.md, section 2).

    With the sample adjustment strategy (`adjusted`) every participant runs the same number of
    one-mini-batch steps, so ten times more data does not mean a ten times longer delta;
    without it, `epochs` full passes (the unadjusted variant, kept for comparison).
    `model` is left untouched; its copy is trained. With `privacy`, the same number of
    DP-SGD steps (Poisson batches of expected size batch_size), spent in its ledger: the
    delta leaves the participant as the trained weights do.
    """
    work = copy.deepcopy(model)
    spec = spec_of(work.state_dict())
    before = flatten(work.state_dict(), spec).clone()
    device = _device_of(work)
    opt = _sgd(work, lr, momentum)
    work.train()
    if privacy is not None:
        count = pre_train_batches(len(data), adjusted, steps, epochs, batch_size)
        privacy.run(work, data, opt, batch_size, [count], generator, objective)
        return flatten(work.state_dict(), spec).cpu() - before.cpu()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        objective.loss(work(x), y).backward()
        opt.step()

    if adjusted:
        done = 0
        while done < steps:
            for x, y in data.batches(batch_size, device, generator):
                step(x, y)
                done += 1
                if done == steps:
                    break
    else:
        for _ in range(epochs):
            for x, y in data.batches(batch_size, device, generator):
                step(x, y)
    return flatten(work.state_dict(), spec).cpu() - before.cpu()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Examples,
    batch_size: int = 2048,
    objective: Objective = CLASSIFICATION,
) -> tuple[float, float]:
    """Mean loss and score of `model` on data: the accuracy (classification) or R^2 clipped
    to [0, 1] (regression; services.core.objectives says why)."""
    if len(data) == 0:
        raise ValueError("no evaluation examples")
    device = _device_of(model)
    model.eval()
    tally = Tally()
    for x, y in data.batches(batch_size, device):
        objective.add(tally, model(x), y)
    return tally.loss_sum / tally.n, objective.score(tally)
