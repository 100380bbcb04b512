"""Progress bars that also show in log files.

rich draws a live bar on a terminal, but where the output is redirected (``segqc train ... > run.log``,
``nohup``, a batch system's log) it draws nothing until the job ends: a 30-minute epoch would leave
the log empty for 30 minutes. :func:`progress_bar` returns a rich ``Progress`` that, where its console
is not a terminal, also prints a plain line per task at most every ``every_s`` seconds and when the
task finishes: ``epoch 2/5: 1200/6134 (20 %) loss 0.0412, 05:31 elapsed, 22:10 left``.
"""
from __future__ import annotations

import math
import time
from datetime import timedelta
from typing import Any

from rich.progress import Progress, TaskID


def _clock(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=int(seconds))).removeprefix("0:")


class _LoggedProgress(Progress):
    """A rich Progress that prints plain progress lines where its console is not a terminal."""

    def __init__(self, *columns: Any, every_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.every_s = every_s
        self._last_line: dict[TaskID, float] = {}
        self._finished: set[TaskID] = set()

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if self.disable or self.console.is_terminal or task_id in self._finished:
            return
        task = self._tasks[task_id]
        now = time.monotonic()
        if task.finished:
            self._finished.add(task_id)
        elif now - self._last_line.get(task_id, -math.inf) < self.every_s:
            return
        self._last_line[task_id] = now
        done = f"{task.completed:.0f}"
        if task.total:
            done += f"/{task.total:.0f} ({100 * task.completed / task.total:.0f} %)"
        fields = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in task.fields.items())
        times = f"{_clock(task.elapsed)} elapsed" + ("" if task.finished else f", {_clock(task.time_remaining)} left")
        self.console.print(f"{task.description}: {done}{' ' + fields if fields else ''}, {times}",
                           markup=False, highlight=False, soft_wrap=True)


def progress_bar(*columns: Any, every_s: float = 60.0, **kwargs: Any) -> Progress:
    """``rich.progress.Progress(*columns, **kwargs)`` that also prints a plain line per task at most
    every ``every_s`` seconds, and when a task finishes, where the console is not a terminal."""
    return _LoggedProgress(*columns, every_s=every_s, **kwargs)
