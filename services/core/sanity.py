"""Whether a downloaded global model is fit to adopt: finite, and in proportion to the last.

A participant never trains from, evaluates or serves a model that holds NaN or infinite
values, or whose largest weight grew more than GROWTH-fold in one version (and past
GROWTH in absolute value). Honest rounds move weights by a few per cent; a sum encrypted
under another key decrypts to values around 1e5 to 1e8, and an overflowing merge reaches
1e22 before it turns non-finite. The check is the guard where nobody else can look:
under --secure he only participants see the model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

GROWTH = 100.0  # the largest weight may grow this much in one version (and reach GROWTH)


def largest(weights: Mapping[str, torch.Tensor]) -> float:
    """The largest absolute float weight (0 for none); inf or nan when there is one."""
    top = 0.0
    for t in weights.values():
        if t.dtype.is_floating_point and t.numel():
            top = max(top, float(t.detach().abs().max()))
            if top != top:  # NaN: max() of a tensor holding one is NaN
                return top
    return top


def unfit(
    weights: Mapping[str, torch.Tensor], last_top: float, top: float | None = None
) -> str | None:
    """Why a model is not to be adopted after one whose largest weight was `last_top`,
    or None when it is fit (`top`: its own largest weight, when the caller has it)."""
    for name, t in weights.items():
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            return f"{name[:64]} holds non-finite values"
    top = largest(weights) if top is None else top
    bound = GROWTH * max(1.0, last_top)
    if top > bound:
        return (
            f"its largest weight is {top:.3g}, past {bound:.3g} ({GROWTH:g} times the last "
            f"adopted model's {last_top:.3g}, and at least {GROWTH:g})"
        )
    return None
