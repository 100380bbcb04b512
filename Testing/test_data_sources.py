"""SegQCLib.data: real labelled sources (Colin27, MNI152), dataset readers, slice sampling.

Real files only (DATA.md): mricron-data and nilearn. Dataset folders are written into tmp_path from
small crops of Colin27 so that every reader runs on real images and labels.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegQCLib.data import (Case, available_sources, colin27, dataset_modality, evenly_spaced_slices,
                           foreground_slices, mni152, read_dataset)
from SegQCLib.data import sources
from SegQCLib.errors import DataSourceMissing, InputError
from SegQCLib.io import Segmentation, write_mask, write_segmentation, write_volume
from SegQCLib.volume import Grid, Volume

AVAILABLE = available_sources()
needs_colin = pytest.mark.skipif(not AVAILABLE["colin27"], reason="apt-get install mricron-data")
needs_mni = pytest.mark.skipif(not AVAILABLE["mni152"], reason="pip install nilearn")


@pytest.fixture(scope="module")
def aal():
    return colin27("aal")


@pytest.fixture(scope="module")
def tissue():
    return mni152("tissue")


# --------------------------------------------------------------------------- Colin27
@needs_colin
def test_colin27_aal_is_the_real_atlas(aal):
    folder = sources.mricron_folder()
    assert aal.subject == "colin27" and aal.modality == "MR"
    assert aal.image.shape == (181, 217, 181) and aal.image.array.dtype == np.float32
    assert aal.image.spacing == (1.0, 1.0, 1.0)
    assert aal.segmentation.grid.same_as(aal.image.grid)
    assert len(aal.segmentation.segments) == 116
    assert aal.segmentation.find("Precentral_L").value == 1
    assert aal.segmentation.find(37).name == "Hippocampus_L"
    # the label map is the file's, voxel for voxel
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "aal.nii.gz")))
    np.testing.assert_array_equal(aal.segmentation.labelmap, truth)
    hippocampus = aal.segmentation.mask("Hippocampus_L")
    assert 5_000 < hippocampus.sum() < 12_000  # ~7.5 ml at 1 mm


@needs_colin
def test_colin27_brodmann_and_brain():
    brodmann = colin27("brodmann")
    values = [int(v) for v in np.unique(brodmann.segmentation.labelmap) if v]
    assert [s.value for s in brodmann.segmentation.segments] == values
    assert all(s.name == f"BA{s.value}" for s in brodmann.segmentation.segments)
    brain = colin27("brain")
    assert [s.name for s in brain.segmentation.segments] == ["Brain"]
    bet = sitk.GetArrayFromImage(sitk.ReadImage(str(sources.mricron_folder() / "ch2bet.nii.gz")))
    np.testing.assert_array_equal(brain.segmentation.mask("Brain"), bet > 0)
    assert brain.image is colin27("aal").image  # one cached read of ch2 shared by the atlases


@needs_colin
def test_colin27_tissue_is_grey_and_white_matter_by_intensity():
    tissue, brain = colin27("tissue"), colin27("brain").segmentation.mask("Brain")
    assert [(s.value, s.name) for s in tissue.segmentation.segments] == [(1, "GreyMatter"), (2, "WhiteMatter")]
    gm, wm = tissue.segmentation.mask("GreyMatter"), tissue.segmentation.mask("WhiteMatter")
    assert not (gm & wm).any() and not ((gm | wm) & ~brain).any()
    t1 = tissue.image.array
    csf = brain & ~gm & ~wm
    assert t1[csf].max() <= t1[gm].min() and t1[gm].max() <= t1[wm].min()  # T1: CSF < grey < white
    assert 600_000 < gm.sum() < 1_100_000 and 500_000 < wm.sum() < 900_000  # ml at 1 mm, as in MNI152
    # the AAL regions lie on the cortex and deep nuclei: far more grey matter in them than outside
    in_aal = colin27("aal").segmentation.labelmap > 0
    assert gm[in_aal].mean() > 2 * gm[brain & ~in_aal].mean()


@needs_mni
def test_tissue_rule_reproduces_the_mni152_probability_maps(tissue):
    """The Otsu rule that makes Colin27's tissue labels, applied to MNI152, agrees with its real maps."""
    from SegQCLib.metrics import dice

    brain = sources.mni152("brain").segmentation.mask("Brain")
    labels = sources._tissue_classes(tissue.image.array, brain)
    assert dice(labels == 1, tissue.segmentation.mask("GreyMatter")) > 0.85
    assert dice(labels == 2, tissue.segmentation.mask("WhiteMatter")) > 0.88


@needs_colin
def test_sources_are_cached_and_read_only(aal):
    assert colin27("aal") is aal
    with pytest.raises(ValueError):
        aal.image.array[0, 0, 0] = 1
    with pytest.raises(ValueError):
        aal.segmentation.layers[0, 0, 0, 0] = 1


def test_reserved_files_are_not_exposed():
    """DATA.md keeps inia19-* and ch2better for external evaluation."""
    assert set(available_sources()) == {"colin27", "mni152"}
    for name in ("inia19", "ch2better"):
        with pytest.raises(ValueError):
            colin27(name)
    text = Path(sources.__file__).read_text()
    assert "inia19-" not in text.replace("``inia19-*``", "") and "ch2better.nii" not in text


# --------------------------------------------------------------------------- MNI152
@needs_mni
def test_mni152_tissue_thresholds_the_probability_maps(tissue):
    folder = sources.nilearn_folder()
    assert tissue.image.shape == (189, 233, 197)  # (z, y, x) of the 197x233x189 file and tissue.image.spacing == (1.0, 1.0, 1.0)
    assert [(s.value, s.name) for s in tissue.segmentation.segments] == [(1, "GreyMatter"), (2, "WhiteMatter")]
    gm = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / sources._MNI_GM))) / 255.0
    wm = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / sources._MNI_WM))) / 255.0
    np.testing.assert_array_equal(tissue.segmentation.mask("GreyMatter"), gm > 0.5)
    np.testing.assert_array_equal(tissue.segmentation.mask("WhiteMatter"), wm > 0.5)
    assert tissue.segmentation.mask("GreyMatter").sum() > tissue.segmentation.mask("WhiteMatter").sum() > 100_000


@needs_mni
def test_mni152_brain_mask_covers_the_tissue(tissue):
    brain = mni152("brain").segmentation.mask("Brain")
    tissue_mask = tissue.segmentation.labelmap > 0
    assert (brain & tissue_mask).sum() / tissue_mask.sum() > 0.99
    assert brain.sum() > tissue_mask.sum()  # also holds CSF (ventricles)
    assert 1.2e6 < brain.sum() < 2.5e6  # ~1.2-2.5 l


def test_bad_source_arguments():
    with pytest.raises(ValueError):
        mni152("csf")


# --------------------------------------------------------------------------- missing sources
def test_missing_sources_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "MRICRON_SEARCH_PATH", [tmp_path / "none"])
    monkeypatch.setattr(sources, "NILEARN_SEARCH_PATH", [tmp_path / "none"])
    assert available_sources() == {"colin27": False, "mni152": False}
    with pytest.raises(DataSourceMissing, match="apt-get install mricron-data"):
        colin27("aal")
    with pytest.raises(DataSourceMissing, match="pip install nilearn"):
        mni152("tissue")


@needs_colin
def test_partial_install_is_missing(monkeypatch, tmp_path):
    """A folder with ch2.nii.gz but no atlas files is not taken for the source."""
    (tmp_path / "ch2.nii.gz").write_bytes((sources.mricron_folder() / "ch2.nii.gz").read_bytes())
    monkeypatch.setattr(sources, "MRICRON_SEARCH_PATH", [tmp_path])
    with pytest.raises(DataSourceMissing, match="aal.nii.gz"):
        colin27("brain")


# --------------------------------------------------------------------------- slices
@needs_colin
def test_evenly_spaced_slices_on_a_real_structure(aal):
    mask = aal.segmentation.mask("Hippocampus_L")
    fg = foreground_slices(mask)
    assert fg == list(range(fg[0], fg[-1] + 1)) and len(fg) > 20
    chosen = evenly_spaced_slices(mask, 10)
    assert len(chosen) == 10 and chosen == sorted(set(chosen))
    assert chosen[0] == fg[0] and chosen[-1] == fg[-1]
    assert all(mask[k].any() for k in chosen)
    gaps = np.diff(chosen)
    assert gaps.max() - gaps.min() <= 1  # evenly spaced


def test_evenly_spaced_slices_few_and_empty():
    mask = np.zeros((30, 8, 8), dtype=bool)
    assert evenly_spaced_slices(mask, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced_slices(np.zeros((4, 8, 8), bool), 10) == [0, 1, 2, 3]
    mask[[5, 9, 20], 2, 2] = True
    assert foreground_slices(mask) == [5, 9, 20]
    assert evenly_spaced_slices(mask, 10) == [5, 9, 20]
    mask[5:25, 3, 3] = True
    assert evenly_spaced_slices(mask, 3) == [5, 15, 24]
    with pytest.raises(ValueError):
        evenly_spaced_slices(mask, 0)


# --------------------------------------------------------------------------- dataset folders
CROPS = {"colin_a": (slice(35, 75), slice(70, 130), slice(30, 150)),
         "colin_b": (slice(40, 80), slice(75, 135), slice(30, 150))}


def _crop(subject, box) -> tuple[Volume, np.ndarray]:
    """A real sub-volume (geometry kept) with hippocampus labels 1 = left, 2 = right."""
    grid = subject.image.grid
    start = np.array([s.start for s in box])
    origin = grid.index_to_lps(start)
    image = Volume(np.array(subject.image.array[box]), Grid(subject.image.array[box].shape, grid.spacing, origin,
                                                            grid.direction))
    aal_map = subject.segmentation.labelmap[box]
    labels = np.zeros(aal_map.shape, np.uint8)
    labels[aal_map == 37] = 1
    labels[aal_map == 38] = 2
    assert (labels == 1).any() and (labels == 2).any()
    return image, labels


def write_nnunet(root: Path, subject, modality: str = "MRI") -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case_id, box in CROPS.items():
        image, labels = _crop(subject, box)
        write_volume(image, root / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_mask(labels, image.grid, root / "labelsTr" / f"{case_id}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": modality}, "labels": {"background": 0, "Hippocampus_L": 1, "Hippocampus_R": 2},
        "numTraining": len(CROPS), "file_ending": ".nii.gz"}))
    return root


def write_msd(root: Path, subject) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for case_id, box in CROPS.items():
        image, labels = _crop(subject, box)
        write_volume(image, root / "imagesTr" / f"{case_id}.nii.gz")
        write_mask(labels, image.grid, root / "labelsTr" / f"{case_id}.nii.gz")
        training.append({"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "Hippocampus", "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Hippocampus_L", "2": "Hippocampus_R"},
        "numTraining": len(training), "training": training, "test": []}))
    return root


@needs_colin
def test_read_nnunet_v2_folder(aal, tmp_path):
    root = write_nnunet(tmp_path / "Dataset001_Hippo", aal, modality="CT")
    cases = read_dataset(root)
    assert [c.case_id for c in cases] == ["colin_a", "colin_b"]
    assert cases[0].label_table == {1: "Hippocampus_L", 2: "Hippocampus_R"}
    assert dataset_modality(root) == "CT"
    image, seg = cases[0].load()
    assert image.shape == (40, 60, 120) and seg.grid.same_as(image.grid)
    assert seg.find("Hippocampus_R").value == 2
    _, labels = _crop(aal, CROPS["colin_a"])
    np.testing.assert_array_equal(seg.labelmap, labels)
    np.testing.assert_array_equal(image.array, aal.image.array[CROPS["colin_a"]])


@needs_colin
def test_read_msd_folder(aal, tmp_path):
    root = write_msd(tmp_path / "Task04_Hippocampus", aal)
    cases = read_dataset(root)
    assert [c.case_id for c in cases] == ["colin_a", "colin_b"]
    assert dataset_modality(root) == "MR"
    image, seg = cases[1].load()
    assert seg.find("Hippocampus_L").value == 1 and image.shape == (40, 60, 120)


@needs_colin
def test_read_csv_of_pairs(aal, tmp_path):
    image, labels = _crop(aal, CROPS["colin_a"])
    (tmp_path / "data").mkdir()
    write_volume(image, tmp_path / "data" / "img.nii.gz")
    write_mask(labels, image.grid, tmp_path / "data" / "pred.nii.gz")
    write_mask(labels > 0, image.grid, tmp_path / "data" / "gt.nii.gz")
    (tmp_path / "table.txt").write_text("1 Hippocampus_L\n2 Hippocampus_R\n")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text("Image,Segmentation,reference,label,label_table\n"
                        "data/img.nii.gz,data/pred.nii.gz,data/gt.nii.gz,Hippocampus_L,table.txt\n"
                        f"{tmp_path / 'data' / 'img.nii.gz'},data/pred.nii.gz,,,\n")
    cases = read_dataset(csv_file)
    assert [c.case_id for c in cases] == ["pred", "pred_3"]
    first = cases[0]
    assert first.reference == tmp_path / "data" / "gt.nii.gz" and first.label == "Hippocampus_L"
    assert first.label_table == {1: "Hippocampus_L", 2: "Hippocampus_R"}
    _, seg = first.load()
    assert seg.mask(first.label).sum() == (labels == 1).sum()
    assert first.load_reference().mask(1).sum() == (labels > 0).sum()
    assert cases[1].reference is None and cases[1].label_table is None
    assert dataset_modality(csv_file) == "unknown"


@needs_colin
def test_case_load_pads_a_cropped_segmentation_and_rejects_another_grid(aal, tmp_path):
    image, labels = _crop(aal, CROPS["colin_a"])
    write_volume(image, tmp_path / "img.nii.gz")
    # Slicer-style: the segmentation cropped to its extent, on the same voxel lattice
    inner = (slice(5, 30), slice(10, 50), slice(0, 120))
    grid = Grid(labels[inner].shape, image.spacing, image.grid.index_to_lps(np.array([5, 10, 0])),
                image.grid.direction)
    seg = Segmentation.from_labelmap(labels[inner], grid, {1: "Hippocampus_L", 2: "Hippocampus_R"})
    write_segmentation(seg, tmp_path / "cropped.seg.nrrd")
    _, loaded = Case("a", tmp_path / "img.nii.gz", tmp_path / "cropped.seg.nrrd").load()
    expected = np.zeros_like(labels)
    expected[inner] = labels[inner]
    np.testing.assert_array_equal(loaded.layers[0], expected)
    # a segmentation on another spacing: error naming it
    other = Grid(labels.shape, (1.0, 1.0, 2.0), image.grid.origin, image.grid.direction)
    write_mask(labels, other, tmp_path / "other.nii.gz")
    with pytest.raises(InputError, match="other.nii.gz.*spacing"):
        Case("b", tmp_path / "img.nii.gz", tmp_path / "other.nii.gz").load()


# --------------------------------------------------------------------------- reader errors
def test_folder_without_dataset_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(InputError, match="dataset.json"):
        read_dataset(tmp_path)
    with pytest.raises(InputError, match="no such file"):
        read_dataset(tmp_path / "absent")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputError, match="not a dataset"):
        read_dataset(tmp_path / "x.txt")


@needs_colin
def test_missing_image_or_label_is_named(aal, tmp_path):
    nnunet = write_nnunet(tmp_path / "nn", aal)
    (nnunet / "imagesTr" / "colin_b_0000.nii.gz").unlink()
    with pytest.raises(InputError, match="colin_b_0000.nii.gz"):
        read_dataset(nnunet)
    msd = write_msd(tmp_path / "msd", aal)
    (msd / "labelsTr" / "colin_a.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labelsTr/colin_a.nii.gz.*missing"):
        read_dataset(msd)


def test_bad_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,mask\na.nii.gz,b.nii.gz\n")
    with pytest.raises(InputError, match="segmentation"):
        read_dataset(bad)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        read_dataset(empty)
    missing = tmp_path / "missing.csv"
    missing.write_text("image,segmentation\nnope.nii.gz,nope_seg.nii.gz\n")
    with pytest.raises(InputError, match=r"nope.nii.gz.*missing"):
        read_dataset(missing)


def test_dataset_json_that_is_neither_layout(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(InputError, match="neither MSD"):
        read_dataset(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_dataset(tmp_path)
