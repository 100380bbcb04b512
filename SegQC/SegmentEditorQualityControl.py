"""The "Quality Control" Segment Editor effect (desktop Slicer): the selected segment's per-slice
scores, a jump to the worst slice, and HERMES Refine, all through :class:`SegQCLogic.SegQCLogic`.

The effect is Qt only where it must be (its option widgets); what it does to the scene is the
Logic's, tested headless (``Testing/test_slicer_effect.py``). Before the refine adds its segment the
editor's undo state is saved, so Ctrl+Z in the Segment Editor removes it again.
"""
from __future__ import annotations

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from SegQCLogic import SegQCLogic


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Scores (pseudo-DSC per axial slice), worst-slice jump and Refine of the selected segment."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "Quality Control"
        scriptedEffect.perSegment = True  # operates on the selected segment
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = SegQCLogic()
        self.tableNode = None
        self._job = None
        self._timer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), "Resources/Icons/SegQC.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return ("<html>Quality control of the selected segment without ground truth: per-slice pseudo-DSC, "
                "a jump to the worst slice, and HERMES refinement into a new segment '&lt;name&gt; refined' "
                "(the original is never changed; Undo removes the new segment).</html>")

    def setupOptionsFrame(self):
        self.modelSelector = qt.QComboBox()
        for name in self.logic.availableModels():
            self.modelSelector.addItem(name)
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelSelector)
        self.thresholdSpinBox = qt.QDoubleSpinBox()
        self.thresholdSpinBox.setRange(0.0, 1.0)
        self.thresholdSpinBox.setSingleStep(0.05)
        self.thresholdSpinBox.value = 0.8
        self.scriptedEffect.addLabeledOptionsWidget("Threshold:", self.thresholdSpinBox)
        self.scoreButton = qt.QPushButton("Score slices")
        self.worstButton = qt.QPushButton("Jump to worst slice")
        self.refineButton = qt.QPushButton("Refine (HERMES)")
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        for widget in (self.scoreButton, self.worstButton, self.refineButton, self.statusLabel):
            self.scriptedEffect.addOptionsWidget(widget)
        self.scoreButton.connect("clicked()", self.onScore)
        self.worstButton.connect("clicked()", self.onWorst)
        self.refineButton.connect("clicked()", self.onRefine)

    def _inputs(self):
        parameterSetNode = self.scriptedEffect.parameterSetNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        return volumeNode, segmentationNode, parameterSetNode.GetSelectedSegmentID()

    def _run(self, job, onFinished):
        """The job's compute in a worker thread, polled by a timer (Slicer stays responsive)."""
        self._job = job
        job.handlers["progress"] = lambda fraction, message="": setattr(
            self.statusLabel, "text", f"{message} {100 * fraction:.0f} %")
        job.start()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", lambda: self._poll(onFinished))
        self._timer.start()

    def _poll(self, onFinished):
        if self._job is None or not self._job.poll():
            return
        self._timer.stop()
        job, self._job = self._job, None
        with slicer.util.tryWithErrorDisplay(f"{job.name} failed."):
            result = job.finish()
            if result is not None:
                onFinished(result)

    def onScore(self):
        volumeNode, segmentationNode, segmentId = self._inputs()
        with slicer.util.tryWithErrorDisplay("Quality control failed."):
            job = self.logic.assessSegmentJob(volumeNode, segmentationNode, segmentId, self.modelSelector.currentText,
                                              self.logic.device(), self.thresholdSpinBox.value)
            self._run(job, self._showScores)

    def _showScores(self, tableNode):
        self.tableNode = tableNode
        self.statusLabel.text = self.logic.summary(self.logic.lastResult)

    def onWorst(self):
        volumeNode, _segmentationNode, _segmentId = self._inputs()
        if self.tableNode is None or volumeNode is None:
            self.statusLabel.text = "Score the slices first."
            return
        k = self.logic.worstSlice(self.tableNode)
        if k is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(
                *self.logic.sliceRAS(volumeNode, k, self.logic.sliceAxisOf(self.tableNode)), True)

    def onRefine(self):
        volumeNode, segmentationNode, segmentId = self._inputs()
        with slicer.util.tryWithErrorDisplay("HERMES refinement failed."):
            job = self.logic.refineSegmentJob(volumeNode, segmentationNode, segmentId, self.modelSelector.currentText,
                                              "grabcut", threshold=self.thresholdSpinBox.value,
                                              device=self.logic.device())

            def added(newId):
                self.statusLabel.text = f"Refined into segment {newId}"

            # the undo state is taken when the segment is about to be added, i.e. after compute
            job.beforeFinish = self.scriptedEffect.saveStateForUndo
            self._run(job, added)
