"""`segqc review` without a browser: bad input is one error line naming the file (exit 2, no server),
a `segqc batch` folder's cases come worst first, `--host` says who can reach the review, and the
library itself never imports MRML or the web app."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

needs_review = pytest.mark.skipif(importlib.util.find_spec("trame_slicer") is None,
                                  reason="needs the review extra (pip install 'segqc[review]')")


def run_review(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow"}
    return subprocess.run([sys.executable, "-m", "SegQCLib.cli", "review", *args, "--port", "0"], cwd=cwd, env=env,
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=180)


@needs_review
def test_nothing_to_review_is_an_error(tmp_path):
    proc = run_review(cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: review:")


@needs_review
def test_a_corrupt_image_is_named_and_no_server_starts(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    proc = run_review(str(bad), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "scan.nii.gz" in errors[0]
    assert "SegQC Review: http" not in proc.stdout


@needs_review
def test_qc_folder_cases_worst_first_errors_last_paths_absolute(tmp_path):
    from SegQCReview.inputs import read_qc_dir

    (tmp_path / "results.csv").write_text(
        "case_id,structure,pred_dsc,n_flagged,worst_slice,image,segmentation,pgt,status\n"
        "a,Liver,0.91,1,40,img/a.nii.gz,seg/a.nii.gz,,ok\n"
        "b,Liver,,0,,img/b.nii.gz,seg/b.nii.gz,,error\n"
        "c,Liver,0.42,9,12,/data/c.nii.gz,/data/c_seg.nii.gz,pgt/c.nii.gz,ok\n")
    cases = read_qc_dir(tmp_path)
    assert [c.case_id for c in cases] == ["c", "a", "b"]
    assert cases[0].pgt == str(tmp_path / "pgt" / "c.nii.gz") and cases[0].image == "/data/c.nii.gz"
    assert cases[1].image == str(tmp_path / "img" / "a.nii.gz") and cases[1].worst_slice == 40
    assert cases[2].worst_slice is None and cases[2].status == "error"


@needs_review
def test_a_folder_without_results_is_an_error_naming_it(tmp_path):
    from SegQCLib.errors import InputError
    from SegQCReview.inputs import read_qc_dir

    with pytest.raises(InputError, match="results.csv"):
        read_qc_dir(tmp_path)


@needs_review
def test_host_says_who_can_reach_the_review():
    from SegQCReview.serve import reachable_addresses

    assert reachable_addresses("127.0.0.1") == []
    assert reachable_addresses("10.1.2.3") == ["10.1.2.3"]
    assert reachable_addresses("0.0.0.0")  # at least this machine's name


def test_the_library_and_its_cli_never_import_slicer():
    """SegQCLib stays pure Python: the web app is imported only when `segqc review` runs."""
    code = ("import sys, SegQCLib, SegQCLib.cli, SegQCLib.qc, SegQCLib.batch, SegQCLib.refine; "
            "bad = [m for m in ('slicer', 'vtk', 'qt', 'trame', 'SegQCLogic', 'SegQCReview') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
