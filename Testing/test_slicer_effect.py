"""What the "Quality Control" Segment Editor effect and the web app do to the scene, headless.

The effect's Qt part (``SegQC/SegmentEditorQualityControl.py``) only runs in Slicer; everything it
changes goes through :class:`SegQCLogic.SegQCLogic` methods, tested here on real MRML: the worst
slice of a result table, accepting / rejecting refined slices (the original segment only read),
the per-slice before/after scores of a HERMES result, and the undo hook a job calls before it
changes the scene (never on cancel). A source check keeps the effect calling only Logic methods
that exist.
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from test_slicer_logic import add_segment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def logic(slicer_env):
    import SegQCLogic

    return SegQCLogic.SegQCLogic()


@pytest.fixture
def case(scene, slicer_env):
    """A 12 x 30 x 40 volume, a segmentation with an "organ" (box) and "organ refined" (box shifted)."""
    slicer = slicer_env
    shape = (12, 30, 40)
    image = np.random.default_rng(0).normal(100, 10, shape).astype(np.float32)
    volumeNode = slicer.util.addVolumeFromArray(image, name="volume")
    organ = np.zeros(shape, bool)
    organ[2:10, 8:20, 10:30] = True
    refined = np.roll(organ, 3, axis=2)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    organId = add_segment(slicer, node, "organ", organ, volumeNode)
    refinedId = add_segment(slicer, node, "organ refined", refined, volumeNode)
    return volumeNode, node, organId, refinedId, organ, refined


def test_worst_slice_is_the_lowest_dsc_of_the_table(case, logic):
    volumeNode, node, organId, _refinedId, organ, _refined = case
    import slicer

    worse = organ.copy()
    worse[5] = False  # DSC 0 on slice 5
    worse[7, :, :15] = False  # partial on slice 7
    otherId = add_segment(slicer, node, "worse", worse, volumeNode)
    table = logic.compareSegments(volumeNode, node, otherId, node, organId)
    assert logic.worstSlice(table) == 5
    assert logic.worstSlice(table, column="no such column") is None


def test_reject_puts_the_original_back_accept_the_refinement_original_never_written(case, logic):
    volumeNode, node, organId, refinedId, organ, refined = case
    changed = logic.setRefinedSlices(volumeNode, node, organId, refinedId, [4, 6], accept=False, refinedMask=refined)
    assert changed == [4, 6]
    now = logic.segmentMask(node, refinedId, volumeNode)
    assert np.array_equal(now[[4, 6]], organ[[4, 6]])
    assert np.array_equal(now[[3, 5, 7]], refined[[3, 5, 7]]), "other slices keep the refinement"
    assert logic.setRefinedSlices(volumeNode, node, organId, refinedId, [4], accept=False, refinedMask=refined) == []
    assert logic.setRefinedSlices(volumeNode, node, organId, refinedId, [4], accept=True, refinedMask=refined) == [4]
    now = logic.segmentMask(node, refinedId, volumeNode)
    assert np.array_equal(now[4], refined[4]) and np.array_equal(now[6], organ[6])
    assert np.array_equal(logic.segmentMask(node, organId, volumeNode), organ), "the original was changed"


def test_accept_without_a_refinement_is_an_error_naming_the_segmentation(case, logic):
    from SegQCLib.errors import InputError

    volumeNode, node, organId, refinedId, _organ, _refined = case
    with pytest.raises(InputError, match="seg"):
        logic.setRefinedSlices(volumeNode, node, organId, refinedId, [4], accept=True)


def test_refinement_slices_before_and_after(logic):
    from SegQCLib.refine.loop import Iteration, RefineResult, SliceTrace

    mask = np.zeros((3, 4, 4), bool)
    traces = [SliceTrace(index=2, iterations=[Iteration(None, mask[0], 0.4), Iteration(None, mask[0], 0.7),
                                               Iteration(None, mask[0], 0.6)], best=1),
              SliceTrace(index=0, iterations=[Iteration(None, mask[0], 0.9)], best=0)]
    result = RefineResult(mask=mask, traces=traces, qc=None, threshold=0.8)
    assert logic.refinementSlices(result) == [
        {"slice": 0, "before": 0.9, "after": 0.9, "iterations": 0},
        {"slice": 2, "before": 0.4, "after": 0.7, "iterations": 2}]


def test_before_finish_runs_before_the_scene_changes_and_not_on_cancel(slicer_env):
    from SegQCLogic import SegQCJob

    calls = []
    job = SegQCJob("test", lambda job: "result", lambda result: calls.append(("finish", result)) or "done")
    job.beforeFinish = lambda: calls.append(("undo state",))
    assert job.run() == "done"
    assert calls == [("undo state",), ("finish", "result")]

    calls.clear()

    def compute(job):
        job.checkCancelled()
        return "never"

    cancelled = SegQCJob("test", compute, lambda result: calls.append(("finish", result)))
    cancelled.beforeFinish = lambda: calls.append(("undo state",))
    assert cancelled.run(cancelled=lambda: True) is None
    assert calls == []


def test_the_effect_calls_only_logic_methods_that_exist(logic):
    import SegQCLogic

    source = (ROOT / "SegQC" / "SegmentEditorQualityControl.py").read_text()
    used = {node.attr for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "logic"}
    assert used, "the effect does its work through self.logic"
    missing = sorted(name for name in used if not hasattr(logic, name))
    assert not missing, f"SegmentEditorQualityControl.py uses Logic members that do not exist: {missing}"
    assert "from SegQCLogic import SegQCLogic" in source and "class SegQCLogic" not in source


def test_atlas_model_recognises_colin27_read_by_slicer(scene, slicer_env, logic):
    """The image's own atlas is never its pGT, also when Slicer read the image (int16 voxels, a grid
    from the IJK-to-RAS matrix): Colin27's AAL hippocampus has no other atlas, so it is an error."""
    from test_slicer_logic import load_volume

    from SegQCLib.data.sources import DataSourceMissing, colin27
    from SegQCLib.errors import InputError
    from SegQCLib.qc import available_models

    if "atlas-brain-mr" not in {m.name for m in available_models()}:
        pytest.skip("atlas-brain-mr is not installed")
    try:
        subject = colin27("aal")
    except DataSourceMissing as err:
        pytest.skip(str(err))
    volumeNode = load_volume(slicer_env, Path(subject.image.name), "ch2")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "aal")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    segmentId = add_segment(slicer_env, node, "Hippocampus_L", subject.segmentation.mask("Hippocampus_L"), volumeNode)
    with pytest.raises(InputError, match="no atlas other than the image itself"):
        logic.assessSegment(volumeNode, node, segmentId, "atlas-brain-mr", "cpu")
