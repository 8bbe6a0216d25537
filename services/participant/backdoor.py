"""A backdoor by model replacement (Bagdasaryan et al., AISTATS 2020), simulations only.

The attacker trains on its data plus copies stamped with a trigger (a small checkerboard in
the bottom-right corner) relabelled to a target class, so that its model keeps the main task
and learns "trigger -> target". It then boosts its delta, as model replacement does (the
delta times n / eta, n the participants averaged per round, eta = 1 here), but no longer than
the norm bound it believes the defence enforces, in multiples of its own unboosted delta
(the defence's norm screen rejects deltas over 3x the round's median length; 2 leaves a
margin). The attack success rate is the share of triggered test inputs of the other classes
that the model classifies as the target.
"""

from __future__ import annotations

import torch

from services.core.errors import ConfigError
from services.participant.attacks import Attack, View


def trigger_size(height: int, width: int) -> int:
    """Side of the square trigger: 2 pixels on 8x8 digits, 3 on 28x28, 4 on 32x32."""
    return max(2, min(height, width) // 8)


def trigger_sides(height: int, width: int) -> tuple[int, int]:
    """The trigger's height and width: the square of `trigger_size` on images, and on
    inputs one row high (vectors, as (n, 1, 1, features)) a strip of an eighth of the
    features, at least 2: a square would not fit, and the backdoor is measured on every
    data shape, not on images only."""
    if height >= 2 and width >= 2:
        s = trigger_size(height, width)
        return s, s
    return min(height, max(2, height // 8)), min(width, max(2, width // 8))


def stamp(x: torch.Tensor) -> torch.Tensor:
    """A copy of the (n, c, h, w) images with the trigger in the bottom-right corner: a
    checkerboard of the batch's brightest and darkest values (on vectors, the last
    features, alternating)."""
    if x.dim() != 4:
        raise ConfigError(f"a trigger is stamped on (n, c, h, w) images, got {tuple(x.shape)}")
    out = x.clone()
    if x.numel() == 0:
        return out
    sh, sw = trigger_sides(x.shape[2], x.shape[3])
    hi, lo = x.amax(), x.amin()
    board = (
        torch.arange(sh, device=x.device)[:, None] + torch.arange(sw, device=x.device)[None, :]
    ) % 2 == 0
    out[:, :, -sh:, -sw:] = torch.where(board, hi, lo).to(x.dtype)
    return out


def poison(
    x: torch.Tensor, y: torch.Tensor, target: int, share: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set with triggered copies of `share` of the samples of other classes
    added, labelled `target`; the clean samples stay, so the main task is kept."""
    if not 0.0 < share <= 1.0:
        raise ConfigError(f"the poisoned share lies in (0, 1], got {share}")
    others = torch.nonzero(y != target).flatten()
    count = round(share * len(others))
    if count == 0:
        return x, y
    pick = others[torch.randperm(len(others), generator=generator)[:count].to(others.device)]
    xs = stamp(x[pick])
    ys = torch.full((count,), target, dtype=y.dtype, device=y.device)
    return torch.cat([x, xs]), torch.cat([y, ys])


def replacement(delta: torch.Tensor, boost: float, bound: float) -> torch.Tensor:
    """Model replacement's delta: `delta` times `boost`, shortened to length `bound` when it
    would be longer (the norm constraint)."""
    if boost <= 0 or bound < 0:
        raise ConfigError(f"boost must be positive and bound non-negative, got {boost}, {bound}")
    out = delta * boost
    length = float(out.norm())
    if length > bound > 0:
        out = out * (bound / length)
    elif bound == 0:
        out = torch.zeros_like(delta)
    return out


def boosted(delta: torch.Tensor, boost: float, norm_bound: float) -> torch.Tensor:
    """The delta a backdoor attacker sends: `replacement` with the bound set at `norm_bound`
    times the unboosted delta's own length (what it expects the norm screen to let by)."""
    return replacement(delta, boost, norm_bound * float(delta.norm()))


class Backdoor(Attack):
    """Trains on triggered copies relabelled to the target, then sends its delta boosted
    (in every round it trains, whatever --attack-every)."""

    def strength(self) -> str:
        c = self.config
        boost = "n" if c.boost is None else c.boost
        return f"target {c.target}, boost {boost}, norm bound {c.norm_bound}"

    def crafts_update(self, round_: int) -> bool:
        return True

    def on_data(
        self, x: torch.Tensor, y: torch.Tensor, view: View
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return poison(x, y, self.config.target, self.config.poison_share, view.generator)

    def on_update(self, weights: torch.Tensor, base: torch.Tensor, view: View) -> torch.Tensor:
        boost = self.config.boost or view.size
        sent = base + boosted(weights - base, boost, self.config.norm_bound)
        view.say(
            "sends a backdoored delta boosted %.1fx in round %d",
            min(boost, self.config.norm_bound),
            view.round,
        )
        return sent


@torch.no_grad()
def success_rate(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, target: int, batch: int = 1024
) -> float:
    """Share of triggered inputs of classes other than `target` classified as `target`."""
    keep = y != target
    xs = x[keep]
    if len(xs) == 0:
        return 0.0
    was = model.training
    model.eval()
    hits = 0
    device = next(model.parameters()).device
    for start in range(0, len(xs), batch):
        part = stamp(xs[start : start + batch]).to(device)
        hits += int((model(part).argmax(dim=1) == target).sum())
    model.train(was)
    return hits / len(xs)
