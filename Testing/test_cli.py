"""The `segqc` command line on real files: JSON contract, exit code 2 and nothing written on bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegQCLib.cli import main
from SegQCLib.io import read_segmentation
from SegQCLib.metrics import dice, volume_metrics

TEMPLATES = Path("/usr/share/mricron/templates")
pytestmark = pytest.mark.skipif(not (TEMPLATES / "aal.nii.gz").exists(), reason="apt-get install mricron-data")

# A block of Colin27 around both hippocampi keeps the files small and the tests fast.
BLOCK = (slice(40, 80), slice(70, 140), slice(40, 141))


def _write_block(array: np.ndarray, path: Path, like: sitk.Image) -> Path:
    image = sitk.GetImageFromArray(array[BLOCK])
    image.SetSpacing(like.GetSpacing())
    image.SetDirection(like.GetDirection())
    start = [s.start for s in BLOCK][::-1]
    image.SetOrigin(like.TransformIndexToPhysicalPoint(start))
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    t1 = sitk.ReadImage(str(TEMPLATES / "ch2.nii.gz"))
    aal = sitk.GetArrayFromImage(sitk.ReadImage(str(TEMPLATES / "aal.nii.gz")))
    hippo = np.where(np.isin(aal, (37, 38)), aal - 36, 0).astype(np.uint8)  # 1 = left, 2 = right
    out = {"image": _write_block(sitk.GetArrayFromImage(t1), root / "t1.nii.gz", t1)}
    out["ref"] = _write_block(hippo, root / "hippo.nii.gz", t1)
    (root / "hippo.txt").write_text("1 Hippocampus_L\n2 Hippocampus_R\n")
    eroded = hippo.copy()
    eroded[:, :, ::7] = 0  # a crude but real error: every 7th sagittal plane missing
    out["pred"] = _write_block(eroded, root / "pred.nii.gz", t1)
    (root / "pred.txt").write_text("1 Hippocampus_L\n2 Hippocampus_R\n")
    out["root"] = root
    return out


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_metrics_json_contract_and_values(files, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert run_cli("metrics", files["pred"], files["ref"], "--label", "Hippocampus_R", "--json", out) == 0
    data = json.loads(out.read_text())
    assert {"model", "label", "volume", "slices", "runtime_s"} <= set(data)
    assert data["model"] == "reference" and data["label"] == "Hippocampus_R"
    pred = read_segmentation(files["pred"]).mask("Hippocampus_R")
    ref = read_segmentation(files["ref"]).mask("Hippocampus_R")
    expected = volume_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert data["volume"]["dsc"] == pytest.approx(expected["dsc"], abs=1e-9)
    assert data["volume"]["hd95"] == pytest.approx(expected["hd95"], abs=1e-9)
    zs = [row["index"] for row in data["slices"]]
    assert zs == sorted(zs) and set(zs) == set(np.flatnonzero((pred | ref).any(axis=(1, 2))))
    for row in data["slices"]:
        assert {"index", "dsc", "hd95", "flagged"} <= set(row)
        assert row["flagged"] == (row["dsc"] < 0.8)
        k = row["index"]
        assert row["dsc"] == pytest.approx(dice(pred[k], ref[k]), abs=1e-9)


def test_degrade_hits_the_band_and_is_reproducible(files, tmp_path: Path) -> None:
    a, b = tmp_path / "a.seg.nrrd", tmp_path / "b.seg.nrrd"
    for out in (a, b):
        assert run_cli("degrade", files["ref"], "--label", "Hippocampus_L", "--dsc-band", "0.25", "0.5",
                       "--seed", "3", "-o", out) == 0
    ref = read_segmentation(files["ref"]).mask("Hippocampus_L")
    da, db = read_segmentation(a), read_segmentation(b)
    assert da.segments[0].name == "Hippocampus_L"
    np.testing.assert_array_equal(da.labelmap, db.labelmap)
    assert 0.25 <= dice(da.mask("Hippocampus_L"), ref) < 0.5


@pytest.fixture
def no_models(monkeypatch):
    """A SegQC with no QC model installed."""
    import SegQCLib.qc as qc

    monkeypatch.setattr(qc, "_REGISTRY", {})
    monkeypatch.setattr(qc, "_discovered", True)


def test_qc_without_an_installed_model_says_so(no_models, files, tmp_path: Path, capsys) -> None:
    out = tmp_path / "qc.json"
    rc = run_cli("qc", files["image"], files["ref"], "--label", "Hippocampus_L", "--json", out)
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no QC model is installed" in err[0]
    assert not out.exists()


def test_demo_shows_truth_when_no_model(no_models, capsys, tmp_path: Path) -> None:
    assert run_cli("demo", "--dsc-band", "0.5", "0.75", "--png", tmp_path / "demo.png") == 0
    text = capsys.readouterr().out
    assert "MNI152 Brain" in text and "No QC model is installed yet" in text
    assert "volume: dsc=0.5" in text or "volume: dsc=0.6" in text or "volume: dsc=0.7" in text


SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "sentinel-brain-mr.json"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped Sentinel model")
def test_qc_with_the_shipped_model_writes_the_json_contract(files, tmp_path: Path) -> None:
    out = tmp_path / "qc.json"
    assert run_cli("qc", files["image"], files["pred"], "--label", "Hippocampus_R", "--model",
                   "sentinel-brain-mr", "--device", "cpu", "--json", out) == 0
    data = json.loads(out.read_text())
    assert data["model"] == "sentinel-brain-mr" and data["label"] == "Hippocampus_R"
    assert 0.0 <= data["volume"]["dsc"] <= 1.0 and data["runtime_s"] > 0
    mask = read_segmentation(files["pred"]).mask("Hippocampus_R")
    assert [row["index"] for row in data["slices"]] == list(np.flatnonzero(mask.any(axis=(1, 2))))
    assert all(row["flagged"] == (row["dsc"] < 0.8) for row in data["slices"])
    assert run_cli("qc", files["image"], files["pred"], "--label", "Hippocampus_R", "--model", "sentinel-brain-mr",
                   "--pgt", tmp_path / "p.nii.gz") == 2


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped Sentinel model")
def test_qc_says_when_the_structure_name_is_new_to_the_model(files, tmp_path: Path, capsys) -> None:
    """The hippocampus is held out of the shipped model's training: the result says so and names the
    closest structure it knows; a trained name (the left putamen, given with --name) gets no such note."""
    card = json.loads(SHIPPED.read_text())
    assert "Hippocampus_R" not in card["trained_structures"] and "Putamen_L" in card["trained_structures"]
    out = tmp_path / "qc.json"
    assert run_cli("qc", files["image"], files["ref"], "--label", "Hippocampus_R", "--model", "sentinel-brain-mr",
                   "--device", "cpu", "--json", out) == 0
    extra = json.loads(out.read_text())["extra"]
    assert extra["structure_seen_in_training"] is False
    assert extra["nearest_trained_structure"] == "ParaHippocampal_R"
    assert "was not trained on a structure named 'Hippocampus_R'" in " ".join(capsys.readouterr().out.split())
    seen = tmp_path / "seen.json"
    assert run_cli("qc", files["image"], files["ref"], "--label", "Hippocampus_R", "--name", "Putamen_L", "--model",
                   "sentinel-brain-mr", "--device", "cpu", "--json", seen) == 0
    extra = json.loads(seen.read_text())["extra"]
    assert extra["structure_seen_in_training"] is True and "nearest_trained_structure" not in extra
    assert "was not trained" not in capsys.readouterr().out


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped Sentinel model")
def test_qc_scores_carry_the_cards_calibrated_intervals(files, tmp_path: Path, capsys) -> None:
    """Every volume and slice score has its 90 % interval beside it; a structure the model never saw gets
    the out-of-domain interval (calibrated on held-out structures: wider) and the CLI says so."""
    card = json.loads(SHIPPED.read_text())
    assert card["calibration"]["coverage"] == 0.9
    runs = {}
    for name, extra_args in (("unseen", []), ("seen", ["--name", "Putamen_L"])):
        out = tmp_path / f"{name}.json"
        assert run_cli("qc", files["image"], files["pred"], "--label", "Hippocampus_R", *extra_args, "--model",
                       "sentinel-brain-mr", "--device", "cpu", "--json", out) == 0
        runs[name] = json.loads(out.read_text())
        volume = runs[name]["volume"]
        assert 0.0 <= volume["dsc_lo"] <= volume["dsc"] <= volume["dsc_hi"] <= 1.0
        assert all(row["dsc_lo"] <= row["dsc"] <= row["dsc_hi"] for row in runs[name]["slices"])
    assert runs["unseen"]["extra"]["interval"]["domain"] == "out"
    assert runs["seen"]["extra"]["interval"]["domain"] == "in"
    text = " ".join(capsys.readouterr().out.split())
    assert "intervals: 90 % calibrated" in text and "outside the model's domain" in text
    assert f"dsc={runs['seen']['volume']['dsc']:.3f} [" in text


# The demo with an installed model (nnQC on MNI152: r, per-slice table, PNG): Testing/test_domain.py.


SEGQC = Path(sys.executable).with_name("segqc")


def test_version_prints_one_line(capsys) -> None:
    from SegQCLib import __version__

    assert run_cli("--version") == 0
    assert capsys.readouterr().out.strip() == f"segqc {__version__}"
    proc = subprocess.run([str(SEGQC), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"segqc {__version__}" and proc.stderr == ""


def test_bare_segqc_prints_the_help_without_a_traceback(capsys) -> None:
    """No arguments: the usage and the command list (click's usage-error code 2), never a traceback."""
    assert run_cli() == 2
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "Usage: segqc" in text and "batch" in text and "metrics" in text and "Traceback" not in text
    proc = subprocess.run([str(SEGQC)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Usage: segqc" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("band", [("0.95", "0.2"), ("0.2", "0.4")])
def test_console_script_bad_band_is_one_line(band, files, tmp_path: Path) -> None:
    out = tmp_path / "o.nii.gz"
    proc = subprocess.run([str(SEGQC), "degrade", str(files["ref"]), "--label", "Hippocampus_L", "--dsc-band", *band,
                           "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"error: --dsc-band: {band[0]} {band[1]} is not one of the DSC bands "
                                   "(0.05 0.1, 0.1 0.25, 0.25 0.5, 0.5 0.75, 0.75 0.95)")
    assert not out.exists()
    demo = subprocess.run([str(SEGQC), "demo", "--dsc-band", *band], capture_output=True, text=True, timeout=120)
    assert demo.returncode == 2 and demo.stderr.strip() == proc.stderr.strip()


def test_console_script_exit_code(files, tmp_path: Path) -> None:
    missing = tmp_path / "nope.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "SegQCLib.cli", "metrics", str(missing), str(files["ref"])],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {missing}: no such file or folder"


# ------------------------------------------------------------------ bad input: one line, exit 2, nothing written
def _bad(tmp_path: Path, name: str, write) -> Path:
    path = tmp_path / name
    write(path)
    return path


def _nifti(array: np.ndarray, spacing=None):
    def write(path: Path) -> None:
        image = sitk.GetImageFromArray(array, isVector=False)
        if spacing:
            image.SetSpacing(spacing)
        sitk.WriteImage(image, str(path))
    return write


def _tiff(array: np.ndarray):
    def write(path: Path) -> None:
        import tifffile

        tifffile.imwrite(path, array)
    return write


def _truncated_copy(src: Path):
    return lambda path: path.write_bytes(src.read_bytes()[: src.stat().st_size // 2])


CASES = {
    "corrupt": lambda f, t: (["metrics", _bad(t, "corrupt.nii.gz", _truncated_copy(f["ref"])), f["ref"]],
                             "corrupt.nii.gz: cannot read: corrupt"),
    "not-an-image": lambda f, t: (["metrics", _bad(t, "text.nrrd", lambda p: p.write_text("hello")), f["ref"]],
                                  "text.nrrd: cannot read"),
    "mismatched-grid": lambda f, t: (["metrics", _bad(t, "grid.nii.gz", _nifti(np.ones((5, 6, 7), np.uint8),
                                                                              (1.0, 1.0, 2.0))), f["ref"]],
                                     "grid.nii.gz: geometry does not match"),
    "empty-mask": lambda f, t: (["degrade", _bad(t, "empty.nii.gz", _nifti(np.zeros((5, 6, 7), np.uint8))),
                                 "--dsc-band", "0.5", "0.75", "-o", t / "out.nii.gz"], "empty"),
    "nan-image": lambda f, t: (["qc", _bad(t, "nan.nii.gz", _nifti(np.full((5, 6, 7), np.nan, np.float32))),
                                _bad(t, "m.nii.gz", _nifti(np.ones((5, 6, 7), np.uint8)))],
                               "nan.nii.gz: contains 210 NaN"),
    "2d-input": lambda f, t: (["qc", _bad(t, "flat.nii.gz", _nifti(np.ones((6, 7), np.float32))), f["ref"]],
                              "flat.nii.gz: is a 2D image"),
    "4d-input": lambda f, t: (["qc", _bad(t, "four.nii.gz", _nifti(np.ones((2, 3, 4, 5), np.float32))), f["ref"]],
                              "four.nii.gz: is a 4D image"),
    "missing-label": lambda f, t: (["metrics", f["pred"], f["ref"], "--label", "Amygdala_L"],
                                   "unknown label 'Amygdala_L'"),
    "non-binary-mask": lambda f, t: (["qc", f["image"], f["ref"]], "has 2 labels"),
    "non-integer-mask": lambda f, t: (["qc", f["image"], _bad(t, "prob.nii.gz", _nifti(
        np.full((5, 6, 7), 0.5, np.float32)))], "prob.nii.gz: segmentation has non-integer values"),
    "bad-band": lambda f, t: (["degrade", f["ref"], "--dsc-band", "0.9", "0.2", "-o", t / "o.nii.gz"], "--dsc-band"),
    "unknown-band": lambda f, t: (["degrade", f["ref"], "--label", "Hippocampus_L", "--dsc-band", "0.2", "0.4", "-o",
                                   t / "o.nii.gz"], "--dsc-band: 0.2 0.4 is not one of the DSC bands (0.05 0.1,"),
    "overwrite-input": lambda f, t: (["degrade", f["pred"], "--dsc-band", "0.5", "0.75", "-o", f["pred"]],
                                     "would overwrite an input"),
    # instance segmentations (QANet): the user's file is named, not the argument
    "qanet-shape": lambda f, t: (["qc", _bad(t, "cells.tif", _tiff(np.ones((40, 48), np.float32))),
                                  _bad(t, "labels.tif", _tiff(np.ones((40, 40), np.int32))), "--model", "qanet-nuclei-2d"],
                                 "labels.tif: shape (40, 40) differs from the shape (40, 48) of"),
    "qanet-nan": lambda f, t: (["qc", _bad(t, "nan.tif", _tiff(np.full((40, 40), np.nan, np.float32))),
                                _bad(t, "labels.tif", _tiff(np.ones((40, 40), np.int32))), "--model", "qanet-nuclei-2d"],
                               "nan.tif: contains NaN"),
    "qanet-fractional-labels": lambda f, t: (["qc", _bad(t, "cells.tif", _tiff(np.ones((40, 40), np.float32))),
                                              _bad(t, "prob.tif", _tiff(np.full((40, 40), 0.5, np.float32))),
                                              "--model", "qanet-nuclei-2d"], "prob.tif: must be an integer instance"),
    "qanet-corrupt-tif": lambda f, t: (["qc", _bad(t, "broken.tif", lambda p: p.write_bytes(b"II*\x00" + b"x" * 60)),
                                        _bad(t, "labels.tif", _tiff(np.ones((40, 40), np.int32))),
                                        "--model", "qanet-nuclei-2d"], "broken.tif: cannot read image"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line_and_writes_nothing(case: str, files, tmp_path: Path, capsys) -> None:
    args, expected = CASES[case](files, tmp_path)
    inputs = {Path(a): Path(a).read_bytes() for a in args if isinstance(a, Path) and Path(a).is_file()}
    before = set(tmp_path.iterdir())
    json_out = tmp_path / "result.json"
    rc = run_cli(*args, *(["--json", json_out] if args[0] in ("qc", "metrics") else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert set(tmp_path.iterdir()) == before  # no output, no temp file
    for path, content in inputs.items():
        assert path.read_bytes() == content  # inputs untouched


def test_qc_with_the_shipped_qanet_scores_instances_per_patch(tmp_path, capsys):
    """`segqc qc --model qanet-nuclei-2d IMAGE LABELS`: true labels score higher than merged ones."""
    import tifffile

    from SegQCLib.data.cells import simulate_cells
    from SegQCLib.degrade import merge_neighbours
    from SegQCLib.qc import available_models

    if "qanet-nuclei-2d" not in {m.name for m in available_models()}:
        pytest.skip("qanet-nuclei-2d is not installed")
    image, labels = simulate_cells((192, 192), 20, seed=11)
    merged = merge_neighbours(labels, np.random.default_rng(0), n_merges=6, max_gap_vox=6.0)
    holed = labels.copy()  # a 3 x 3 px hole at the centre of five nuclei (a threshold's dim nucleoli)
    for value in np.unique(labels)[1:6]:
        cy, cx = np.round(np.argwhere(labels == value).mean(axis=0)).astype(int)
        holed[cy - 1:cy + 2, cx - 1:cx + 2][labels[cy - 1:cy + 2, cx - 1:cx + 2] == value] = 0
    tifffile.imwrite(tmp_path / "cells.tif", image)
    scores, with_holes, distances = {}, {}, {}
    for name, lab in (("true", labels), ("merged", merged), ("holed", holed)):
        tifffile.imwrite(tmp_path / f"{name}.tif", lab)
        out, heat = tmp_path / f"{name}.json", tmp_path / f"{name}-heat.tif"
        assert main(["qc", str(tmp_path / "cells.tif"), str(tmp_path / f"{name}.tif"), "--model", "qanet-nuclei-2d",
                     "--json", str(out), "--heatmap", str(heat)]) == 0
        data = json.loads(out.read_text())
        # the shipped model's image score is the instance average of its whole-object head
        assert data["image_score"]["seg"] == pytest.approx(data["image_score"]["seg_objects"], abs=1e-6)
        assert all("seg_objects" in row for row in data["patches"])
        assert set(data) >= {"model", "image_score", "patches"} and data["patches"]
        assert tifffile.imread(heat).shape == image.shape
        scores[name] = data["image_score"]["seg"]
        with_holes[name] = data["instances_with_holes"]
        distances[name] = data["image_score"]["mhd95"], data["image_score"]["asd"]
        assert all(row["mhd95"] >= 0 and row["asd"] >= 0 for row in data["patches"])
    assert scores["true"] > 0.9 and scores["true"] > scores["merged"] + 0.1
    # the boundary-distance heads (px): exact outlines are close, merged ones far from their nuclei
    assert distances["true"][0] < 1.5 and distances["true"][1] < 1.0
    assert distances["merged"][0] > distances["true"][0] + 0.5 and distances["merged"][1] > distances["true"][1]
    printed = capsys.readouterr().out
    assert "boundary distances (predicted" in printed and "5 instance(s) have holes" in printed
    # holes are filled for the network and cost only the pixels they take
    assert with_holes == {"true": 0, "merged": 0, "holed": 5}
    assert scores["true"] - 0.05 < scores["holed"] < scores["true"]


def test_qc_of_an_empty_instance_segmentation_scores_low_and_has_no_distances(tmp_path, capsys):
    """An empty label image misses every nucleus: the shipped model scores it near 0, and its boundary
    distances are null (no outline to measure), not a number."""
    import tifffile

    from SegQCLib.data.cells import simulate_cells

    image, labels = simulate_cells((192, 192), 20, seed=11)
    tifffile.imwrite(tmp_path / "cells.tif", image)
    tifffile.imwrite(tmp_path / "empty.tif", np.zeros_like(labels))
    out = tmp_path / "empty.json"
    assert main(["qc", str(tmp_path / "cells.tif"), str(tmp_path / "empty.tif"), "--model", "qanet-nuclei-2d",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert 0.0 <= data["image_score"]["seg"] <= 0.1
    assert data["image_score"]["mhd95"] is None and data["image_score"]["asd"] is None
    assert all(row["n_instances"] == 0 for row in data["patches"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "no instance in the segmentation: the mean" in printed
    assert "the segmentation has no instance to measure" in printed


def test_qc_with_the_shipped_3d_qanet_cuts_kissing_nuclei_at_the_neck(tmp_path, capsys):
    """`segqc qc --model qanet-nuclei-3d`: two nuclei that kiss, merged under one id through a narrow
    neck, are counted in ``instances_cut_at_necks`` and score well below the two separate ids; their
    MHD95 and ASD (the 3D distance heads, each body pooled with the other's outline) are far above."""
    import tifffile
    from scipy import ndimage as ndi

    from SegQCLib.metrics import instance_metrics
    from SegQCLib.qc import available_models

    if "qanet-nuclei-3d" not in {m.name for m in available_models()}:
        pytest.skip("qanet-nuclei-3d is not installed")
    zz, yy, xx = np.indices((28, 40, 60))
    truth = np.zeros(zz.shape, np.int32)
    truth[(zz - 14) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 81] = 1
    truth[(zz - 14) ** 2 + (yy - 20) ** 2 + (xx - 39) ** 2 <= 81] = 2
    image = ndi.gaussian_filter(np.where(truth > 0, 3000.0, 1000.0), 1.0)
    image = (image + np.random.default_rng(0).normal(0, 60, image.shape)).astype(np.float32)
    merged = (truth > 0).astype(np.int32)
    merged[(zz - 14) ** 2 + (yy - 20) ** 2 <= 2] = 1  # the neck: a thin bridge where they kiss
    merged[:, :, :11] = truth[:, :, :11] > 0
    merged[:, :, 49:] = truth[:, :, 49:] > 0
    tifffile.imwrite(tmp_path / "cells.tif", image)
    scores, cut, mhd95, asd = {}, {}, {}, {}
    for name, lab in (("true", truth), ("merged", merged)):
        tifffile.imwrite(tmp_path / f"{name}.tif", lab)
        out = tmp_path / f"{name}.json"
        assert main(["qc", str(tmp_path / "cells.tif"), str(tmp_path / f"{name}.tif"), "--model", "qanet-nuclei-3d",
                     "--json", str(out)]) == 0
        data = json.loads(out.read_text())
        scores[name], cut[name] = data["image_score"]["seg"], data["instances_cut_at_necks"]
        mhd95[name], asd[name] = data["image_score"]["mhd95"], data["image_score"]["asd"]
    assert cut == {"true": 0, "merged": 1}
    assert scores["merged"] < 0.65 * scores["true"]
    truth_merged = instance_metrics(merged, truth)  # 17.7 px / 3.8 px (the true ids: 0)
    assert mhd95["true"] < 3.0 and asd["true"] < 1.5
    assert mhd95["merged"] == pytest.approx(truth_merged["mhd95"], rel=0.2)
    assert asd["merged"] == pytest.approx(truth_merged["asd"], rel=0.3)
    assert "1 instance(s) join bodies through a narrow neck" in capsys.readouterr().out
