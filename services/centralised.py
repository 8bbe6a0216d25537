"""`flclustering centralised`: the same model, data and training budget on pooled data.

The baseline federated learning is measured against (the seeds' `local_training.py`): one
model trained on the union of every participant's training shard, with the federation's
budget in examples processed. A federation round trains `select` participants for
`local_epochs` epochs of their own data, so each "round" here is a pass over a random
`local_epochs x select / participants` share of the pooled data (a whole epoch at the
defaults), with the round's learning rate; after it the model is evaluated on every
participant's own test split, exactly as a federation's round is, so the figures compare
round by round. Written like a run: results.json, rounds.csv, figures, model file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from services.core.device import resolve_device
from services.core.models import build_model
from services.core.record import Layout, RoundRecord
from services.core.tensors import state_of
from services.experiment import ExperimentConfig
from services.inprocess import RunResult, build_participants, card_of, measured
from services.participant.examples import TensorExamples
from services.participant.partition import federation_data
from services.participant.training import evaluate, local_train


def run_centralised(
    config: ExperimentConfig, progress: Callable[[dict[str, Any]], None] | None = None
) -> RunResult:
    """Train on the pooled training data and evaluate per participant after each round."""
    fed, train = config.federation, config.training
    data = federation_data(fed, config.data)
    people = build_participants(config, data)
    device = resolve_device(config.run.device)
    model = build_model(fed.model, data.input_shape, data.num_classes, fed.seed).to(device)
    x = torch.cat([p.x_train for p in people]).to(device)
    y = torch.cat([p.y_train for p in people]).to(device)
    share = train.local_epochs * min(fed.select, fed.participants) / fed.participants
    per_round = max(1, math.ceil(share * len(y)))
    gen = torch.Generator().manual_seed(fed.seed)
    once = train.replace(local_epochs=1)
    result = RunResult(config={**config.model_dump(mode="json"), "centralised": True})
    for rnd in range(fed.rounds):
        start = time.perf_counter()
        # `share` epochs: whole permutations, then a random part of one more.
        order = torch.cat([torch.randperm(len(y), generator=gen) for _ in range(math.ceil(share))])[
            :per_round
        ].to(device)
        fit = local_train(model, TensorExamples(x[order], y[order]), once, rnd, gen)
        figs = [evaluate(model, p.test) for p in people]
        record = RoundRecord(
            round=rnd,
            layout=Layout.CENTRALISED,
            **measured(people, figs),
            train_loss=fit.loss,
            examples=fit.examples,
            duration_s=time.perf_counter() - start,
            rejected=0,
        ).to_dict()
        result.add(record, progress)
    result.weights = dict(state_of(model))
    result.card = card_of(config, data, result.final)
    return result
