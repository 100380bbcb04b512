"""SegQCLogic with real QC models on real MRML, headless: plot, pGT / FP / FN nodes, batch of a scene, .mrb.

Data: the MNI152 T1 (nilearn) and its brain mask, degraded by SegQC; the pGT model is
``atlas-brain-mr`` (Colin27 registered onto MNI152, so the image's own mask is never its pGT); the
regressor is the shipped ``sentinel-brain-mr``.
"""
from __future__ import annotations

import math
import zipfile

import numpy as np
import pytest
from scipy import ndimage as ndi

from test_slicer_logic import add_segment, load_volume, table_column

from SegQCLib.data.sources import mni152
from SegQCLib.degrade import degrade_to_band
from SegQCLib.io import write_volume
from SegQCLib.qc import available_models

pytestmark = pytest.mark.skipif("atlas-brain-mr" not in {m.name for m in available_models()},
                                reason="atlas-brain-mr needs mricron-data")


@pytest.fixture
def logic(slicer_env):
    import SegQC

    return SegQC.SegQCLogic()


def new_segmentation(scene, name: str, volumeNode):
    """An empty segmentation node with display nodes, referencing ``volumeNode``'s geometry."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return node


def degraded_brain_case(scene, slicer, tmp_path, subject, volumeName: str, nodeName: str, seed: int):
    """Load ``subject``'s T1 with Slicer's reader and add its brain mask degraded into DSC 0.5-0.75:
    (volume node, segmentation node, segment id, degraded mask, truth)."""
    path = tmp_path / f"{volumeName}.nii.gz"
    write_volume(subject.image, path)
    volumeNode = load_volume(slicer, path, volumeName)
    truth = subject.segmentation.mask("Brain")
    degraded = degrade_to_band(truth.astype(np.uint8), (0.5, 0.75), seed=seed)[0] > 0
    node = new_segmentation(scene, nodeName, volumeNode)
    segmentId = add_segment(slicer, node, "Brain", degraded, volumeNode)
    return volumeNode, node, segmentId, degraded, truth


@pytest.fixture
def mni_case(scene, slicer_env, tmp_path):
    """(volume node, segmentation node, segment id of a degraded brain mask, the mask, the truth)."""
    return degraded_brain_case(scene, slicer_env, tmp_path, mni152("brain"), "MNI152", "quick brain", seed=3)


def test_assess_with_a_pgt_model_makes_table_plot_and_pgt_fp_fn_nodes(mni_case, logic, scene, slicer_env):
    slicer = slicer_env
    volumeNode, node, segmentId, degraded, truth = mni_case
    before = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode).copy()

    table = logic.assessSegment(volumeNode, node, segmentId, "atlas-brain-mr", device="cpu", threshold=0.8)

    result = logic.lastResult
    # the table: one row per scored slice, pseudo-DSC of the mask against the pGT
    slices = table_column(table, "slice").astype(int)
    assert list(slices) == [row["index"] for row in result.slices]
    flagged = table_column(table, "flagged").astype(bool)
    assert list(slices[flagged]) == result.flagged
    # each score with its calibrated interval right after it (the atlas card's calibration)
    names = [table.GetTable().GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert names[names.index("dsc"):names.index("dsc") + 3] == ["dsc", "dsc_lo", "dsc_hi"]
    dsc, lo, hi = (table_column(table, c) for c in ("dsc", "dsc_lo", "dsc_hi"))
    assert np.all((lo <= dsc + 1e-9) & (dsc <= hi + 1e-9)) and np.any(hi - lo > 0)
    assert "90 % calibrated interval" in table.GetColumnDescription("dsc_lo")
    assert table.GetAttribute("SegQC.interval.coverage") == "0.9" and table.GetAttribute("SegQC.interval.domain") == "in"
    # the plot: scores per slice and a threshold line spanning the slices
    chart = logic.lastChartNode
    assert table.GetNodeReference("SegQCChart") is chart and chart.GetNumberOfPlotSeriesNodes() == 2
    scores, line = (chart.GetNthPlotSeriesNode(i) for i in range(2))
    assert scores.GetTableNode() is table and (scores.GetXColumnName(), scores.GetYColumnName()) == ("slice", "dsc")
    np.testing.assert_allclose(table_column(line.GetTableNode(), "threshold"), [0.8, 0.8])
    np.testing.assert_allclose(table_column(line.GetTableNode(), "slice"), [slices.min(), slices.max()])
    # the pGT node: pGT (outline), FP and FN, on the volume grid, exactly the arrays of the result
    pgtNode = logic.lastPseudoGroundTruthNode
    segmentation = pgtNode.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["pGT", "FP", "FN"]
    arrays = {name: slicer.util.arrayFromSegmentBinaryLabelmap(pgtNode, segmentation.GetSegmentIdBySegmentName(name),
                                                               volumeNode) > 0 for name in names}
    pgt = result.pgt
    np.testing.assert_array_equal(arrays["pGT"], pgt)
    np.testing.assert_array_equal(arrays["FP"], degraded & ~pgt)
    np.testing.assert_array_equal(arrays["FN"], pgt & ~degraded)
    display = pgtNode.GetDisplayNode()
    assert not display.GetSegmentVisibility2DFill("pGT") and display.GetSegmentVisibility2DOutline("pGT")
    # the pGT is a real estimate of the truth, and the user's segment is untouched
    from SegQCLib.metrics import dice

    assert dice(pgt, truth) > 0.9
    assert abs(result.volume["dsc"] - dice(degraded, truth)) < 0.1
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode), before)


def test_batch_of_a_mrb_scene_saves_the_summary_back(mni_case, logic, scene, slicer_env, tmp_path):
    slicer = slicer_env
    volumeNode, node, segmentId, degraded, truth = mni_case
    good = new_segmentation(scene, "careful brain", volumeNode)
    add_segment(slicer, good, "Brain", ndi.binary_erosion(truth), volumeNode)  # one voxel off the truth
    add_segment(slicer, good, "Liver", truth, volumeNode)  # no atlas holds it: an error row, not a stop
    bundle = tmp_path / "two-segmentations.mrb"
    assert scene.WriteToMRB(str(bundle))

    scene.Clear(0)
    assert scene.ReadFromMRB(str(bundle))
    assert len(slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 2
    progress = []
    table = logic.batchScene("atlas-brain-mr", device="cpu", progressCallback=lambda f, m="": progress.append(f))

    column = lambda name: [table.GetTable().GetColumnByName(name).GetValue(i) for i in range(table.GetNumberOfRows())]
    assert table.GetNumberOfRows() == 3 and progress[-1] == 1.0
    assert column("node")[:2] == ["quick brain", "careful brain"]  # worst first
    scores = column("score")
    assert scores[0] < 0.8 < scores[1] and math.isnan(scores[2])
    low, high = column("scoreLow"), column("scoreHigh")
    assert all(low[i] <= scores[i] <= high[i] for i in range(2)) and math.isnan(low[2])
    assert column("segment")[2] == "Liver" and "no atlas" in column("status")[2]
    assert column("flagged")[0] > column("flagged")[1]

    # saved back into the scene bundle, readable by Slicer again
    saved = tmp_path / "two-segmentations-qc.mrb"
    assert scene.WriteToMRB(str(saved))
    with zipfile.ZipFile(saved) as archive:
        assert any(name.endswith(".tsv") and "SegQC batch" in name for name in archive.namelist())
    scene.Clear(0)
    assert scene.ReadFromMRB(str(saved))
    tables = [n for n in slicer.util.getNodesByClass("vtkMRMLTableNode") if n.GetName().startswith("SegQC batch")]
    assert len(tables) == 1 and tables[0].GetNumberOfRows() == 3


def test_batch_can_be_cancelled(mni_case, logic):
    calls = []
    table = logic.batchScene("atlas-brain-mr", device="cpu", cancelled=lambda: calls.append(1) or len(calls) > 1)
    assert table.GetNumberOfRows() == 0 or table.GetNumberOfRows() == 1


def test_missing_dependencies_lists_only_what_is_absent(logic, monkeypatch):
    import importlib.util

    import SegQC

    torchMissing, missing = logic.missingDependencies()
    assert torchMissing is False and missing == []  # this environment has everything
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "cv2") else real(name, *a))
    torchMissing, missing = logic.missingDependencies()
    assert torchMissing is True and missing == ["opencv-python-headless"]
    assert all(requirement for _, requirement in SegQC.PIP_REQUIREMENTS)


def test_hermes_refine_adds_a_refined_segment_shows_prompts_and_leaves_the_original(scene, slicer_env, logic, tmp_path):
    from SegQCLib.data.sources import colin27
    from SegQCLib.metrics import dice

    slicer = slicer_env
    # a full-head T1: the pGT comes from the MNI152 atlas
    volumeNode, node, segmentId, degraded, truth = degraded_brain_case(scene, slicer, tmp_path, colin27("brain"),
                                                                       "Colin27", "brain", seed=5)
    before = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode).copy()
    shown = []
    real_show = logic.showPrompts
    logic.showPrompts = lambda *a, **k: shown.append(a[1]) or real_show(*a, **k)

    slices = [70, 100]
    newId = logic.refineSegment(volumeNode, node, segmentId, "atlas-brain-mr", "grabcut", threshold=0.9,
                                maxIterations=6, slices=slices, device="cpu")

    segmentation = node.GetSegmentation()
    assert segmentation.GetSegment(newId).GetName() == "Brain refined" and segmentation.GetNumberOfSegments() == 2
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode), before)
    refined = slicer.util.arrayFromSegmentBinaryLabelmap(node, newId, volumeNode) > 0
    untouched = [k for k in range(refined.shape[0]) if k not in slices]
    np.testing.assert_array_equal(refined[untouched], degraded[untouched])
    for k in slices:  # HERMES improves the flagged slices against the (unseen) truth
        assert dice(refined[k], truth[k]) > dice(degraded[k], truth[k]) + 0.03  # measured +0.07 and more
    # the prompts were shown per iteration, on the slice being refined
    traces = logic.lastRefineResult.traces
    assert shown.count(70) == len(traces[0].iterations) and shown.count(100) == len(traces[1].iterations)
    roi = scene.GetFirstNodeByName("SegQC prompt box")
    last = traces[-1].iterations[-1].prompts
    assert roi.GetDisplayVisibility() and last.box is not None
    center = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(center)
    ras_slice = logic.sliceRAS(volumeNode, 100)
    assert abs(center[2] - ras_slice[2]) < 1e-6
    size = roi.GetSize()
    x0, y0, x1, y1 = last.box
    np.testing.assert_allclose(size, [(x1 - x0 + 1) * 1.0, (y1 - y0 + 1) * 1.0, 1.0], atol=1e-6)
    positive = scene.GetFirstNodeByName("SegQC positive clicks")
    assert positive.GetNumberOfControlPoints() == sum(p for _, _, p in last.points)
    for i in range(positive.GetNumberOfControlPoints()):
        point = [0.0, 0.0, 0.0]
        positive.GetNthControlPointPositionWorld(i, point)
        assert abs(point[2] - ras_slice[2]) < 1e-6


def test_an_empty_segment_is_scored_and_a_ct_gets_the_domain_warning(mni_case, logic, scene, slicer_env, tmp_path):
    """An empty segment (a segmenter that found nothing) is scored, not refused: 0 against the atlas pGT
    on the pGT's slices. A CT given to the brain MR model: the panel's summary warns on a second line."""
    from SegQCLib.data.phantom import ct_phantom

    slicer = slicer_env
    volumeNode, node, _, _, _ = mni_case
    emptyId = add_segment(slicer, node, "Brain", np.zeros(volumeNode.GetImageData().GetDimensions()[::-1], bool),
                          volumeNode)
    table = logic.assessSegment(volumeNode, node, emptyId, "atlas-brain-mr", device="cpu")
    result = logic.lastResult
    assert result.volume["dsc"] < 0.05 and result.extra["domain"]["in"] is True
    assert list(table_column(table, "slice").astype(int)) == list(np.flatnonzero(result.pgt.any(axis=(1, 2))))
    assert np.all(table_column(table, "dsc") == 0.0) and "warning" not in logic.summary(result)
    ct, organs = ct_phantom(0)
    write_volume(ct, tmp_path / "ct.nii.gz")
    ctNode = load_volume(slicer, tmp_path / "ct.nii.gz", "CT")
    ctSeg = new_segmentation(scene, "organs", ctNode)
    liverId = add_segment(slicer, ctSeg, "Brain", organs.mask("liver"), ctNode)
    logic.assessSegment(ctNode, ctSeg, liverId, "sentinel-brain-mr", device="cpu")
    lines = logic.summary(logic.lastResult).splitlines()
    assert len(lines) == 2 and lines[1].startswith("warning: outside sentinel-brain-mr's domain: image looks like a CT")
