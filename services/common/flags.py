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


def add_auth_flags(parser: argparse.ArgumentParser) -> None:
    """--auth-token and --auth-token-file (FLCLUSTERING_AUTH_TOKEN[_FILE]); the file wins.

    A file is how Kubernetes should hand the token over (a mounted Secret, not an
    environment variable that every child process and crash dump can read).
    """
    parser.add_argument(
        "--auth-token",
        default=env("FLCLUSTERING_AUTH_TOKEN", None, str),
        help="shared bearer token guarding every RPC (health excepted)",
    )
    parser.add_argument(
        "--auth-token-file",
        default=env("FLCLUSTERING_AUTH_TOKEN_FILE", None, str),
        help="read the token from this file instead",
    )


def resolve_token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str | None:
    """The token from --auth-token-file or --auth-token; a missing file is one clear error."""
    path = getattr(args, "auth_token_file", None)
    if path:
        try:
            token = open(path, encoding="utf-8").read().strip()  # noqa: SIM115
        except OSError as exc:
            parser.error(f"--auth-token-file {path}: {exc.strerror}")
        if not token:
            parser.error(f"--auth-token-file {path} is empty")
        return token
    return args.auth_token or None
