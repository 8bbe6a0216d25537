"""--mode async at the clusterer: an upload is taken only for the TRAIN task its sender
holds, of that task's version, once per buffer."""

from __future__ import annotations

import pytest

from services.clusterer.board import Task, TaskKind
from services.clusterer.collection import AsyncCollection
from services.core.errors import StateError


def collection() -> AsyncCollection:
    board = {
        "a": Task(TaskKind.TRAIN, 0, 3),
        "b": Task(TaskKind.EVALUATE, 0, 3, "async-v3"),
    }
    return AsyncCollection(0, 3, {"a": 1, "b": 0, "c": 0}, board=board)


def test_the_holder_of_a_train_task_uploads_for_its_version_whatever_the_round():
    c = collection()
    assert c.reserve("a", 7, 3, None) == 1 and c.takes(99)
    with pytest.raises(StateError, match="duplicate"):
        c.reserve("a", 7, 3, None)
    c.release("a", True)
    c.received.add("a")
    assert c.buffered() == {1: 1}


@pytest.mark.parametrize(
    ("who", "version", "said"),
    [
        ("b", 3, "no training task"),  # holds an evaluation, not a TRAIN task
        ("c", 3, "no training task"),  # holds nothing
        ("x" * 10_000, 3, "no training task"),  # a stranger (named at most 64 characters)
        ("a", 2, "the task was version 3"),
        ("a", -(2**62), "the task was version 3"),
    ],
)
def test_an_upload_without_its_task_or_of_another_version_is_refused(who, version, said):
    c = collection()
    with pytest.raises(StateError, match=said) as refused:
        c.reserve(who, 0, version, None)
    assert len(str(refused.value)) < 200 and not c.in_flight
