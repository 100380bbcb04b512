"""`segqc review QC_DIR` in the browser: the output folder of a real `segqc batch` run (two degraded
Colin27 brain masks scored by atlas-brain-mr) lists its cases worst first; a click opens the case with
image, segmentation and pGT, at its worst slice. Same browser set-up as test_review_browser.py."""
from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from test_review_browser import MODEL, browser, demo_available, open_page, pytestmark, start_review, stop_review  # noqa: F401

STRUCTURE = "Brain"


@pytest.fixture(scope="module")
def qc_dir(demo_available, tmp_path_factory):
    """A `segqc batch` output folder: (folder, rows of results.csv)."""
    from SegQCLib.data.sources import colin27
    from SegQCLib.degrade import degrade_to_band
    from SegQCLib.io import write_bytes_atomic, write_mask

    folder = tmp_path_factory.mktemp("review-cases")
    subject = colin27("brain")
    truth = subject.segmentation.mask(STRUCTURE).astype(np.uint8)
    lines = ["image,segmentation,case_id,label"]
    for case, band, seed in (("good", (0.75, 0.95), 1), ("bad", (0.25, 0.5), 2)):
        mask = degrade_to_band(truth, band, seed=seed)[0] > 0
        path = write_mask(mask, subject.image.grid, folder / f"{case}.nii.gz")
        write_bytes_atomic(folder / f"{case}.nii.txt", f"1 {STRUCTURE}\n")
        lines.append(f"{subject.image.name},{path},{case},{STRUCTURE}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    proc = subprocess.run([sys.executable, "-m", "SegQCLib.cli", "batch", str(folder / "pairs.csv"), "--out",
                           str(folder / "qc"), "--model", MODEL, "--workers", "0", "--no-report", "--device", "cpu"],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (folder / "qc" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and all(r["pgt"] for r in rows), rows
    return folder / "qc", rows


@pytest.fixture(scope="module")
def cases_page(qc_dir, browser, tmp_path_factory):
    url, proc = start_review([str(qc_dir[0]), "--model", MODEL], tmp_path_factory.mktemp("review-cases-out"))
    try:  # the server stops even when the page never comes up
        context, page = open_page(browser, url)
        yield page
        context.close()
    finally:
        stop_review(proc)


def test_cases_worst_first_and_a_click_opens_the_case_with_its_pgt(cases_page, qc_dir):
    page = cases_page
    _folder, rows = qc_dir
    page.click("#qc-tab-cases")
    page.wait_for_selector("#qc-cases-table .qc-case-row")
    shown = page.evaluate("window.trame.state.get('qc_cases')")
    expected = sorted(rows, key=lambda r: float(r["pred_dsc"]))
    assert [c["case"] for c in shown] == [r["case_id"] for r in expected]
    assert [c["score"] for c in shown] == pytest.approx([float(r["pred_dsc"]) for r in expected], abs=1e-4)
    # the worst case is open at start; a click opens the other one
    target = expected[1]
    page.locator("#qc-cases-table .qc-case-row").nth(1).click()
    page.wait_for_function(f"(document.querySelector('#qc-info') || {{innerText: ''}}).innerText"
                           f".includes('case {target['case_id']} /')")
    page.wait_for_function(f"document.querySelector('#qc-axial') && "
                           f"document.querySelector('#qc-axial').dataset.slice == '{int(target['worst_slice'])}'")
    assert page.evaluate("window.trame.state.get('qc_has_pgt')")
    segments = page.evaluate("window.trame.state.get('qc_segments').map(s => s.title)")
    assert segments == [STRUCTURE]
