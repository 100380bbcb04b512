"""SegQC: quality control of segmentations in 3D Slicer.

Four classes, as every scripted module has: ``SegQC`` (module description; it also registers the
"Quality Control" Segment Editor effect), ``SegQCWidget`` (the panel; thin: it reads its inputs,
keeps them in a parameter node and calls the Logic) and ``SegQCTest`` (the in-Slicer self-test).

The Logic is not here: it is the ``SegQCLogic`` package (MRML, never Qt), shared by this panel, the
Segment Editor effect (``SegmentEditorQualityControl.py``) and the web app (``segqc review``). It is
re-exported here so ``SegQC.SegQCLogic`` keeps working. Everything Qt is imported behind a guard, so
this file also imports headless (the pytest suite runs the self-test on the ``slicer-core`` wheel).
"""
from __future__ import annotations

import logging
import os
import time
import unittest

import numpy as np
import slicer

from SegQCLogic import *  # noqa: F401,F403 - the Logic, re-exported: SegQC.SegQCLogic, SegQC.SegQCJob, ...

try:  # the Slicer application (Qt)
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )

    SLICER_APP = True
except ImportError:  # headless: the slicer-core wheel only. Plain stand-ins keep the classes importable.
    qt = None
    SLICER_APP = False

    class ScriptedLoadableModule:  # noqa: D101 - stand-in, never instantiated headless
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # noqa: D101 - stand-in, never instantiated headless
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # noqa: D101
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):  # noqa: D101
        def delayDisplay(self, message, msec=1000):
            logging.info(message)

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:

    def _(text):
        return text

    def translate(context, text):
        return text

try:  # desktop only: the parameter node wrapper needs the Slicer application
    from slicer.parameterNodeWrapper import parameterNodeWrapper
except ImportError:
    parameterNodeWrapper = None

if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class SegQCParameterNode:
        """The panel's settings, saved with the scene (desktop only)."""

        model: str = REFERENCE_MODEL
        threshold: float = 0.8
        forceCpu: bool = False
        segmenter: str = "grabcut"
        maxIterations: int = 20
        onlyFlagged: bool = True
else:
    SegQCParameterNode = None

#: The panel's widgets bound to :class:`SegQCParameterNode` fields (``SlicerParameterName``).
_PARAMETER_WIDGETS = {"thresholdSliderWidget": "threshold", "forceCpuCheckBox": "forceCpu",
                      "maxIterationsSpinBox": "maxIterations", "onlyFlaggedCheckBox": "onlyFlagged"}


#
# SegQC
#


class SegQC(ScriptedLoadableModule):
    """Module description shown by Slicer (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegQC")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quality Control")]
        self.parent.dependencies = []
        self.parent.contributors = ["SegQC developers"]
        self.parent.helpText = _(
            "Quality control of segmentations: per-slice scores (worst slices first; a click on a row"
            " jumps the slice views there), flagged slices below a DSC threshold. With a reference"
            " segmentation the scores are the true metrics (DSC, IoU, HD95, ASD, MHD); QC models"
            " predict them without a reference."
        )
        self.parent.acknowledgementText = _(
            "SegQC reimplements published segmentation quality-control methods; see the model cards"
            " shipped with the extension for the data and metrics of each model."
        )
        if SLICER_APP:  # the Segment Editor effect, once the editor's effect registry exists
            slicer.app.connect("startupCompleted()", registerQualityControlEffect)


def registerQualityControlEffect() -> None:
    """Register the "Quality Control" scripted Segment Editor effect (``SegmentEditorQualityControl.py``)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    effect = effects.qSlicerSegmentEditorScriptedEffect(None)
    effect.setPythonSource(os.path.join(os.path.dirname(__file__), "SegmentEditorQualityControl.py"))
    effect.self().register()


#
# SegQCWidget
#


class SegQCWidget(ScriptedLoadableModuleWidget):
    """The module panel: inputs, Run, a results table. All computation is in :class:`SegQCLogic`."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.ui = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegQC.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SegQCLogic()
        self._parameterNode = None

        self.ui.modelComboBox.addItem(_("Reference segmentation (true metrics)"), REFERENCE_MODEL)
        try:
            for name in self.logic.availableModels():
                self.ui.modelComboBox.addItem(name, name)
        except Exception as err:  # a model's dependency missing must not break the panel
            logging.warning(f"SegQC: QC models unavailable: {err}")

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.updateGUI)
        self.ui.referenceSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.referenceSegmentSelector.connect("currentSegmentChanged(QString)", self.updateGUI)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateGUI)
        self.ui.forceCpuCheckBox.connect("toggled(bool)", self.updateGUI)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.resultsTableView.connect("clicked(QModelIndex)", self.onResultClicked)
        self.ui.batchButton.connect("clicked(bool)", self.onBatchButton)
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        for name in ("grabcut", "randomwalker", "medsam"):
            self.ui.segmenterComboBox.addItem(name)
        self.ui.batchTableView.connect("clicked(QModelIndex)", self.onBatchRowClicked)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)

        self._job = None  # the SegQCJob running in a worker thread, if any
        self._pollTimer = None
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        self.initializeParameterNode()
        self.updateGUI()

    def initializeParameterNode(self):
        """Bind the panel's settings to the module's parameter node (restored with a scene)."""
        if SegQCParameterNode is None:
            return
        moduleLogic = ScriptedLoadableModuleLogic()
        moduleLogic.moduleName = "SegQC"  # the singleton parameter node of this module (not "ScriptedLoadableModule")
        self._parameterNode = SegQCParameterNode(moduleLogic.getParameterNode())
        for widgetName, field in _PARAMETER_WIDGETS.items():
            getattr(self.ui, widgetName).setProperty("SlicerParameterName", field)
        self._parameterNode.connectGui(self.ui)
        stored = {"model": self._parameterNode.model, "segmenter": self._parameterNode.segmenter}  # read both first:
        for combo, field in ((self.ui.modelComboBox, "model"), (self.ui.segmenterComboBox, "segmenter")):
            index = combo.findData(stored[field])  # setting one combo saves both (updateGUI)
            if index < 0:
                index = combo.findText(stored[field])
            if index >= 0:
                combo.setCurrentIndex(index)

    def _saveComboSettings(self):
        """The combo boxes hold item data, which connectGui does not bind: store them here."""
        if self._parameterNode is not None:
            self._parameterNode.model = self.selectedModel() or REFERENCE_MODEL
            self._parameterNode.segmenter = self.ui.segmenterComboBox.currentText

    def cleanup(self):
        """On module close or reload: stop polling and ask a running job to stop."""
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None

    def selectedModel(self):
        return self.ui.modelComboBox.itemData(self.ui.modelComboBox.currentIndex)

    def updateGUI(self, *_args):
        """Enable Run when the inputs the chosen model needs are set; show the device in use."""
        self._saveComboSettings()
        useReference = self.selectedModel() == REFERENCE_MODEL
        self.ui.referenceSegmentSelector.setEnabled(useReference)
        self.ui.forceCpuCheckBox.setEnabled(not useReference)
        ready = bool(
            self.ui.inputVolumeSelector.currentNode()
            and self.ui.segmentSelector.currentNode()
            and self.ui.segmentSelector.currentSegmentID()
        )
        if useReference:
            ready = ready and bool(
                self.ui.referenceSegmentSelector.currentNode() and self.ui.referenceSegmentSelector.currentSegmentID()
            )
            self.ui.deviceLabel.text = _("not needed")
        else:
            try:
                self.ui.deviceLabel.text = self.logic.device(self.ui.forceCpuCheckBox.checked)
            except Exception as err:
                self.ui.deviceLabel.text = str(err)
        busy = getattr(self, "_job", None) is not None
        self.ui.applyButton.enabled = ready and not busy
        self.ui.refineButton.enabled = ready and not busy and not useReference
        self.ui.batchButton.enabled = not busy and not useReference

    def onProgress(self, fraction, message=""):
        self.ui.progressBar.value = int(round(100 * fraction))
        if message:
            self.ui.progressBar.setFormat(f"{message} %p%")

    def ensureDependencies(self) -> bool:
        """Install what the QC models need, after one confirmation: PyTorch through the PyTorch
        extension (the right CUDA/CPU build for this machine), the rest with pip. True when ready."""
        torchMissing, missing = self.logic.missingDependencies()
        if not torchMissing and not missing:
            return True
        what = ([_("PyTorch (through the PyTorch extension)")] if torchMissing else []) + missing
        if not slicer.util.confirmOkCancelDisplay(
                _("SegQC's QC models need these Python packages, which are not installed yet:") + "\n\n"
                + "\n".join(what) + "\n\n" + _("Install them now? This can take several minutes.")):
            return False
        with slicer.util.tryWithErrorDisplay(_("Installing SegQC's dependencies failed."), waitCursor=True):
            if torchMissing:
                try:
                    import PyTorchUtils
                except ImportError:
                    slicer.util.errorDisplay(_("Install the PyTorch extension from the Extensions Manager, restart "
                                               "Slicer, then run SegQC again."))
                    return False
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is None:
                    return False
            if missing:
                slicer.util.pip_install(missing)
        torchMissing, missing = self.logic.missingDependencies()
        return not torchMissing and not missing

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self.ui.progressBar.setFormat(_("Cancelling...") + " %p%")

    def _runJob(self, job, onFinished=None):
        """Run a Logic job's computation in a worker thread so that Slicer stays responsive; a QTimer
        on the GUI thread shows its progress (and its other messages, e.g. HERMES prompts) and, when
        it has ended, writes its results into the scene and calls ``onFinished(result)``."""
        self._job = job
        job.handlers["progress"] = self.onProgress
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat(job.name + " %p%")
        self.ui.cancelButton.setVisible(True)
        self.updateGUI()
        job.start()
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)
        self._pollTimer.connect("timeout()", lambda: self._pollJob(onFinished))
        self._pollTimer.start()

    def _pollJob(self, onFinished):
        job = self._job
        if job is None or not job.poll():
            return
        self._pollTimer.stop()
        self._job = None
        try:
            with slicer.util.tryWithErrorDisplay(_("{name} failed.").format(name=job.name), waitCursor=True):
                result = job.finish()
                if result is not None and onFinished is not None:
                    onFinished(result)
        finally:
            self.ui.progressBar.setVisible(False)
            self.ui.cancelButton.setVisible(False)
            self.updateGUI()

    def onBatchButton(self):
        """QC every segment of every segmentation in the scene with the chosen model; summary worst first."""
        model = self.selectedModel()
        if model == REFERENCE_MODEL:
            slicer.util.errorDisplay(_("Choose a QC model for the batch (a reference is not needed)."))
            return
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("SegQC batch failed."), waitCursor=True):
            job = self.logic.batchSceneJob(model, device=self.logic.device(self.ui.forceCpuCheckBox.checked),
                                           threshold=self.ui.thresholdSliderWidget.value)
            self._runJob(job, self.ui.batchTableView.setMRMLTableNode)

    def onRefineButton(self):
        """HERMES on the selected segment with the chosen pGT model; the result lands in a new segment."""
        model = self.selectedModel()
        if model == REFERENCE_MODEL:
            slicer.util.errorDisplay(_("Choose a QC model that gives a pseudo ground truth (e.g. atlas-brain-mr)."))
            return
        if not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("HERMES refinement failed."), waitCursor=True):
            job = self.logic.refineSegmentJob(
                self.ui.inputVolumeSelector.currentNode(), self.ui.segmentSelector.currentNode(),
                self.ui.segmentSelector.currentSegmentID(), model, self.ui.segmenterComboBox.currentText,
                checkpoint=self.ui.checkpointPathLineEdit.currentPath or None,
                threshold=self.ui.thresholdSliderWidget.value, maxIterations=self.ui.maxIterationsSpinBox.value,
                onlyFlagged=self.ui.onlyFlaggedCheckBox.checked,
                device=self.logic.device(self.ui.forceCpuCheckBox.checked))
            self._runJob(job, self.ui.segmentSelector.setCurrentSegmentID)

    def onBatchRowClicked(self, index):
        """Select the clicked row's segment as the input, so Run shows its per-slice scores."""
        tableNode = self.ui.batchTableView.mrmlTableNode()
        if tableNode is None:
            return
        table = tableNode.GetTable()
        row = index.row()
        nodeId = table.GetColumnByName("nodeID").GetValue(row)
        segmentId = table.GetColumnByName("segmentID").GetValue(row)
        node = slicer.mrmlScene.GetNodeByID(nodeId)
        if node is not None:
            self.ui.segmentSelector.setCurrentNode(node)
            self.ui.segmentSelector.setCurrentSegmentID(segmentId)
            self.ui.inputVolumeSelector.setCurrentNode(self.logic.referenceVolumeOf(node))

    def onApplyButton(self):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        segmentationNode = self.ui.segmentSelector.currentNode()
        segmentId = self.ui.segmentSelector.currentSegmentID()
        tableNode = self.ui.outputTableSelector.currentNode()
        threshold = self.ui.thresholdSliderWidget.value
        model = self.selectedModel()
        if model != REFERENCE_MODEL and not self.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("SegQC failed."), waitCursor=True):
            if model == REFERENCE_MODEL:  # true metrics against a reference segment
                job = self.logic.compareSegmentsJob(
                    volumeNode, segmentationNode, segmentId, self.ui.referenceSegmentSelector.currentNode(),
                    self.ui.referenceSegmentSelector.currentSegmentID(), threshold, tableNode)
            else:
                job = self.logic.assessSegmentJob(volumeNode, segmentationNode, segmentId, model,
                                                  self.logic.device(self.ui.forceCpuCheckBox.checked), threshold,
                                                  tableNode)
            self._runJob(job, self.showResult)

    def showResult(self, tableNode):
        """Show a per-slice result table (worst slices first), its summary and its plot."""
        self.ui.outputTableSelector.setCurrentNode(tableNode)
        self.ui.resultsTableView.setMRMLTableNode(tableNode)
        dscColumn = tableNode.GetColumnIndex("dsc")
        if dscColumn >= 0:  # worst slices first
            self.ui.resultsTableView.sortByColumn(dscColumn, qt.Qt.AscendingOrder)
        self.ui.summaryLabel.text = self.logic.summary(self.logic.lastResult)
        volumeNode = tableNode.GetNodeReference(VOLUME_REFERENCE_ROLE)
        if volumeNode is not None:
            slicer.util.setSliceViewerLayers(background=volumeNode)
        chartNode = tableNode.GetNodeReference(CHART_REFERENCE_ROLE)
        if chartNode is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)

    def onResultClicked(self, index):
        """Jump the slice views to the slice of the clicked row (column 0 holds the slice index)."""
        tableNode = self.ui.resultsTableView.mrmlTableNode()
        if tableNode is None:
            return
        volumeNode = tableNode.GetNodeReference(VOLUME_REFERENCE_ROLE) or self.ui.inputVolumeSelector.currentNode()
        try:
            sliceIndex = int(float(index.sibling(index.row(), 0).data()))
        except (TypeError, ValueError):
            return
        if volumeNode is None:
            return
        r, a, s = self.logic.sliceRAS(volumeNode, sliceIndex, self.logic.sliceAxisOf(tableNode))
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)


#
# SegQCLogic
#

#
# SegQCTest
#


class SegQCTest(ScriptedLoadableModuleTest):
    """Self-test: a synthetic volume and two segmentations, compared with :meth:`SegQCLogic.compareSegments`.

    Runs in Slicer (Reload and Test). It only uses the Logic, so the headless pytest suite runs it too.
    """

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_SegQC_compareSegments()

    def test_SegQC_compareSegments(self):
        from SegQCLib import metrics

        self.delayDisplay("Creating a synthetic volume and two segmentations")
        shape = (12, 40, 48)  # z, y, x
        z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
        ellipsoid = ((z - 5.5) / 5.0) ** 2 + ((y - 20) / 14.0) ** 2 + ((x - 24) / 17.0) ** 2 <= 1.0
        image = (100 * ellipsoid + np.random.default_rng(0).normal(0, 5, shape)).astype(np.int16)
        ijkToRas = np.array([[-0.8, 0, 0, 30.0], [0, -0.7, 0, 12.0], [0, 0, 2.0, -40.0], [0, 0, 0, 1]])
        volumeNode = slicer.util.addVolumeFromArray(image, ijkToRAS=ijkToRas, name="SegQCTestVolume")

        degraded = ellipsoid.copy()
        degraded[3] = np.roll(ellipsoid[3], 4, axis=1)  # shifted in slice 3
        degraded[7] = False  # missed in slice 7
        predNode = self._segmentation("Prediction", "organ", degraded, volumeNode)
        refNode = self._segmentation("Reference", "organ", ellipsoid, volumeNode)
        predId = predNode.GetSegmentation().GetSegmentIdBySegmentName("organ")
        refId = refNode.GetSegmentation().GetSegmentIdBySegmentName("organ")

        self.delayDisplay("Comparing")
        logic = SegQCLogic()
        table = logic.compareSegments(volumeNode, predNode, predId, refNode, refId, threshold=0.9)

        expected = metrics.slice_metrics(degraded, ellipsoid, (2.0, 0.7, 0.8))
        self.assertEqual(table.GetNumberOfRows(), len(expected))
        self.assertEqual(table.GetColumnName(0), "slice")
        slices = [int(table.GetTable().GetValueByName(i, "slice").ToInt()) for i in range(table.GetNumberOfRows())]
        self.assertEqual(slices, [row["index"] for row in expected])
        for i, row in enumerate(expected):
            self.assertAlmostEqual(table.GetTable().GetValueByName(i, "dsc").ToDouble(), row["dsc"], places=6)
        self.assertEqual(logic.lastResult.flagged, [3, 7])
        self.assertAlmostEqual(logic.lastResult.volume["dsc"], metrics.volume_metrics(degraded, ellipsoid, (2.0, 0.7, 0.8))["dsc"])
        self.assertEqual(float(table.GetAttribute("SegQC.volume.dsc")), logic.lastResult.volume["dsc"])

        r, a, s = logic.sliceRAS(volumeNode, 3)
        np.testing.assert_allclose((r, a, s), (ijkToRas @ [23.5, 19.5, 3.0, 1.0])[:3])  # (nx-1)/2, (ny-1)/2, k

        self.delayDisplay("Comparing in a worker thread, as the panel does")
        job = logic.compareSegmentsJob(volumeNode, predNode, predId, refNode, refId, threshold=0.9)
        job.start()
        while not job.poll():
            if SLICER_APP:
                slicer.app.processEvents()
            time.sleep(0.01)
        threaded = job.finish()
        self.assertNotEqual(threaded.GetID(), table.GetID())
        for i in range(table.GetNumberOfRows()):
            self.assertEqual(threaded.GetTable().GetValueByName(i, "dsc").ToDouble(),
                             table.GetTable().GetValueByName(i, "dsc").ToDouble())
        self.delayDisplay("Test passed")

    @staticmethod
    def _segmentation(nodeName, segmentName, mask, volumeNode):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", nodeName)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        segmentId = node.GetSegmentation().AddEmptySegment("", segmentName)  # (ID generated, name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segmentId, volumeNode)
        return node
