#!/usr/bin/env python3
"""Entries of a hashed requirements file (requirements/runtime.txt, exported from uv.lock),
dropped or kept by distribution name, each entry whole: its requirement line, its
`--hash` continuation lines and its `# via` comments. The Dockerfile uses it to install a
subset of the lock (the control plane without the participants' data and plotting
libraries; the CPU variant without the CUDA build of torch and its nvidia-*/cuda-*/triton
wheels); scripts/sbom reads the same subsets.

    scripts/lock_filter.py LOCK --drop 'nvidia-*' torch ...   # all but these
    scripts/lock_filter.py LOCK --keep pyarrow matplotlib ...  # only these
    scripts/lock_filter.py LOCK --this-python                  # what pip installs here

Names are compared normalised (PEP 503: case, runs of `-_.`) and may be shell patterns;
a name with several entries (one per environment marker) loses or keeps all of them. A
pattern that matches no entry is an error: a renamed or vanished package is said, not
silently installed or left out. --this-python keeps only the entries whose environment
markers hold for the Python running it (the lock covers other platforms and Pythons too):
what `pip install -r` would install here, which is what an image's SBOM lists. Standard
library only (and pip's own copy of `packaging` for --this-python): it runs before anything
is installed.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from pathlib import Path

REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?:==|@|;|\s|\\|$)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def entries(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The header (lines before the first requirement) and each entry: (name, its lines)."""
    header: list[str] = []
    found: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        match = REQUIREMENT.match(line)
        if match:
            found.append((normalise(match.group(1)), [line]))
        elif found and (not line.strip() or line[0].isspace()):
            found[-1][1].append(line)  # a hash, a `# via` comment, a blank line
        elif found:
            raise SystemExit(f"lock_filter: cannot tell which entry this line belongs to: {line}")
        elif line.startswith("-") and not line.startswith("--hash"):
            raise SystemExit(f"lock_filter: a pip option in the lock is not supported: {line}")
        else:
            header.append(line)
    return header, found


def applies_here(line: str) -> bool:
    """Whether a requirement line's environment marker (after `;`) holds for this Python."""
    try:
        from packaging.markers import Marker
    except ImportError:  # the build stage's bare Python: pip's vendored copy
        from pip._vendor.packaging.markers import Marker
    _, semicolon, marker = line.rstrip().removesuffix("\\").partition(";")
    return not semicolon or Marker(marker.strip()).evaluate()


def select(text: str, patterns: list[str] | None, keep: bool, this_python: bool = False) -> str:
    header, found = entries(text)
    if this_python:
        found = [(name, lines) for name, lines in found if applies_here(lines[0])]
    wanted = [normalise(p) for p in patterns or []]
    unused = [p for p in wanted if not any(fnmatch.fnmatchcase(n, p) for n, _ in found)]
    if unused:
        raise SystemExit(f"lock_filter: no entry in the lock matches {', '.join(unused)}")
    out = list(header)
    for name, lines in found:
        if patterns is None or any(fnmatch.fnmatchcase(name, p) for p in wanted) == keep:
            out += lines
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("lock", type=Path)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--drop", nargs="+", metavar="NAME", help="every entry but these")
    how.add_argument("--keep", nargs="+", metavar="NAME", help="only these entries")
    parser.add_argument(
        "--this-python", action="store_true", help="only entries whose markers hold here"
    )
    args = parser.parse_args(argv)
    text = args.lock.read_text()
    patterns = args.keep or args.drop
    sys.stdout.write(select(text, patterns, bool(args.keep), args.this_python))
    return 0


if __name__ == "__main__":
    sys.exit(main())
