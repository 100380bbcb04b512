"""The curator report of ``segqc batch`` (SegQCLib.report) on a real results table.

The table is built the way batch builds it, from real files: the Colin27 T1 and three AAL
structures (cropped around them), segmented by three "methods" whose masks are the atlas
structures degraded into different DSC bands (SegQCLib.degrade), written as NIfTI label maps with
SegQCLib.io; the true DSC and the worst slice come from the masks (SegQCLib.metrics). The QC model
itself is not under test here: ``pred_dsc`` is a deterministic noisy function of the true DSC, and
it overrates the method "medsam" (the way a QC model can be fooled), so the pseudo ranking of the
methods swaps the top two: pseudo medsam > nnunet > atlas, true nnunet > medsam > atlas. From 3
methods Kendall tau (it would be 1/3) says nothing, and the report says "too few"; small tables
built here check tau, r, AURC and the risk threshold against hand-computed values.

The table has none of the newer columns (intervals, domain, note), as a resumed batch's older
results.csv; tables with them are built here too.

Every expected number is recomputed here from the rows with plain Python / scipy, not with the
report's own functions. The report must also render in headless Chromium (installed by
install.sh): a screenshot that shows the risk-coverage curve and the table of all rows, the key
numbers in the rendered DOM, and the table sorted by a header click.
"""
from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import statistics
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage as ndi
from scipy import stats

from SegQCLib import report
from SegQCLib.data.sources import colin27
from SegQCLib.degrade import degrade_to_band
from SegQCLib.io import Segmentation, write_mask, write_segmentation, write_volume
from SegQCLib.metrics import dice
from SegQCLib.volume import Grid, Volume

CHROMIUM = "/usr/bin/chromium"
STRUCTURES = ("Hippocampus_L", "Caudate_R", "Putamen_L")
#: method -> index of the nnQC DSC band its masks are degraded into
METHODS = {"nnunet": 4, "medsam": 3, "atlas": 2}
CASES = ("case01", "007")  # "007" must stay a string, not become 7
THRESHOLD = 0.8
WORST_N = 12
TOP_N = 8
ERROR_MESSAGE = "/data/seg_case03.nii.gz: not a NIfTI file <header> & truncated"
PGT_METHOD = "atlas"  # its first row whose reference shows on the worst slice gets a pGT file
#: Columns results.csv gained later (issue 33): older tables, as this fixture's, lack them.
NEW_COLUMNS = ("pred_dsc_lo", "pred_dsc_hi", "pred_hd95_lo", "pred_hd95_hi", "interval_coverage", "domain", "note")
CORRUPT = ("case01", "nnunet")  # its segmentation file is overwritten after the batch ran (all flagged)


def _crop(subject, margin: int = 6):
    """The image and label map cropped to the three structures (+ margin), with the right origin."""
    seg = subject.segmentation
    union = np.zeros(seg.layers.shape[1:], bool)
    for name in STRUCTURES:
        union |= seg.mask(name)
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, union.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grid = subject.image.grid
    cropped = Grid(tuple(hi - lo), grid.spacing, tuple(grid.index_to_lps(lo)), grid.direction)
    labels = np.zeros(cropped.shape, np.uint8)
    values = {}
    for name in STRUCTURES:
        segment = seg.find(name)
        labels[seg.layers[segment.layer][box] == segment.value] = segment.value
        values[name] = segment.value
    return Volume(np.array(subject.image.array[box]), cropped), labels, values


def _slice_dsc(mask: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, float]:
    """(slices scored, slices below THRESHOLD, worst slice z, its DSC) over slices with either mask."""
    scored = [z for z in range(mask.shape[0]) if mask[z].any() or ref[z].any()]
    dscs = [dice(mask[z], ref[z]) for z in scored]
    worst = int(np.argmin(dscs))
    return len(scored), sum(d < THRESHOLD for d in dscs), scored[worst], float(dscs[worst])


@dataclass
class Batch:
    table: pd.DataFrame
    csv: Path
    folder: Path
    on_worst: dict[tuple[str, str, str], tuple[bool, bool]]
    pgt_row: tuple[str, str, str]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The results table (18 ok rows, one error row) and what the test knows about it.

    on_worst[case, method, structure] = (segmentation, reference) have voxels on the worst slice:
    a degraded mask can miss the slice entirely, or add a blob where the reference has none.
    pgt_row: (case, method, structure) of the one row with a pGT file."""
    folder = tmp_path_factory.mktemp("batch")
    image, ref_labels, values = _crop(colin27("aal"))
    names = {v: n for n, v in values.items()}
    image_file = write_volume(image, folder / "colin27_t1.nii.gz")
    ref_file = write_segmentation(Segmentation.from_labelmap(ref_labels, image.grid, names),
                                  folder / "reference.nii.gz")
    rows, k, on_worst = [], 0, {}
    for c, case in enumerate(CASES):
        for m, (method, band) in enumerate(METHODS.items()):
            labels = np.zeros_like(ref_labels)
            for s, name in enumerate(STRUCTURES):
                degraded, _ = degrade_to_band(ref_labels == values[name], band, seed=100 * c + 10 * m + s)
                labels[(degraded > 0) & (labels == 0)] = values[name]
            seg_file = write_segmentation(Segmentation.from_labelmap(labels, image.grid, names),
                                          folder / f"seg_{case}_{method}.nii.gz")
            for name in STRUCTURES:
                k += 1
                mask, ref = labels == values[name], ref_labels == values[name]
                true = dice(mask, ref)
                # stand-in for the QC model (not under test): noisy in true DSC, fooled by "medsam"
                pred = 0.975 + 0.005 * math.sin(k) if method == "medsam" else min(max(true + 0.01 * math.sin(k), 0), 1)
                n_slices, n_flagged, worst, worst_dsc = _slice_dsc(mask, ref)
                on_worst[case, method, name] = (bool(mask[worst].any()), bool(ref[worst].any()))
                pgt = ""
                if method == PGT_METHOD and ref[worst].any() and not any(r["pgt"] for r in rows):
                    pgt = str(write_mask(ndi.binary_dilation(ref, iterations=2), image.grid,
                                         folder / f"pgt_{case}_{method}_{name}.nii.gz"))
                rows.append({
                    "case_id": case, "structure": name, "label_value": values[name], "method": method,
                    "model": "sentinel-brain-mr", "pred_dsc": pred, "pred_hd95": math.nan, "n_slices": n_slices,
                    "n_flagged": n_flagged, "worst_slice": worst, "worst_slice_dsc": worst_dsc,
                    "threshold": THRESHOLD, "true_dsc": true, "true_hd95": math.nan, "image": str(image_file),
                    "segmentation": str(seg_file), "reference": str(ref_file), "pgt": pgt, "runtime_s": 0.5,
                    "status": "ok", "error": "", "worker": "local"})
    rows.append({"case_id": "case03", "structure": "", "label_value": -1, "method": "nnunet",
                 "model": "sentinel-brain-mr", "pred_dsc": math.nan, "pred_hd95": math.nan, "n_slices": 0,
                 "n_flagged": 0, "worst_slice": -1, "worst_slice_dsc": math.nan, "threshold": math.nan,
                 "true_dsc": math.nan, "true_hd95": math.nan, "image": str(folder / "missing.nii.gz"),
                 "segmentation": "/data/seg_case03.nii.gz", "reference": "", "pgt": "", "runtime_s": 0.0,
                 "status": "error", "error": ERROR_MESSAGE, "worker": "local"})
    (folder / f"seg_{CORRUPT[0]}_{CORRUPT[1]}.nii.gz").write_bytes(b"this is no longer an image")
    table = pd.DataFrame(rows, columns=[c for c in report.COLUMNS if c not in NEW_COLUMNS])
    (pgt_row,) = [(r["case_id"], r["method"], r["structure"]) for r in rows if r["pgt"]]
    csv = folder / "results.csv"
    table.to_csv(csv, index=False)  # as batch writes it: NaN as blanks
    return Batch(table, csv, folder, on_worst, pgt_row)


@pytest.fixture(scope="module")
def written(batch):
    """The report written from results.csv: (output folder, report.html path)."""
    csv, folder = batch.csv, batch.folder
    out = folder / "report"
    path = report.write_report(csv, out, threshold=THRESHOLD, worst_n=WORST_N, top_n=TOP_N)
    return out, path


def _ok(table: pd.DataFrame) -> list[dict]:
    return [r for r in table.to_dict(orient="records") if r["status"] == "ok"]


def test_summary_numbers_match_an_independent_computation(batch, written):
    table, csv = batch.table, batch.csv
    ok = _ok(table)
    summary = report.summarise(csv, THRESHOLD)
    assert summary == report.summarise(table, THRESHOLD)  # the CSV round trip loses nothing
    assert json.loads((written[0] / "summary.json").read_text(encoding="utf-8")) == summary
    assert (summary["n_rows"], summary["n_ok"], summary["n_error"]) == (19, 18, 1)
    assert summary["n_cases"] == 3 and summary["n_structures"] == 3
    assert summary["models"] == ["sentinel-brain-mr"] and summary["methods"] == ["atlas", "medsam", "nnunet"]

    by_name = {r["structure"]: r for r in summary["structures"]}
    assert set(by_name) == set(STRUCTURES)
    for name in STRUCTURES:
        pred = [r["pred_dsc"] for r in ok if r["structure"] == name]
        true = [r["true_dsc"] for r in ok if r["structure"] == name]
        got = by_name[name]
        assert got["n"] == got["n_ref"] == 6
        assert got["mean_pred_dsc"] == pytest.approx(statistics.fmean(pred), abs=1e-12)
        assert got["share_below"] == pytest.approx(sum(p < THRESHOLD for p in pred) / 6, abs=1e-12)
        assert got["mean_true_dsc"] == pytest.approx(statistics.fmean(true), abs=1e-12)
        assert got["share_true_below"] == pytest.approx(sum(t < THRESHOLD for t in true) / 6, abs=1e-12)
        assert got["r"] == pytest.approx(stats.pearsonr(pred, true).statistic, abs=1e-9)
        assert got["mae"] == pytest.approx(statistics.fmean(abs(p - t) for p, t in zip(pred, true)), abs=1e-12)
    # worst mean predicted DSC first
    means = [r["mean_pred_dsc"] for r in summary["structures"]]
    assert means == sorted(means)

    pred = [r["pred_dsc"] for r in ok]
    true = [r["true_dsc"] for r in ok]
    assert summary["n_ref"] == 18
    assert summary["r"] == pytest.approx(stats.pearsonr(pred, true).statistic, abs=1e-9)
    assert summary["mae"] == pytest.approx(statistics.fmean(abs(p - t) for p, t in zip(pred, true)), abs=1e-12)
    assert summary["mean_pred_dsc"] == pytest.approx(statistics.fmean(pred), abs=1e-12)
    # no intervals in this (older) table: flag is predicted DSC below the threshold, nothing is uncertain
    flagged = sum(p < THRESHOLD for p in pred)
    assert summary["triage"] == {"error": 1, "flag": flagged, "uncertain": 0, "pass": 18 - flagged}
    assert 0 < flagged < 18 and summary["warnings"] == [] and summary["interval_coverage"] == []
    assert summary["n_out_of_domain"] == 0 and summary["domain_recorded"] is False


def test_method_ranking_and_kendall_tau(batch, written):
    table = batch.table
    summary = report.summarise(table, THRESHOLD)
    ranking = {r["method"]: r for r in summary["ranking"]}
    for method in METHODS:
        rows = [r for r in _ok(table) if r["method"] == method]
        assert ranking[method]["n"] == 6
        assert ranking[method]["mean_pred_dsc"] == pytest.approx(statistics.fmean(r["pred_dsc"] for r in rows))
        assert ranking[method]["mean_true_dsc"] == pytest.approx(statistics.fmean(r["true_dsc"] for r in rows))
    assert [ranking[m]["rank_pred"] for m in ("medsam", "nnunet", "atlas")] == [1, 2, 3]
    assert [ranking[m]["rank_true"] for m in ("nnunet", "medsam", "atlas")] == [1, 2, 3]
    # 3 methods: tau would be 1/3, from too few methods to mean anything
    assert summary["kendall_tau"] is None and summary["kendall_n"] == 3
    assert summary["per_model"]["sentinel-brain-mr"]["kendall_tau"] is None
    csv = pd.read_csv(written[0] / "ranking.csv")
    assert csv["method"].tolist() == ["medsam", "nnunet", "atlas"]
    assert csv["rank_true"].tolist() == [2, 1, 3]


def test_csv_lists_for_active_learning_and_self_training(batch, written):
    table = batch.table
    out = written[0]
    ok = _ok(table)
    active = pd.read_csv(out / "active_learning.csv", dtype={"case_id": str})
    assert len(active) == TOP_N
    assert active["pred_dsc"].tolist() == sorted(active["pred_dsc"])
    assert active["pred_dsc"].tolist() == pytest.approx(sorted(r["pred_dsc"] for r in ok)[:TOP_N])
    assert active["rank"].tolist() == list(range(1, TOP_N + 1))
    assert set(active["method"]) <= {"atlas", "nnunet"}

    keep = pd.read_csv(out / "self_training.csv", dtype={"case_id": str})
    good = sorted((r["pred_dsc"] for r in ok if r["pred_dsc"] >= THRESHOLD), reverse=True)
    assert len(keep) == min(TOP_N, len(good)) and len(keep) > 0
    assert (keep["pred_dsc"] >= THRESHOLD).all()
    assert keep["pred_dsc"].tolist() == pytest.approx(good[:TOP_N])
    assert "007" in set(keep["case_id"]) | set(active["case_id"])

    # written atomically, with the usual permissions, no temporary file left behind
    assert sorted(os.listdir(out)) == ["active_learning.csv", "ranking.csv", "report.html", "self_training.csv",
                                       "structures.csv", "summary.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "report.html").stat().st_mode & 0o777 == 0o666 & ~umask

    structures = pd.read_csv(out / "structures.csv")
    assert list(structures.columns) == list(report.STRUCTURE_COLUMNS)
    assert sorted(structures["structure"]) == sorted(STRUCTURES)


def _figures(page: str) -> list[tuple[dict[str, str], str]]:
    """(data-* attributes, inner HTML) of every case figure (the rows to review) of the page."""
    found = []
    for attrs, inner in re.findall(r'<figure class="case" ([^>]*)>(.*?)</figure>', page, re.S):
        found.append((dict(re.findall(r'data-(\w+)="([^"]*)"', attrs)), inner))
    return found


def _views(inner: str) -> dict[str, np.ndarray]:
    """The RGB pixels (int) of each view (axial, coronal, sagittal) embedded in a case figure."""
    found = re.findall(r'<img data-view="(\w+)" src="data:image/png;base64,([^"]+)"', inner)
    return {view: np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)
            for view, data in found}


def _colour_counts(rgb: np.ndarray) -> dict[str, int]:
    """Pixels of pure-ish red, green, yellow and the cyan slice ticks in a view."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return {"red": int(((r > 200) & (g < 80) & (b < 80)).sum()),
            "green": int(((g > 200) & (r < 80) & (b < 80)).sum()),
            "yellow": int(((r > 200) & (g > 200) & (b < 80)).sum()),
            "cyan": int(((r < 60) & (g > 170) & (b > 220)).sum())}


def _keys(inner: str) -> set[str]:
    """What the figure's legend names (data-key of its swatches)."""
    return set(re.findall(r'<span data-key="([^"]+)"', inner))


def test_html_holds_the_worst_cases_numbers_thumbnails_and_errors(batch, written):
    table, on_worst = batch.table, batch.on_worst
    page = written[1].read_text(encoding="utf-8")
    ok = _ok(table)
    summary = report.summarise(table, THRESHOLD)
    # self-contained: one inline script (the table sort), nothing fetched
    assert page.count("<script") == 1 and "<script>" in page and "src=\"http" not in page
    assert "http://" not in page and "https://" not in page and "<link" not in page
    for record in summary["structures"]:
        assert f"{record['mean_pred_dsc']:.3f}" in page
        assert f"{record['r']:.3f}" in page
    assert "Kendall tau between the pseudo and the true ranking: <b>too few (n = 3)</b>" in page
    assert f"{summary['mae']:.3f}" in page
    # the error row, escaped
    assert "not a NIfTI file &lt;header&gt; &amp; truncated" in page and "<header>" not in page

    figures = _figures(page)
    # only flagged rows (no intervals here: predicted DSC < threshold), lowest first; passing ones never
    worst = sorted((r for r in ok if r["pred_dsc"] < THRESHOLD), key=lambda r: r["pred_dsc"])[:WORST_N]
    assert 0 < len(worst) < len(ok)
    assert [(f["case"], f["structure"], f["method"]) for f, _ in figures] == \
        [(r["case_id"], r["structure"], r["method"]) for r in worst]
    assert {f["status"] for f, _ in figures} == {"flag"}
    for (attrs, inner), row in zip(figures, worst):
        assert f"{row['pred_dsc']:.3f}" in inner and f"{row['true_dsc']:.3f}" in inner
        if (attrs["case"], attrs["method"]) == CORRUPT:
            assert "<img" not in inner and "could not be read" in inner and "seg_case01_nnunet" in inner
            assert _keys(inner) == set()  # nothing drawn, nothing in the legend
            continue
        views = _views(inner)
        assert list(views) == ["axial", "coronal", "sagittal"], inner[:300]
        counts = {view: _colour_counts(rgb) for view, rgb in views.items()}
        # the axial view is the worst slice: outlines of the segmentation (red) and the reference
        # (yellow) exactly where they have voxels
        seg_there, ref_there = on_worst[attrs["case"], attrs["method"], attrs["structure"]]
        assert seg_there or ref_there
        axial = counts["axial"]
        assert (axial["red"] > 5 if seg_there else axial["red"] == 0), (attrs, axial)
        assert (axial["yellow"] > 5 if ref_there else axial["yellow"] == 0), (attrs, axial)
        # coronal and sagittal cut through the masks: something outlined, and the axial slice ticked
        for view in ("coronal", "sagittal"):
            assert counts[view]["red"] + counts[view]["yellow"] > 20, (attrs, view, counts[view])
        assert counts["axial"]["cyan"] == 0 and counts["coronal"]["cyan"] + counts["sagittal"]["cyan"] > 10
        has_pgt = (attrs["case"], attrs["method"], attrs["structure"]) == batch.pgt_row
        if has_pgt:
            assert axial["green"] > 20, axial
        else:
            assert all(c["green"] == 0 for c in counts.values()), (attrs, counts)
        # legends only for what is drawn: no pGT key without a pGT file
        assert _keys(inner) == {"segmentation", "reference", "slice"} | ({"pGT"} if has_pgt else set()), attrs
        assert ("pseudo ground truth" in inner) == has_pgt
    assert sum(1 for a, _ in figures if (a["case"], a["method"]) == CORRUPT) == 3
    assert any((a["case"], a["method"], a["structure"]) == batch.pgt_row for a, _ in figures)


def test_report_without_references_or_methods(batch, tmp_path):
    table = batch.table
    bare = table.copy()
    bare["true_dsc"] = math.nan
    bare["reference"] = ""
    bare["method"] = ""
    bare["pgt"] = ""
    out = tmp_path / "bare"
    path = report.write_report(bare, out, threshold=THRESHOLD, worst_n=4, top_n=TOP_N)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["r"] is None and summary["mae"] is None and summary["kendall_tau"] is None
    assert summary["ranking"] == [] and not (out / "ranking.csv").exists()
    assert all(r["mean_true_dsc"] is None and r["n_ref"] == 0 for r in summary["structures"])
    assert summary["risk_coverage"]["n"] == 0 and summary["risk_coverage"]["aurc"] is None
    assert summary["risk_threshold"]["achieved"] is False
    page = path.read_text(encoding="utf-8")
    assert 'id="scatter"' not in page and 'id="ranking"' not in page and "Mean true DSC" not in page
    assert 'id="risk"' not in page and 'data-key="true_dsc"' not in page  # no curve, no true column without references
    assert 'id="structures"' in page and 'id="errors"' in page
    # legends only for what is drawn: neither pGT nor reference without their files
    figures = _figures(page)
    assert len(figures) == 4
    for attrs, inner in figures:
        if (attrs["case"], attrs["method"]) == CORRUPT:
            continue
        assert _keys(inner) == {"segmentation", "slice"}, attrs
        assert all(c["yellow"] == c["green"] == 0 for c in map(_colour_counts, _views(inner).values()))
    assert 'data-key="pGT"' not in page and "pseudo ground truth" not in page
    assert 'data-key="reference"' not in page


def test_several_qc_models_and_an_all_error_table(batch, tmp_path):
    table = batch.table
    ok = table[table["status"] == "ok"]
    other = ok.assign(model="other-model", pred_dsc=1.0 - ok["pred_dsc"])  # anti-correlated scores
    summary = report.summarise(pd.concat([table, other]), THRESHOLD)
    assert summary["models"] == ["other-model", "sentinel-brain-mr"] and summary["n_ok"] == 36
    assert summary["r"] is None and summary["kendall_tau"] is None  # never mixed across QC models
    per_model = summary["per_model"]
    assert per_model["sentinel-brain-mr"]["kendall_tau"] is None and per_model["other-model"]["kendall_n"] == 3
    assert per_model["other-model"]["r"] == pytest.approx(-stats.pearsonr(ok["pred_dsc"], ok["true_dsc"]).statistic)
    assert per_model["other-model"]["risk_coverage"]["n"] == 18
    # 1 - x reverses the order: the anti-correlated model is worse than random, the other better
    assert per_model["other-model"]["risk_coverage"]["aurc"] > per_model["other-model"]["risk_coverage"]["aurc_random"]
    assert per_model["sentinel-brain-mr"]["risk_coverage"]["aurc"] < summary["per_model"]["sentinel-brain-mr"][
        "risk_coverage"]["aurc_random"]
    assert summary["risk_coverage"] is None and summary["risk_threshold"] is None
    assert len(summary["structures"]) == 6 and len(summary["ranking"]) == 6

    failed = table[table["status"] == "error"]
    path = report.write_report(failed, tmp_path / "failed", threshold=THRESHOLD)
    summary = json.loads((tmp_path / "failed" / "summary.json").read_text(encoding="utf-8"))
    assert (summary["n_ok"], summary["n_error"], summary["mean_pred_dsc"], summary["structures"]) == (0, 1, None, [])
    page = path.read_text(encoding="utf-8")
    assert "No successfully scored rows." in page and "not a NIfTI file &lt;header&gt;" in page
    assert pd.read_csv(tmp_path / "failed" / "active_learning.csv").empty


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: install.sh installs it (apt-get install chromium); "
                    "the report is checked by rendering it in headless Chromium")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)


def _hex_rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])


def _blobs(rgb: np.ndarray, colour: str, tolerance: int) -> list[tuple[slice, slice]]:
    """Bounding boxes of the connected regions of ``rgb`` within ``tolerance`` of ``colour``."""
    near = np.abs(rgb - _hex_rgb(colour)).max(axis=-1) <= tolerance
    labels, _ = ndi.label(near)
    return [box for box in ndi.find_objects(labels) if box is not None]


def _table_rows(dom: str) -> list[dict[str, str]]:
    """The rows of the table of all rows in a DOM: {column key: its cell's sort value}, plus ``row_status``
    and ``row_case`` (the row's data attributes)."""
    body = re.search(r'<table class="sortable" id="all-rows">(.*?)</table>', dom, re.S).group(1)
    keys = re.findall(r'<th data-key="(\w+)"', body)
    rows = []
    for status, case, cells in re.findall(r'<tr data-status="(\w+)" data-case="([^"]*)">(.*?)</tr>', body, re.S):
        values = re.findall(r'<td[^>]* data-v="([^"]*)"', cells)
        rows.append({"row_status": status, "row_case": case} | dict(zip(keys, values)))
    return rows


def test_report_renders_in_headless_chromium(batch, written, tmp_path):
    """The page renders: the risk-coverage curve and the table of all rows on screen, and clicking a
    header sorts the table (the page clicks the header a ``#sort=`` address names)."""
    table = batch.table
    url = written[1].resolve().as_uri()
    shot = tmp_path / "shot.png"
    done = _chromium([f"--screenshot={shot}", "--window-size=1280,4000", url], tmp_path / "profile1")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1280, 4000)
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 22)
    assert len(colours) > 1000, f"screenshot looks blank: {len(colours)} distinct colours"
    rgb = np.asarray(image).astype(int)

    # the QC model's risk-coverage curve (a colour used nowhere else): two panels, each a curve
    # running across most of its width
    curves = [b for b in _blobs(rgb, report.CURVE_COLOURS["model"], 40) if b[1].stop - b[1].start > 150]
    assert len(curves) >= 2, [(b[1].start, b[1].stop) for b in _blobs(rgb, report.CURVE_COLOURS["model"], 40)]
    ok = _ok(table)
    n_pass = sum(r["pred_dsc"] >= THRESHOLD for r in ok)
    # the table of all rows: a "pass" badge on each passing row (passing rows appear nowhere else but in
    # the summary's count), stacked in one column below the curve
    passes = [b for b in _blobs(rgb, "#2e8540", 12) if (b[0].stop - b[0].start) > 8 and (b[1].stop - b[1].start) > 20]
    column = [b for b in passes if b[0].start > max(c[0].stop for c in curves)]
    assert len(column) == n_pass, passes
    assert max(b[1].start for b in column) - min(b[1].start for b in column) <= 2  # one column, aligned
    tops = sorted(b[0].start for b in column)
    assert min(np.diff(tops)) > 15  # one badge per row, rows stacked

    dom = _chromium(["--dump-dom", url], tmp_path / "profile2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    summary = report.summarise(table, THRESHOLD)
    hippocampus = next(r for r in summary["structures"] if r["structure"] == "Hippocampus_L")
    assert "SegQC batch report" in dom.stdout
    assert f"{hippocampus['mean_pred_dsc']:.3f}" in dom.stdout
    assert re.search(r"Kendall tau[^<]*:\s*<b>too few \(n = 3\)</b>", dom.stdout)
    rows = _table_rows(dom.stdout)
    assert len(rows) == len(table) == 19  # every row of results.csv, errors included
    assert [r["row_status"] for r in rows] == ["error"] + ["flag"] * (18 - n_pass) + ["pass"] * n_pass
    assert sorted(r["row_case"] for r in rows) == sorted(table["case_id"])

    # sorted by predicted DSC, highest first (two clicks); the error row without one stays last
    dom = _chromium(["--dump-dom", url + "#sort=pred_dsc:desc"], tmp_path / "profile3")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-key="pred_dsc" data-type="num" aria-sort="descending"' in dom.stdout
    rows = _table_rows(dom.stdout)
    assert [float(r["pred_dsc"]) for r in rows[:-1]] == sorted((r["pred_dsc"] for r in ok), reverse=True)
    assert rows[-1]["row_status"] == "error" and rows[-1]["pred_dsc"] == ""
    # a text column, ascending: case ids in natural order ("007" before "case01" before "case03")
    dom = _chromium(["--dump-dom", url + "#sort=case"], tmp_path / "profile4")
    rows = _table_rows(dom.stdout)
    assert [r["row_case"] for r in rows] == ["007"] * 9 + ["case01"] * 9 + ["case03"]


# --------------------------------------------------------------------------- small constructed tables
def _rows(pred, true=None, **columns) -> pd.DataFrame:
    """A results table of one QC model and structure, one ok row per predicted DSC, no files behind it;
    ``columns``: more columns (a value or one per row)."""
    table = pd.DataFrame({"case_id": [f"c{i:02d}" for i in range(len(pred))], "structure": "Liver", "model": "m",
                          "status": "ok", "pred_dsc": pred, "true_dsc": math.nan if true is None else true})
    return table.assign(**columns)


def test_triage_states():
    # interval straddling the threshold (lo < 0.8 <= hi) -> uncertain, whichever side the point is on
    table = report.load_table(_rows(
        [0.70, 0.79, 0.81, 0.90, 0.85, math.nan, 0.95, 0.5],
        pred_dsc_lo=[0.60, 0.75, 0.78, 0.85, math.nan, math.nan, 0.80, math.nan],
        pred_dsc_hi=[0.79, 0.85, 0.86, 0.95, math.nan, math.nan, 0.99, math.nan],
        status=["ok"] * 7 + ["error"]))
    assert report.triage(table, 0.8).tolist() == ["flag", "uncertain", "uncertain", "pass", "pass", "uncertain",
                                                  "pass", "error"]
    # an older table without interval columns: by the predicted DSC alone
    assert report.triage(report.load_table(_rows([0.7, 0.8, 0.9])), 0.8).tolist() == ["flag", "pass", "pass"]


def test_aurc_matches_a_hand_computed_value():
    # in the order of predicted DSC the risks (1 - true DSC) are 0.3, 0.1, 0.5, 0.7: the mean risk of the
    # top 1, 2, 3, 4 cases is 0.3, 0.2, 0.3, 0.4
    table = _rows([0.9, 0.8, 0.7, 0.6], [0.7, 0.9, 0.5, 0.3])
    numbers = report.summarise(table, 0.8)["risk_coverage"]
    assert numbers["risk"] == "1 - true DSC" and numbers["n"] == 4
    assert numbers["aurc"] == pytest.approx((0.3 + 0.2 + 0.3 + 0.4) / 4, abs=1e-12)
    assert numbers["aurc_optimal"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4) / 4, abs=1e-12)  # 0.1, 0.3, 0.5, 0.7
    assert numbers["aurc_random"] == pytest.approx(0.4, abs=1e-12)
    assert numbers["e_aurc"] == pytest.approx(0.05, abs=1e-12)
    # the failure risk (true DSC < 0.8): failures 1, 0, 1, 1 -> 1, 1/2, 2/3, 3/4; oracle 0, 1/2, 2/3, 3/4
    assert numbers["failure_aurc"] == pytest.approx((1 + 1 / 2 + 2 / 3 + 3 / 4) / 4, abs=1e-12)
    assert numbers["failure_aurc_optimal"] == pytest.approx((0 + 1 / 2 + 2 / 3 + 3 / 4) / 4, abs=1e-12)
    assert numbers["failure_aurc_random"] == pytest.approx(0.75, abs=1e-12)
    # the rows' order, error rows and rows without a reference change nothing
    extra = pd.concat([table.iloc[::-1], _rows([0.95], status="error"), _rows([0.99])])
    again = report.summarise(extra, 0.8)["risk_coverage"]
    assert again.pop("risk") == numbers.pop("risk") and again == pytest.approx(numbers, abs=1e-12)

    # a tie (0.8 twice, risks 0.1 and 0.5) is kept as a whole or in expectation: its kept part counts
    # at the group's mean risk 0.3, so 0.3, (0.3 + 0.3) / 2, (0.3 + 0.6) / 3, 0.4 in either row order
    tied = _rows([0.9, 0.8, 0.8, 0.6], [0.7, 0.9, 0.5, 0.3])
    for order in ([0, 1, 2, 3], [0, 2, 1, 3]):
        got = report.summarise(tied.iloc[order], 0.8)["risk_coverage"]["aurc"]
        assert got == pytest.approx((0.3 + 0.3 + 0.3 + 0.4) / 4, abs=1e-12)


#: (predicted, true) DSC, highest predicted first; failures (true < 0.8) at ranks 3, 7, 8 and 10: the
#: failure rate of the top k is 0, 0, 1/3, 1/4, 1/5, 1/6, 2/7, 3/8, 3/9, 4/10
CURATED = [(0.95, 0.90), (0.93, 0.85), (0.91, 0.70), (0.89, 0.88), (0.87, 0.90), (0.85, 0.86), (0.80, 0.60),
           (0.70, 0.50), (0.60, 0.82), (0.50, 0.30)]


@pytest.mark.parametrize("target, threshold, accepted", [(0.05, 0.93, 2), (0.2, 0.85, 6), (0.25, 0.85, 6),
                                                         (0.4, 0.50, 10)])
def test_risk_threshold_on_a_constructed_table(target, threshold, accepted):
    pred, true = zip(*CURATED[::-1])  # the row order does not matter
    pick = report.summarise(_rows(list(pred), list(true)), 0.8, target_risk=target)["risk_threshold"]
    rates = [0, 0, 1 / 3, 1 / 4, 1 / 5, 1 / 6, 2 / 7, 3 / 8, 3 / 9, 4 / 10]
    assert pick["achieved"] is True and pick["target_risk"] == target and pick["n"] == 10
    assert pick["pred_threshold"] == threshold and pick["n_accepted"] == accepted
    assert pick["coverage"] == pytest.approx(accepted / 10) and pick["failure_rate"] == pytest.approx(rates[accepted - 1])
    assert pick["failure_rate"] <= target


def test_risk_threshold_says_when_no_threshold_achieves_it(tmp_path):
    # the highest-scored case fails: no threshold gets under 5 % failures, at best 1 in 3
    table = _rows([0.95, 0.9, 0.85, 0.7], [0.5, 0.9, 0.95, 0.3])
    path = report.write_report(table, tmp_path / "none", threshold=0.8, worst_n=0, target_risk=0.05)
    pick = json.loads((tmp_path / "none" / "summary.json").read_text(encoding="utf-8"))["risk_threshold"]
    assert pick["achieved"] is False and pick["pred_threshold"] is None and pick["coverage"] is None
    assert pick["min_failure_rate"] == pytest.approx(1 / 3)
    page = path.read_text(encoding="utf-8")
    assert "<b>no threshold achieves it</b>" in page and "the lowest any threshold gives is 33 %" in page

    # the same page with a risk it can meet states the threshold and its coverage
    path = report.write_report(table, tmp_path / "half", threshold=0.8, worst_n=0, target_risk=0.5)
    page = path.read_text(encoding="utf-8")
    assert "accept predicted DSC &ge; <b>0.700</b>: 4 of 4 cases (coverage <b>100 %</b>)" in page
    assert 'id="risk"' in page and 'alt="risk-coverage curve, m"' in page


def test_r_and_tau_need_five(tmp_path):
    four = _rows([0.9, 0.7, 0.5, 0.3], [0.95, 0.6, 0.55, 0.2])
    summary = report.summarise(four, 0.8)
    assert summary["n_ref"] == 4 and summary["r"] is None and summary["structures"][0]["r"] is None
    assert summary["mae"] == pytest.approx(statistics.fmean([0.05, 0.1, 0.05, 0.1]))
    page = report.write_report(four, tmp_path / "four", worst_n=0).read_text(encoding="utf-8")
    # the summary, the per-structure table and the scatter caption all say so
    assert page.count("too few (n = 4)") >= 3 and "Pearson r = too few (n = 4)" in page

    five = _rows([0.9, 0.7, 0.5, 0.3, 0.8], [0.95, 0.6, 0.55, 0.2, 0.7])
    summary = report.summarise(five, 0.8)
    expected = stats.pearsonr(five["pred_dsc"], five["true_dsc"]).statistic
    assert summary["r"] == pytest.approx(expected) and summary["structures"][0]["r"] == pytest.approx(expected)
    page = report.write_report(five, tmp_path / "five", worst_n=0).read_text(encoding="utf-8")
    assert "too few" not in page and f"{expected:.3f}" in page

    # Kendall tau over methods: from 5 on; 4 give "too few"
    pred, true = [0.9, 0.8, 0.7, 0.6, 0.5], [0.85, 0.9, 0.6, 0.65, 0.4]
    methods = _rows(pred, true, method=[f"method{i}" for i in range(5)])
    summary = report.summarise(methods, 0.8)
    assert summary["kendall_n"] == 5
    assert summary["kendall_tau"] == pytest.approx(stats.kendalltau(pred, true).statistic)  # (8 - 2) / 10
    assert summary["kendall_tau"] == pytest.approx(0.6)
    summary = report.summarise(methods.iloc[:4], 0.8)
    assert summary["kendall_n"] == 4 and summary["kendall_tau"] is None
    page = report.write_report(methods.iloc[:4], tmp_path / "tau", worst_n=0).read_text(encoding="utf-8")
    assert "Kendall tau between the pseudo and the true ranking: <b>too few (n = 4)</b>" in page


def _before_first_section(page: str) -> str:
    return page[:page.index("<section")]


def test_warnings_at_the_top(tmp_path):
    # every true DSC 0: a reference/label mismatch, so the MAE means nothing
    zero = _rows([0.9, 0.8, 0.3, 0.6, 0.7], [0.0] * 5)
    summary = report.summarise(zero, 0.8)
    assert [w["code"] for w in summary["warnings"]] == ["true_dsc_all_zero"]
    page = report.write_report(zero, tmp_path / "zero", worst_n=0).read_text(encoding="utf-8")
    top = _before_first_section(page)
    assert 'data-warning="true_dsc_all_zero"' in top and "Every true DSC is 0 (5 row(s) with a reference)" in top
    assert f"{summary['mae']:.3f} (see the warning above)" in page

    # most rows outside the QC model's domain
    domain = ["out", "out", "OUT ", "in", ""]  # read case- and space-insensitively
    outside = _rows([0.9, 0.8, 0.3, 0.6, 0.7], [0.9, 0.7, 0.4, 0.6, 0.75], domain=domain)
    summary = report.summarise(outside, 0.8)
    assert [w["code"] for w in summary["warnings"]] == ["mostly_out_of_domain"] and summary["n_out_of_domain"] == 3
    page = report.write_report(outside, tmp_path / "outside", worst_n=0).read_text(encoding="utf-8")
    assert "3 of 5 scored rows (60 %) lie outside" in _before_first_section(page)
    assert page.count('<span class="ood">out</span>') == 3  # shown in the table of all rows

    # neither: no warning
    fine = outside.assign(domain=["out", "out", "in", "in", "in"])
    assert report.summarise(fine, 0.8)["warnings"] == []
    page = report.write_report(fine, tmp_path / "fine", worst_n=0).read_text(encoding="utf-8")
    assert 'class="warn"' not in page and page.count('<span class="ood">out</span>') == 2


def test_intervals_domain_and_note_columns(batch, tmp_path):
    """A table with the newer columns, read back from its CSV: intervals make rows uncertain, the
    interval's coverage heads its column, out-of-domain rows and notes are shown."""
    table = batch.table.copy()
    ok = table["status"] == "ok"
    table["pred_dsc_lo"] = np.where(ok, table["pred_dsc"] - 0.05, math.nan)
    table["pred_dsc_hi"] = np.where(ok, table["pred_dsc"] + 0.05, math.nan)
    table["interval_coverage"] = np.where(ok, 0.9, math.nan)
    table["domain"] = np.where(table["method"] == "medsam", "out", "in")
    table["note"] = ""
    noted = table.index[ok][0]
    table.loc[noted, "note"] = "resampled to 1 mm"
    csv = tmp_path / "results.csv"
    table.to_csv(csv, index=False)
    path = report.write_report(csv, tmp_path / "report", threshold=THRESHOLD, worst_n=WORST_N, top_n=TOP_N)
    summary = json.loads((tmp_path / "report" / "summary.json").read_text(encoding="utf-8"))

    rows = _ok(table)
    uncertain = [r for r in rows if r["pred_dsc"] - 0.05 < THRESHOLD <= r["pred_dsc"] + 0.05]
    flagged = [r for r in rows if r["pred_dsc"] + 0.05 < THRESHOLD]
    assert len(uncertain) >= 2 and any(r["pred_dsc"] >= THRESHOLD for r in uncertain)  # both sides of it
    assert summary["triage"] == {"error": 1, "flag": len(flagged), "uncertain": len(uncertain),
                                 "pass": 18 - len(flagged) - len(uncertain)}
    assert summary["interval_coverage"] == [0.9] and summary["n_out_of_domain"] == 6 and summary["warnings"] == []
    assert summary["domain_recorded"] is True

    page = path.read_text(encoding="utf-8")
    assert "Pred DSC [90 % interval]" in page
    first = uncertain[0]
    assert f"{first['pred_dsc']:.3f} [{first['pred_dsc'] - 0.05:.3f}&ndash;{first['pred_dsc'] + 0.05:.3f}]" in page
    assert page.count('<span class="ood">out</span>') == 6 and "resampled to 1 mm" in page
    # the rows to review: flagged and uncertain ones, lowest predicted DSC first, never a passing one
    figures = _figures(page)
    expected = sorted(flagged + uncertain, key=lambda r: r["pred_dsc"])[:WORST_N]
    assert [(f["case"], f["structure"], f["method"]) for f, _ in figures] == \
        [(r["case_id"], r["structure"], r["method"]) for r in expected]
    assert {f["status"] for f, _ in figures} == {"flag", "uncertain"}


def test_no_rows_to_review_says_so(tmp_path):
    page = report.write_report(_rows([0.95, 0.9]), tmp_path / "good", threshold=0.8).read_text(encoding="utf-8")
    review = page[page.index('<section id="review">'):]
    assert "None: no row is flagged or uncertain" in review[:review.index("</section>")]
    assert _figures(page) == []


def test_coinciding_outlines_all_stay_visible(batch, tmp_path):
    """A perfect segmentation with a perfect pGT: all three outlines lie on the same voxels, and each
    must still show in every view (the reference widest underneath, the segmentation on top)."""
    from SegQCLib.io import read_segmentation, read_volume

    row = next(r for r in _ok(batch.table) if r["structure"] == "Caudate_R" and r["method"] == "atlas")
    grid = read_volume(row["image"]).grid
    mask = read_segmentation(row["reference"]).mask("Caudate_R")
    pgt = write_mask(mask, grid, tmp_path / "pgt_perfect.nii.gz")
    middle = int(np.flatnonzero(mask.any(axis=(1, 2))).mean())
    perfect = pd.DataFrame([row | {"segmentation": row["reference"], "pgt": str(pgt), "pred_dsc": 0.5,
                                   "true_dsc": 1.0, "worst_slice": middle}])
    page = report.write_report(perfect, tmp_path / "perfect", threshold=THRESHOLD).read_text(encoding="utf-8")
    ((attrs, inner),) = _figures(page)
    assert _keys(inner) == {"segmentation", "pGT", "reference", "slice"}
    views = _views(inner)
    assert len(views) == 3
    for view, rgb in views.items():
        counts = _colour_counts(rgb)
        assert counts["red"] > 20 and counts["green"] > 20 and counts["yellow"] > 20, (view, counts)


@pytest.mark.parametrize("spacing, bar_mm", [((0.5, 0.5), 10), ((2.0, 2.0), 50)])
def test_scale_bar_length_follows_the_spacing(spacing, bar_mm):
    # 100 x 100 pixels in a 190 px view: 50 mm or 200 mm wide; the bar is the longest of 1, 2, 5, 10,
    # 20, 50... mm within 35 % of that width
    uri = report.view_png(np.zeros((100, 100), np.float32), [], spacing)
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))
    white = (rgb >= 235).all(axis=-1)
    longest = max(max((len(run) for run in "".join("1" if v else "0" for v in line).split("0")), default=0)
                  for line in white)
    assert longest == pytest.approx(bar_mm / spacing[1] * 190 / 100, abs=3)


def test_results_csv_floats_read_back_exactly(tmp_path):
    # pandas 3.0.6's to_numeric reads these (repr-written) floats back changed, e.g.
    # 0.016527635528529094 -> 0.016527635528529; the table must come back as written.
    from SegQCLib.batch import RESULT_COLUMNS, read_results

    written = ["0.016527635528529094", "0.04097352393619469", "0.9750549333037571", "", "inf", "n/a"]
    rows = [{c: "" for c in RESULT_COLUMNS} | {"case_id": f"c{i}", "structure": "Brain", "status": "ok",
                                               "pred_dsc": text, "n_slices": "10" if i else ""}
            for i, text in enumerate(written)]
    path = tmp_path / "results.csv"
    pd.DataFrame(rows, columns=list(RESULT_COLUMNS)).to_csv(path, index=False)
    expected = [0.016527635528529094, 0.04097352393619469, 0.9750549333037571, math.nan, math.inf, math.nan]
    for table in (read_results(path), report.load_table(path)):
        got = table["pred_dsc"].tolist()
        assert got[:3] == expected[:3] and got[4] == math.inf
        assert math.isnan(got[3]) and math.isnan(got[5])  # blank and text -> NaN
        assert table["n_slices"].tolist() == [-1, 10, 10, 10, 10, 10]
    assert report.parse_floats(pd.Series([0.25, None, "0.5"])).tolist()[::2] == [0.25, 0.5]
