"""Dashboards and alerts against the real thing: a Prometheus server scraping a federation.

Needs Debian's `prometheus` package (prometheus and promtool), which scripts/test installs;
without it these tests fail, they do not skip.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import stop

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}
# Series only an asynchronous federation (--mode async) has: a labelled gauge has none
# before its first value, and the federation watched here runs synchronous rounds. Their
# names are checked against the services' declared metrics instead of their exposition.
ASYNC_ONLY = frozenset({"flclustering_async_buffer_updates"})


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed: run scripts/test (it installs Debian's prometheus)"
    return path


def panel_exprs() -> list[tuple[str, str, str]]:
    out = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                out.append((path.stem, panel["title"], target["expr"]))
    return out


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bflclustering_[a-z_]+\b", expr))


def declared_names() -> set[str]:
    """Every sample name the services' metric tables declare (histograms' series, the
    _total of counters, the _info of infos)."""
    from prometheus_client import Counter, Histogram, Info

    from services.aggregator.metrics import AggregatorMetrics
    from services.clusterer.metrics import ClustererMetrics
    from services.common.metrics import PREFIX, BuildMetrics, RpcMetrics
    from services.participant.metrics import ParticipantMetrics

    names = set()
    tables = (AggregatorMetrics, ClustererMetrics, ParticipantMetrics, RpcMetrics, BuildMetrics)
    for table in tables:
        for row in table.TABLE:
            name = f"{PREFIX}_{row.name}"
            if row.kind is Histogram:
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif row.kind is Counter:
                names.add(name if name.endswith("_total") else f"{name}_total")
            elif row.kind is Info:
                names.add(f"{name}_info")
            else:
                names.add(name)
    return names


def test_every_metric_a_dashboard_or_rule_names_is_declared():
    """Without a federation: a name no service declares (a typo, a renamed metric) fails
    here; the test against Prometheus below checks what is really exported."""
    named = set().union(*(metric_names(e) for _, _, e in panel_exprs()))
    named |= metric_names(RULES.read_text())
    assert named - declared_names() == set()
    assert named >= ASYNC_ONLY


def test_generated_files_are_current(tmp_path):
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_observability.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for fresh in gen.generate(tmp_path):
        committed = ROOT / fresh.relative_to(tmp_path)
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run python scripts/gen_observability.py"
        )


def test_dashboards_use_a_datasource_variable():
    assert len(DASHBOARDS) == 4
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_promtool_checks_and_unit_tests_the_rules():
    promtool = tool("promtool")
    check = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "5 rules found" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "SUCCESS" in unit.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path.name} did not appear in {timeout}s"
        time.sleep(0.2)


def query(base: str, expr: str) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def served_federation(tmp_path):
    """`flclustering simulate --serve`, left running after its rounds."""
    out = tmp_path / "sim"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "simulate",
            "--serve",
            "--out",
            str(out),
            "--participants",
            "6",
            "--select",
            "6",
            "--rounds",
            "4",
            "--per-process",
            "3",
            "--personalise",  # the per-cluster model panels have data too
            "--dp",  # and the participants' epsilon (DP-SGD); the central DP gauges are
            "local",  # exported from the start
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(out / "endpoints.json", proc, 180)
        yield out, proc
    finally:
        stop(proc, signal.SIGTERM, 60)


def test_prometheus_scrapes_the_federation_and_every_panel_has_data(tmp_path, served_federation):
    prometheus = tool("prometheus")
    out, sim = served_federation
    endpoints = json.loads((out / "endpoints.json").read_text())
    jobs = {
        "aggregator": [endpoints["aggregator"]["metrics"]],
        "clusterer": [endpoints["clusterer"]["metrics"]],
        "participants": [p["metrics"] for p in endpoints["participants"]],
    }
    # The documented way (docs/operations.md): scrape-config writes the configuration.
    config = tmp_path / "prometheus.yml"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "scrape-config",
            str(out / "endpoints.json"),
            "--rules",
            str(RULES),
            "--interval",
            "1s",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    config.write_text(made.stdout)
    port = free_port()
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # The federation finishes its rounds (results.json) while Prometheus scrapes it.
        wait_for(out / "results.json", sim, 240)
        results = json.loads((out / "results.json").read_text())
        assert len(results["rounds"]) >= 2
        deadline = time.monotonic() + 60
        while True:
            try:
                up = query(base, "up")["data"]["result"]
                if len(up) == 4 and all(r["value"][1] == "1" for r in up):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus did not scrape all four targets"
            time.sleep(0.5)
        time.sleep(4)  # a few more scrapes, so rates have two samples in their window
        # The rule file loaded and evaluates.
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=10) as resp:
            groups = json.loads(resp.read())["data"]["groups"]
        assert sum(len(g["rules"]) for g in groups) == 5
        assert all(r["health"] == "ok" for g in groups for r in g["rules"])
        # Every query of every panel returns data.
        empty = []
        for board, title, expr in panel_exprs():
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            reply = query(base, expr)
            assert reply["status"] == "success", (board, title, reply)
            if not reply["data"]["result"] and not metric_names(expr) <= ASYNC_ONLY:
                empty.append(f"{board} / {title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        # Final figures made it into Prometheus as the clusterer saw them.
        acc = query(base, "flclustering_accuracy_mean")["data"]["result"]
        assert abs(float(acc[0]["value"][1]) - results["final"]["mean_accuracy"]) < 1e-6
    finally:
        server.terminate()
        server.wait(30)

    # Each exposition parses, and every metric a dashboard or rule names is exported.
    exported: set[str] = set()
    for targets in jobs.values():
        for target in targets:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    exported.add(sample.name)
    named = set().union(*(metric_names(e) for _, _, e in panel_exprs()))
    named |= metric_names(RULES.read_text())
    missing = sorted(n for n in named - ASYNC_ONLY if n not in exported)
    assert not missing, f"named in dashboards/rules but exported by no service: {missing}"
