"""The task board: which task each participant should work on now.

Pure rules (no locking, no protobuf): the state holds the board under its condition
variable, and the server converts a TaskKind to the wire's enum (services/clusterer/server.py).
Every assignment tells a listener who got a task, so long polls that do not block on the
state's cond (the clusterer's asyncio polls) wake.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass


class TaskKind(enum.Enum):
    """What a participant is asked to do (the wire's TaskKind, without UNSPECIFIED)."""

    WAIT = "wait"
    PRETRAIN = "pretrain"
    TRAIN = "train"
    EVALUATE = "evaluate"
    DONE = "done"


@dataclass
class Task:
    """The task a participant should work on now; kept until it is done or cancelled."""

    kind: TaskKind
    round: int
    model_version: int
    evaluation_id: str = ""


# Told, with the cond held, who was just given a task (None: everyone, the federation ended).
TaskListener = Callable[[Iterable[str] | None], None]


class TaskBoard(dict[str, Task]):
    """The open tasks by participant: a dict whose item assignment and update tell `told`
    who gets one, so waiters that do not block on the cond (the clusterer's asyncio long
    polls) wake."""

    def __init__(self, told: TaskListener) -> None:
        super().__init__()
        self._told = told

    def __setitem__(self, pid: str, task: Task) -> None:
        super().__setitem__(pid, task)
        self._told((pid,))

    def update(self, tasks: Mapping[str, Task]) -> None:  # type: ignore[override]
        super().update(tasks)
        self._told(tasks.keys())

    def has(self, pid: str, kind: TaskKind, tag: str | None = None) -> bool:
        """Whether pid's open task is of kind (and, given a tag, that evaluation)."""
        task = self.get(pid)
        return task is not None and task.kind == kind and (tag is None or task.evaluation_id == tag)

    def withdraw(self, pid: str, kind: TaskKind) -> bool:
        """End pid's task if it is of kind; whether there was one."""
        if self.has(pid, kind):
            del self[pid]
            return True
        return False

    def withdraw_all(self, participants: Iterable[str], kind: TaskKind) -> list[str]:
        """End the tasks of kind of participants; who had one, in the order given."""
        return [p for p in participants if self.withdraw(p, kind)]
