"""Command-line plumbing shared by every entry point: env fallbacks and one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar, cast

T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def env(name: str, default: T, convert: Callable[[str], T] | None = None) -> T:
    """The value of environment variable `name` converted like `default`, else `default`.

    A malformed value stops the program with one line naming the variable.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    conv: Callable[[str], Any] = convert or (type(default) if default is not None else str)
    if conv is bool:
        conv = parse_bool
    try:
        return cast(T, conv(raw))
    except (TypeError, ValueError):
        sys.stderr.write(f"error: environment variable {name}={raw!r} is not a valid value\n")
        raise SystemExit(2) from None


def parse_bool(raw: str) -> bool:
    """'1', 'true', 'yes', 'on' and their opposites, any case."""
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def optional_int(raw: str) -> int | None:
    """An integer, or 'auto' / 'none' for None."""
    return None if raw.strip().lower() in ("auto", "none", "") else int(raw)
