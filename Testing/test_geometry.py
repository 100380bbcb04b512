"""Geometry invariance, tested metamorphically: the same anatomy stored another way gives the same answer.

Copies are made here from MNI152 (nilearn) and its brain mask with SegQCLib.data.regrid: axes permuted
(sagittal / coronal array orders) and flipped (other axis codes in the header) are exact copies of the
voxels, so results must be equal once slice indices are mapped back; a shifted origin moves the head
in scanner space, which a registration must not mind. The one slice contract: per-slice rows are along
the array axis closest to superior-inferior, named ``slice_axis``.
"""
from __future__ import annotations

import numpy as np
import pytest

from SegQCLib.data import regrid
from SegQCLib.degrade import degrade_to_band
from SegQCLib.errors import InputError
from SegQCLib.fingerprint import slice_axis
from SegQCLib.metrics import dice
from SegQCLib.qc import available_models, compare_to_reference, load_model
from SegQCLib.volume import Volume

INSTALLED = {m.name for m in available_models()}


@pytest.fixture(scope="module")
def brain():
    from SegQCLib.data.sources import mni152

    subject = mni152("brain")
    truth = subject.segmentation.mask("Brain")
    degraded = degrade_to_band(truth.astype(np.uint8), (0.5, 0.75), seed=1)[0] > 0
    return subject.image, truth, degraded


def _copies(image, masks):
    """(name, copy image, copy masks, map: original slice index -> copy slice index along its slice axis)."""
    n = image.shape[0]
    return [
        ("sagittal array order", *regrid.permuted(image, masks, (2, 0, 1)), lambda k: k),
        ("coronal array order", *regrid.permuted(image, masks, (1, 0, 2)), lambda k: k),
        ("flipped z and x", *regrid.flipped(image, masks, (0, 2)), lambda k: n - 1 - k),
    ]


def test_the_slice_axis_is_the_one_closest_to_superior_inferior(brain):
    image, truth, _ = brain
    assert slice_axis(image.grid) == 0
    sagittal, _ = regrid.permuted(image, [truth], (2, 0, 1))  # array (x, z, y): S-I is now axis 1
    assert slice_axis(sagittal.grid) == 1
    oblique, _ = regrid.resampled(image, [], spacing=(3.0, 3.0, 3.0), rotation_deg=(15, 0, 10))
    assert slice_axis(oblique.grid) == 0  # tilted 15 degrees: still nearest to axial


def test_true_metrics_per_slice_follow_the_contract(brain):
    image, truth, degraded = brain
    original = compare_to_reference(degraded, truth, image.spacing, "Brain", slice_axis=slice_axis(image.grid))
    copy, (t, d) = regrid.permuted(image, [truth, degraded], (2, 0, 1))
    moved = compare_to_reference(d, t, copy.spacing, "Brain", slice_axis=slice_axis(copy.grid))
    assert moved.extra["slice_axis"] == 1
    assert [r["index"] for r in moved.slices] == [r["index"] for r in original.slices]
    np.testing.assert_allclose([r["dsc"] for r in moved.slices], [r["dsc"] for r in original.slices])


@pytest.mark.skipif("sentinel-brain-mr" not in INSTALLED, reason="no shipped Sentinel model")
def test_sentinel_is_invariant_to_array_order_and_axis_codes(brain):
    image, truth, degraded = brain
    model = load_model("sentinel-brain-mr", "cpu")
    base = model.assess(image, degraded, "Brain")
    rows = {r["index"]: r["dsc"] for r in base.slices}
    for name, copy, (t, d), to_copy in _copies(image, [truth, degraded]):
        result = model.assess(copy, d, "Brain")
        assert result.volume["dsc"] == pytest.approx(base.volume["dsc"], abs=1e-5), name
        assert result.extra["slice_axis"] == slice_axis(copy.grid), name
        copied = {r["index"]: r["dsc"] for r in result.slices}
        assert copied.keys() == {to_copy(k) for k in rows}, name
        for k, value in rows.items():
            assert copied[to_copy(k)] == pytest.approx(value, abs=1e-5), name


@pytest.mark.skipif("atlas-brain-mr" not in INSTALLED, reason="atlas-brain-mr needs mricron-data")
def test_atlas_pgt_does_not_mind_where_the_head_lies_in_the_scanner(brain):
    """A scanner's origin can put the head 50 mm from the atlas's: the registration starts from the
    images' centres of mass, so the pGT is as good as on the original (it was 0.82 vs 0.98 from an
    identity start at a 40 mm shift)."""
    image, truth, _ = brain
    model = load_model("atlas-brain-mr", "cpu")
    base = dice(model.pseudo_ground_truth(image, "Brain"), truth)
    copy, (t,) = regrid.shifted(image, [truth], (40.0, -30.0, 25.0))
    moved = dice(model.pseudo_ground_truth(copy, "Brain"), t)
    assert base > 0.95 and abs(moved - base) <= 0.02


@pytest.mark.skipif("atlas-brain-mr" not in INSTALLED, reason="atlas-brain-mr needs mricron-data")
def test_atlas_refuses_to_score_when_its_registration_fails_its_check():
    """An image without a head (noise) cannot take the atlas: the model says so instead of giving a
    pseudo-DSC against a misplaced pGT."""
    rng = np.random.default_rng(0)
    noise = Volume.from_array(rng.gamma(2.0, 50.0, (96, 110, 90)).astype(np.float32), spacing=(2.0, 2.0, 2.0),
                              name="noise.nii.gz")
    mask = np.zeros(noise.shape, bool)
    mask[30:60, 30:70, 30:60] = True
    with pytest.raises(InputError, match="could not be registered onto it.*not scored"):
        load_model("atlas-brain-mr", "cpu").assess(noise, mask, "Brain")


@pytest.mark.skipif("atlas-brain-mr" not in INSTALLED, reason="atlas-brain-mr needs mricron-data")
def test_hermes_refines_the_slices_the_model_flags_whatever_the_array_order(brain):
    """HERMES works along the QC result's slice axis: on a sagittal-stored copy it refines the same
    anatomical slices as on the original, and the refined mask maps back onto the original's."""
    from SegQCLib.refine.loop import refine_volume
    from SegQCLib.refine.segmenters import GrabCutSegmenter

    image, truth, degraded = brain
    model = load_model("atlas-brain-mr", "cpu")
    slices = [60, 90, 120]
    base = refine_volume(image, degraded, "Brain", model, GrabCutSegmenter(), slices=slices, max_iterations=4)
    copy, (t, d) = regrid.permuted(image, [truth, degraded], (2, 0, 1))
    moved = refine_volume(copy, d, "Brain", model, GrabCutSegmenter(), slices=slices, max_iterations=4)
    assert [tr.index for tr in moved.traces] == slices
    back = np.transpose(moved.mask, np.argsort((2, 0, 1)))  # the copy's array order undone
    for k in slices:
        assert dice(back[k], base.mask[k]) > 0.97
        assert dice(back[k], truth[k]) > dice(degraded[k], truth[k])  # it did refine towards the truth
    untouched = [k for k in range(image.shape[0]) if k not in slices]
    np.testing.assert_array_equal(back[untouched], degraded[untouched])


def _intensity_copies(image):
    return [("x 7.3 + 100", regrid.rescaled(image), 1e-4),
            ("12-bit integers", regrid.rescaled(image, 4095.0 / float(image.array.max()), 0.0, np.uint16), 2e-3),
            ("bias field", regrid.bias_field(image), 0.03),
            ("Rician noise", regrid.rician_noise(image), 0.03),
            ("gamma 0.7", regrid.gamma_contrast(image), 0.03)]


@pytest.mark.skipif("sentinel-brain-mr" not in INSTALLED, reason="no shipped Sentinel model")
def test_sentinel_reads_any_scanners_units_the_same(brain):
    """Scale and offset of the raw units change nothing (the normalisation ignores the background's value,
    not just zeros); bias, noise and a contrast change stay within the stated 0.03."""
    image, truth, degraded = brain
    model = load_model("sentinel-brain-mr", "cpu")
    base = model.assess(image, degraded, "Brain").volume["dsc"]
    for name, copy, tolerance in _intensity_copies(image):
        assert model.assess(copy, degraded, "Brain").volume["dsc"] == pytest.approx(base, abs=tolerance), name


@pytest.mark.skipif("atlas-brain-mr" not in INSTALLED, reason="atlas-brain-mr needs mricron-data")
def test_atlas_pgt_reads_any_scanners_units_the_same(brain):
    image, truth, _ = brain
    model = load_model("atlas-brain-mr", "cpu")
    base = dice(model.pseudo_ground_truth(image, "Brain"), truth)
    for name, copy, tolerance in _intensity_copies(image)[::2]:  # units, bias field, gamma: a registration each
        assert abs(dice(model.pseudo_ground_truth(copy, "Brain"), truth) - base) <= max(tolerance, 0.01), name
