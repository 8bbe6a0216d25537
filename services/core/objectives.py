"""What a participant minimises and how well the model serves it: per task.

Classification minimises cross-entropy and is served as well as its accuracy. Regression
minimises the mean squared error; accuracy has no meaning there, and the fair merge
(docs/algorithm.md, section 6) needs a number in [0, 1] that is higher when a participant
is served better. It gets the coefficient of determination on the participant's own test
data, clipped at 0: R^2 = 1 - SSE / SST, the share of the variance of its targets that the
model explains. A participant whose targets the model explains worst weighs the most, as
an ill-served class mix does for classification; a model that predicts worse than the
participant's own mean counts as 0 (then 0.1, as an accuracy of 0 does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from services.core.registry import Registry


@dataclass
class Tally:
    """Running sums of an evaluation: enough for the loss and the score, batch by batch."""

    n: int = 0
    loss_sum: float = 0.0
    correct: int = 0  # classification
    y_sum: float = 0.0  # regression: sums of the targets and their squares (for SST)
    y2_sum: float = 0.0


class Objective:
    """A task's loss and its score in [0, 1]."""

    name = ""

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of a batch (what is minimised)."""
        raise NotImplementedError

    def add(self, tally: Tally, out: torch.Tensor, y: torch.Tensor) -> None:
        """Count a batch of the evaluation."""
        raise NotImplementedError

    def score(self, tally: Tally) -> float:
        """How well the evaluated model serves the data, in [0, 1]."""
        raise NotImplementedError


class Classification(Objective):
    """Cross-entropy; served as well as the accuracy."""

    name = "classification"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    def add(self, tally: Tally, out: torch.Tensor, y: torch.Tensor) -> None:
        tally.n += len(y)
        tally.loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        tally.correct += int((out.argmax(1) == y).sum())

    def score(self, tally: Tally) -> float:
        return tally.correct / tally.n


class Regression(Objective):
    """Mean squared error of one output; served as well as R^2 (clipped at 0)."""

    name = "regression"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out.reshape(-1), y.reshape(-1).to(out.dtype))

    def add(self, tally: Tally, out: torch.Tensor, y: torch.Tensor) -> None:
        pred, y = out.reshape(-1).double(), y.reshape(-1).double()
        tally.n += len(y)
        tally.loss_sum += float(((pred - y) ** 2).sum())
        tally.y_sum += float(y.sum())
        tally.y2_sum += float((y * y).sum())

    def score(self, tally: Tally) -> float:
        sst = tally.y2_sum - tally.y_sum**2 / tally.n
        if sst <= 1e-12 * max(1.0, tally.y2_sum):  # constant targets: explained or not
            return 1.0 if tally.loss_sum <= 1e-12 * tally.n else 0.0
        return min(1.0, max(0.0, 1.0 - tally.loss_sum / sst))


OBJECTIVES: Registry[Objective] = Registry(
    "target", {"classification": Classification(), "regression": Regression()}
)
CLASSIFICATION = OBJECTIVES["classification"]
