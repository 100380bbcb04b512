"""The Logic's jobs off the GUI thread, on real MRML (headless slicer-core): what the panel runs.

The panel starts a job's ``compute`` in a worker thread and polls it from a QTimer; here the test
thread plays the GUI thread: it polls, keeps editing the scene meanwhile, and checks that the
worker added nothing to the scene, that every message reached its handler on the polling thread,
that the results equal the synchronous Logic's, and that Cancel leaves the scene as it was.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from test_slicer_logic import add_segment, table_column
from test_slicer_qc import degraded_brain_case, logic, mni_case, new_segmentation  # noqa: F401 - fixtures

from SegQCLib.qc import available_models

pytestmark = pytest.mark.skipif("atlas-brain-mr" not in {m.name for m in available_models()},
                                reason="atlas-brain-mr needs mricron-data")


def drive(job, scene, handlers: dict[str, list], timeout: float = 300.0) -> int:
    """Play the GUI thread: start ``job``, record each message's handler call (and whether it ran on
    this thread), edit the scene between polls; return how many polls the GUI thread made."""
    gui = threading.current_thread()
    for kind, calls in handlers.items():
        previous = job.handlers.get(kind)

        def handler(*args, _calls=calls, _previous=previous):
            _calls.append((threading.current_thread() is gui, args))
            if _previous is not None:
                _previous(*args)

        job.handlers[kind] = handler
    job.start()
    polls, deadline = 0, time.monotonic() + timeout
    while not job.poll():
        assert time.monotonic() < deadline, f"{job.name} did not end in {timeout} s"
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "GUI thread was free")  # the GUI keeps working
        scene.RemoveNode(node)
        polls += 1
        time.sleep(0.02)
    return polls


def test_assess_job_runs_off_the_gui_thread_and_equals_the_synchronous_run(mni_case, logic, scene, slicer_env):
    volumeNode, node, segmentId, degraded, truth = mni_case
    job = logic.assessSegmentJob(volumeNode, node, segmentId, "atlas-brain-mr", device="cpu", threshold=0.8)
    nodes = scene.GetNumberOfNodes()
    progress = []
    polls = drive(job, scene, {"progress": progress})
    assert polls > 5, "the GUI thread was blocked while the model ran"
    assert scene.GetNumberOfNodes() == nodes, "compute touched the scene"
    assert progress and all(onGui for onGui, _ in progress)
    fractions = [args[0] for _, args in progress]
    assert fractions == sorted(fractions)

    table = job.finish()
    threaded = logic.lastResult
    assert table.GetNumberOfRows() == len(threaded.slices) > 0
    assert logic.lastPseudoGroundTruthNode is not None and logic.lastChartNode is not None

    again = logic.assessSegment(volumeNode, node, segmentId, "atlas-brain-mr", device="cpu", threshold=0.8)
    assert logic.lastResult.volume["dsc"] == pytest.approx(threaded.volume["dsc"])
    np.testing.assert_allclose(table_column(again, "dsc"), table_column(table, "dsc"))


def test_refine_job_shows_prompts_from_the_gui_thread_and_cancel_adds_nothing(scene, slicer_env, logic, tmp_path):
    from SegQCLib.data.sources import colin27
    from SegQCLib.metrics import dice

    slicer = slicer_env
    volumeNode, node, segmentId, degraded, truth = degraded_brain_case(scene, slicer, tmp_path, colin27("brain"),
                                                                       "Colin27", "brain", seed=5)
    before = slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode).copy()

    # cancelled at the first prompts the GUI thread shows
    job = logic.refineSegmentJob(volumeNode, node, segmentId, "atlas-brain-mr", "grabcut", threshold=0.99,
                                 maxIterations=20, slices=[70, 100], device="cpu")
    prompts = []
    job.handlers["prompts"] = (lambda show: lambda *a: (show(*a), job.cancel()))(job.handlers["prompts"])
    drive(job, scene, {"prompts": prompts})
    assert prompts and all(onGui for onGui, _ in prompts)
    assert job.finish() is None
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode), before)

    # run to the end in the worker: the same refined segment as the synchronous Logic
    job = logic.refineSegmentJob(volumeNode, node, segmentId, "atlas-brain-mr", "grabcut", threshold=0.9,
                                 maxIterations=4, slices=[100], device="cpu")
    prompts = []
    drive(job, scene, {"prompts": prompts})
    threadedId = job.finish()
    trace = logic.lastRefineResult.traces[0]
    assert len(prompts) == len(trace.iterations) and {args[0] for _, args in prompts} == {100}
    roi = scene.GetFirstNodeByName("SegQC prompt box")
    center = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(center)
    assert abs(center[2] - logic.sliceRAS(volumeNode, 100)[2]) < 1e-6  # markups moved by the GUI thread
    syncId = logic.refineSegment(volumeNode, node, segmentId, "atlas-brain-mr", "grabcut", threshold=0.9,
                                 maxIterations=4, slices=[100], device="cpu")
    threaded = slicer.util.arrayFromSegmentBinaryLabelmap(node, threadedId, volumeNode) > 0
    synchronous = slicer.util.arrayFromSegmentBinaryLabelmap(node, syncId, volumeNode) > 0
    # the same up to a few pixels (SimpleITK's multi-threaded registration is not bit-reproducible)
    assert dice(threaded[100], synchronous[100]) > 0.99
    assert dice(threaded[100], truth[100]) > dice(degraded[100], truth[100])
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, segmentId, volumeNode), before)


def test_batch_job_in_a_worker_and_its_errors(mni_case, logic, scene, slicer_env):
    slicer = slicer_env
    volumeNode, node, segmentId, degraded, truth = mni_case
    second = new_segmentation(scene, "good brain", volumeNode)
    add_segment(slicer, second, "Brain", truth, volumeNode)
    events = []  # segments are exported one at a time, on the GUI thread, as the worker needs them
    gui = threading.current_thread()
    realSegmentMask = logic.segmentMask
    logic.segmentMask = lambda *a: events.append(("export", threading.current_thread() is gui)) or realSegmentMask(*a)
    job = logic.batchSceneJob("atlas-brain-mr", device="cpu")
    assert not events, "nothing is exported before the job runs"
    job.handlers["progress"] = lambda *a: events.append(("progress", threading.current_thread() is gui))
    drive(job, scene, {})
    table = job.finish()
    assert [table.GetTable().GetValueByName(i, "node").ToString() for i in range(table.GetNumberOfRows())] == \
        ["quick brain", "good brain"]  # worst first
    assert events == [("progress", True), ("export", True)] * 2

    # a segmentation removed from the scene while the batch runs gets an error row, the rest is scored
    job = logic.batchSceneJob("atlas-brain-mr", device="cpu")
    scene.RemoveNode(second)
    drive(job, scene, {})
    table = job.finish()
    status = {table.GetTable().GetValueByName(i, "node").ToString(): table.GetTable().GetValueByName(i, "status").ToString()
              for i in range(table.GetNumberOfRows())}
    assert status["quick brain"] == "ok" and "removed from the scene" in status["good brain"]

    # an error in compute reaches the GUI thread through finish(), and nothing is written
    job = logic.assessSegmentJob(volumeNode, node, segmentId, "no-such-model", device="cpu")
    nodes = scene.GetNumberOfNodes()
    drive(job, scene, {})
    with pytest.raises(Exception, match="no-such-model"):
        job.finish()
    assert scene.GetNumberOfNodes() == nodes


def test_call_on_gui_runs_on_the_polling_thread_and_gives_up_on_cancel(slicer_env):
    import SegQC

    gui = threading.current_thread()
    seen, late = [], []

    def compute(job):
        seen.append(job.callOnGui(lambda x: (x * 2, threading.current_thread() is gui), 21))
        job.callOnGui(late.append, 1)  # the GUI thread does not answer this one: the job is cancelled instead
        return "unreachable"

    job = SegQC.SegQCJob("test", compute, lambda result: result)
    job.start()
    while not seen:
        job.poll()
        time.sleep(0.01)
    assert seen == [(42, True)]
    job.cancel()
    assert job.wait(5.0)
    assert job.finish() is None  # cancelled: finish writes nothing
    assert late == []  # and the call compute stopped waiting for never runs

    def failing(job):
        return job.callOnGui(lambda: 1 / 0)

    job = SegQC.SegQCJob("fails", failing, lambda result: result)
    job.start()
    while not job.poll():
        time.sleep(0.01)
    with pytest.raises(ZeroDivisionError):
        job.finish()
