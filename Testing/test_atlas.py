"""Atlas-registration QC (``atlas-brain-mr``): pGT quality, pseudo-scores, no use of the image's own labels."""
from __future__ import annotations

import numpy as np
import pytest

from SegQCLib.data.algorithmic import _cached_transform
from SegQCLib.data.sources import colin27, mni152
from SegQCLib.degrade import degrade_to_band
from SegQCLib.errors import InputError
from SegQCLib.metrics import dice
from SegQCLib.qc import available_models, load_model


@pytest.fixture(scope="module")
def model():
    return load_model("atlas-brain-mr", "cpu")


def test_registered_as_a_reconstruction_model():
    entry = {m.name: m for m in available_models()}["atlas-brain-mr"]
    assert entry.kind == "reconstruction"


def test_pgt_of_a_held_out_subject_and_pseudo_dsc_tracks_true_dsc(model):
    subject = mni152("brain")  # the atlas is Colin27: MNI152's own mask is never used
    truth = subject.segmentation.mask("Brain")
    result = model.assess(subject.image, truth, "Brain")
    assert result.extra["atlas"] == "mricron-data:ch2bet"
    assert result.pgt.shape == truth.shape and result.pgt.dtype == bool
    assert dice(result.pgt, truth) > 0.9
    hits_before = _cached_transform.cache_info().hits
    for band, seed in (((0.05, 0.10), 1), ((0.5, 0.75), 2), ((0.75, 0.95), 3)):
        degraded = degrade_to_band(truth.astype(np.uint8), band, seed=seed)[0] > 0
        scored = model.assess(subject.image, degraded, "Brain")
        assert abs(scored.volume["dsc"] - dice(degraded, truth)) < 0.1
        flags = [(row["dsc"] < 0.8) == (dice(degraded[row["index"]], truth[row["index"]]) < 0.8)
                 for row in scored.slices]
        assert np.mean(flags) > 0.8  # measured 0.87-0.99; slices near the 0.8 line are the hard ones
    assert _cached_transform.cache_info().hits >= hits_before + 3  # registered once, reused


def test_an_atlas_equal_to_the_image_is_skipped(model):
    subject = colin27("brain")
    result = model.assess(subject.image, subject.segmentation.mask("Brain"), "Brain")
    assert result.extra["atlas"].startswith("nilearn:")  # Colin27's own brain mask is not its pGT
    with pytest.raises(InputError, match="no atlas other than the image itself"):
        model.assess(subject.image, subject.segmentation.mask("Brain"), "Hippocampus_L")


def test_cli_writes_the_pgt(tmp_path):
    from SegQCLib.cli import main
    from SegQCLib.io import read_segmentation, write_mask, write_volume

    subject = mni152("brain")
    image, seg, pgt = tmp_path / "t1.nii.gz", tmp_path / "brain.nii.gz", tmp_path / "pgt.nii.gz"
    write_volume(subject.image, image)
    write_mask(subject.segmentation.mask("Brain"), subject.image.grid, seg)
    assert main(["qc", str(image), str(seg), "--model", "atlas-brain-mr", "--name", "Brain", "--pgt", str(pgt)]) == 0
    written = read_segmentation(pgt).layers[0] > 0
    assert dice(written, subject.segmentation.mask("Brain")) > 0.9
