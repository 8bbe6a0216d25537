"""What the benchmark scripts share: their flags' parser and writing their rows as JSON.

Imported by path (the scripts' directory is on sys.path when they run), like processes.py.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def parser(doc: str | None) -> argparse.ArgumentParser:
    """A script's flags, its docstring (as written) the description of --help."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def write_json(path: str | None, rows: Any, indent: int) -> None:
    """Write rows as JSON to path (the script's --json), when one was given."""
    if path:
        with open(path, "w") as fh:
            json.dump(rows, fh, indent=indent)
