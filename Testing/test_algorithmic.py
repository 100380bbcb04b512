"""SegQCLib.data.algorithmic: real algorithmic segmentations of real images, with their true DSC.

Real data only (Colin27 AAL and brain mask from mricron-data, MNI152 brain from nilearn). The DSC
bounds asserted here were measured first (seeds 0-9, see the module docstring): thresholding and
region growing of Caudate_L / Thalamus_L span 0.1-0.9, the affine brain registrations reach
0.93 (MNI152 -> Colin27) and 0.95 (Colin27 -> MNI152). Each registration (~6 s on 2 cores) runs
once: module fixtures hold its result and the module's own transform cache serves the rest.
"""
from __future__ import annotations


import numpy as np
import pytest

from SegQCLib.data import available_sources, colin27, mni152
from SegQCLib.data.algorithmic import (_cached_transform, algorithmic_segmentations, region_growing_segmentation,
                                       registration_segmentation, registration_transform, threshold_segmentation)
from SegQCLib.metrics import dice

AVAILABLE = available_sources()
needs_colin = pytest.mark.skipif(not AVAILABLE["colin27"], reason="apt-get install mricron-data")
needs_both = pytest.mark.skipif(not (AVAILABLE["colin27"] and AVAILABLE["mni152"]),
                                reason="apt-get install mricron-data; pip install nilearn")

METHODS = {"threshold": threshold_segmentation, "region_growing": region_growing_segmentation}
SEEDS = range(10)


@pytest.fixture(scope="module")
def aal():
    return colin27("aal")


@pytest.fixture(scope="module")
def colin_brain():
    return colin27("brain")


@pytest.fixture(scope="module")
def mni_brain():
    return mni152("brain")


@pytest.fixture(scope="module")
def mni_to_colin(mni_brain, colin_brain):
    """MNI152's brain mask registered (affine) onto Colin27 (speed: not a unit test's business)."""
    return registration_segmentation(mni_brain, colin_brain, "Brain", np.random.default_rng(0), kind="affine")


# --------------------------------------------------------------------------- threshold, region growing
@needs_colin
@pytest.mark.parametrize("method", sorted(METHODS))
def test_mask_is_bool_on_the_grid_and_seeded(aal, method):
    segment = METHODS[method]
    truth = aal.segmentation.mask("Caudate_L")
    truth_before, image_before = truth.copy(), aal.image.array.copy()
    first = segment(aal.image, truth, np.random.default_rng(3))
    assert first.dtype == bool and first.shape == aal.image.shape
    assert first.any()
    again = segment(aal.image, truth, np.random.default_rng(3))
    np.testing.assert_array_equal(first, again)
    other = segment(aal.image, truth, np.random.default_rng(4))
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(truth, truth_before)  # inputs are read, never changed
    np.testing.assert_array_equal(aal.image.array, image_before)


@needs_colin
@pytest.mark.parametrize("structure", ["Caudate_L", "Thalamus_L"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_dsc_spreads_over_seeds(aal, method, structure):
    """Measured over seeds 0-9: Caudate_L 0.11-0.73 (threshold), 0.13-0.83 (region growing);
    Thalamus_L 0.34-0.86, 0.30-0.88."""
    truth = aal.segmentation.mask(structure)
    scores = np.array([dice(METHODS[method](aal.image, truth, np.random.default_rng(s)), truth) for s in SEEDS])
    assert scores.max() - scores.min() >= 0.3, scores
    assert scores.max() > 0.6, scores
    assert scores.min() > 0.0, scores  # real masks, none empty for these seeds
    assert len(np.unique(np.round(scores, 4))) >= 8, scores  # distinct masks, not a few repeats


@needs_colin
def test_masks_stay_near_the_structure(aal):
    """Both methods only label voxels in a box around the structure (margins of at most 10 mm)."""
    truth = aal.segmentation.mask("Thalamus_L")
    zyx = np.argwhere(truth)
    lo, hi = zyx.min(axis=0) - 10, zyx.max(axis=0) + 10
    for segment in METHODS.values():
        for seed in range(3):
            found = np.argwhere(segment(aal.image, truth, np.random.default_rng(seed)))
            assert (found >= lo).all() and (found <= hi).all()


@needs_colin
def test_bad_truth_is_refused(aal):
    empty = np.zeros(aal.image.shape, dtype=bool)
    for segment in METHODS.values():
        with pytest.raises(ValueError, match="empty"):
            segment(aal.image, empty, np.random.default_rng(0))
        with pytest.raises(ValueError, match="shape"):
            segment(aal.image, np.ones((4, 4, 4), dtype=bool), np.random.default_rng(0))


@needs_colin
def test_global_random_state_is_untouched(aal):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    truth = aal.segmentation.mask("Putamen_L")
    algorithmic_segmentations(aal, "Putamen_L", np.random.default_rng(0), 4, methods=("threshold", "region_growing"))
    threshold_segmentation(aal.image, truth, np.random.default_rng(1))
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# --------------------------------------------------------------------------- registration
@needs_both
def test_registration_mni152_brain_onto_colin27(mni_to_colin, colin_brain):
    mask = mni_to_colin
    assert mask.dtype == bool and mask.shape == colin_brain.image.shape
    assert dice(mask, colin_brain.segmentation.mask("Brain")) > 0.85  # measured 0.93


@needs_both
def test_registration_is_cached_and_seeded(mni_to_colin, mni_brain, colin_brain):
    mask = mni_to_colin
    hits = _cached_transform.cache_info().hits
    again = registration_segmentation(mni_brain, colin_brain, "Brain", np.random.default_rng(7), kind="affine")
    assert _cached_transform.cache_info().hits > hits  # the transform came from the cache
    np.testing.assert_array_equal(mask, again)
    assert registration_transform(mni_brain, colin_brain, "affine") is registration_transform(
        mni_brain, colin_brain, "affine")
    with pytest.raises(ValueError, match="kind"):
        registration_segmentation(mni_brain, colin_brain, "Brain", np.random.default_rng(0), kind="bspline")


@needs_both
def test_registration_colin27_brain_onto_mni152(colin_brain, mni_brain):
    mask = registration_segmentation(colin_brain, mni_brain, "Brain", np.random.default_rng(0), kind="affine")
    assert mask.dtype == bool and mask.shape == mni_brain.image.shape
    assert dice(mask, mni_brain.segmentation.mask("Brain")) > 0.85  # measured 0.95


# --------------------------------------------------------------------------- the mix
@needs_colin
def test_algorithmic_segmentations_of_a_nucleus(aal):
    truth = aal.segmentation.mask("Caudate_L")
    out = algorithmic_segmentations(aal, "Caudate_L", np.random.default_rng(5), 6)
    assert len(out) == 6
    families = set()
    for name, mask, score in out:
        family = name.split(":")[0]
        assert family in ("threshold", "region_growing")  # no atlas holds Caudate_L: no registration
        families.add(family)
        assert mask.dtype == bool and mask.shape == aal.image.shape
        assert score == pytest.approx(dice(mask, truth))
        assert 0.0 <= score <= 1.0
    assert families == {"threshold", "region_growing"}
    again = algorithmic_segmentations(aal, "Caudate_L", np.random.default_rng(5), 6)
    assert [n for n, _, _ in again] == [n for n, _, _ in out]
    for (_, first, _), (_, second, _) in zip(out, again):
        np.testing.assert_array_equal(first, second)


@needs_both
def test_algorithmic_segmentations_by_registration(mni_to_colin, colin_brain, mni_brain):
    mask = mni_to_colin
    (name, found, score), = algorithmic_segmentations(
        colin_brain, "Brain", np.random.default_rng(0), 1, methods=("registration",), atlases=[mni_brain],
        registration_kinds=("affine",), registration_variants=1)
    assert name == "registration:affine:mni152:v0"
    np.testing.assert_array_equal(found, mask)
    assert score > 0.85
    with pytest.raises(ValueError, match="distinct"):  # one registration cannot give two different masks
        algorithmic_segmentations(colin_brain, "Brain", np.random.default_rng(0), 2, methods=("registration",),
                                  atlases=[mni_brain], registration_kinds=("affine",), registration_variants=1)


@needs_both
def test_no_atlas_no_registration(aal):
    with pytest.raises(ValueError, match="distinct"):
        algorithmic_segmentations(aal, "Caudate_L", np.random.default_rng(0), 1, methods=("registration",))
    with pytest.raises(ValueError, match="unknown methods"):
        algorithmic_segmentations(aal, "Caudate_L", np.random.default_rng(0), 1, methods=("grabcut",))
    assert algorithmic_segmentations(aal, "Caudate_L", np.random.default_rng(0), 0) == []
