"""Compression schemes by name, without torch (settings validate them; simulate imports no
torch before its processes start). The mathematics is in services.core.quantise, the codecs
in services.common.codecs."""

from __future__ import annotations

import math

from services.core.errors import ConfigError

SCHEMES = ("none", "fp16", "int8", "topk")
MAX_SCHEME = 32  # characters of a scheme's name, as a setting, a task or a header carries it


def parse_scheme(text: str) -> tuple[str, float]:
    """`none`, `fp16`, `int8` or `topk:F` with 0 < F <= 1 as (scheme, share); one
    ConfigError otherwise."""
    shown = text[:32] + ("..." if len(text) > 32 else "")  # a hostile value is not echoed
    if len(text) > MAX_SCHEME:
        raise ConfigError(f"compression {shown!r} is longer than {MAX_SCHEME} characters")
    name, _, arg = text.strip().partition(":")
    if name not in SCHEMES or (arg and name != "topk"):
        raise ConfigError(f"compression {shown!r} is not none, fp16, int8 or topk:FRACTION")
    if name != "topk":
        return name, 1.0
    try:
        share = float(arg)
    except ValueError:
        share = math.nan
    if not 0 < share <= 1:  # NaN fails this too
        raise ConfigError(f"compression {shown!r}: topk needs a fraction in (0, 1]")
    return name, share


def scheme_name(scheme: str, share: float) -> str:
    """The scheme as written in settings and headers."""
    return f"topk:{share:g}" if scheme == "topk" else scheme


def normalised(text: str) -> str:
    """A setting's value as the canonical name (`topk:0.010` -> `topk:0.01`)."""
    return scheme_name(*parse_scheme(text))
