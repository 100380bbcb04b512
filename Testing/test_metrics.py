"""Tests of SegQCLib.metrics: agreement with MONAI, hand-computed cases, conventions, SEG."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial.distance import cdist

from SegQCLib import metrics
from SegQCLib.metrics import (
    METRIC_KEYS,
    asd,
    dice,
    hd,
    hd95,
    instance_metrics,
    iou,
    mhd,
    mhd95,
    nemhd,
    seg_measure,
    slice_metrics,
    surface_distances,
    volume_metrics,
)

ANISO = (2.5, 0.8, 1.1)


# ----------------------------------------------------------------------------------------------
# Fixtures and independent (brute-force) reference implementations
# ----------------------------------------------------------------------------------------------

def _ellipsoids(shape, centres, radii) -> np.ndarray:
    """Union of axis-aligned ellipsoids (voxel units) on a grid of ``shape``."""
    grid = np.indices(shape, dtype=np.float64)
    out = np.zeros(shape, dtype=bool)
    for c, r in zip(centres, radii):
        out |= sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1.0
    return out


def _random_pair(seed: int, shape=(40, 60, 50)) -> tuple[np.ndarray, np.ndarray]:
    """A reference union of ellipsoids (2D or 3D) and a perturbed prediction (jittered ellipsoids ± blobs).

    Some centres lie near the array border so that the objects get clipped by it.
    """
    rng = np.random.default_rng(seed)
    n, ndim = int(rng.integers(1, 4)), len(shape)
    shape_arr = np.array(shape, dtype=float)
    centres = rng.uniform(0.1, 0.9, size=(n, ndim)) * shape_arr
    radii = rng.uniform(0.08, 0.3, size=(n, ndim)) * shape_arr
    ref = _ellipsoids(shape, centres, radii)
    pred = _ellipsoids(shape, centres + rng.normal(0, 1.5, size=(n, ndim)),
                       radii * rng.uniform(0.8, 1.2, size=(n, ndim)))
    blobs = ndi.binary_dilation(rng.random(shape) < 2e-4, iterations=2)
    pred = pred ^ (blobs & (rng.random(shape) < 0.7))
    assert ref.any() and pred.any()
    return pred, ref


def _brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels by explicit face-neighbour checks (outside the array = background)."""
    padded = np.pad(mask, 1)
    interior = padded.copy()
    for axis in range(mask.ndim):
        for step in (-1, 1):
            interior &= np.roll(padded, step, axis=axis)
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    return mask & ~interior[core]


def _brute_distances(pred, ref, spacing):
    """All-pairs directed surface distances (mm), for small arrays only."""
    p = np.argwhere(_brute_surface(pred)) * np.asarray(spacing)
    r = np.argwhere(_brute_surface(ref)) * np.asarray(spacing)
    d = cdist(p, r)
    return d.min(axis=1), d.min(axis=0)


def _monai(pred: np.ndarray, ref: np.ndarray, spacing) -> dict[str, float]:
    """MONAI's DSC, HD95 and symmetric ASD for one binary pair (batch 1, channel 1)."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    y_pred = torch.from_numpy(pred[None, None].astype(np.float32))
    y = torch.from_numpy(ref[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dsc": float(compute_dice(y_pred, y, include_background=True)[0, 0]),
            "hd95": float(compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95,
                                                     spacing=list(spacing))[0, 0]),
            "hd": float(compute_hausdorff_distance(y_pred, y, include_background=True, spacing=list(spacing))[0, 0]),
            # symmetric=True is the mean over both surfaces' distances, i.e. QANet eq. 9 = our asd
            # (MONAI's default symmetric=False would be the directed mean d(pred -> ref) only).
            "asd": float(compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                                          spacing=list(spacing))[0, 0]),
        }


# ----------------------------------------------------------------------------------------------
# Agreement with MONAI and with a brute-force implementation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_agrees_with_monai_on_random_3d_shapes(seed):
    pred, ref = _random_pair(seed)
    ours = volume_metrics(pred, ref, ANISO)
    theirs = _monai(pred, ref, ANISO)
    voxel = max(ANISO)
    assert ours["dsc"] == pytest.approx(theirs["dsc"], abs=1e-6)
    assert abs(ours["hd95"] - theirs["hd95"]) <= voxel
    assert abs(ours["asd"] - theirs["asd"]) <= voxel
    # Same surface definition and exact Euclidean distances: agreement is to float32 precision.
    assert ours["hd95"] == pytest.approx(theirs["hd95"], rel=1e-4, abs=1e-4)
    assert ours["asd"] == pytest.approx(theirs["asd"], rel=1e-4, abs=1e-4)
    assert hd(pred, ref, ANISO) == pytest.approx(theirs["hd"], rel=1e-4, abs=1e-4)


def test_agrees_with_monai_in_2d():
    pred, ref = _random_pair(3, shape=(80, 70))
    spacing = (0.7, 1.3)
    ours, theirs = volume_metrics(pred, ref, spacing), _monai(pred, ref, spacing)
    for key in ("dsc", "hd95", "asd"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4), key


def test_objects_touching_the_border_agree_with_monai():
    ref = np.zeros((12, 20, 20), dtype=bool)
    ref[:, 3:15, 0:10] = True          # touches three array faces
    pred = np.zeros_like(ref)
    pred[2:, 5:20, 0:12] = True
    ours, theirs = volume_metrics(pred, ref, ANISO), _monai(pred, ref, ANISO)
    for key in ("dsc", "hd95", "asd"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-4), key
    # A full slab: every voxel of a 1-voxel-thick object on the border is on the surface.
    slab = np.zeros((5, 6, 7), dtype=bool)
    slab[0] = True
    d_pred, d_ref = surface_distances(slab, slab)
    assert d_pred.shape == (42,) and d_ref.shape == (42,)


@pytest.mark.parametrize("seed", range(4))
def test_all_distance_metrics_match_brute_force(seed):
    pred, ref = _random_pair(100 + seed, shape=(12, 20, 16))
    d_pr, d_rp = _brute_distances(pred, ref, ANISO)
    ours_pr, ours_rp = surface_distances(pred, ref, ANISO)
    np.testing.assert_allclose(np.sort(ours_pr), np.sort(d_pr), atol=1e-9)
    np.testing.assert_allclose(np.sort(ours_rp), np.sort(d_rp), atol=1e-9)
    both = np.concatenate([d_pr, d_rp])
    p95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    expected_mhd = max(d_pr.mean(), d_rp.mean())
    assert hd(pred, ref, ANISO) == pytest.approx(both.max())
    assert hd95(pred, ref, ANISO) == pytest.approx(p95)
    assert mhd95(pred, ref, ANISO) == pytest.approx(p95)
    assert asd(pred, ref, ANISO) == pytest.approx(both.mean())
    assert mhd(pred, ref, ANISO) == pytest.approx(expected_mhd)
    assert nemhd(pred, ref, ANISO, tau=5.0) == pytest.approx(math.exp(-expected_mhd / 5.0))
    vm = volume_metrics(pred, ref, ANISO, tau=5.0)
    assert vm["nemhd"] == pytest.approx(math.exp(-expected_mhd / 5.0))
    assert vm["dsc"] == pytest.approx(2 * (pred & ref).sum() / (pred.sum() + ref.sum()))
    assert vm["iou"] == pytest.approx((pred & ref).sum() / (pred | ref).sum())


# ----------------------------------------------------------------------------------------------
# Hand-computable cases
# ----------------------------------------------------------------------------------------------

def _cube(shape=(30, 30, 30), start=(10, 10, 10), size=10) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("axis", [0, 2])
def test_shifted_cubes(k, axis):
    ref = _cube()
    start = [10, 10, 10]
    start[axis] += k
    pred = _cube(start=tuple(start))
    assert dice(pred, ref) == pytest.approx((10 - k) / 10)
    assert iou(pred, ref) == pytest.approx((10 - k) / (10 + k))
    # The far face of each cube is k voxels from the other cube's face, and nothing is farther.
    assert hd(pred, ref, ANISO) == pytest.approx(k * ANISO[axis])
    vm = volume_metrics(pred, ref, ANISO)
    assert vm["dsc"] == pytest.approx((10 - k) / 10)
    assert 0 < vm["asd"] <= vm["mhd"] <= vm["hd95"] <= k * ANISO[axis] + 1e-9


def test_mask_against_itself():
    pred, _ = _random_pair(7)
    vm = volume_metrics(pred, pred.astype(np.uint8), ANISO)
    assert vm == {"dsc": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "mhd": 0.0, "mhd95": 0.0, "nemhd": 1.0}
    assert list(vm) == list(METRIC_KEYS)


def test_empty_conventions():
    empty = np.zeros((8, 9, 10), dtype=bool)
    full = _cube((8, 9, 10), (2, 2, 2), 4)
    both = volume_metrics(empty, empty, ANISO)
    assert both == {"dsc": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0, "mhd": 0.0, "mhd95": 0.0, "nemhd": 1.0}
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert hd(empty, empty) == 0.0
    for pred, ref in ((empty, full), (full, empty)):
        one = volume_metrics(pred, ref, ANISO)
        assert one["dsc"] == 0.0 and one["iou"] == 0.0 and one["nemhd"] == 0.0
        for key in ("hd95", "asd", "mhd", "mhd95"):
            assert one[key] == math.inf, key
        assert hd(pred, ref) == math.inf and nemhd(pred, ref) == 0.0
    d_pr, d_rp = surface_distances(empty, full)
    assert d_pr.shape == (0,) and np.all(np.isinf(d_rp)) and d_rp.size > 0
    assert slice_metrics(empty, empty) == []


def test_2d_inputs():
    ref = np.zeros((20, 20), dtype=bool)
    ref[5:15, 5:15] = True
    pred = np.roll(ref, 3, axis=1)
    vm = volume_metrics(pred, ref, (1.0, 0.5))
    assert vm["dsc"] == pytest.approx(0.7)
    assert hd(pred, ref, (1.0, 0.5)) == pytest.approx(1.5)
    d_pr, d_rp = _brute_distances(pred, ref, (1.0, 0.5))
    assert vm["asd"] == pytest.approx(np.concatenate([d_pr, d_rp]).mean())


def test_spacing_follows_array_axis_order():
    ref = _cube()
    pred = _cube(start=(12, 10, 10))  # shifted by 2 along axis 0 (z)
    assert hd(pred, ref, (3.0, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd(pred, ref, (1.0, 1.0, 3.0)) == pytest.approx(2.0)
    assert hd(pred, ref, 2.0) == pytest.approx(4.0)  # a single number is isotropic


@pytest.mark.parametrize("axis", [0, 1])
def test_slice_metrics_rows_match_2d_volume_metrics(axis):
    pred, ref = _random_pair(11, shape=(30, 40, 36))
    ref[:, :, :] &= np.arange(30)[:, None, None] != 20   # a gap inside the object's z range
    pred[:, :, :] &= np.arange(30)[:, None, None] != 20
    ref[25:] = False                                      # slices where only pred has foreground
    rows = slice_metrics(pred, ref, ANISO, axis=axis)
    union = np.moveaxis(pred | ref, axis, 0)
    expected_indices = [i for i in range(union.shape[0]) if union[i].any()]
    assert [row["index"] for row in rows] == expected_indices
    if axis == 0:
        assert 20 not in expected_indices
    in_plane = tuple(s for a, s in enumerate(ANISO) if a != axis)
    for row in rows:
        i = row["index"]
        p2, r2 = np.take(pred, i, axis=axis), np.take(ref, i, axis=axis)
        expected = volume_metrics(p2, r2, in_plane)
        assert set(row) == {"index", *METRIC_KEYS}
        for key in METRIC_KEYS:
            assert row[key] == pytest.approx(expected[key]), (i, key)
    if axis == 0:
        only_pred = [row for row in rows if row["index"] >= 25]
        assert only_pred and all(row["dsc"] == 0.0 and row["hd95"] == math.inf for row in only_pred)


def test_input_errors():
    a = np.zeros((4, 5, 6), dtype=bool)
    with pytest.raises(ValueError, match="same shape"):
        dice(a, np.zeros((4, 5, 7), dtype=bool))
    with pytest.raises(ValueError, match="same shape"):
        volume_metrics(a, np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="2D or 3D"):
        volume_metrics(np.zeros((2, 3, 4, 5), bool), np.zeros((2, 3, 4, 5), bool))
    with pytest.raises(ValueError, match="3D"):
        slice_metrics(np.zeros((4, 5), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        volume_metrics(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="binary"):
        dice(np.full(a.shape, 2, dtype=np.uint8), a)
    with pytest.raises(ValueError, match="axis"):
        slice_metrics(a, a, axis=3)


# ----------------------------------------------------------------------------------------------
# SEG measure and instance metrics
# ----------------------------------------------------------------------------------------------

def _instances() -> np.ndarray:
    """A 2D label image with three objects of 12, 16 and 9 pixels (labels 1, 2, 3)."""
    labels = np.zeros((20, 20), dtype=np.int32)
    labels[1:4, 1:5] = 1
    labels[6:10, 6:10] = 2
    labels[12:15, 12:15] = 3
    return labels


def test_seg_identical_is_one():
    labels = _instances()
    assert seg_measure(labels, labels) == 1.0
    volume = np.stack([labels, labels * 0, labels])   # 3D works too
    assert seg_measure(volume, volume) == 1.0


def test_seg_exactly_half_covered_scores_zero():
    ref = np.zeros((6, 6), dtype=np.int32)
    ref[1, 1:5] = 1                  # 4 pixels
    ref[4, 0:3] = 2                  # 3 pixels, predicted perfectly
    pred = np.zeros_like(ref)
    pred[1, 1:3] = 7                 # covers exactly 2 of 4 pixels: not > 50%
    pred[4, 0:3] = 9
    assert seg_measure(pred, ref) == pytest.approx(0.5)
    pred[1, 3] = 7                   # now 3 of 4: IoU 3/4
    assert seg_measure(pred, ref) == pytest.approx((0.75 + 1.0) / 2)


def test_seg_merged_objects():
    ref = np.zeros((6, 10), dtype=np.int32)
    ref[2, 0:6] = 1                  # 6 pixels
    ref[2, 6:10] = 2                 # 4 pixels
    pred = (ref > 0).astype(np.int32) * 5    # one object covering both
    # Each GT object is fully inside the merged object: IoU 6/10 and 4/10.
    assert seg_measure(pred, ref) == pytest.approx((0.6 + 0.4) / 2)
    ids, scores = metrics.seg_per_object(pred, ref)
    assert ids.tolist() == [1, 2] and scores == pytest.approx([0.6, 0.4])


def test_seg_is_invariant_to_label_permutation():
    rng = np.random.default_rng(0)
    ref = _instances()
    pred = np.roll(ref, 1, axis=0)
    pred[pred == 3] = 0
    pred[0:2, 15:19] = 4             # a false positive object
    base = seg_measure(pred, ref)

    def permute(labels):
        new_ids = np.concatenate([[0], rng.permutation(np.arange(50, 50 + labels.max()))])
        return new_ids[labels]

    for _ in range(3):
        assert seg_measure(permute(pred), permute(ref)) == pytest.approx(base)
    assert 0 < base < 1


def test_seg_without_reference_objects_is_nan():
    ref = np.zeros((5, 5), dtype=np.int32)
    assert math.isnan(seg_measure(_instances()[:5, :5], ref))
    assert all(math.isnan(v) for v in instance_metrics(ref, ref).values())


def test_seg_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        seg_measure(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="non-negative"):
        seg_measure(-np.ones((3, 3), int), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="integer"):
        seg_measure(np.full((3, 3), 0.5), np.zeros((3, 3), int))


def test_instance_metrics():
    ref = _instances()
    same = instance_metrics(ref, ref * 3, spacing=(0.5, 2.0))
    assert same == {"seg": 1.0, "mhd95": 0.0, "asd": 0.0, "nemhd": 1.0}

    pred = ref.copy()
    pred[pred == 3] = 0                       # object 3 unmatched
    pred[pred == 2] = 0
    pred[7:11, 6:10] = 2                      # object 2 shifted by one row: 12/16 covered
    spacing = (0.5, 2.0)
    result = instance_metrics(pred, ref, spacing=spacing)
    obj2 = volume_metrics(pred == 2, ref == 2, spacing)
    assert result["seg"] == pytest.approx((1.0 + 12 / 20 + 0.0) / 3)
    assert result["seg"] == pytest.approx(seg_measure(pred, ref))
    # Distances averaged over the two matched pairs (object 1 is perfect); nemhd counts object 3 as 0.
    assert result["mhd95"] == pytest.approx(obj2["mhd95"] / 2)
    assert result["asd"] == pytest.approx(obj2["asd"] / 2)
    assert result["nemhd"] == pytest.approx((1.0 + obj2["nemhd"] + 0.0) / 3)
    assert metrics.seg_measure(pred.astype(np.float32), ref) == pytest.approx(result["seg"])
