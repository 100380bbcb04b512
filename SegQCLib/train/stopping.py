"""Clean stops for long training runs: Ctrl-C and SIGTERM stop at the end of the current step.

A trainer checkpoints and exits when the user presses Ctrl-C, and when the job is stopped with
SIGTERM (``kill <pid>``, a batch system, a session that ends): a background run
(``nohup segqc train ... &``) may ignore SIGINT. Inside :func:`stop_between_steps` either signal
only *asks* to stop; the trainer calls :meth:`StopRequest.check` where a step has finished, so the
checkpoint holds the state after whole steps and the resumed run repeats the stopped one exactly.
(A KeyboardInterrupt raised mid-step would leave a half-done step behind: batch-norm statistics of a
forward pass without its optimiser step.) A second signal stops at once. Signal handlers can only be
set from the main thread; elsewhere requests are never made and the block runs unchanged.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class StopRequest:
    """Whether Ctrl-C or SIGTERM asked the run to stop."""

    def __init__(self) -> None:
        self.requested = False

    def check(self) -> None:
        """Raise KeyboardInterrupt if a stop was asked for (call it where a step has finished)."""
        if self.requested:
            raise KeyboardInterrupt


@contextmanager
def stop_between_steps() -> Iterator[StopRequest]:
    """Within the block, SIGINT and SIGTERM set ``requested`` (a second one raises KeyboardInterrupt
    at once); the previous handlers are restored after it."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request(signum, frame):
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
