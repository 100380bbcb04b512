"""SegQCJob: a Logic operation whose heavy part runs off the GUI (or server) thread, with progress and cancel."""
from __future__ import annotations

import queue
import threading

try:
    from slicer.i18n import tr as _
except ImportError:  # slicer-core wheels without i18n

    def _(text):
        return text


class _Cancelled(Exception):
    """Raised inside a job's ``compute`` when the user pressed Cancel."""


_GUI_CALL = "__call_on_gui__"  # SegQCJob message kind of callOnGui


class SegQCJob:
    """A Logic operation split so that its heavy part runs off the GUI thread.

    The Logic's ``*Job`` methods read what they need from MRML when they build the job (GUI thread)
    and return it; then:

    - ``compute(job)`` does the numerical work on those NumPy arrays. It may run in a worker thread,
      so it touches no MRML/VTK object (they are not thread-safe): it reports through
      ``job.post(kind, *args)`` / ``job.progress(fraction, message)``, reads more from MRML only
      through ``job.callOnGui(function, *args)``, and checks ``job.cancelled`` (or calls
      ``job.checkCancelled()``) between steps.
    - ``poll()`` (GUI thread, e.g. from a QTimer) hands the posted messages to ``handlers[kind]``
      (``"progress"``: ``(fraction, message)``; a Logic adds its own kinds, e.g. HERMES's
      ``"prompts"``, which updates markups) and says whether compute has ended.
    - ``finish()`` (GUI thread) re-raises compute's error, or writes the result nodes and returns
      what the synchronous Logic method returns; None when compute stopped at a cancel.

    ``run()`` does all of it in the calling thread, which is what scripts and tests use.
    """

    def __init__(self, name: str, compute, finish):
        self.name = name
        self.handlers = {}
        self._compute, self._finish = compute, finish
        self._messages = queue.Queue()
        self._cancel = threading.Event()
        self._cancelCheck = None
        self._ended = threading.Event()
        self._thread = None
        self._result, self._error, self._stopped = None, None, False
        #: called (GUI thread) right before ``finish`` changes the scene, e.g. to save an undo state
        self.beforeFinish = None

    # called from compute (any thread)
    def post(self, kind: str, *args) -> None:
        self._messages.put((kind, args))
        if self._thread is None:  # synchronous run: deliver at once
            self.poll()

    def progress(self, fraction: float, message: str = "") -> None:
        self.post("progress", float(fraction), message)

    @property
    def cancelled(self) -> bool:
        if not self._cancel.is_set() and self._cancelCheck is not None and self._cancelCheck():
            self._cancel.set()
        return self._cancel.is_set()

    def checkCancelled(self) -> None:
        if self.cancelled:
            raise _Cancelled()

    def callOnGui(self, function, *args):
        """``function(*args)`` run on the GUI thread (at its next :meth:`poll`), its result returned
        here: how ``compute`` reads MRML when it needs data piece by piece. Raises what ``function``
        raises, or ``_Cancelled`` when the job is cancelled while waiting."""
        if self._thread is None or threading.current_thread() is not self._thread:
            return function(*args)
        call = {"done": threading.Event()}
        self._messages.put((_GUI_CALL, (function, args, call)))
        while not call["done"].wait(0.05):
            self.checkCancelled()
        if "error" in call:
            raise call["error"]
        return call["value"]

    # called from the GUI thread
    def cancel(self) -> None:
        self._cancel.set()

    def start(self) -> None:
        """Run ``compute`` in a daemon worker thread; follow it with :meth:`poll`, then :meth:`finish`."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self._thread = threading.Thread(target=self._work, name=f"SegQC: {self.name}", daemon=True)
        self._thread.start()

    def poll(self) -> bool:
        """Deliver the posted messages to their handlers; True once compute has ended (and all were delivered)."""
        ended = self._ended.is_set()
        while True:
            try:
                kind, args = self._messages.get_nowait()
            except queue.Empty:
                break
            if kind == _GUI_CALL:
                function, callArgs, call = args
                if self._cancel.is_set():  # compute has given up waiting: do not touch the scene for it
                    call["error"] = _Cancelled()
                    call["done"].set()
                    continue
                try:
                    call["value"] = function(*callArgs)
                except BaseException as err:  # handed back to compute
                    call["error"] = err
                finally:
                    call["done"].set()
                continue
            handler = self.handlers.get(kind)
            if handler is not None:
                handler(*args)
        return ended

    def wait(self, timeout: float | None = None) -> bool:
        """Block until compute has ended (True) or ``timeout`` seconds passed (False)."""
        return self._ended.wait(timeout)

    def finish(self):
        if not self._ended.is_set():
            raise RuntimeError(f"{self.name}: compute has not ended")
        self.poll()
        if self._error is not None:
            raise self._error
        if self._stopped:
            return None
        if self.beforeFinish is not None:
            self.beforeFinish()
        return self._finish(self._result)

    def run(self, progressCallback=None, cancelled=None):
        """Compute and finish in this thread; ``cancelled()`` is polled like a Cancel button."""
        if progressCallback is not None:
            self.handlers["progress"] = progressCallback
        self._cancelCheck = cancelled
        self._work()
        result = self.finish()
        if result is not None:
            self.progress(1.0, _("Done"))
        return result

    def _work(self) -> None:
        try:
            self._result = self._compute(self)
        except _Cancelled:
            self._stopped = True
        except BaseException as err:  # handed to the GUI thread by finish()
            self._error = err
        finally:
            self._ended.set()

