"""DP-SGD on a participant's own examples: sample-level local differential privacy.

Each step draws a Poisson batch (every example independently, with rate q = B / n),
computes each example's gradient (Opacus's per-sample hooks), clips each to L2 norm C,
sums them, adds Gaussian noise N(0, (zC)^2) to every coordinate and divides by the
expected batch size qn. That is the sampled Gaussian mechanism the accountant analyses
(services.core.accountant: one Step(z, q, count) per round), so a participant's epsilon is
what its ledger says. The learning rate and momentum act on the privatised gradient only:
post-processing, free of charge. The batch is never empty of noise: a step that sampled no
example still adds it, since skipping it would tell that no example was drawn.

The model is not wrapped: Opacus's hooks are attached to it for one training call and
removed after, so its state_dict keys are the federation's and the same model object is
evaluated, and reused by other simulated participants, as a plain module.

Randomness: batches and noise come from the caller's torch.Generator (the participant's
seeded one), so a simulation is reproducible. That is not a cryptographically secure
source: torch's generators are predictable from their state, and sampling floating-point
Gaussians leaks through their low bits (Mironov 2012). Opacus's `secure_mode` (noise from
torchcsprng, sampled as Opacus does against that attack) is not supported here: torchcsprng
is not installed and the participant's reproducibility rests on the seeded generator. A
deployment guarding real people's data should draw the noise from a CSPRNG instead.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from services.common.files import durable_write
from services.common.settings import PrivacySettings, TrainingSettings
from services.core.errors import ConfigError, StateError
from services.core.objectives import Objective
from services.participant.examples import Batch, Examples, LoaderExamples, TensorExamples

if TYPE_CHECKING:
    from services.core.accountant import Ledger, Step

# Opacus (and the accountant, which is Opacus's analysis) are imported where DP-SGD runs,
# not with this module: importing opacus costs about 2 s of CPU (its package imports its
# whole engine), paid by every participant process that imports the training loop, with
# DP or without (the cost torch.optim's import was avoided for: training.Sgd).


# Torch warns, once per process, that a module's full backward hook fires with no input
# requiring gradients: true of every DP-SGD step (inputs are data) and harmless, since
# Opacus's hooks read the gradients of the module's outputs.
warnings.filterwarnings(
    "ignore", message="Full backward hook is firing when gradients are computed with respect"
)


class BudgetSpent(StateError):
    """Training would spend more than the participant's --dp-epsilon (the ledger's reason)."""


class Optimizer(Protocol):
    """What DP-SGD steps with: the gradients it leaves in `p.grad`, applied."""

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> None: ...


@dataclass(frozen=True)
class Pass:
    """What a run of private steps did: its summed loss, examples drawn and steps."""

    loss_sum: float
    examples: int
    steps: int


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the examples drawn, each independently with probability `rate` (on the
    generator's device: CPU for the participants' generators)."""
    drawn = torch.rand(n, generator=generator, device=generator.device) < rate
    return drawn.nonzero().squeeze(1)


def take(data: Examples, indices: torch.Tensor, device: torch.device) -> Batch:
    """The examples at `indices` (a Poisson batch: any size, any order) on device."""
    if isinstance(data, TensorExamples):
        at = indices.to(data.y.device)
        return data.x[at].to(device), data.y[at].to(device)
    if isinstance(data, LoaderExamples):  # one pass of one batch, read to its end
        ((x, y),) = list(data.readers.read(indices + data.offset, len(indices), device))
        return x, y
    raise TypeError(f"DP-SGD reads examples by index; {type(data).__name__} cannot")


def clipped_sum(grad_samples: Sequence[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """The sum over a batch of per-example gradients, each example's (all tensors together)
    scaled to L2 norm at most `clip`. `grad_samples`: one (B, *shape) tensor per parameter."""
    norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=1) for g in grad_samples]).norm(2, dim=0)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # Opacus's flat clipping
    return [torch.einsum("i,i...->...", factor.to(g.dtype), g) for g in grad_samples]


def noised(
    summed: Sequence[torch.Tensor], std: float, expected: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """(sum + N(0, std^2)) / expected for each tensor: the noise drawn from generator (on
    its device, then moved to the tensor's)."""
    out = []
    for s in summed:
        noise = torch.normal(
            0.0, std, s.shape, generator=generator, device=generator.device, dtype=s.dtype
        )
        out.append((s + noise.to(s.device)) / expected)
    return out


@contextmanager
def per_example_gradients(model: nn.Module) -> Iterator[None]:
    """Opacus's hooks on model for the block (each backward fills `p.grad_sample`), then
    removed with every attribute they set, so the model is a plain module again."""
    from opacus.grad_sample import GradSampleHooks

    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)
    try:
        yield
    finally:
        hooks.cleanup()
        for module in model.modules():
            for attr in ("activations", "max_batch_len"):
                if hasattr(module, attr):
                    delattr(module, attr)


def unsupported(model: nn.Module, input_shape: Sequence[int]) -> str:
    """Why Opacus cannot give this model's per-example gradients ("" when it can): tried
    on a copy with two zero inputs of input_shape, so that a participant refuses at
    start-up, in one line, rather than at its first round."""
    probe = copy.deepcopy(model)
    first = next((p for p in probe.parameters() if p.requires_grad), None)
    if first is None:
        return "it has no parameters to train"
    probe.train()
    try:
        with per_example_gradients(probe):
            x = torch.zeros(2, *input_shape, device=first.device)
            probe(x).float().sum().backward()
            missing = [
                n
                for n, p in probe.named_parameters()
                if p.requires_grad and getattr(p, "grad_sample", None) is None
            ]
    except Exception as exc:  # Opacus's and torch's refusals alike: one line
        lines = str(exc).strip().splitlines() or [""]
        return f"{type(exc).__name__}: {lines[0][:200]}"
    if missing:
        return f"no per-example gradient for {', '.join(missing[:3])}"
    return ""


class DpSgd:
    """One participant's DP-SGD: noise multiplier z, clipping bound C, its number of
    training examples n, and the ledger of the steps it has run (the budget its check).

    n plans the rounds the budget is checked for; a run samples the examples it is given
    at their own rate, and spends that. They differ only for a simulated backdoor attacker,
    whose poisoned set holds copies of its examples besides them (its privacy is not what
    the budget protects)."""

    def __init__(
        self, privacy: PrivacySettings, examples: int, ledger: Ledger | None = None
    ) -> None:
        from services.core.accountant import Ledger

        if examples < 1:
            raise ConfigError("DP-SGD needs training examples")
        self.noise = privacy.dp_noise
        self.clip = privacy.dp_clip
        self.examples = examples
        # The steps are facts; delta and the budget are this run's settings.
        spent = list(ledger.steps) if ledger is not None else []
        self.ledger = Ledger(privacy.dp_delta, privacy.dp_epsilon, spent)
        # Epsilon by the steps it is of: the accountant takes 50 to 200 ms a call, and a
        # round asks about the same steps several times (its check, its log line, its gauge,
        # the next round's check).
        self._known: dict[tuple[tuple[float, float, int], ...], float] = {}

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far, at the ledger's delta."""
        return self._epsilon(self.ledger.steps)

    def _epsilon(self, steps: Sequence[Step]) -> float:
        from services.core.accountant import epsilon_of

        merged: dict[tuple[float, float], int] = {}
        for s in steps:
            merged[(s.noise, s.rate)] = merged.get((s.noise, s.rate), 0) + s.count
        key = tuple(sorted((n, r, c) for (n, r), c in merged.items() if c))
        if key not in self._known:
            if len(self._known) >= 64:
                self._known.clear()
            self._known[key] = epsilon_of(steps, self.ledger.delta)
        return self._known[key]

    def rate(self, batch_size: int, examples: int | None = None) -> float:
        """The Poisson rate of batches of expected size batch_size (1 at most) among n (or
        `examples`) examples."""
        return min(1.0, batch_size / (examples or self.examples))

    def plan(self, batch_size: int, count: int, examples: int | None = None) -> Step:
        """`count` Poisson batches of expected size batch_size among n (or `examples`)
        examples, as the accountant sees them."""
        from services.core.accountant import Step

        return Step(self.noise, self.rate(batch_size, examples), count)

    def round_plan(self, settings: TrainingSettings) -> Step:
        """One round of local training: local_epochs x ceil(n / B) batches at rate B / n."""
        return self.plan(settings.batch_size, settings.local_epochs * self.per_epoch(settings))

    def per_epoch(self, settings: TrainingSettings) -> int:
        """Batches of an epoch: ceil(n / B), as many as plain SGD's."""
        return math.ceil(self.examples / settings.batch_size)

    def refuses(self, settings: TrainingSettings) -> str:
        """Why the next round's training would break the budget ("" when it would not)."""
        return self.refuses_plan(self.round_plan(settings))

    def refuses_plan(self, step: Step) -> str:
        """Why running `step` would break the budget ("" when it would not): the ledger's
        words, asked for only when it does."""
        budget = self.ledger.budget
        if budget is None or self._epsilon([*self.ledger.steps, step]) <= budget:
            return ""
        return self.ledger.refuses([step])

    def run(
        self,
        model: nn.Module,
        data: Examples,
        opt: Optimizer,
        batch_size: int,
        passes: Sequence[int],
        generator: torch.Generator,
        objective: Objective,
    ) -> list[Pass]:
        """DP-SGD steps of model on data with opt, `passes` of them (an epoch's count each:
        its loss is reported apart), all checked against the budget before the first
        (BudgetSpent). The ledger spends the steps that ran, even when one fails part way:
        what ran was computed on the data."""
        n = len(data)
        if n == 0:
            raise ValueError("no training examples")
        step = self.plan(batch_size, sum(passes), n)
        why = self.refuses_plan(step)
        if why:
            raise BudgetSpent(why)
        params = [p for p in model.parameters() if p.requires_grad]
        device = params[0].device
        expected = step.rate * n
        std = self.noise * self.clip
        done: list[Pass] = []
        ran = 0
        try:
            with per_example_gradients(model):
                for count in passes:
                    loss_sum, drawn = 0.0, 0
                    for _ in range(count):
                        opt.zero_grad(set_to_none=True)
                        indices = poisson_sample(n, step.rate, generator)
                        if len(indices):
                            x, y = take(data, indices, device)
                            loss = objective.loss(model(x), y)
                            loss.backward()
                            loss_sum += float(loss.detach()) * len(indices)
                            samples = [_grad_sample(p, len(indices)) for p in params]
                            summed = clipped_sum(samples, self.clip)
                        else:
                            summed = [torch.zeros_like(p) for p in params]
                        noisy = noised(summed, std, expected, generator)
                        for p, g in zip(params, noisy, strict=True):
                            setattr(p, "grad_sample", None)  # noqa: B010 (Opacus's attribute)
                            p.grad = g
                        opt.step()
                        drawn += len(indices)
                        ran += 1
                    done.append(Pass(loss_sum, drawn, count))
        finally:
            self._spend(self.plan(batch_size, ran, n))
        return done

    def _spend(self, step: Step) -> None:
        """Record steps that ran, merged with the last entry of the same kind (one entry a
        participant for a fixed batch size and data, however many rounds)."""
        if step.count == 0:
            return
        steps = self.ledger.steps
        if steps and (steps[-1].noise, steps[-1].rate) == (step.noise, step.rate):
            steps[-1] = replace(step, count=steps[-1].count + step.count)
        else:
            self.ledger.spend([step])


def _grad_sample(p: nn.Parameter, batch: int) -> torch.Tensor:
    """p's per-example gradients (batch, *p.shape) from the last backward pass; zeros for a
    parameter the forward pass did not use."""
    g = getattr(p, "grad_sample", None)
    if g is None:
        return torch.zeros(batch, *p.shape, dtype=p.dtype, device=p.device)
    if isinstance(g, list):  # Opacus stacks passes it was not cleared between: a bug here
        raise StateError("per-example gradients accumulated over several backward passes")
    return g


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def ledger_path(state_dir: str | Path, participant: str) -> Path:
    """Where participant's ledger is kept in --state-dir."""
    return Path(state_dir) / f"{_UNSAFE.sub('_', participant)}.dp-ledger.json"


def load_ledger(path: Path) -> Ledger | None:
    """A ledger written before (None when there is none yet)."""
    from services.core.accountant import Ledger

    if not path.exists():
        return None
    try:
        return Ledger.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a privacy ledger ({exc})") from None


def save_ledger(path: Path, ledger: Ledger) -> None:
    """Write the ledger so that a crash leaves the old one or the new one, durably: done
    before the update it accounts for leaves the participant."""
    text = json.dumps(ledger.to_json())
    durable_write(path, lambda tmp: tmp.write_text(text))
