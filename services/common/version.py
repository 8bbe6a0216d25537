"""Which release this code is: for --version, the status RPCs, build_info and Join.

An operator upgrading a federation piece by piece (docs/compatibility.md) needs to see
which version each service and participant runs, and the clusterer needs the participant's
to refuse one older than it accepts. The version is the installed package's (pyproject's
`version`, as pip recorded it), so nothing here has to be edited at a release. The source
revision is FLCLUSTERING_REVISION, which the container image bakes in at build time; in a
git checkout without it, git's short hash of HEAD; otherwise unknown (empty). Nothing is
cached: each service reads these once at start.
"""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

DISTRIBUTION = "flclustering"
REVISION_ENV = "FLCLUSTERING_REVISION"
# What a copy of the code that was never installed calls itself: parseable (PEP 440), and
# lower than every release, so it is never mistaken for a newer one.
UNKNOWN = "0+unknown"
MAX_VERSION_CHARS = 64  # longer than any PEP 440 version we would publish
# The last release whose participants send no version at Join (JoinRequest predates the
# field): an empty participant_version is this one.
UNVERSIONED = "0.1.0"
_CHECKOUT = Path(__file__).resolve().parents[2]


def version() -> str:
    """The installed distribution's version, or UNKNOWN when it is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def revision() -> str:
    """The source revision: FLCLUSTERING_REVISION, else git's short hash when this code
    runs from a checkout (a subprocess, once at start), else empty."""
    given = os.environ.get(REVISION_ENV, "").strip()
    if given:
        return given[:MAX_VERSION_CHARS]
    if not (_CHECKOUT / ".git").exists():  # an installed copy: site-packages has no .git
        return ""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=_CHECKOUT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def describe(program: str = DISTRIBUTION) -> str:
    """What --version prints: `flclustering 0.1.0`, and the revision in brackets if known."""
    known = revision()
    return f"{program} {version()}" + (f" ({known})" if known else "")


def parse(text: str) -> Version:
    """A version as sent on the wire or given as a setting; ValueError, naming it, when it
    is too long or not a PEP 440 version."""
    if len(text) > MAX_VERSION_CHARS:
        raise ValueError(f"a version has at most {MAX_VERSION_CHARS} characters, not {len(text)}")
    try:
        return Version(text)
    except InvalidVersion:
        raise ValueError(f"{text!r} is not a version (PEP 440, e.g. 0.2.0)") from None
