"""Rolling a refused version back: the aggregator's copy of the last good version (plain
and under --secure he, across a restart), the clusterer's judgement of the evaluators'
verdicts, its group testing of the contributors, and the participants' check of a model
before they adopt it."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.aggregator.state import AggregatorState, PendingUpdate, RoundClose
from services.common.settings import DefenceSettings
from services.core.errors import NotFoundError, StateError
from services.core.models import build_model
from services.core.quarantine import Quarantine, judge
from services.core.sanity import GROWTH, unfit
from services.core.strategies import STRATEGIES
from services.core.tensors import state_of

FEDAVG = STRATEGIES["fedavg"]
DEFENCE = DefenceSettings(byzantine_fraction=0.0)


def fresh() -> AggregatorState:
    return AggregatorState(state_of(build_model("cnn", (1, 8, 8), 10, seed=0)))


def round_of(s: AggregatorState, r: int, value: float) -> int:
    d = s.versions[0].numel()
    s.begin_update("a", r, s.version)
    s.end_update(PendingUpdate("a", 0, 10, torch.full((d,), value)), r)
    return s.aggregate(RoundClose(r, FEDAVG, {}, DEFENCE, 0.05)).version


def test_a_rollback_publishes_a_copy_of_the_good_version_and_is_idempotent(tmp_path: Path):
    s = fresh()
    good = round_of(s, 0, 0.1)
    bad = round_of(s, 1, -0.3)  # within the guard's bounds; its evaluators refuse it
    done = s.rollback(1, good, "refused by 5 of 5")
    assert (done.refused, done.to, done.version) == (bad, good, bad + 1)
    assert s.version == bad + 1 and torch.equal(s.versions[s.version], s.versions[good])
    assert s.rollback(1, good).replayed and s.version == bad + 1  # asked again: same answer
    with pytest.raises(StateError, match="rolled back to version"):
        s.rollback(1, 0)
    # Durable: a restarted aggregator serves the copy and answers the same again.
    s.save(tmp_path)
    again = fresh()
    assert again.restore(tmp_path)
    assert again.version == bad + 1
    assert torch.equal(again.versions[again.version], s.versions[good])
    assert again.rollback(1, good).version == bad + 1
    # The next round trains from the copy: its deltas apply to the good weights.
    assert round_of(again, 2, 0.0) == bad + 1  # a zero delta changes nothing


def test_a_rollback_needs_the_last_closed_round_no_open_updates_and_a_kept_version():
    s = fresh()
    with pytest.raises(StateError, match="not the last aggregated round"):
        s.rollback(0, 0)
    round_of(s, 0, 0.1)
    round_of(s, 1, 0.2)
    with pytest.raises(StateError, match="not the last aggregated round"):
        s.rollback(0, 0)
    with pytest.raises(NotFoundError, match="not an earlier kept version"):
        s.rollback(1, 2)
    with pytest.raises(NotFoundError, match="not an earlier kept version"):
        s.rollback(1, 7)
    s.begin_update("b", 2, s.version)
    with pytest.raises(StateError, match="has updates already"):
        s.rollback(1, 1)


def test_a_sealed_rollback_to_w0_serves_w0_in_the_clear_across_a_restart(tmp_path: Path):
    from services.aggregator.sealed import SealedState
    from services.common.homomorphic import upload_tensors
    from services.core.ckks import HeKeys
    from services.core.tensors import flatten, spec_of

    initial = state_of(build_model("cnn", (1, 8, 8), 10, seed=0))
    spec = spec_of(initial)
    secret = HeKeys.create()
    public = HeKeys.from_bytes(secret.public_bytes())
    state = SealedState(OrderedDict(initial), public)
    state.begin_update("p", 0, 0)
    forged = HeKeys.create()  # another key, the federation's tag: the aggregator adds it
    upload = upload_tensors(public, forged.encrypt(flatten(initial, spec), 10))
    state.end_update(state.sealed_update("p", 0, 10, dict(upload)), 0)
    assert state.aggregate(RoundClose(0, FEDAVG, {}, DEFENCE, 0.05)).version == 1
    assert state.served()[1] == "he:ckks"
    assert state.rollback(0, 0, "noise").version == 2
    version, kind, served = state.served()
    assert (version, kind) == (2, "weights")
    assert all(torch.equal(served[k], initial[k]) for k in initial)
    state.save(tmp_path)
    again = SealedState(OrderedDict(initial), public)
    assert again.restore(tmp_path)
    assert again.served()[:2] == (2, "weights")
    assert again.rollback(0, 0).replayed


@dataclass
class Ev:
    verdict: str
    reason: str = ""
    accuracy: float = 0.0


def test_a_majority_of_the_answers_decides_a_rollback():
    ok, refused, diverged = Ev("ok"), Ev("refused", "noise"), Ev("diverged", "nan")
    assert not judge({}).collapsed
    assert not judge({"a": ok, "b": refused}).collapsed  # a tie keeps the model
    assert not judge({"a": ok, "b": ok, "c": refused}).collapsed  # one liar cannot force it
    got = judge({"a": refused, "b": refused, "c": ok})  # one liar cannot block it
    assert got.collapsed and (got.refused, got.diverged) == (2, 0)
    assert got.reason.startswith("2 of 3 evaluators: 2 refused the model")
    assert judge({"a": refused, "b": diverged, "c": ok}).collapsed


def test_a_fall_in_accuracy_counts_against_the_new_version_per_evaluator():
    before = {"a": 0.9, "b": 0.8, "c": 0.85}
    fine = {p: Ev("ok", accuracy=a - 0.3) for p, a in before.items()}  # honest swings
    assert not judge(fine, before).collapsed
    fallen = {p: Ev("ok", accuracy=0.1) for p in before}
    got = judge(fallen, before)
    assert got.collapsed and got.fell == 3 and "lost more than 0.5 accuracy and 75%" in got.reason
    # A large honest swing that keeps more than a quarter is no collapse.
    assert not judge({p: Ev("ok", accuracy=a - 0.55) for p, a in before.items()}, before).collapsed
    # One evaluator (a liar, or one whose data the model no longer serves) cannot force it;
    # one whose accuracy before is unknown counts as not fallen.
    assert not judge({**fine, "a": Ev("ok", accuracy=0.0)}, before).collapsed
    assert not judge(fallen, {"a": 0.9}).collapsed


def test_group_testing_convicts_the_one_forger_in_log2_rounds():
    q = Quarantine()
    everyone = [f"p{i}" for i in range(8)]
    forger = "p5"
    failures = 0
    for _ in range(20):
        chosen = q.eligible(everyone)
        assert chosen and not set(chosen) & q.convicted
        bad = forger in chosen
        failures += bad
        q.record(chosen, failed=bad)
        if q.convicted:
            break
    assert q.convicted == {forger}
    assert failures <= 1 + 3 + 1  # the first round, log2(8) halvings, the probe of one
    # Afterwards: everyone else trains, nobody is suspected, the forger never again.
    for p in everyone:
        if p != forger:
            q.record([p], failed=False)
    assert sorted(q.eligible(everyone)) == sorted(set(everyone) - {forger})
    assert Quarantine.from_json(q.to_json()) == q


def test_a_trusted_attacker_cannot_get_a_newcomer_convicted():
    q = Quarantine()
    q.record(["attacker"], failed=False)  # behaves once: cleared
    q.record(["attacker", "newcomer"], failed=True)  # forges beside an untested one
    assert not q.convicted and q.suspects == {"attacker": 1, "newcomer": 1}
    assert q.eligible(["attacker", "newcomer"]) == ["attacker"]  # a probe of one, alone
    q.record(["attacker"], failed=True)
    assert q.convicted == {"attacker"}
    assert q.eligible(["attacker", "newcomer"]) == ["newcomer"]


def test_probes_are_drawn_among_present_participants_and_never_leave_nobody():
    q = Quarantine()
    q.record(["a", "b", "c", "d"], failed=True)
    assert q.eligible(["c", "d", "e"]) == ["c"]  # a and b left: the probe is among c, d
    assert q.eligible(["e", "f"]) == ["e", "f"]  # no suspect present: everyone


def test_a_trusted_participant_that_turns_is_suspected_again():
    q = Quarantine()
    q.record(["a", "b"], failed=False)
    q.record(["a", "b"], failed=True)  # both trusted: neither is convicted on this
    assert not q.convicted and set(q.suspects) == {"a", "b"}
    assert q.eligible(["a", "b", "c"]) == ["a"]  # half of them, nobody untested beside


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 24), st.data())
def test_group_testing_never_convicts_an_honest_participant(n, data):
    forgers = set(data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=max(1, n // 3))))
    q = Quarantine()
    ids = [f"p{i:02d}" for i in range(n)]
    for _ in range(6 * n):
        chosen = q.eligible(ids)
        if not chosen:
            break
        q.record(chosen, failed=any(int(p[1:]) in forgers for p in chosen))
    assert {int(p[1:]) for p in q.convicted} <= forgers
    assert {int(p[1:]) for p in q.convicted} == forgers  # and it finds them all


def test_a_model_is_adopted_only_when_finite_and_in_proportion():
    w = {"w": torch.tensor([0.5, -0.2]), "steps": torch.tensor(3)}
    assert unfit(w, 0.4) is None
    assert "non-finite" in (unfit({"w": torch.tensor([float("nan")])}, 1.0) or "")
    assert "non-finite" in (unfit({"w": torch.tensor([float("inf")])}, 1.0) or "")
    assert unfit({"w": torch.tensor([GROWTH * 0.99])}, 0.2) is None  # at least GROWTH
    assert "past" in (unfit({"w": torch.tensor([GROWTH * 1.01])}, 0.2) or "")
    assert unfit({"w": torch.tensor([3 * GROWTH])}, 5.0) is None
    assert "past" in (unfit({"w": torch.tensor([7.8e7])}, 0.2) or "")
