"""Forged encrypted updates (--secure he only; simulated by the services only).

The aggregator adds ciphertexts it cannot read, so it cannot screen them: what stops a
forged update is the participants' verdicts on the model it makes and the clusterer's
rollback, which only the services run (`flclustering local` refuses these attacks through
their registry entry's `needs_services`).
"""

from __future__ import annotations

import torch

from services.common.homomorphic import HeKeys
from services.participant.attacks import Attack, AttackConfig, View


class ForgedKey(Attack):
    """Encrypts n * w under a key of its own (the upload still carries the federation's
    key tag: the aggregator cannot tell), so the sum decrypts to noise."""

    def __init__(self, config: AttackConfig) -> None:
        super().__init__(config)
        self._own_key: HeKeys | None = None  # made on first use

    def on_encrypt(self, he: HeKeys, flat: torch.Tensor, n: int, view: View) -> list[bytes] | None:
        if not self.fires(view.round):
            return None
        view.say("sends %s ciphertexts in round %d", self.kind, view.round)
        if self._own_key is None:
            self._own_key = HeKeys.create()
        return self._own_key.encrypt(flat, n)


class Huge(Attack):
    """Encrypts every value of n * w at half of what encryption allows (2^27), under the
    federation's key."""

    def on_encrypt(self, he: HeKeys, flat: torch.Tensor, n: int, view: View) -> list[bytes] | None:
        if not self.fires(view.round):
            return None
        view.say("sends %s ciphertexts in round %d", self.kind, view.round)
        return he.encrypt(torch.where(flat < 0, -1.0, 1.0) * (2.0**27 / n), 1.0)
