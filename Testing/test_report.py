"""The curator report of ``segqc batch`` (SegQCLib.report) on a real results table.

The table is built the way batch builds it, from real files: the Colin27 T1 and three AAL
structures (cropped around them), segmented by three "methods" whose masks are the atlas
structures degraded into different DSC bands (SegQCLib.degrade), written as NIfTI label maps with
SegQCLib.io; the true DSC and the worst slice come from the masks (SegQCLib.metrics). The QC model
itself is not under test here: ``pred_dsc`` is a deterministic noisy function of the true DSC, and
it overrates the method "medsam" (the way a QC model can be fooled), so the pseudo ranking of the
methods swaps the top two: pseudo medsam > nnunet > atlas, true nnunet > medsam > atlas, Kendall
tau = (2 concordant - 1 discordant) / 3 = 1/3.

Every expected number is recomputed here from the rows with plain Python / scipy, not with the
report's own functions. The report must also render in headless Chromium (installed by
install.sh): a screenshot that is not blank, and the key numbers in the rendered DOM.
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
CORRUPT = ("007", "nnunet")  # its segmentation file is overwritten after the batch ran


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
    table = pd.DataFrame(rows, columns=list(report.COLUMNS))
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
    assert json.loads((written[0] / "summary.json").read_text()) == summary
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
    assert summary["kendall_tau"] == pytest.approx(1 / 3, abs=1e-12)
    assert summary["per_model"]["sentinel-brain-mr"]["kendall_tau"] == pytest.approx(1 / 3, abs=1e-12)
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
    """(data-* attributes, inner HTML) of every thumbnail figure of the page."""
    found = []
    for attrs, inner in re.findall(r'<figure class="thumb" ([^>]*)>(.*?)</figure>', page, re.S):
        found.append((dict(re.findall(r'data-(\w+)="([^"]*)"', attrs)), inner))
    return found


def _colour_counts(inner: str) -> dict[str, int]:
    """Pixels of pure-ish red, green and yellow in the figure's embedded PNG."""
    data = re.search(r'src="data:image/png;base64,([^"]+)"', inner).group(1)
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return {"red": int(((r > 200) & (g < 80) & (b < 80)).sum()),
            "green": int(((g > 200) & (r < 80) & (b < 80)).sum()),
            "yellow": int(((r > 200) & (g > 200) & (b < 80)).sum())}


def test_html_holds_the_worst_cases_numbers_thumbnails_and_errors(batch, written):
    table, on_worst = batch.table, batch.on_worst
    page = written[1].read_text()
    ok = _ok(table)
    summary = report.summarise(table, THRESHOLD)
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    for record in summary["structures"]:
        assert f"{record['mean_pred_dsc']:.3f}" in page
        assert f"{record['r']:.3f}" in page
    assert f"{summary['kendall_tau']:.3f}" == "0.333" and "0.333" in page
    assert f"{summary['mae']:.3f}" in page
    # the error row, escaped
    assert "not a NIfTI file &lt;header&gt; &amp; truncated" in page and "<header>" not in page

    figures = _figures(page)
    worst = sorted(ok, key=lambda r: r["pred_dsc"])[:WORST_N]
    assert [(f["case"], f["structure"], f["method"]) for f, _ in figures] == \
        [(r["case_id"], r["structure"], r["method"]) for r in worst]
    for (attrs, inner), row in zip(figures, worst):
        assert f"{row['pred_dsc']:.3f}" in inner and f"{row['true_dsc']:.3f}" in inner
        if (attrs["case"], attrs["method"]) == CORRUPT:
            assert "<img" not in inner and "could not be read" in inner and "seg_007_nnunet" in inner
            continue
        assert "<img" in inner, inner[:300]
        colours = _colour_counts(inner)
        # outlines of the segmentation (red) and the reference (yellow) where they have voxels
        seg_there, ref_there = on_worst[attrs["case"], attrs["method"], attrs["structure"]]
        assert seg_there or ref_there
        assert (colours["red"] > 5 if seg_there else colours["red"] == 0), (attrs, colours)
        assert (colours["yellow"] > 5 if ref_there else colours["yellow"] == 0), (attrs, colours)
        if (attrs["case"], attrs["method"], attrs["structure"]) == batch.pgt_row:
            assert colours["green"] > 20, colours
        else:
            assert colours["green"] == 0, (attrs, colours)
    assert sum(1 for a, _ in figures if (a["case"], a["method"]) == CORRUPT) == 3
    assert any((a["case"], a["method"], a["structure"]) == batch.pgt_row for a, _ in figures)


def test_report_without_references_or_methods(batch, tmp_path):
    table = batch.table
    bare = table.copy()
    bare["true_dsc"] = math.nan
    bare["reference"] = ""
    bare["method"] = ""
    out = tmp_path / "bare"
    path = report.write_report(bare, out, threshold=THRESHOLD, worst_n=0, top_n=TOP_N)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["r"] is None and summary["mae"] is None and summary["kendall_tau"] is None
    assert summary["ranking"] == [] and not (out / "ranking.csv").exists()
    assert all(r["mean_true_dsc"] is None and r["n_ref"] == 0 for r in summary["structures"])
    page = path.read_text()
    assert 'id="scatter"' not in page and 'id="ranking"' not in page and "Mean true DSC" not in page
    assert 'id="structures"' in page and 'id="errors"' in page


def test_several_qc_models_and_an_all_error_table(batch, tmp_path):
    table = batch.table
    ok = table[table["status"] == "ok"]
    other = ok.assign(model="other-model", pred_dsc=1.0 - ok["pred_dsc"])  # anti-correlated scores
    summary = report.summarise(pd.concat([table, other]), THRESHOLD)
    assert summary["models"] == ["other-model", "sentinel-brain-mr"] and summary["n_ok"] == 36
    assert summary["r"] is None and summary["kendall_tau"] is None  # never mixed across QC models
    per_model = summary["per_model"]
    assert per_model["sentinel-brain-mr"]["kendall_tau"] == pytest.approx(1 / 3)
    assert per_model["other-model"]["r"] == pytest.approx(-stats.pearsonr(ok["pred_dsc"], ok["true_dsc"]).statistic)
    assert per_model["other-model"]["kendall_tau"] == pytest.approx(-1 / 3)  # 1 - x reverses the pseudo ranking
    assert len(summary["structures"]) == 6 and len(summary["ranking"]) == 6

    failed = table[table["status"] == "error"]
    path = report.write_report(failed, tmp_path / "failed", threshold=THRESHOLD)
    summary = json.loads((tmp_path / "failed" / "summary.json").read_text())
    assert (summary["n_ok"], summary["n_error"], summary["mean_pred_dsc"], summary["structures"]) == (0, 1, None, [])
    page = path.read_text()
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


def test_report_renders_in_headless_chromium(batch, written, tmp_path):
    table = batch.table
    url = written[1].resolve().as_uri()
    shot = tmp_path / "shot.png"
    done = _chromium([f"--screenshot={shot}", "--window-size=1280,4000", url], tmp_path / "profile1")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (1280, 4000)
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 22)
    assert len(colours) > 1000, f"screenshot looks blank: {len(colours)} distinct colours"

    dom = _chromium(["--dump-dom", url], tmp_path / "profile2")
    assert dom.returncode == 0, dom.stderr[-2000:]
    summary = report.summarise(table, THRESHOLD)
    hippocampus = next(r for r in summary["structures"] if r["structure"] == "Hippocampus_L")
    assert "SegQC batch report" in dom.stdout
    assert f"{hippocampus['mean_pred_dsc']:.3f}" in dom.stdout
    assert re.search(r"Kendall tau[^<]*:\s*<b>0\.333</b>", dom.stdout)


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
