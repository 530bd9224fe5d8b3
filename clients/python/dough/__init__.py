"""Dough's Python client: submit tasks to `dough serve`, follow their output,
cancel them, read their results, egress records and provenance.

    from dough import Dough

    d = Dough()                       # DOUGH_URL/DOUGH_TOKEN or the state dir
    task = d.submit(["make", "test"], timeout=600)
    for ev in task.stream():          # output and state, live
        if ev.kind == "output":
            print(ev.data, end="")
    print(task.wait()["state"])

:class:`AsyncDough` is the same, awaited.
"""
from ._common import Commit, Event, TaskResult, task_body
from .aio import AsyncDough, AsyncTask
from .client import Dough, Task
from .errors import *  # noqa: F401,F403 (every error class)
from .errors import ERRORS, DoughError

__all__ = [
    "AsyncDough",
    "AsyncTask",
    "Commit",
    "Dough",
    "DoughError",
    "ERRORS",
    "Event",
    "Task",
    "TaskResult",
    "task_body",
] + [c.__name__ for c in ERRORS.values()] + [
    "ConfigError",
    "DoughConnectionError",
    "TaskFailed",
    "TaskTimeout",
]
