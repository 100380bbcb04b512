"""Batch QC: journal, resume, errors, filters, .mrb scenes, Dask (killed worker, killed driver, remote scheduler).

Real parts throughout: Colin27 T1 and AAL structures (cropped to keep the files small), degraded
by SegQC's degradations, scored by the shipped Quality Sentinel model, on a real Dask cluster.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from SegQCLib.batch import RESULT_COLUMNS, ResultJournal, case_key, read_results, run_batch
from SegQCLib.data.degraded import crop_to_labels, degraded_dataset
from SegQCLib.data.sources import colin27
from SegQCLib.degrade import degrade_to_band
from SegQCLib.errors import InputError
from SegQCLib.io import Segmentation, read_segmentation, write_segmentation
from SegQCLib.metrics import dice
from SegQCLib.qc import available_models
from SegQCLib.volume import Grid

MODEL = "sentinel-brain-mr"
STRUCTURES = ("Hippocampus_L", "Caudate_R", "Putamen_L")
SEGQC = Path(sys.executable).with_name("segqc")

pytestmark = pytest.mark.skipif(MODEL not in {m.name for m in available_models()},
                                reason="the shipped Sentinel model is not installed")


def make_dataset(folder: Path, n_cases: int, seed: int = 0) -> Path:
    """A CSV of ``n_cases`` segmentations (methods "better" and "worse") with references and a label table,
    cropped with a 64-voxel margin (the model looks at a 128 mm context)."""
    return degraded_dataset(folder, n_cases, STRUCTURES, methods=("better", "worse"), crop_margin=64, seed=seed)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("batch-data"), 6)


def _keys(table) -> list[tuple[str, str, str]]:
    return list(zip(table.case_id, table.method, table.structure))


# --------------------------------------------------------------------------- in process
def test_batch_scores_every_case_and_structure_and_resumes(dataset, tmp_path):
    out = tmp_path / "out"
    seen = []
    summary = run_batch(dataset, MODEL, out, workers=0, progress=lambda done, total, case: seen.append((done, total)))
    assert (summary.total, summary.skipped, summary.done, summary.errors) == (6, 0, 6, 0)
    assert seen[-1] == (6, 6) and [d for d, _ in seen] == list(range(1, 7))
    table = read_results(out / "results.csv")
    assert tuple(table.columns) == RESULT_COLUMNS
    assert len(table) == 6 * 3 and len(set(_keys(table))) == 18
    assert (table.status == "ok").all() and (table.case_rows == 3).all()
    assert table.pred_dsc.between(0, 1).all() and (table.n_slices > 0).all()
    # true DSC recomputed independently from the files
    row = table[(table.segmentation.str.endswith("seg3.nii.gz")) & (table.structure == "Caudate_R")].iloc[0]
    pred = read_segmentation(dataset.parent / "seg3.nii.gz").layers[0] == 2
    ref = read_segmentation(dataset.parent / "truth.nii.gz").layers[0] == 2
    assert row.true_dsc == pytest.approx(dice(pred, ref), abs=1e-9)
    # the model separates the better method from the worse one on average
    means = table.groupby("method").pred_dsc.mean()
    assert means["better"] > means["worse"] + 0.15
    # a rerun skips every finished case and leaves the journal byte-identical
    before = (out / "results.csv").read_bytes()
    again = run_batch(dataset, MODEL, out, workers=0)
    assert (again.skipped, again.done) == (6, 0)
    assert (out / "results.csv").read_bytes() == before


def test_limit_and_structure_filter(dataset, tmp_path):
    summary = run_batch(dataset, MODEL, tmp_path / "out", workers=0, limit=2, structures=["caudate_r", "3"])
    table = read_results(summary.results)
    assert summary.total == 2 and sorted(set(table.structure)) == ["Caudate_R", "Putamen_L"]
    assert len(table) == 4 and (table.case_rows == 2).all()


def test_bad_case_gets_an_error_row_and_retry_replaces_it(dataset, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for file in dataset.parent.iterdir():
        (data / file.name).symlink_to(file)
    bad = data / "seg1.nii.gz"
    bad.unlink()
    labels = read_segmentation(dataset.parent / "seg1.nii.gz")
    other = Grid(labels.grid.shape, tuple(s * 1.25 for s in labels.grid.spacing), labels.grid.origin,
                 labels.grid.direction)  # another voxel size: does not fit the image
    write_segmentation(Segmentation.from_labelmap(labels.layers[0], other, dict(enumerate(STRUCTURES, 1))), bad)
    out = tmp_path / "out"
    summary = run_batch(data / "pairs.csv", MODEL, out, workers=0)
    table = read_results(summary.results)
    errors = table[table.status == "error"]
    assert summary.errors == 1 and len(errors) == 1
    assert "seg1.nii.gz" in errors.error.iloc[0] and len(table[table.status == "ok"]) == 5 * 3
    # the user fixes the file; --retry-errors runs that case again, and it appears exactly once
    bad.unlink()
    bad.symlink_to(dataset.parent / "seg1.nii.gz")
    assert run_batch(data / "pairs.csv", MODEL, out, workers=0).skipped == 6  # errors count as finished
    retry = run_batch(data / "pairs.csv", MODEL, out, workers=0, retry_errors=True)
    assert (retry.skipped, retry.done, retry.errors) == (5, 1, 0)
    table = read_results(out / "results.csv")
    assert (table.status == "ok").all() and len(table) == 18 and len(set(_keys(table))) == 18


def test_journal_repair_drops_torn_cases_and_lines(tmp_path):
    journal = ResultJournal(tmp_path / "results.csv")
    row = {c: "" for c in RESULT_COLUMNS}
    complete = [dict(row, case_id="a", structure=s, model="m", status="ok", case_rows=2) for s in ("x", "y")]
    torn = [dict(row, case_id="b", structure="x", model="m", status="ok", case_rows=2)]
    journal.append(complete)
    journal.append(torn)
    with open(journal.path, "a") as handle:
        handle.write("c,x,1,,m,0.5")  # a crash in the middle of a line
    reopened = ResultJournal(journal.path)
    assert reopened.finished() == {case_key("a", "", "m")}
    text = journal.path.read_text()
    assert text.count("\n") == 3 and text.endswith("\n") and ",b," not in text


def test_journal_of_another_kind_is_not_overwritten(tmp_path):
    foreign = tmp_path / "results.csv"
    foreign.write_text("name,score\nx,1\n")
    with pytest.raises(InputError, match="not a SegQC results journal"):
        ResultJournal(foreign)
    assert foreign.read_text() == "name,score\nx,1\n"


def test_output_that_is_the_input_or_a_file_is_refused(dataset, tmp_path):
    before = dataset.read_bytes()
    with pytest.raises(InputError, match="is the input dataset"):
        run_batch(dataset, MODEL, dataset, workers=0)
    with pytest.raises(InputError, match="not a folder"):
        run_batch(dataset, MODEL, dataset.parent / "t1.nii.gz", workers=0)
    assert dataset.read_bytes() == before


# --------------------------------------------------------------------------- Slicer scene
def test_mrb_scene_with_two_segmentations(slicer_env, scene, tmp_path):
    slicer = slicer_env
    subject = colin27("aal")
    truth = np.zeros(subject.image.shape, np.uint8)
    for value, name in enumerate(STRUCTURES, 1):
        truth[subject.segmentation.mask(name)] = value
    image, truth = crop_to_labels(subject.image, truth, 64)
    volume = slicer.util.addVolumeFromArray(image.array.astype(np.float32), name="Colin27")
    volume.SetSpacing(*image.spacing[::-1])
    masks = {}
    for node_name, band in (("atlas", (0.75, 0.95)), ("quick", (0.10, 0.25))):
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", node_name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        for value, name in enumerate(STRUCTURES[:2], 1):
            degraded, _ = degrade_to_band((truth == value).astype(np.uint8), band, seed=value)
            segment_id = node.GetSegmentation().AddEmptySegment("", name)
            slicer.util.updateSegmentBinaryLabelmapFromArray(degraded.astype(np.uint8), node, segment_id, volume)
            masks[(node_name, name)] = degraded
    bundle = tmp_path / "scene.mrb"
    assert scene.WriteToMRB(str(bundle))
    before = bundle.read_bytes()
    summary = run_batch(bundle, MODEL, tmp_path / "out", workers=0)
    table = read_results(summary.results)
    assert bundle.read_bytes() == before
    assert sorted(set(table.case_id)) == ["atlas", "quick"] and sorted(set(table.structure)) == sorted(STRUCTURES[:2])
    assert (table.status == "ok").all() and len(table) == 4
    by_node = table.groupby("case_id").pred_dsc.mean()
    assert by_node["atlas"] > by_node["quick"]
    # the segment masks read back from the bundle are the ones put into the scene
    row = table[(table.case_id == "quick") & (table.structure == STRUCTURES[0])].iloc[0]
    from SegQCLib.io import align_to_grid, read_volume
    seg = align_to_grid(read_segmentation(row.segmentation), read_volume(row.image).grid)
    assert np.array_equal(seg.mask(STRUCTURES[0]), masks[("quick", STRUCTURES[0])] > 0)


# --------------------------------------------------------------------------- Dask
def _worker_pids(driver_pid: int) -> list[int]:
    import psutil

    children = psutil.Process(driver_pid).children(recursive=True)
    return [p.pid for p in children if "spawn_main" in " ".join(p.cmdline()) and "resource_tracker" not in " ".join(p.cmdline())]


def _finished_cases(journal: Path) -> int:
    if not journal.exists():
        return 0
    import csv

    text = journal.read_text()
    rows = csv.DictReader(text[: text.rfind("\n") + 1].splitlines())
    return len({(r["case_id"], r["method"]) for r in rows})


def _wait_for(condition, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_killed_worker_and_killed_driver_then_rerun_gives_every_case_once(tmp_path):
    csv = make_dataset(tmp_path / "data", 16, seed=1)
    out = tmp_path / "out"
    journal = out / "results.csv"
    command = [str(SEGQC), "batch", str(csv), "--model", MODEL, "--out", str(out), "--workers", "2", "--no-report",
               "--device", "cpu"]
    log = open(tmp_path / "run1.log", "w")
    run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(lambda: _finished_cases(journal) >= 1, 240, "the first finished case")
        workers = _worker_pids(run.pid)
        assert len(workers) == 2, f"expected 2 Dask worker processes, found {workers}"
        os.kill(workers[0], signal.SIGKILL)  # a worker dies mid-run: Dask reschedules its case
        _wait_for(lambda: _finished_cases(journal) >= 5 or run.poll() is not None, 240, "five finished cases")
        assert run.poll() is None, "the run finished before it could be killed: make the dataset larger"
        os.killpg(run.pid, signal.SIGKILL)  # then the whole run crashes
        run.wait(30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        log.close()
    done_before = _finished_cases(journal)
    assert 5 <= done_before < 16
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"{done_before} already finished" in rerun.stdout.replace("\n", " ")
    table = read_results(journal)
    assert len(table) == 16 * 3 and len(set(_keys(table))) == 16 * 3, "a case is missing or duplicated"
    assert (table.status == "ok").all()


def test_existing_scheduler(dataset, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        summary = run_batch(dataset, MODEL, tmp_path / "out", limit=2, scheduler=cluster.scheduler_address)
    table = read_results(summary.results)
    assert summary.workers == 1 and summary.done == 2 and (table.status == "ok").all() and len(table) == 6
    # the same scores as in-process
    local = read_results(run_batch(dataset, MODEL, tmp_path / "local", limit=2, workers=0).results)
    assert np.allclose(table.sort_values(["case_id", "method", "structure"]).pred_dsc.to_numpy(),
                       local.sort_values(["case_id", "method", "structure"]).pred_dsc.to_numpy(), atol=1e-5)


# --------------------------------------------------------------------------- command line
def test_cli_batch_writes_journal_and_report(dataset, tmp_path, capsys):
    from SegQCLib.cli import main

    out = tmp_path / "qc"
    assert main(["batch", str(dataset), "--model", MODEL, "--out", str(out), "--workers", "0", "--limit", "4",
                 "--worst-n", "3", "--top-n", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 case(s) scored now, 0 already finished" in printed and "report.html" in printed
    table = read_results(out / "results.csv")
    assert len(table) == 12
    html = (out / "report.html").read_text()
    worst = table.sort_values("pred_dsc").iloc[0]
    assert worst.case_id in html and f"{worst.pred_dsc:.3f}" in html
    assert len(read_results_list(out / "active_learning.csv")) == 2


def read_results_list(path: Path) -> list[str]:
    return path.read_text().strip().splitlines()[1:]


def test_cli_batch_bad_input_names_the_file(tmp_path, capsys):
    from SegQCLib.cli import main

    missing = tmp_path / "nowhere.csv"
    assert main(["batch", str(missing), "--model", MODEL, "--out", str(tmp_path / "qc"), "--workers", "0"]) == 2
    assert f"error: {missing}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "qc").exists()


def test_ctrl_c_stops_cleanly_and_the_rerun_resumes(dataset, tmp_path):
    out = tmp_path / "out"
    command = [str(SEGQC), "batch", str(dataset), "--model", MODEL, "--out", str(out), "--workers", "0", "--no-report"]
    # A shell that starts jobs in the background ignores SIGINT in them, and Python then keeps it
    # ignored; give the run a terminal's default disposition, as a user's Ctrl-C meets it.
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(lambda: _finished_cases(out / "results.csv") >= 1 or run.poll() is not None, 240, "a finished case")
        assert run.poll() is None, "the run finished before Ctrl-C could be sent"
        run.send_signal(signal.SIGINT)
        output, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    done = _finished_cases(out / "results.csv")
    assert 1 <= done < 6
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and f"{done} already finished" in rerun.stdout.replace("\n", " ")
    assert len(read_results(out / "results.csv")) == 18


def test_unknown_model_fails_before_any_work(dataset, tmp_path):
    with pytest.raises(InputError, match="unknown QC model"):
        run_batch(dataset, "no-such-model", tmp_path / "out", workers=2)
    assert not (tmp_path / "out").exists()
