"""Tests of SegQCLib.degrade: synthetic degradations (nnQC), perturbations (QANet) and sweeps."""
from __future__ import annotations


import numpy as np
import pytest
from scipy import ndimage as ndi

from SegQCLib import degrade as D
from SegQCLib.errors import InputError

N_TRIES = 200  # seeded tries per band for the hit-rate requirement (>= 95 % inside the band)


def ellipsoid(shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    """uint8 mask of an axis-aligned ellipse/ellipsoid (1 inside)."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1).astype(np.uint8)


@pytest.fixture(scope="module")
def mask3d() -> np.ndarray:
    """A 40x50x50 ellipsoid, about 16,800 voxels."""
    return ellipsoid((40, 50, 50), (20, 25, 25), (14, 18, 16))


@pytest.fixture(scope="module")
def slices2d(mask3d) -> list[np.ndarray]:
    """64x64 axial slices of an ellipsoid, from a 125-pixel cap to an 877-pixel middle section."""
    volume = ellipsoid((40, 64, 64), (20, 32, 30), (14, 20, 14))
    return [np.ascontiguousarray(volume[z]) for z in (7, 9, 12, 16, 20, 25, 30)]


@pytest.fixture(scope="module")
def three_class_2d() -> np.ndarray:
    """A 64x64 map: class 1 ring around class 2, plus a small separate class 3."""
    labels = ellipsoid((64, 64), (32, 30), (18, 22))
    labels[ellipsoid((64, 64), (32, 30), (9, 11)) > 0] = 2
    labels[ellipsoid((64, 64), (8, 56), (4, 5)) > 0] = 3
    return labels


@pytest.fixture(scope="module")
def cells() -> np.ndarray:
    """128x128 instance map: 5 disks (two of them touching) and a square with a spur and a notch."""
    labels = np.zeros((128, 128), dtype=np.int32)
    yy, xx = np.ogrid[:128, :128]
    for value, (y, x) in enumerate([(30, 30), (30, 52), (80, 80), (100, 30), (60, 105)], start=1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= 11 ** 2] = value
    labels[95:120, 95:120] = 6
    labels[106:108, 85:95] = 6  # thin spur: opening removes it
    labels[100:102, 100:115] = 0  # narrow notch: closing fills it
    return labels


def hit_rate(masks: list[np.ndarray], band: tuple[float, float]) -> float:
    """Fraction of N_TRIES seeded degrade_to_band calls (cycling through ``masks``) that land in ``band``."""
    hits = 0
    for seed in range(N_TRIES):
        mask = masks[seed % len(masks)]
        out, dsc = D.degrade_to_band(mask, band, seed=seed)
        assert out.shape == mask.shape and out.dtype == mask.dtype and out.any()
        assert dsc == pytest.approx(D.multiclass_dice(out, mask), abs=1e-12)
        hits += D.dsc_in_band(dsc, band)
    return hits / N_TRIES


# --------------------------------------------------------------------------------------------------
# degrade_to_band
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("band", D.DSC_BANDS)
def test_band_hit_rate_3d(mask3d, band):
    assert hit_rate([mask3d], band) >= 0.95


@pytest.mark.parametrize("band", D.DSC_BANDS)
def test_band_hit_rate_2d_slices(slices2d, band):
    assert hit_rate(slices2d, band) >= 0.95


@pytest.mark.parametrize("band", range(len(D.DSC_BANDS)))
def test_band_multiclass_and_tiny(three_class_2d, band):
    tiny = ellipsoid((32, 32), (16, 16), (1, 2))  # 7 pixels
    for seed in range(40):
        for mask in (three_class_2d, tiny):
            out, dsc = D.degrade_to_band(mask, band, seed=seed)
            assert D.dsc_in_band(dsc, band)
            assert set(np.unique(out)) <= set(np.unique(mask))


def test_band_brain_sized_volume():
    brain = ellipsoid((181, 217, 181), (90, 108, 90), (70, 85, 70))
    out, dsc = D.degrade_to_band(brain, (0.05, 0.10), seed=3)  # speed: benchmarks/bench_degrade.py
    assert D.dsc_in_band(dsc, 0) and out.any()


def test_band_bounds_and_validation(mask3d):
    assert D.dsc_in_band(0.05, 0) and not D.dsc_in_band(0.10, 0) and D.dsc_in_band(0.10, 1)
    assert D.dsc_in_band(0.95, 4) and not D.dsc_in_band(0.951, 4)
    with pytest.raises(ValueError):
        D.degrade_to_band(mask3d, (0.2, 0.3), seed=0)
    with pytest.raises(ValueError):
        D.degrade_to_band(mask3d, 5, seed=0)


@pytest.mark.parametrize("shape", [(30, 30), (10, 20, 20)])
def test_empty_mask_raises_input_error(shape):
    with pytest.raises(InputError, match="empty"):
        D.degrade_to_band(np.zeros(shape, dtype=np.uint8), 2, seed=0)


def test_multiclass_dice(three_class_2d):
    assert D.multiclass_dice(three_class_2d, three_class_2d) == 1.0
    missing = three_class_2d.copy()
    missing[missing == 3] = 0
    assert D.multiclass_dice(missing, three_class_2d) == pytest.approx(2 / 3)


# --------------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------------

RANDOM_OPS = {
    "holes": lambda m, rng: D.add_holes(m, rng, n_holes=3, radius_vox=2.0),
    "erosion": lambda m, rng: D.iterative_erosion(m, rng, iterations=3),
    "blobs": lambda m, rng: D.add_false_positive_blobs(m, rng, n_blobs=3, radius_vox=2.0),
    "collapse": D.collapse_classes,
    "swap": D.swap_classes,
    "band": lambda m, rng: D.degrade_to_band(m, 2, rng=rng)[0],
    "morphology": lambda m, rng: D.morphology_perturbation(m, rng, operation="dilation"),
    "nonrigid": D.nonrigid_perturbation,
    "qanet": D.qanet_perturbation,
    "merge": lambda m, rng: D.merge_neighbours(m, rng, n_merges=1, max_gap_vox=30.0),
}


@pytest.fixture(scope="module")
def many_classes_3d() -> np.ndarray:
    """A 30x40x40 map with 4 classes (also read as 4 instances)."""
    labels = np.zeros((30, 40, 40), dtype=np.int16)
    for value, centre in enumerate([(15, 12, 12), (15, 12, 28), (15, 28, 12), (15, 28, 28)], start=1):
        labels[ellipsoid(labels.shape, centre, (8, 7, 7)) > 0] = value
    return labels


@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
@pytest.mark.parametrize("dims", [2, 3])
def test_reproducible_and_input_untouched(name, dims, many_classes_3d):
    labels = many_classes_3d if dims == 3 else np.ascontiguousarray(many_classes_3d[15])
    before = labels.copy()
    op = RANDOM_OPS[name]
    first = op(labels, np.random.default_rng(7))
    again = op(labels, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(labels, before)
    assert first.shape == labels.shape and first.dtype == labels.dtype
    others = [op(labels, np.random.default_rng(seed)) for seed in range(8, 14)]
    assert any(not np.array_equal(first, other) for other in others)


def test_degrade_to_band_seed_matches_rng(mask3d):
    by_seed, dsc = D.degrade_to_band(mask3d, 3, seed=11)
    by_rng, dsc_rng = D.degrade_to_band(mask3d, 3, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(by_seed, by_rng)
    assert dsc == dsc_rng
    with pytest.raises(ValueError):
        D.degrade_to_band(mask3d, 3, seed=1, rng=np.random.default_rng(1))


# --------------------------------------------------------------------------------------------------
# nnQC operations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_add_holes_removes_inside(mask3d, dims):
    mask = mask3d if dims == 3 else np.ascontiguousarray(mask3d[20])
    out = D.add_holes(mask, np.random.default_rng(0), n_holes=2, radius_vox=2.0)
    assert out.sum() < mask.sum()
    assert np.all(out <= mask)  # only foreground was blanked
    np.testing.assert_array_equal(ndi.binary_fill_holes(out), mask.astype(bool))  # the outline is intact


@pytest.mark.parametrize("dims", [2, 3])
def test_iterative_erosion_shrinks_monotonically(mask3d, dims):
    mask = mask3d if dims == 3 else np.ascontiguousarray(mask3d[20])
    previous = mask
    for iterations in range(1, 6):
        out = D.iterative_erosion(mask, np.random.default_rng(1), iterations=iterations)
        assert out.sum() < previous.sum()
        assert np.all(out <= previous)
        previous = out


def test_false_positive_blobs_add_outside_near(mask3d):
    out = D.add_false_positive_blobs(mask3d, np.random.default_rng(2), n_blobs=3, radius_vox=3.0)
    added = (out > 0) & (mask3d == 0)
    assert added.sum() > 0
    np.testing.assert_array_equal(out[mask3d > 0], mask3d[mask3d > 0])
    assert set(np.unique(out[added])) == {1}
    distance = ndi.distance_transform_edt(mask3d == 0)
    assert distance[added].max() <= 2 * 3.0 + 1 + 3.0 + 1e-6  # seed reach + blob radius


def test_false_positive_blobs_never_overwrite(three_class_2d):
    out = D.add_false_positive_blobs(three_class_2d, np.random.default_rng(3), n_blobs=6, radius_vox=4.0)
    fg = three_class_2d > 0
    np.testing.assert_array_equal(out[fg], three_class_2d[fg])
    assert np.count_nonzero(out) > np.count_nonzero(three_class_2d)


def test_collapse_reduces_classes(three_class_2d):
    for seed in range(10):
        out = D.collapse_classes(three_class_2d, np.random.default_rng(seed))
        assert len(np.unique(out)) < len(np.unique(three_class_2d))
        np.testing.assert_array_equal(out > 0, three_class_2d > 0)


def test_swap_permutes(three_class_2d):
    for seed in range(10):
        out = D.swap_classes(three_class_2d, np.random.default_rng(seed))
        mapping = {}
        for c in (1, 2, 3):
            values = np.unique(out[three_class_2d == c])
            assert values.size == 1
            mapping[c] = int(values[0])
        assert sorted(mapping.values()) == [1, 2, 3] and mapping != {1: 1, 2: 2, 3: 3}
        np.testing.assert_array_equal(out > 0, three_class_2d > 0)


def test_collapse_and_swap_noop_on_single_class(mask3d):
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(D.collapse_classes(mask3d, rng), mask3d)
    np.testing.assert_array_equal(D.swap_classes(mask3d, rng), mask3d)


# --------------------------------------------------------------------------------------------------
# QANet perturbations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["erosion", "dilation", "opening", "closing"])
def test_morphology_changes_mask(cells, operation):
    out = D.morphology_perturbation(cells, np.random.default_rng(0), operation=operation, kernel_radius=1)
    assert not np.array_equal(out, cells)
    assert set(np.unique(out)) <= set(np.unique(cells))
    fg, before = out > 0, cells > 0
    if operation in ("erosion", "opening"):
        assert np.all(fg <= before) and np.all(out[fg] == cells[fg])
    else:  # growth never overwrites another instance
        assert np.all(fg >= before) and np.all(out[before] == cells[before])


def test_random_morphology_is_identity_or_changes(cells):
    changed = 0
    for seed in range(20):
        out = D.morphology_perturbation(cells, np.random.default_rng(seed))
        changed += not np.array_equal(out, cells)
    assert changed >= 10  # 4 of 5 states change this map


@pytest.mark.parametrize("dims", [2, 3])
def test_nonrigid_keeps_labels_and_bounded(cells, many_classes_3d, dims):
    labels = cells if dims == 2 else many_classes_3d
    bound = 20.0 if dims == 2 else 4.0 + np.sqrt(3) / 2  # 2D: |v| about 3 px, 99.9 % under 12
    for seed in range(3):
        out = D.nonrigid_perturbation(labels, np.random.default_rng(seed))
        assert set(np.unique(out)) <= set(np.unique(labels))
        assert not np.array_equal(out, labels)
        for value in np.unique(out[out > 0]):
            distance = ndi.distance_transform_edt(labels != value)
            assert distance[out == value].max() <= bound


def test_qanet_perturbation_labels_subset(cells):
    out = D.qanet_perturbation(cells, np.random.default_rng(4))
    assert set(np.unique(out)) <= set(np.unique(cells))


def test_merge_neighbours_reduces_count(cells, many_classes_3d):
    out = D.merge_neighbours(cells, np.random.default_rng(0), n_merges=1, max_gap_vox=0.0)
    assert len(np.unique(out)) == len(np.unique(cells)) - 1
    np.testing.assert_array_equal(np.unique(out[(cells == 1) | (cells == 2)]), [1])  # the touching pair
    far = D.merge_neighbours(many_classes_3d, np.random.default_rng(0), n_merges=2, max_gap_vox=4.0)
    assert len(np.unique(far)) == len(np.unique(many_classes_3d)) - 2
    assert np.all((far > 0) >= (many_classes_3d > 0))  # gaps are bridged, nothing is lost
    none = D.merge_neighbours(many_classes_3d, np.random.default_rng(0), n_merges=1, max_gap_vox=0.0)
    np.testing.assert_array_equal(none, many_classes_3d)  # no instances touch: nothing to merge


# --------------------------------------------------------------------------------------------------
# Sweeps
# --------------------------------------------------------------------------------------------------


def test_erosion_dilation_sweep(mask3d):
    radii = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
    sweep = D.erosion_dilation_sweep(mask3d, radii, spacing=(1.0, 1.0, 1.0))
    assert [r for r, _ in sweep] == radii
    volumes = [int(m.sum()) for _, m in sweep]
    assert volumes == sorted(volumes) and len(set(volumes)) == len(volumes)
    np.testing.assert_array_equal(sweep[3][1], mask3d > 0)
    cross = ndi.generate_binary_structure(3, 1)
    np.testing.assert_array_equal(sweep[2][1], ndi.binary_erosion(mask3d, cross))
    np.testing.assert_array_equal(sweep[4][1], ndi.binary_dilation(mask3d, cross))


def test_sweep_uses_physical_spacing(mask3d):
    (_, iso), (_, aniso) = D.erosion_dilation_sweep(mask3d, [2.0], (1.0, 1.0, 1.0)) + \
        D.erosion_dilation_sweep(mask3d, [2.0], (2.0, 1.0, 1.0))
    assert aniso.sum() < iso.sum()  # 2 mm is one voxel along z instead of two
