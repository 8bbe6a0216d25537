"""The divergence guard: a federation that notices when its model breaks.

Real processes over mutual TLS (`flclustering simulate --serve`): colluding modified
participants drive the merge toward overflow and the aggregator refuses it; a merge that
passes the aggregator's bounds still makes the evaluations collapse and the clusterer rolls
it back. In both, the served model never has non-finite outputs, the event shows in
results.json and GetStatus (results.json is built from it), in a metric scraped from the
running service and in the alert rule (promtool, on the scraped values), and no round
lasts longer than its deadlines. And an honest evaluation whose loss is not finite is
acknowledged and counted, not refused.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import clusterer_pb2 as pb
from services.common.pb.flclustering.v1 import tensors_pb2
from services.common.streams import build_stream, read_model
from tests.deploy.test_observability import tool
from tests.processes import stop

from .conftest import META, SMALL_FEDAVG, rpc_code

ROOT = Path(__file__).resolve().parents[2]
ROUND_TIMEOUT_S, EVAL_TIMEOUT_S = 60.0, 30.0
COMMON = (
    *SMALL_FEDAVG,
    "--seed",
    "2",
    "--round-timeout-s",
    str(ROUND_TIMEOUT_S),
    "--eval-timeout-s",
    str(EVAL_TIMEOUT_S),
)


def served_run(out: Path, *flags: str) -> tuple[dict, dict[str, str]]:
    """Run simulate with --serve; once results.json is written, scrape both services'
    /metrics while they still serve, then stop it. The results and the scraped texts."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "simulate",
            "--out",
            str(out),
            "--serve",
            *COMMON,
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 400
        while not (out / "results.json").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "the run did not finish"
            time.sleep(0.5)
        time.sleep(0.5)
        endpoints = json.loads((out / "endpoints.json").read_text())
        scraped = {}
        for service in ("aggregator", "clusterer"):
            url = f"http://{endpoints[service]['metrics']}/metrics"
            scraped[service] = urllib.request.urlopen(url, timeout=10).read().decode()
        return json.loads((out / "results.json").read_text()), scraped
    finally:
        stop(proc, signal.SIGINT, 30)


def metric(text: str, name: str) -> float:
    """A label-free sample's value in a /metrics text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def alert_fires(tmp_path: Path, series: str, value: float) -> None:
    """promtool: FLClusteringModelRefused fires on the counter going from 0 to `value`
    (what the running service exported)."""
    promtool = tool("promtool")  # fails, never skips, where scripts/test did not install it
    rules = ROOT / "deploy" / "prometheus" / "alerts.yml"
    test = tmp_path / "guard_test.yml"
    test.write_text(
        json.dumps(
            {
                "rule_files": [str(rules)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": [
                            {"series": series, "values": f"0 0 {value:g} {value:g} {value:g}"}
                        ],
                        "alert_rule_test": [
                            {
                                "eval_time": "4m",
                                "alertname": "FLClusteringModelRefused",
                                "exp_alerts": [
                                    {
                                        "exp_labels": {"severity": "critical"},
                                        "exp_annotations": alert_annotations(rules),
                                    }
                                ],
                            }
                        ],
                    }
                ],
            }
        )
    )
    got = subprocess.run([promtool, "test", "rules", str(test)], capture_output=True, text=True)
    assert got.returncode == 0, got.stdout + got.stderr


def alert_annotations(rules: Path) -> dict[str, str]:
    import yaml

    for group in yaml.safe_load(rules.read_text())["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == "FLClusteringModelRefused":
                return dict(rule["annotations"])
    raise AssertionError("no FLClusteringModelRefused rule")


def final_model_is_sane(out: Path) -> None:
    """The model the aggregator ends with: finite weights, finite outputs on real digits."""
    from services.core.models import build_model
    from services.participant.datasets import load_dataset

    weights = load_file(str(out / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    data = load_dataset("digits")
    model = build_model("cnn", data.input_shape, data.num_classes)
    model.load_state_dict(weights)
    with torch.no_grad():
        assert bool(torch.isfinite(model(data.x_test)).all())


def rounds_within_deadlines(results: dict) -> None:
    """Collect, and both evaluations, each end at their deadline at the latest."""
    longest = ROUND_TIMEOUT_S + 2 * EVAL_TIMEOUT_S + 15
    assert all(r["duration_s"] < longest for r in results["rounds"]), [
        r["duration_s"] for r in results["rounds"]
    ]


def test_a_merge_driven_toward_overflow_is_refused_and_the_model_kept(tmp_path):
    # One modified participant sends its weights times 1e30 in every round (finite float32:
    # each upload passes validation); FedAvg's mean is about 1e28.
    out = tmp_path / "run"
    results, scraped = served_run(
        out,
        "--rounds",
        "6",
        "--attack",
        "scaling",
        "--attack-factor",
        "1e30",
        "--attack-every",
        "1",
        "--attack-rate",
        "0.17",
    )
    rounds = results["rounds"]
    refused = [r for r in rounds if r["merge_refused"]]
    assert refused and rounds[0]["merge_refused"]
    assert all("largest weight" in r["merge_refused"] for r in refused)
    assert all(r["failed_clusters"] == {"0": r["received"]} for r in refused)
    # The version stays while merges are refused; the colluder is traced and convicted,
    # after which every merge is accepted and the model learns.
    assert rounds[0]["model_version"] == 0
    convicted = [p for r in rounds for p in r["convicted"]]
    assert len(convicted) == 1
    attacker = next(c["participant"] for c in results["clusters"] if c["attacker"])
    assert convicted == [attacker]
    assert not rounds[-1]["merge_refused"] and rounds[-1]["mean_accuracy"] > 0.5
    assert not any(r["rolled_back"] for r in rounds)
    final_model_is_sane(out)
    rounds_within_deadlines(results)
    count = metric(scraped["aggregator"], "flclustering_merges_refused_total")
    assert count == len(refused)
    assert metric(scraped["clusterer"], "flclustering_participants_convicted") == 1
    alert_fires(tmp_path, 'flclustering_merges_refused_total{job="aggregator"}', count)


def test_a_merge_within_bounds_whose_evaluations_collapse_is_rolled_back(tmp_path):
    # Three of six modified participants send their negated model in rounds 2 and 5: the
    # FedAvg merge is near zero, finite, within every bound the aggregator applies (too
    # few steps are known in round 2 for the step bound), and useless.
    out = tmp_path / "run"
    results, scraped = served_run(
        out,
        "--rounds",
        "4",
        "--attack",
        "scaling",
        "--attack-factor",
        "-1",
        "--attack-every",
        "3",
        "--attack-rate",
        "0.5",
    )
    rounds = results["rounds"]
    assert [r["rolled_back"] for r in rounds] == [False, False, True, False]
    bad = rounds[2]
    assert not bad["merge_refused"]
    assert "lost more than 0.5 accuracy and 75% of it" in bad["rollback_reason"]
    assert bad["failed_clusters"] == {"0": 6}
    # The new version is a copy of the one round 2 trained from: version 2, copied as 4.
    assert [r["model_version"] for r in rounds] == [1, 2, 4, 5]
    assert bad["mean_accuracy"] == pytest.approx(rounds[1]["mean_accuracy"], abs=0.02)
    assert rounds[-1]["mean_accuracy"] >= rounds[1]["mean_accuracy"] - 0.05
    final_model_is_sane(out)
    rounds_within_deadlines(results)
    count = metric(scraped["clusterer"], "flclustering_rollbacks_total")
    assert count == 1
    alert_fires(tmp_path, 'flclustering_rollbacks_total{job="clusterer"}', count)


def test_an_honest_non_finite_evaluation_is_acknowledged_and_counted(federation_factory):
    """A participant whose model's loss is not finite on its data reports DIVERGED: OK,
    counted by the clusterer (metric and the round's entry), and the round goes on; the
    same report with figures, or a non-finite loss reported as OK, is INVALID_ARGUMENT."""
    fed = federation_factory(strategy="fedavg", participants=3, select=3, rounds=1)
    pids = [f"participant-{i:05d}" for i in range(3)]
    for pid in pids:
        fed.stub.Join(
            pb.JoinRequest(participant_id=pid, num_train=50, num_test=20, group=-1),
            metadata=META,
            timeout=10,
        )
    _, w0 = read_model(
        fed.stub.DownloadModel(pb.DownloadModelRequest(model_version=0), metadata=META)
    )
    for pid in pids:
        task = fed.stub.GetTask(pb.GetTaskRequest(participant_id=pid, wait_s=20), metadata=META)
        assert task.kind == pb.TASK_KIND_TRAIN
        h = tensors_pb2.ModelHeader(
            sender=pid, round=0, model_version=0, num_samples=50, kind="weights"
        )
        stream = build_stream(pb.SubmitUpdateRequest, h, h, w0)
        fed.stub.SubmitUpdate(iter(list(stream)), metadata=META, timeout=30)
    tasks = {}
    for pid in pids:
        task = fed.stub.GetTask(pb.GetTaskRequest(participant_id=pid, wait_s=30), metadata=META)
        assert task.kind == pb.TASK_KIND_EVALUATE
        tasks[pid] = task
    me = pids[0]

    def report(**fields):
        request = pb.ReportEvaluationRequest(
            participant_id=me,
            evaluation_id=tasks[me].evaluation_id,
            model_version=tasks[me].model_version,
            num_examples=20,
            **fields,
        )
        return rpc_code(lambda: fed.stub.ReportEvaluation(request, metadata=META, timeout=10))

    C = grpc.StatusCode
    assert report(accuracy=0.5, loss=float("nan")) == C.INVALID_ARGUMENT
    assert report(verdict=pb.EVALUATION_VERDICT_DIVERGED, loss=float("nan")) == (C.INVALID_ARGUMENT)
    assert report(verdict=pb.EVALUATION_VERDICT_DIVERGED, accuracy=0.4) == C.INVALID_ARGUMENT
    assert report(verdict=7) == C.INVALID_ARGUMENT
    assert report(verdict=pb.EVALUATION_VERDICT_DIVERGED, reason="x" * 201) == C.INVALID_ARGUMENT
    why = "its loss on the test split is not finite"
    assert report(verdict=pb.EVALUATION_VERDICT_DIVERGED, reason=why) == C.OK
    for pid in pids[1:]:
        fed.stub.ReportEvaluation(
            pb.ReportEvaluationRequest(
                participant_id=pid,
                evaluation_id=tasks[pid].evaluation_id,
                model_version=tasks[pid].model_version,
                accuracy=0.2,
                loss=2.0,
                num_examples=20,
            ),
            metadata=META,
            timeout=10,
        )
    status = fed.wait_for(lambda s: s.done, 60)
    # The aggregator's Rollback: hostile fields get their codes, nothing changes.
    rollback = agg_pb.RollbackRequest
    assert (
        rpc_code(lambda: fed.agg_stub.Rollback(rollback(round=0, reason="x" * 201), metadata=META))
        == C.INVALID_ARGUMENT
    )
    assert (
        rpc_code(lambda: fed.agg_stub.Rollback(rollback(round=0, to_version=-1), metadata=META))
        == C.INVALID_ARGUMENT
    )
    assert (
        rpc_code(lambda: fed.agg_stub.Rollback(rollback(round=99, to_version=0), metadata=META))
        == C.FAILED_PRECONDITION
    )
    assert (
        rpc_code(lambda: fed.agg_stub.Rollback(rollback(round=0, to_version=2**40), metadata=META))
        == C.NOT_FOUND
    )
    agg = fed.agg_stub.GetAggregatorStatus(agg_pb.GetAggregatorStatusRequest(), metadata=META)
    assert (agg.model_version, agg.open_round) == (0, 1)  # w0 sent back: no new version
    entry = status.history[0]
    assert entry.diverged_evaluations == 1 and entry.evaluated == 2 and not entry.rolled_back
    registry = fed.clusterer.registry
    assert registry.get_sample_value("flclustering_evaluations_total", {"verdict": "diverged"}) == 1
    assert registry.get_sample_value("flclustering_evaluations_total", {"verdict": "ok"}) == 2
