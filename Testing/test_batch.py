"""Batch QC: journal, resume, errors, filters, .mrb scenes, Dask (killed worker, killed driver, remote scheduler).

Real parts throughout: Colin27 T1 and AAL structures (cropped to keep the files small), degraded
by SegQC's degradations, scored by the shipped Quality Sentinel model, on a real Dask cluster.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
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
from SegQCLib.degrade import DSC_BANDS, degrade_to_band
from SegQCLib.errors import InputError
from SegQCLib.io import Segmentation, read_segmentation, write_mask, write_segmentation, write_volume
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


# --------------------------------------------------------------------------- truth by name (issue 33)
TEMPLATES = Path("/usr/share/mricron/templates")
needs_colin27 = pytest.mark.skipif(not (TEMPLATES / "aal.nii.txt").is_file(), reason="apt-get install mricron-data")
#: Five neighbouring AAL structures: the box around them keeps the files small.
PAIR_STRUCTURES = ("Hippocampus_L", "ParaHippocampal_L", "Amygdala_L", "Putamen_L", "Pallidum_L")
PAIR_BANDS = {"better": DSC_BANDS[3], "worse": DSC_BANDS[1]}


@pytest.fixture(scope="module")
def colin_box(tmp_path_factory) -> dict:
    """Colin27's T1 and its whole AAL atlas cut to a box around PAIR_STRUCTURES (8-voxel margin),
    written as a user copies them: ``t1.nii.gz``, ``aal.nii.gz`` with its sidecar ``aal.nii.txt``
    (so value 1 is Precentral_L there), and the atlas label map itself for the expected masks."""
    folder = tmp_path_factory.mktemp("colin-box")
    subject = colin27("aal")
    atlas = subject.segmentation
    values = {name: atlas.find(name).value for name in PAIR_STRUCTURES}
    chosen = np.isin(atlas.labelmap, list(values.values()))
    image, _ = crop_to_labels(subject.image, chosen.astype(np.uint8), 8)
    lo = np.maximum(np.argwhere(chosen).min(0) - 8, 0)  # the same box as crop_to_labels', for the whole atlas
    labels = atlas.labelmap[tuple(slice(a, a + n) for a, n in zip(lo, image.shape))]
    write_volume(image, folder / "t1.nii.gz")
    write_mask(labels, image.grid, folder / "aal.nii.gz")
    shutil.copy(TEMPLATES / "aal.nii.txt", folder / "aal.nii.txt")
    assert read_segmentation(folder / "aal.nii.gz").find("1").name == "Precentral_L"
    return {"folder": folder, "grid": image.grid, "labels": labels, "values": values}


def _ten_pairs(box: dict) -> tuple[Path, dict[str, float]]:
    """The user's CSV: ten binary masks (five structures x two methods, each degraded into a DSC band),
    reference aal.nii.gz, ``label`` = the structure's name. Returns the CSV and each mask's achieved DSC."""
    folder, achieved = box["folder"], {}
    lines = ["image,segmentation,reference,label,method"]
    for i, name in enumerate(PAIR_STRUCTURES):
        for method, band in PAIR_BANDS.items():
            truth = (box["labels"] == box["values"][name]).astype(np.uint8)
            degraded, achieved[f"{name}_{method}"] = degrade_to_band(truth, band, seed=i)
            write_mask(degraded > 0, box["grid"], folder / f"{name}_{method}.nii.gz")
            lines.append(f"t1.nii.gz,{name}_{method}.nii.gz,aal.nii.gz,{name},{method}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv", achieved


@needs_colin27
def test_ten_binary_masks_against_the_aal_atlas_match_segqc_metrics(colin_box, tmp_path, capsys):
    """Issue 33: binary masks (value 1) against aal.nii.gz (1 = Precentral_L) with ``label`` naming the
    structure: one row per pair, its true DSC / HD95 those of `segqc metrics` on the same files."""
    from SegQCLib.cli import main

    pairs, achieved = _ten_pairs(colin_box)
    out = tmp_path / "qc"
    assert main(["batch", str(pairs), "--out", str(out), "--model", MODEL, "--workers", "0", "--no-report",
                 "--device", "cpu"]) == 0
    table = read_results(out / "results.csv")
    assert len(table) == 10 and sorted(table.case_id) == sorted(achieved)
    assert (table.status == "ok").all() and (table.case_rows == 1).all()
    trained = set(json.loads((Path(__file__).resolve().parents[1] / "Resources" / "Models" /
                              f"{MODEL}.json").read_text()).get("trained_structures", []))
    for row in table.itertuples():
        name = row.case_id.rsplit("_", 1)[0]
        assert row.structure == name and row.label_value == colin_box["values"][name]
        assert row.true_dsc == pytest.approx(achieved[row.case_id], abs=1e-9)  # the degradation's own DSC
        json_out = tmp_path / f"{row.case_id}.json"
        assert main(["metrics", row.segmentation, row.reference, "--label", name, "--json", str(json_out)]) == 0
        metrics = json.loads(json_out.read_text())["volume"]
        assert row.true_dsc == pytest.approx(metrics["dsc"], abs=1e-9)
        assert row.true_hd95 == pytest.approx(metrics["hd95"], abs=1e-6)
        assert ("model not trained on this structure" in row.note) == (bool(trained) and name not in trained)
    assert table.true_dsc.min() > 0.05
    capsys.readouterr()


@needs_colin27
def test_tables_that_number_structures_differently_are_matched_by_name(colin_box, tmp_path):
    """The segmentation's table says 1 = Hippocampus_L, 2 = Amygdala_L; the reference's 1 = Putamen_L,
    2 = Hippocampus_L. No value is compared with a value of another structure; Amygdala_L, missing from
    the reference, has no true metrics (blank in the CSV) and a note; Putamen_L, which the segmentation
    lacks, is scored as its empty segmentation. A row whose label names a structure gives that one row,
    also for an empty binary mask."""
    folder, labels, values, grid = colin_box["folder"], colin_box["labels"], colin_box["values"], colin_box["grid"]
    hippo = labels == values["Hippocampus_L"]
    degraded, achieved = degrade_to_band(hippo.astype(np.uint8), DSC_BANDS[3], seed=7)
    seg = np.where(degraded > 0, 1, np.where(labels == values["Amygdala_L"], 2, 0)).astype(np.uint8)
    ref = np.where(labels == values["Putamen_L"], 1, np.where(hippo, 2, 0)).astype(np.uint8)
    write_segmentation(Segmentation.from_labelmap(seg, grid, {1: "Hippocampus_L", 2: "Amygdala_L"}),
                       tmp_path / "seg.nii.gz")  # with its sidecar table seg.txt
    write_segmentation(Segmentation.from_labelmap(ref, grid, {1: "Putamen_L", 2: "Hippocampus_L"}),
                       tmp_path / "ref.nii.gz")
    write_mask(np.zeros_like(seg), grid, tmp_path / "empty.nii.gz")
    image = folder / "t1.nii.gz"
    (tmp_path / "pairs.csv").write_text(
        "case_id,image,segmentation,reference,label\n"
        f"all,{image},seg.nii.gz,ref.nii.gz,\n"
        f"named,{image},seg.nii.gz,ref.nii.gz,Putamen_L\n"
        f"empty,{image},empty.nii.gz,{folder / 'aal.nii.gz'},Pallidum_L\n")
    summary = run_batch(tmp_path / "pairs.csv", MODEL, tmp_path / "out", workers=0, write_pgt=False)
    table = read_results(summary.results)
    assert (table.status == "ok").all(), table.error.tolist()
    rows = {(r.case_id, r.structure): r for r in table.itertuples()}
    assert sorted(rows) == [("all", "Amygdala_L"), ("all", "Hippocampus_L"), ("all", "Putamen_L"),
                            ("empty", "Pallidum_L"), ("named", "Putamen_L")]
    hippocampus = rows[("all", "Hippocampus_L")]
    assert hippocampus.true_dsc == pytest.approx(achieved, abs=1e-9) and hippocampus.label_value == 2
    assert dice(seg == 1, ref == 1) == 0.0  # what comparing the values would have given
    amygdala = rows[("all", "Amygdala_L")]
    assert np.isnan(amygdala.true_dsc) and np.isnan(amygdala.true_hd95) and np.isfinite(amygdala.pred_dsc)
    assert "structure not in the reference: no true metrics" in amygdala.note
    for key in (("all", "Putamen_L"), ("named", "Putamen_L"), ("empty", "Pallidum_L")):  # found nothing
        assert rows[key].true_dsc == 0.0 and np.isinf(rows[key].true_hd95) and "empty segmentation" in rows[key].note
    assert rows[("empty", "Pallidum_L")].label_value == values["Pallidum_L"]
    with open(summary.results, newline="") as handle:  # blank cells, never 0, in the file itself
        raw = {(r["case_id"], r["structure"]): r for r in csv.DictReader(handle)}
    assert raw[("all", "Amygdala_L")]["true_dsc"] == "" and raw[("all", "Amygdala_L")]["true_hd95"] == ""
    assert list(raw[("all", "Amygdala_L")]) == list(RESULT_COLUMNS)


def test_a_journal_of_an_earlier_version_resumes(dataset, tmp_path):
    """A results.csv with the 23 columns of earlier versions (or any prefix of today's) keeps its
    finished cases: the run skips them, and the file is rewritten with today's header, the old rows
    blank in the new columns."""
    out = tmp_path / "out"
    run_batch(dataset, MODEL, out, workers=0, limit=1, write_pgt=False)
    journal = out / "results.csv"
    with open(journal, newline="") as handle:
        written = list(csv.DictReader(handle))
    old_columns = RESULT_COLUMNS[: RESULT_COLUMNS.index("case_rows") + 1]
    assert len(old_columns) == 23 and len(written) == 3
    with open(journal, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(old_columns)
        writer.writerows([r[c] for c in old_columns] for r in written)
    summary = run_batch(dataset, MODEL, out, workers=0, limit=2, write_pgt=False)
    assert (summary.skipped, summary.done, summary.errors) == (1, 1, 0)
    assert journal.read_text().splitlines()[0] == ",".join(RESULT_COLUMNS)
    with open(journal, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and all(None not in r for r in rows)
    assert [{c: r[c] for c in old_columns} for r in rows[:3]] == [{c: r[c] for c in old_columns} for r in written]
    assert all(r[c] == "" for r in rows[:3] for c in RESULT_COLUMNS[len(old_columns):])
    assert read_results(journal).pred_dsc_lo.iloc[:3].isna().all()  # parsed as floats: blank -> NaN
    # a journal of an in-between version (a longer prefix), with a torn case: finished cases kept, torn dropped
    prefix = RESULT_COLUMNS[:-2]
    with open(journal, "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(prefix)
        writer.writerows([r[c] for c in prefix] for r in rows[:4])
    reopened = ResultJournal(journal)
    assert reopened.finished() == {case_key(rows[0]["case_id"], rows[0]["method"], MODEL)}
    assert journal.read_text().splitlines()[0] == ",".join(RESULT_COLUMNS) and len(reopened.rows) == 3
    # a header that is no prefix of today's (a column renamed) is not taken for a journal
    journal.write_text(",".join(("case", *RESULT_COLUMNS[1:])) + "\n")
    with pytest.raises(InputError, match="not a SegQC results journal"):
        ResultJournal(journal)


@needs_colin27
def test_a_batch_in_which_every_case_failed_exits_non_zero(colin_box, tmp_path, capsys):
    """Every case failing (two unreadable masks) exits 1 with one line saying so, from main() and from
    the console script; when a case finished well in an earlier run, failures now exit 0."""
    from SegQCLib.cli import main

    for name in ("bad1.nii.gz", "bad2.nii.gz"):
        (tmp_path / name).write_text("not an image")
    image = colin_box["folder"] / "t1.nii.gz"
    bad_rows = [f"{image},bad1.nii.gz", f"{image},bad2.nii.gz"]
    (tmp_path / "bad.csv").write_text("\n".join(["image,segmentation"] + bad_rows) + "\n")
    args = ["--model", MODEL, "--workers", "0", "--device", "cpu"]
    capsys.readouterr()
    assert main(["batch", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "qc"), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "every case failed (2 of 2)" in err[0], err
    assert "bad1.nii.gz" in err[0]  # the first error says what went wrong
    proc = subprocess.run([str(SEGQC), "batch", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "qc2"), *args,
                           "--no-report"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert "every case failed (2 of 2)" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    # a good case finished earlier: this batch scored something, so failures of the others exit 0
    good = f"{image},{colin_box['folder'] / 'aal.nii.gz'},{colin_box['folder'] / 'aal.nii.gz'},Putamen_L"
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("\n".join(["image,segmentation,reference,label", good] + [r + ",," for r in bad_rows]) + "\n")
    out = tmp_path / "qc3"
    assert main(["batch", str(mixed), "--out", str(out), *args, "--no-report", "--limit", "1"]) == 0
    assert main(["batch", str(mixed), "--out", str(out), *args, "--no-report"]) == 0
    table = read_results(out / "results.csv")
    assert sorted(table.status) == ["error", "error", "ok"]
