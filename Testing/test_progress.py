"""Progress bars: plain lines where the output is a log file, not a terminal."""
from __future__ import annotations

import io

from rich.console import Console

from SegQCLib.progress import progress_bar


def _run(console: Console, every_s: float) -> str:
    with progress_bar(console=console, every_s=every_s) as bar:
        task = bar.add_task("epoch 1/2", total=4, loss=0.0)
        for i in range(4):
            bar.update(task, advance=1, loss=0.5 / (i + 1))
    return console.file.getvalue()


def test_a_log_file_gets_plain_progress_lines() -> None:
    lines = [line for line in _run(Console(file=io.StringIO(), force_terminal=False, width=200), 0.0).splitlines()
             if line.startswith("epoch 1/2:")]
    assert [line.split(",")[0] for line in lines] == [
        "epoch 1/2: 1/4 (25 %) loss 0.5000", "epoch 1/2: 2/4 (50 %) loss 0.2500",
        "epoch 1/2: 3/4 (75 %) loss 0.1667", "epoch 1/2: 4/4 (100 %) loss 0.1250"]
    assert lines[0].endswith("left") and lines[-1].endswith("elapsed")  # the last line has no time left


def test_lines_are_spaced_by_every_s_and_the_end_is_always_printed() -> None:
    out = _run(Console(file=io.StringIO(), force_terminal=False, width=200), 3600.0)
    lines = [line.split(",")[0] for line in out.splitlines() if line.startswith("epoch 1/2:")]
    assert lines == ["epoch 1/2: 1/4 (25 %) loss 0.5000", "epoch 1/2: 4/4 (100 %) loss 0.1250"]


def test_a_terminal_gets_the_live_bar_only() -> None:
    out = _run(Console(file=io.StringIO(), force_terminal=True, width=200), 0.0)
    assert "epoch 1/2:" not in out and "epoch 1/2" in out
