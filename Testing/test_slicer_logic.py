"""SegQCLogic on real MRML nodes, headless (``slicer-core`` wheel; see conftest.py).

The data: a sub-block of the MNI "ch2bet" brain (mricron-data), written to disk with SimpleITK and
read back by Slicer's own volume reader (a storage node), so that the RAS geometry Slicer builds is
checked against SimpleITK's LPS reading of the same file; a segmentation with the brain mask
(intensity > 0) and an eroded copy of it.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

CH2BET = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
needs_ch2bet = pytest.mark.skipif(not CH2BET.exists(), reason="apt-get install mricron-data")

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


# --------------------------------------------------------------------------- helpers
def write_crop(path: Path, oblique: bool = False) -> Path:
    """A sub-block of ch2bet (90 x 120 x 40 voxels) written to ``path``; ``oblique`` also gives it an
    anisotropic spacing, a rotated direction and a shifted origin (metadata only)."""
    image = sitk.ReadImage(str(CH2BET))[45:135, 50:170, 60:100]
    if oblique:
        a, b = 0.35, -0.2  # rotations about z, then x
        rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
        direction = rx @ rz @ np.asarray(image.GetDirection()).reshape(3, 3)
        image.SetDirection(tuple(direction.ravel()))
        image.SetSpacing((0.9, 1.1, 1.7))
        image.SetOrigin((12.5, -30.25, 7.0))
    sitk.WriteImage(image, str(path))
    return path


def load_volume(slicer, path: Path, name: str = "volume"):
    """Read a volume file with Slicer's reader (slicer.util.loadVolume needs the Qt application)."""
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node), f"Slicer could not read {path}"
    node.CreateDefaultDisplayNodes()
    return node


def add_segment(slicer, segmentationNode, name: str, mask: np.ndarray, volumeNode) -> str:
    segmentId = segmentationNode.GetSegmentation().AddEmptySegment(name, name)
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), segmentationNode, segmentId, volumeNode)
    return segmentId


def table_column(tableNode, name: str) -> np.ndarray:
    table = tableNode.GetTable()
    column = table.GetColumnByName(name)
    assert column is not None, f"no column {name!r}"
    return np.array([column.GetValue(i) for i in range(table.GetNumberOfRows())], dtype=float)


def node_ids(scene) -> set[str]:
    """IDs of the scene's nodes, but the subject hierarchy (created lazily after a scene Clear)."""
    ids = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    return {i for i in ids if not i.startswith("vtkMRMLSubjectHierarchyNode")}


def ijk_to_ras(volumeNode) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


@pytest.fixture
def logic(slicer_env):
    import SegQC

    return SegQC.SegQCLogic()


@pytest.fixture
def brain_case(scene, slicer_env, tmp_path):
    """(volume node, segmentation node, brain id, eroded id, brain mask, eroded mask, sitk image)."""
    slicer = slicer_env
    path = write_crop(tmp_path / "ch2bet_crop.nii.gz")
    volumeNode = load_volume(slicer, path, "ch2bet")
    image = sitk.ReadImage(str(path))
    brain = sitk.GetArrayFromImage(image) > 0
    eroded = ndi.binary_erosion(brain, iterations=2)
    eroded[5] = False  # a slice the prediction misses entirely: DSC 0, infinite distances
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "brain segmentation")
    segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    brainId = add_segment(slicer, segmentationNode, "brain", brain, volumeNode)
    erodedId = add_segment(slicer, segmentationNode, "brain eroded", eroded, volumeNode)
    return volumeNode, segmentationNode, brainId, erodedId, brain, eroded, image


# --------------------------------------------------------------------------- import
def test_logic_imports_without_qt(slicer_env):
    import SegQC
    import SegQCLogic

    assert not SegQC.SLICER_APP
    assert "qt" not in sys.modules and "ctk" not in sys.modules
    # one Logic for every front end: the module re-exports the package's class, it has no copy
    assert SegQC.SegQCLogic is SegQCLogic.SegQCLogic and SegQC.SegQCJob is SegQCLogic.SegQCJob
    assert "class SegQCLogic" not in Path(SegQC.__file__).read_text()


# --------------------------------------------------------------------------- geometry
@needs_ch2bet
@pytest.mark.parametrize("oblique", [False, True], ids=["ch2bet-crop", "oblique-anisotropic"])
def test_volume_from_node_matches_simpleitk(scene, slicer_env, logic, tmp_path, oblique):
    path = write_crop(tmp_path / ("crop.nrrd" if oblique else "crop.nii.gz"), oblique)
    volumeNode = load_volume(slicer_env, path)
    image = sitk.ReadImage(str(path))

    volume = logic.volumeFromNode(volumeNode)

    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert volume.shape == tuple(reversed(image.GetSize()))
    np.testing.assert_allclose(volume.spacing, image.GetSpacing()[::-1], atol=1e-6)  # (z, y, x)
    np.testing.assert_allclose(volume.grid.origin, image.GetOrigin(), atol=1e-4)  # LPS
    np.testing.assert_allclose(volume.grid.direction, image.GetDirection(), atol=1e-6)
    # the copy is the library's: changing the node's voxels does not change it
    slicer_env.util.arrayFromVolume(volumeNode)[:] = 0
    assert volume.array.any()


@needs_ch2bet
def test_ch2bet_is_lps_flipped(scene, slicer_env, logic, tmp_path):
    """ch2bet's ITK direction is diag(-1, -1, 1) (LPS): in Slicer's RAS the index axes are +x, +y, +z."""
    volumeNode = load_volume(slicer_env, write_crop(tmp_path / "crop.nii.gz"))
    np.testing.assert_allclose(ijk_to_ras(volumeNode)[:3, :3], np.eye(3), atol=1e-6)
    volume = logic.volumeFromNode(volumeNode)
    np.testing.assert_allclose(volume.grid.direction_matrix, LPS_TO_RAS, atol=1e-6)


@needs_ch2bet
@pytest.mark.parametrize("oblique", [False, True], ids=["ch2bet-crop", "oblique-anisotropic"])
def test_slice_ras_is_the_slice_centre(scene, slicer_env, logic, tmp_path, oblique):
    path = write_crop(tmp_path / ("crop.nrrd" if oblique else "crop.nii.gz"), oblique)
    volumeNode = load_volume(slicer_env, path)
    image = sitk.ReadImage(str(path))
    nx, ny, nz = image.GetSize()
    matrix = ijk_to_ras(volumeNode)
    for k in (0, 7, nz - 1):
        ras = np.array(logic.sliceRAS(volumeNode, k))
        centre = ((nx - 1) / 2, (ny - 1) / 2, k)
        np.testing.assert_allclose(ras, (matrix @ [*centre, 1.0])[:3], atol=1e-9)
        # independently of Slicer: SimpleITK's LPS point, flipped to RAS
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint(centre))
        np.testing.assert_allclose(ras, LPS_TO_RAS @ lps, atol=1e-4)
        # and the library's own index -> RAS mapping agrees
        grid = logic.gridFromNode(volumeNode)
        np.testing.assert_allclose(ras, grid.index_to_ras(np.array([k, (ny - 1) / 2, (nx - 1) / 2])), atol=1e-4)
    from SegQCLib.errors import InputError

    with pytest.raises(InputError, match="outside"):
        logic.sliceRAS(volumeNode, nz)


def test_parent_transform_is_applied(scene, slicer_env, logic):
    slicer = slicer_env
    volumeNode = slicer.util.addVolumeFromArray(np.zeros((4, 5, 6), np.int16), ijkToRAS=np.diag([0.5, 0.6, 2.0, 1.0]))
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 3.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    volumeNode.SetAndObserveTransformNodeID(transform.GetID())
    volume = logic.volumeFromNode(volumeNode)
    np.testing.assert_allclose(volume.grid.origin, (-10.0, 5.0, 3.0), atol=1e-9)  # RAS (10, -5, 3) in LPS
    np.testing.assert_allclose(volume.spacing, (2.0, 0.6, 0.5), atol=1e-9)
    np.testing.assert_allclose(logic.sliceRAS(volumeNode, 1), (10 + 2.5 * 0.5, -5 + 2 * 0.6, 3 + 2.0), atol=1e-9)


# --------------------------------------------------------------------------- segments and metrics
@needs_ch2bet
def test_segment_mask_round_trips(brain_case, logic):
    volumeNode, segmentationNode, brainId, erodedId, brain, eroded, _ = brain_case
    mask = logic.segmentMask(segmentationNode, brainId, volumeNode)
    assert mask.dtype == bool and mask.shape == brain.shape
    np.testing.assert_array_equal(mask, brain)
    np.testing.assert_array_equal(logic.segmentMask(segmentationNode, erodedId, volumeNode), eroded)
    from SegQCLib.errors import InputError

    with pytest.raises(InputError, match="no segment"):
        logic.segmentMask(segmentationNode, "no such segment", volumeNode)


@needs_ch2bet
def test_compare_segments_gives_true_metrics(brain_case, logic, scene, slicer_env):
    from SegQCLib import metrics

    volumeNode, segmentationNode, brainId, erodedId, brain, eroded, image = brain_case
    spacing = image.GetSpacing()[::-1]
    nodesBefore = node_ids(scene)

    table = logic.compareSegments(volumeNode, segmentationNode, erodedId, segmentationNode, brainId, threshold=0.9)

    expected = metrics.slice_metrics(eroded, brain, spacing)
    assert table.IsA("vtkMRMLTableNode")
    assert table.GetNumberOfRows() == len(expected) > 10
    columns = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert columns == ["slice", "dsc", "iou", "hd95", "asd", "mhd", "mhd95", "nemhd", "flagged"]
    np.testing.assert_array_equal(table_column(table, "slice"), [row["index"] for row in expected])
    for key in metrics.METRIC_KEYS:
        want = np.array([row[key] for row in expected], dtype=float)
        want[~np.isfinite(want)] = np.nan  # infinite distances are shown as NaN
        np.testing.assert_allclose(table_column(table, key), want, rtol=1e-12, equal_nan=True, err_msg=key)
    dsc = np.array([row["dsc"] for row in expected])
    np.testing.assert_array_equal(table_column(table, "flagged"), dsc < 0.9)
    assert 5 in logic.lastResult.flagged and np.isnan(table_column(table, "hd95")[list(table_column(table, "slice")).index(5)])

    volumeScores = metrics.volume_metrics(eroded, brain, spacing)
    assert logic.lastResult.volume == volumeScores
    assert logic.lastResult.model == "reference" and logic.lastResult.label == "brain eroded"
    for key, value in volumeScores.items():
        assert float(table.GetAttribute(f"SegQC.volume.{key}")) == pytest.approx(value, rel=1e-12)
    assert table.GetAttribute("SegQC.threshold") == "0.9"
    assert table.GetNodeReference("SegQCVolume") is volumeNode
    assert table.GetNodeReference("SegQCSegmentation") is segmentationNode
    assert table.GetColumnUnitLabel("hd95") == "mm"

    # inputs untouched, and no temporary node left behind: only the table and its plot were added
    nodesAfter = node_ids(scene)
    chart = table.GetNodeReference("SegQCChart")
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
    plotNodes = {chart.GetID()} | {s.GetID() for s in series} | {s.GetTableNodeID() for s in series}
    assert nodesAfter - nodesBefore == plotNodes | {table.GetID()} and not nodesBefore - nodesAfter
    assert len(plotNodes) == 5  # chart, two series, the result table itself and the threshold-line table
    assert segmentationNode.GetSegmentation().GetNumberOfSegments() == 2
    util = slicer_env.util
    np.testing.assert_array_equal(util.arrayFromSegmentBinaryLabelmap(segmentationNode, brainId, volumeNode) > 0, brain)
    np.testing.assert_array_equal(util.arrayFromSegmentBinaryLabelmap(segmentationNode, erodedId, volumeNode) > 0, eroded)
    assert segmentationNode.GetSegmentation().GetSegment(erodedId).GetName() == "brain eroded"


@needs_ch2bet
def test_compare_segments_reuses_a_table(brain_case, logic, scene):
    volumeNode, segmentationNode, brainId, erodedId, *_ = brain_case
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "mine")
    table.SetAttribute("SegQC.volume.stale", "1")
    progress = []
    out = logic.compareSegments(volumeNode, segmentationNode, erodedId, segmentationNode, brainId, tableNode=table,
                                progressCallback=lambda f, msg="": progress.append(f))
    assert out is table
    rows = table.GetNumberOfRows()
    out = logic.compareSegments(volumeNode, segmentationNode, brainId, segmentationNode, brainId, tableNode=table)
    assert out is table and table.GetNumberOfRows() == rows and table.GetNumberOfColumns() == 9
    np.testing.assert_array_equal(table_column(table, "dsc"), 1.0)
    assert table.GetAttribute("SegQC.volume.stale") is None
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)


def test_result_to_table_handles_inf_empty_and_extra_columns(scene, logic):
    from SegQCLib.qc import QCResult

    result = QCResult.from_slice_scores(
        model="dummy", label="liver", volume={"dsc": 0.5, "hd95": math.inf},
        slice_rows=[{"index": 4, "dsc": 0.2, "hd95": math.inf, "zeta": 1.0}, {"index": 2, "dsc": 0.95, "hd95": 1.5}])
    table = logic.resultToTable(result)
    assert table.GetName().startswith("SegQC liver")
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == ["slice", "dsc", "hd95", "zeta", "flagged"]
    np.testing.assert_array_equal(table_column(table, "slice"), [2, 4])
    np.testing.assert_array_equal(table_column(table, "hd95"), [1.5, np.nan])
    np.testing.assert_array_equal(table_column(table, "zeta"), [np.nan, 1.0])
    np.testing.assert_array_equal(table_column(table, "flagged"), [0, 1])
    assert table.GetAttribute("SegQC.volume.hd95") == "nan"
    empty = logic.resultToTable(QCResult.from_slice_scores("dummy", "x", {"dsc": 1.0}, []))
    assert empty.GetNumberOfRows() == 0 and empty.GetColumnName(1) == "dsc"
    assert "2 of 2" not in logic.summary(result) and "1 of 2 slices below 0.8: 4" in logic.summary(result)


# --------------------------------------------------------------------------- models
def test_models_and_device(logic):
    from SegQCLib import qc

    assert logic.availableModels() == [entry.name for entry in qc.available_models()]
    assert logic.device(forceCpu=True) == "cpu"
    assert logic.device(forceCpu=False) in ("cpu", "cuda")


def test_assess_segment_runs_a_registered_model(scene, slicer_env, logic, monkeypatch):
    """The model path hands the model the Volume (geometry included) and the segment's bool mask."""
    from SegQCLib import qc

    qc.available_models()  # discover the installed models first, then add ours to a private copy
    monkeypatch.setattr(qc, "_REGISTRY", dict(qc._REGISTRY))
    seen = {}

    class FillModel:
        name = "fill"

        def assess(self, image, mask, label, *, threshold=qc.DEFAULT_FLAG_THRESHOLD, all_slices=True):
            seen.update(image=image, mask=mask, label=label)
            rows = [{"index": k, "dsc": float(mask[k].mean())} for k in range(mask.shape[0]) if mask[k].any()]
            return qc.QCResult.from_slice_scores(self.name, label, {"dsc": float(mask.mean())}, rows, threshold)

    qc.register_model("fill", lambda device: FillModel(), "test model")
    assert "fill" in logic.availableModels()

    slicer = slicer_env
    array = np.arange(6 * 8 * 10, dtype=np.int16).reshape(6, 8, 10)
    volumeNode = slicer.util.addVolumeFromArray(array, ijkToRAS=np.diag([-0.5, -0.75, 2.0, 1.0]))
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mask = np.zeros(array.shape, bool)
    mask[1:4, 2:6, 3:9] = True
    segmentId = add_segment(slicer, segmentationNode, "kidney", mask, volumeNode)

    table = logic.assessSegment(volumeNode, segmentationNode, segmentId, "fill", device="cpu")

    np.testing.assert_array_equal(seen["mask"], mask)
    np.testing.assert_array_equal(seen["image"].array, array)
    assert seen["image"].spacing == (2.0, 0.75, 0.5) and seen["label"] == "kidney"
    np.testing.assert_allclose(seen["image"].grid.direction_matrix, np.eye(3), atol=1e-12)  # RAS -x,-y = LPS +x,+y
    np.testing.assert_array_equal(table_column(table, "slice"), [1, 2, 3])
    np.testing.assert_allclose(table_column(table, "dsc"), [24 / 80] * 3)
    assert table.GetAttribute("SegQC.model") == "fill" and logic.lastResult.runtime_s > 0


# --------------------------------------------------------------------------- the in-Slicer self-test
def test_module_self_test_runs_headless(scene):
    import SegQC

    SegQC.SegQCTest("runTest").runTest()
