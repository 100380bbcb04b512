"""Stand-ins for what the Slicer application gives ``slicer.util`` when there is none (no Qt).

Used by the pytest suite's headless Slicer (``Testing/conftest.py``, on the ``slicer-core`` wheel)
and by the web app (``SegQCReview.env``, on a trame-slicer ``SlicerApp``'s scene): both set
``slicer.app = HeadlessApp(...)`` and ``slicer.modules.<name> = HeadlessModule(...)``.
"""
from __future__ import annotations

import types


class HeadlessApp:
    """The few members of ``slicer.app`` (qSlicerApplication) that ``slicer.util`` and our code use."""

    applicationName = "SlicerHeadless"

    def __init__(self, scene, appLogic, tempDir: str):
        self._scene = scene
        self._appLogic = appLogic
        self.temporaryPath = tempDir
        self.commandOptions = lambda: types.SimpleNamespace(noMainWindow=True)

    def mrmlScene(self):
        return self._scene

    def applicationLogic(self):
        return self._appLogic

    def testingEnabled(self):
        return True  # message boxes of slicer.util return at once instead of waiting for a click

    def layoutManager(self):
        return None  # no Qt views

    def processEvents(self):
        pass

    def pauseRender(self):
        pass

    def resumeRender(self):
        pass


class HeadlessModule:
    """A ``slicer.modules.<name>`` entry: ``name`` and ``logic()``."""

    def __init__(self, name: str, logic):
        self.name = name
        self._logic = logic

    def logic(self):
        return self._logic
