"""SegQCLib.fingerprint on real data (Colin27, MNI152): values, JSON, RAS reorientation, the
preprocess -> postprocess round trip (exact without resampling, DSC >= 0.97 with it),
intensity normalisation, and fingerprints of dataset folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from SegQCLib.data import available_sources, colin27, mni152
from SegQCLib.data import sources
from SegQCLib.data.sources import LabelledSubject
from SegQCLib.errors import InputError
from SegQCLib.fingerprint import (Fingerprint, compute_fingerprint, ct_window, fingerprint_dataset,
                                  orientation_code, postprocess, preprocess, ras_axes, reorient_to_ras)
from SegQCLib.io import Segmentation, write_mask, write_volume
from SegQCLib.volume import Grid, Volume

AVAILABLE = available_sources()
pytestmark = pytest.mark.skipif(not all(AVAILABLE.values()),
                                reason="needs apt-get install mricron-data and pip install nilearn")

AAL_STRUCTURES = ("Hippocampus_L", "Caudate_R", "Putamen_L", "Thalamus_R", "Precentral_L")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def aal() -> LabelledSubject:
    return colin27("aal")


@pytest.fixture(scope="module")
def brain() -> LabelledSubject:
    return colin27("brain")


@pytest.fixture(scope="module")
def tissue() -> LabelledSubject:
    return mni152("tissue")


@pytest.fixture(scope="module")
def fp_aal(aal) -> Fingerprint:
    return compute_fingerprint([aal])


@pytest.fixture(scope="module")
def fp_two(aal, tissue) -> Fingerprint:
    return compute_fingerprint([aal, tissue])


def _sitk(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.grid.spacing_xyz)
    image.SetOrigin(volume.grid.origin)
    image.SetDirection(volume.grid.direction)
    return image


def _as_lps(volume: Volume, mask: np.ndarray) -> tuple[Volume, np.ndarray]:
    """The same voxels stored LPS (identity direction): x and y reversed in the array."""
    grid = volume.grid
    corner = grid.index_to_lps(np.array([0, grid.shape[1] - 1, grid.shape[2] - 1]))
    array = np.ascontiguousarray(volume.array[:, ::-1, ::-1])
    return Volume.from_array(array, grid.spacing, corner, np.eye(3).ravel()), np.ascontiguousarray(mask[:, ::-1, ::-1])


def _as_asl(volume: Volume, mask: np.ndarray) -> tuple[Volume, np.ndarray]:
    """The same voxels stored sagittal-first: array axes (x reversed, z, y), orientation "ASL"."""
    grid = volume.grid
    d = grid.direction_matrix
    direction = np.stack([d[:, 1], d[:, 2], -d[:, 0]], axis=1)  # new i = old y, j = old z, k = -old x
    spacing = (grid.spacing[2], grid.spacing[0], grid.spacing[1])
    origin = grid.index_to_lps(np.array([0, 0, grid.shape[2] - 1]))
    move = lambda a: np.ascontiguousarray(np.transpose(a, (2, 0, 1))[::-1])  # noqa: E731
    return Volume.from_array(move(volume.array), spacing, origin, direction.ravel()), move(mask)


# --------------------------------------------------------------------------- fingerprint values
def test_fingerprint_of_colin27_aal(aal, fp_aal):
    fg = aal.segmentation.labelmap > 0
    values = aal.image.array[fg]
    assert fp_aal.spacing == (1.0, 1.0, 1.0)
    assert fp_aal.orientation == "RAS" and fp_aal.modality == "MR"
    assert fp_aal.n_cases == fp_aal.n_foreground_cases == 1
    assert len(fp_aal.labels) == 116 and fp_aal.labels[37] == "Hippocampus_L" and fp_aal.labels[1] == "Precentral_L"
    idx = np.argwhere(fg)
    extent = idx.max(0) - idx.min(0) + 1
    assert fp_aal.box_voxels == tuple(float(e) for e in extent) == fp_aal.box_mm
    # sampled statistics close to the exact ones, ordered and inside the image range
    lo, hi = np.percentile(values, [0.5, 99.5])
    assert aal.image.array.min() <= fp_aal.intensity_p0_5 < fp_aal.intensity_mean < fp_aal.intensity_p99_5 \
        <= aal.image.array.max()
    assert abs(fp_aal.intensity_p0_5 - lo) <= 5 and abs(fp_aal.intensity_p99_5 - hi) <= 5
    assert abs(fp_aal.intensity_mean - values.mean()) < 1.0 and abs(fp_aal.intensity_std - values.std()) < 1.0


def test_fingerprint_of_two_subjects_takes_medians(aal, tissue, fp_aal, fp_two):
    mni = compute_fingerprint([tissue])
    assert fp_two.n_cases == 2 and fp_two.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(fp_two.box_voxels, (np.array(fp_aal.box_voxels) + mni.box_voxels) / 2)
    assert fp_two.intensity_p0_5 < fp_two.intensity_p99_5
    assert compute_fingerprint([aal, tissue]) == fp_two  # seeded sampling: reproducible


def test_fingerprint_of_one_label(aal):
    fp = compute_fingerprint([aal], label="Hippocampus_L")
    assert fp.labels == {37: "Hippocampus_L"}
    assert max(fp.box_voxels) < 60


def test_fingerprint_geometry_in_ras_order(aal):
    """A sagittal-first, anisotropic copy: spacing and box come out in RAS (z, y, x) order."""
    mask = aal.segmentation.mask("Putamen_L")
    moved, moved_mask = _as_asl(aal.image, mask)
    spacing = (1.0, 2.0, 3.0)  # on the moved (z, y, x) array axes = old (-x, z, y)
    stretched = Volume.from_array(moved.array, spacing, moved.grid.origin, moved.grid.direction)
    seg = Segmentation.from_labelmap(moved_mask.astype(np.uint8), stretched.grid, {1: "Putamen_L"})
    fp = compute_fingerprint([LabelledSubject("asl", stretched, seg, "test")])
    assert fp.orientation == orientation_code(stretched.grid.direction) == "ASL"
    assert fp.spacing == (2.0, 3.0, 1.0)  # S <- old z, A <- old y, R <- old x
    idx = np.argwhere(mask)
    assert fp.box_voxels == tuple(float(e) for e in idx.max(0) - idx.min(0) + 1)
    np.testing.assert_allclose(fp.box_mm, np.array(fp.box_voxels) * fp.spacing)


def test_fingerprint_json_round_trip(fp_two, tmp_path):
    path = fp_two.to_json(tmp_path / "fingerprint.json")
    data = json.loads(path.read_text())
    assert data["labels"]["37"] == "Hippocampus_L" and data["spacing"] == [1.0, 1.0, 1.0]
    assert Fingerprint.from_json(path) == fp_two
    (tmp_path / "bad.json").write_text('{"spacing": [1, 1]}')
    with pytest.raises(InputError, match="bad.json"):
        Fingerprint.from_json(tmp_path / "bad.json")


def test_empty_foreground_everywhere_is_an_error(aal):
    empty = Segmentation.from_labelmap(np.zeros(aal.image.shape, np.uint8), aal.image.grid)
    with pytest.raises(InputError, match="no foreground"):
        compute_fingerprint([LabelledSubject("empty", aal.image, empty, "test")])
    with pytest.raises(InputError):
        compute_fingerprint([])


def test_fingerprint_of_dataset_folders(aal, tmp_path):
    """An nnU-Net v2 folder and a CSV of pairs written from real crops."""
    root = tmp_path / "Dataset002_Putamen"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    putamen = aal.segmentation.mask("Putamen_L")
    rows = ["image,segmentation"]
    for case_id, z0 in (("a", 55), ("b", 60), ("c", 65)):  # Putamen_L spans z 61-87, y 104-147, x 55-82
        box = (slice(z0, z0 + 30), slice(95, 155), slice(45, 95))
        grid = Grid(aal.image.array[box].shape, aal.image.spacing,
                    aal.image.grid.index_to_lps(np.array([z0, 95, 45])), aal.image.grid.direction)
        write_volume(Volume(np.array(aal.image.array[box]), grid), root / "imagesTr" / f"{case_id}_0000.nii.gz")
        write_mask(putamen[box], grid, root / "labelsTr" / f"{case_id}.nii.gz")
        rows.append(f"imagesTr/{case_id}_0000.nii.gz,labelsTr/{case_id}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "file_ending": ".nii.gz",
                                                   "labels": {"background": 0, "Putamen_L": 1}, "numTraining": 3}))
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    fp = fingerprint_dataset(root)
    assert fp.n_cases == 3 and fp.modality == "MR" and fp.labels == {1: "Putamen_L"}
    assert fp.spacing == (1.0, 1.0, 1.0) and fp.orientation == "RAS"
    assert fp.intensity_p0_5 < fp.intensity_mean < fp.intensity_p99_5
    from_csv = fingerprint_dataset(root / "pairs.csv")
    assert from_csv.modality == "unknown" and from_csv.box_voxels == fp.box_voxels
    assert from_csv.labels == {1: "1"}  # a bare mask: named by its value


# --------------------------------------------------------------------------- RAS reorientation
def test_ras_axes_of_common_orientations():
    assert ras_axes(np.diag([-1.0, -1.0, 1.0]).ravel()) == ((0, 1, 2), (False, False, False))  # RAS
    assert ras_axes(np.eye(3).ravel()) == ((0, 1, 2), (False, True, True))  # LPS: x, y reversed


def test_reorientation_matches_simpleitk_and_anatomy(aal):
    labels = aal.segmentation.labelmap
    moved, moved_labels = _as_asl(aal.image, labels)
    assert orientation_code(moved.grid.direction) == "ASL"
    ras = reorient_to_ras(moved)
    reference = sitk.DICOMOrient(_sitk(moved), "RAS")
    np.testing.assert_array_equal(ras.array, sitk.GetArrayFromImage(reference))
    assert ras.grid.same_as(Grid(reference.GetSize()[::-1], reference.GetSpacing()[::-1], reference.GetOrigin(),
                                 reference.GetDirection()))
    assert orientation_code(ras.grid.direction) == "RAS"
    # anatomy: x runs left -> right, y posterior -> anterior, z inferior -> superior
    ras_labels = reorient_to_ras(Volume(moved_labels, moved.grid)).array
    centre = lambda value: np.argwhere(ras_labels == value).mean(axis=0)  # noqa: E731  (z, y, x)
    names = {s.name: s.value for s in aal.segmentation.segments}
    assert centre(names["Hippocampus_L"])[2] < centre(names["Hippocampus_R"])[2]
    assert centre(names["Frontal_Sup_L"])[1] > centre(names["Occipital_Sup_L"])[1]
    assert centre(names["Precentral_L"])[0] > centre(names["Cerebelum_8_L"])[0]
    # the physical position of a voxel is kept
    k = tuple(int(round(c)) for c in centre(names["Hippocampus_L"]))
    assert ras_labels[k] == names["Hippocampus_L"]


# --------------------------------------------------------------------------- exact round trips
def _round_trip(image: Volume, mask: np.ndarray, fp: Fingerprint, size: int = 256):
    pre = preprocess(image, mask, fp, size)
    return pre, postprocess(pre.mask, pre.transform)


@pytest.mark.parametrize("structure", AAL_STRUCTURES)
def test_round_trip_is_exact_on_aal_structures(aal, fp_aal, structure):
    mask = aal.segmentation.mask(structure)
    pre, back = _round_trip(aal.image, mask, fp_aal)
    assert pre.image.shape == pre.mask.shape == (181, 256, 256)
    assert pre.image.dtype == np.float32 and pre.mask.dtype == bool
    assert pre.transform.exact and pre.transform.zoom == 1.0
    assert pre.mask.sum() == mask.sum()
    np.testing.assert_array_equal(back, mask)


def test_round_trip_is_exact_on_brain_masks_and_tissue(brain, tissue, fp_two):
    cases = [(brain.image, brain.segmentation.mask("Brain"))]
    cases += [(tissue.image, tissue.segmentation.mask(name)) for name in ("GreyMatter", "WhiteMatter")]
    for image, mask in cases:
        pre, back = _round_trip(image, mask, fp_two)
        assert pre.transform.exact
        np.testing.assert_array_equal(back, mask)


@pytest.mark.parametrize("layout", ["LPS", "ASL"])
def test_round_trip_is_exact_on_reoriented_storage(aal, fp_aal, layout):
    """LPS (x, y flipped) and sagittal-first storage of the same voxels: same slices, exact inverse."""
    mask = aal.segmentation.mask("Caudate_L")
    moved, moved_mask = (_as_lps if layout == "LPS" else _as_asl)(aal.image, mask)
    assert orientation_code(moved.grid.direction) == layout
    pre, back = _round_trip(moved, moved_mask, fp_aal)
    np.testing.assert_array_equal(back, moved_mask)
    ras_pre = preprocess(aal.image, mask, fp_aal)
    np.testing.assert_array_equal(pre.image, ras_pre.image)
    np.testing.assert_array_equal(pre.mask, ras_pre.mask)


# --------------------------------------------------------------------------- resampling cases
def _mni_resampled(spacing_xyz: tuple[float, float, float]) -> tuple[Volume, dict[str, np.ndarray]]:
    """MNI152 slices 70-109 resampled (linear) to another in-plane spacing; masks = probability > 0.5
    on that grid, so they hold detail finer than the 1 mm grid."""
    folder = sources.nilearn_folder()

    def read(name):
        image = sitk.ReadImage(str(folder / name), sitk.sitkFloat32)[:, :, 70:110]
        size = [int(round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_xyz)]
        out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing_xyz,
                            image.GetDirection())
        return out, sitk.GetArrayFromImage(out)

    t1, array = read(sources._MNI_T1)
    volume = Volume.from_array(array, spacing_xyz[::-1], t1.GetOrigin(), t1.GetDirection())
    masks = {label: read(name)[1] > 127.5 for label, name in (("GM", sources._MNI_GM), ("WM", sources._MNI_WM))}
    return volume, masks


def test_round_trip_with_anisotropic_in_plane_spacing(tissue):
    """Resampling happens (0.8 x 1.3 mm -> 1 mm and back, nearest): not exact, DSC >= 0.97."""
    fp = compute_fingerprint([tissue])
    volume, masks = _mni_resampled((1.3, 0.8, 1.0))
    for mask in masks.values():
        pre, back = _round_trip(volume, mask, fp)
        assert not pre.transform.exact and pre.transform.plane_spacing == (1.0, 1.0)
        assert pre.transform.plane_shape == (233, 198)
        assert back.shape == mask.shape and dice(back, mask) >= 0.97


def test_structure_larger_than_size_is_zoomed_out(brain):
    """Oversize rule: the brain (180 mm) in 128 x 128 -> spacing enlarged, whole brain kept."""
    fp = compute_fingerprint([brain])
    mask = brain.segmentation.mask("Brain")
    pre, back = _round_trip(brain.image, mask, fp, size=128)
    assert pre.transform.zoom < 1 and not pre.transform.exact
    assert pre.image.shape == (181, 128, 128)
    assert dice(back, mask) >= 0.97
    # the fingerprint's box sets the scale too: a small structure of this dataset is zoomed alike
    small = preprocess(brain.image, colin27("aal").segmentation.mask("Caudate_L"), fp, size=128)
    assert small.transform.zoom == pytest.approx(pre.transform.zoom)


def test_outside_the_crop_comes_back_as_background(aal):
    fp = compute_fingerprint([aal], label="Hippocampus_L")  # a whole-brain fingerprint would zoom out
    mask = aal.segmentation.mask("Hippocampus_L")
    pre = preprocess(aal.image, mask, fp, size=64)
    assert pre.transform.exact and pre.mask.sum() == mask.sum()
    everything = postprocess(np.ones((181, 64, 64), bool), pre.transform)
    assert everything.sum() == 181 * 64 * 64 and everything[mask].all()
    y0, x0 = pre.transform.crop_start
    assert not everything[:, :y0].any() and not everything[:, :, x0 + 64:].any()
    # only some slices predicted: the others are background
    picked = [60, 70]
    partial = postprocess(pre.mask[picked], pre.transform, slice_indices=picked)
    assert partial[picked].sum() == mask[picked].sum() and partial.sum() == mask[picked].sum()
    with pytest.raises(InputError):
        postprocess(pre.mask[:, :32], pre.transform)
    with pytest.raises(InputError):
        postprocess(pre.mask[:5], pre.transform)


# --------------------------------------------------------------------------- intensities
def test_mr_normalisation_is_0_to_1(aal, fp_aal):
    pre = preprocess(aal.image, aal.segmentation.mask("Thalamus_L"), fp_aal)
    assert pre.image.min() == 0.0 and pre.image.max() == 1.0
    assert pre.image[:, 0, 0].max() == 0.0  # padding = image minimum -> 0
    values = pre.image[pre.mask]
    assert 0.2 < values.mean() < 0.9


def test_ct_normalisation_uses_the_fingerprint(brain):
    """The CT path: clip to the fingerprint's foreground percentiles, z-score with its mean/std."""
    fp = compute_fingerprint([brain], modality="CT")
    assert fp.modality == "CT"
    mask = brain.segmentation.mask("Brain")
    pre = preprocess(brain.image, mask, fp)
    lo = (fp.intensity_p0_5 - fp.intensity_mean) / fp.intensity_std
    hi = (fp.intensity_p99_5 - fp.intensity_mean) / fp.intensity_std
    assert pre.image.min() >= lo - 1e-5 and pre.image.max() <= hi + 1e-5
    values = pre.image[pre.mask]
    assert abs(values.mean()) < 0.1 and abs(values.std() - 1) < 0.1


def test_ct_window():
    hu = np.array([-1000.0, -200.0, 0.0, 200.0, 3000.0])
    np.testing.assert_allclose(ct_window(hu, level=0, width=400), [0, 0, 0.5, 1, 1])
    assert ct_window(hu, 40, 80).dtype == np.float32
    with pytest.raises(ValueError):
        ct_window(hu, 0, 0)


def test_preprocess_without_a_mask(brain, fp_aal):
    pre = preprocess(brain.image, None, fp_aal)
    assert pre.mask is None and pre.image.shape == (181, 256, 256) and pre.transform.exact
    with pytest.raises(InputError, match="mask shape"):
        preprocess(brain.image, np.zeros((3, 3, 3), bool), fp_aal)
