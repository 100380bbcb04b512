"""Empty segmentations are scored, inputs outside a model's domain are said so, unnamed masks need a
name, and the demo shows the best model's r and the worst slices (issue 32, parts 3-5).

Real data: the MNI152 T1 (nilearn, a subject none of the brain models was trained on), Colin27
(mricron-data), our CT phantom; the shipped brain models.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from SegQCLib.cli import main
from SegQCLib.data.phantom import ct_phantom
from SegQCLib.domain import check_domain
from SegQCLib.io import Segment, Segmentation, write_mask, write_segmentation, write_volume
from SegQCLib.qc import available_models, load_model
from SegQCLib.volume import Volume

BRAIN_MODELS = ("sentinel-brain-mr", "nnqc-Brain", "atlas-brain-mr")
ENTRIES = {e.name: e for e in available_models()}
pytestmark = pytest.mark.skipif(not set(BRAIN_MODELS) <= set(ENTRIES), reason="shipped brain models and mricron-data")
#: MNI152's top 89 slices: the brain without the temporal lobes (no hippocampus), for fast files.
TOP = slice(100, 189)


@pytest.fixture(scope="module")
def mni():
    from SegQCLib.data.sources import mni152

    return mni152("brain")


def _crop(volume: Volume, z: slice) -> Volume:
    return Volume.from_array(np.ascontiguousarray(volume.array[z]), spacing=volume.spacing, name=volume.name)


@pytest.fixture(scope="module")
def files(mni, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("domain")
    image = _crop(mni.image, TOP)
    ct, organs = ct_phantom(0)
    out = {"image": write_volume(image, root / "t1.nii.gz"), "ct": write_volume(ct, root / "ct.nii.gz")}
    brain = mni.segmentation.mask("Brain")[TOP]
    out["brain"] = write_mask(brain, image.grid, root / "brain.nii.gz")  # unnamed binary mask
    out["empty"] = write_mask(np.zeros_like(brain), image.grid, root / "empty.nii.gz")
    named = Segmentation(brain.astype(np.uint8)[None], image.grid, [Segment("Brain", 1)], "named")
    out["named"] = write_segmentation(named, root / "brain.seg.nrrd")
    out["liver"] = write_mask(organs.mask("liver"), ct.grid, root / "liver.nii.gz")
    out["blank"] = write_volume(Volume(np.full(image.shape, 7.0, np.float32), image.grid), root / "blank.nii.gz")
    return out


def run(*args) -> int:
    return main([str(a) for a in args])


# --------------------------------------------------------------------------- domain
def test_mni152_is_in_every_brain_models_domain_at_any_mr_scale(mni) -> None:
    """MR units are arbitrary: the T1 x 7.3 + 100 is the same image to the domain check."""
    rescaled = Volume(mni.image.array * 7.3 + 100.0, mni.image.grid)
    for name in BRAIN_MODELS:
        for image in (mni.image, rescaled):
            assert check_domain(ENTRIES[name].domain, image, "Brain") == {"in": True, "reasons": []}, name


def test_a_ct_is_outside_every_brain_model_and_the_result_says_so(files, capsys) -> None:
    ct, organs = ct_phantom(1)
    for name in BRAIN_MODELS:
        verdict = check_domain(ENTRIES[name].domain, ct, "Brain")
        assert not verdict["in"] and any("CT" in r for r in verdict["reasons"]), name
    # a scored result carries it, its interval is the out-of-domain one, and the CLI warns
    result = load_model("sentinel-brain-mr", "cpu").assess(ct, organs.mask("liver"), "Brain")
    assert result.extra["domain"]["in"] is False and result.extra["interval"]["domain"] == "out"
    out = files["ct"].parent / "ct.json"
    assert run("qc", files["ct"], files["liver"], "--model", "sentinel-brain-mr", "--name", "Brain", "--device", "cpu",
               "--json", out) == 0
    assert json.loads(out.read_text())["extra"]["domain"]["in"] is False
    text = " ".join(capsys.readouterr().out.split())
    assert "warning: outside sentinel-brain-mr's domain: image looks like a CT" in text


def test_qc_without_model_picks_none_for_a_ct_and_a_fitting_one_for_an_mr(files, capsys) -> None:
    assert run("qc", files["ct"], files["liver"], "--name", "Brain", "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ct.nii.gz: no installed QC model's domain fits it" in err[0]
    assert all(name in err[0] for name in BRAIN_MODELS) and "--model" in err[0]
    # a structure only the atlas knows: the higher-priority models are passed over, with the reason
    out = files["image"].parent / "pick.json"
    assert run("qc", files["image"], files["empty"], "--name", "Precentral_R", "--device", "cpu", "--json", out) == 0
    assert json.loads(out.read_text())["model"] == "atlas-brain-mr"
    assert "sentinel-brain-mr passed over: structure 'Precentral_R' was never in its training" in \
        " ".join(capsys.readouterr().out.split())


def test_a_structure_the_model_never_saw_is_out_of_domain(mni) -> None:
    verdict = check_domain(ENTRIES["nnqc-Brain"].domain, mni.image, "Hippocampus_L")
    assert not verdict["in"] and "Hippocampus_L" in verdict["reasons"][0]


# --------------------------------------------------------------------------- names
def test_an_unnamed_mask_to_a_text_model_needs_a_name(files, capsys, tmp_path) -> None:
    assert run("qc", files["image"], files["brain"], "--model", "sentinel-brain-mr", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert "brain.nii.gz: is an unnamed mask" in err and "--name" in err
    named = tmp_path / "named.json"  # a .seg.nrrd segment's name is used
    assert run("qc", files["image"], files["named"], "--model", "sentinel-brain-mr", "--device", "cpu",
               "--json", named) == 0
    data = json.loads(named.read_text())
    assert data["label"] == "Brain" and data["extra"]["structure_seen_in_training"] is True
    assert data["volume"]["dsc"] > 0.6


# --------------------------------------------------------------------------- empty segmentations
def test_an_empty_mask_is_scored_by_each_brain_model(mni) -> None:
    """The brain is in the image: pGT models score an empty mask near 0 on the pGT's slices; Sentinel low
    on its 10 volume slices (spread over the whole volume, as it was trained on empty masks)."""
    empty = np.zeros(mni.image.shape, bool)
    for name in ("nnqc-Brain", "sentinel-brain-mr"):
        result = load_model(name, "cpu").assess(mni.image, empty, "Brain")
        assert result.extra["domain"]["in"] is True
        if name == "sentinel-brain-mr":
            assert result.volume["dsc"] < 0.2
            assert [r["index"] for r in result.slices] == result.extra["volume_slices"] and len(result.slices) == 10
        else:
            assert result.volume["dsc"] < 0.05 and result.pgt.any()
            assert [r["index"] for r in result.slices] == list(np.flatnonzero(result.pgt.any(axis=(1, 2))))
            assert all(r["dsc"] == 0.0 for r in result.slices)


def test_empty_mask_against_an_empty_pgt_is_perfect_and_said(mni, capsys) -> None:
    """Atlas pGT on MNI152's top slices: the brain is there (empty mask scores 0), the left hippocampus is
    not (an empty mask agrees with the empty pGT: 1.0, no slice to show, and the CLI says why)."""
    from SegQCLib.cli import print_result

    image = _crop(mni.image, TOP)
    empty = np.zeros(image.shape, bool)
    atlas = load_model("atlas-brain-mr", "cpu")
    assert atlas.assess(image, empty, "Brain").volume["dsc"] < 0.05
    result = atlas.assess(image, empty, "Hippocampus_L")
    assert not result.pgt.any() and result.volume["dsc"] == 1.0 and result.slices == []
    print_result(result)
    assert "the mask and the pGT are both empty" in capsys.readouterr().out


def test_cli_scores_an_empty_binary_mask_file(files, tmp_path) -> None:
    """An unnamed empty mask given to nnQC (one structure: Brain) is scored, not refused."""
    out = tmp_path / "empty.json"
    assert run("qc", files["image"], files["empty"], "--model", "nnqc-Brain", "--device", "cpu", "--json", out) == 0
    data = json.loads(out.read_text())
    assert data["label"] == "Brain" and data["volume"]["dsc"] < 0.05 and data["slices"]


def test_a_blank_image_is_an_error_naming_the_file(files, capsys) -> None:
    for model in ("sentinel-brain-mr", "nnqc-Brain"):
        assert run("qc", files["blank"], files["brain"], "--model", model, "--name", "Brain", "--device", "cpu") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "blank.nii.gz: image is blank: every voxel is 7" in err[0]


# --------------------------------------------------------------------------- demo
def test_demo_prints_r_and_writes_the_worst_slices_png(tmp_path, capsys, monkeypatch) -> None:
    from matplotlib.image import imread

    png = tmp_path / "demo.png"
    monkeypatch.setenv("COLUMNS", "160")
    assert run("demo", "--device", "cpu", "--png", png) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "nnqc-Brain on MNI152 Brain" in text and "Pearson r = 0.9" in text
    assert "pred dsc" in text and "true dsc" in text and "truth: dsc=0." in text  # the per-slice table, truth beside
    assert f"worst slices (red: segmentation, green: pGT, yellow: truth): {png}" in text
    rgb = imread(png)[..., :3]
    for colour in ((1, 0, 0), (0, 1, 0), (1, 1, 0)):  # the three outlines (report colours)
        assert (np.abs(rgb - colour).max(axis=-1) < 0.15).sum() > 50, colour
