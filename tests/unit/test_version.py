"""--version, and the version every service reports: from the package's metadata, with
the revision the image sets; versions from the wire parsed or refused in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata

import pytest

from services.cli import main
from services.common import version


def test_the_version_is_the_installed_packages(monkeypatch):
    assert version.version() == metadata.version("flclustering")

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version.metadata, "version", missing)
    assert version.version() == version.UNKNOWN
    # Never newer than a release: a copy nobody installed is not taken for an upgrade.
    assert version.parse(version.UNKNOWN) < version.parse("0.1.0")


def test_the_revision_is_the_images_when_set(monkeypatch):
    monkeypatch.setenv(version.REVISION_ENV, " 3134705 ")
    assert version.revision() == "3134705"
    assert version.describe() == f"flclustering {version.version()} (3134705)"
    monkeypatch.setattr(version, "_CHECKOUT", version._CHECKOUT / "no-such-dir")
    monkeypatch.delenv(version.REVISION_ENV)
    assert version.revision() == ""
    assert version.describe() == f"flclustering {version.version()}"


def test_flclustering_version_prints_one_line(capsys, monkeypatch):
    monkeypatch.setenv(version.REVISION_ENV, "abc1234")
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"flclustering {version.version()} (abc1234)\n"


@pytest.mark.parametrize("service", ["aggregator", "clusterer", "participant"])
def test_each_service_prints_its_version(service):
    # In a child: the whole `python -m` path, the way an operator runs it.
    out = subprocess.run(
        [sys.executable, "-m", f"services.{service}", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FLCLUSTERING_REVISION": "r1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == f"flclustering {version.version()} (r1)\n"


@pytest.mark.parametrize(
    ("text", "why"),
    [("x" * 65, "at most 64 characters"), ("one.two", "is not a version"), ("", "not a version")],
)
def test_versions_that_are_not_are_refused_with_the_reason(text, why):
    with pytest.raises(ValueError, match=why):
        version.parse(text)
    assert version.parse("0.2.0rc1") < version.parse("0.2.0")


def test_a_participant_sends_its_release_or_none_when_it_has_none(monkeypatch):
    from services.participant import worker

    assert worker.sent_version() == version.version() != ""
    monkeypatch.setattr(worker, "version", lambda: version.UNKNOWN)
    assert worker.sent_version() == ""  # taken as 0.1.0, not refused as older than any


def test_the_clusterers_minimum_is_a_version(capsys):
    from services.clusterer.__main__ import parser

    config = parser().parse(["--min-participant-version", "0.2.0"])
    assert config.clustering.min_participant_version == "0.2.0"
    assert parser().parse([]).clustering.min_participant_version == version.UNVERSIONED
    with pytest.raises(SystemExit) as exc:
        parser().parse(["--min-participant-version", "latest"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--min-participant-version" in err
    assert "is not a version" in err
