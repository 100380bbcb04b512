"""Volumes and IO on real files: NIfTI, NRRD, MHA, .seg.nrrd (names kept), DICOM series, label tables."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegQCLib.errors import InputError
from SegQCLib.io import (Segmentation, align_to_grid, binary_mask, read_label_table, read_segmentation,
                         read_volume, write_mask, write_segmentation, write_volume)
from SegQCLib.volume import Grid, Volume, check_same_grid

TEMPLATES = Path("/usr/share/mricron/templates")
needs_mricron = pytest.mark.skipif(not (TEMPLATES / "aal.nii.gz").exists(), reason="apt-get install mricron-data")


@pytest.fixture(scope="module")
def aal() -> Segmentation:
    return read_segmentation(TEMPLATES / "aal.nii.gz")


def _oblique_image(shape=(12, 20, 16)) -> sitk.Image:
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
    image.SetSpacing((0.7, 0.9, 2.5))
    image.SetOrigin((-10.0, 20.5, 3.25))
    angle = 0.3
    image.SetDirection((np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle), 0, 0, 0, -1))
    return image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_write_round_trip_keeps_array_and_geometry(tmp_path: Path, suffix: str) -> None:
    src = tmp_path / f"img{suffix}"
    sitk.WriteImage(_oblique_image(), str(src))
    volume = read_volume(src)
    expected = sitk.GetArrayFromImage(_oblique_image())
    np.testing.assert_array_equal(volume.array, expected)
    assert volume.spacing == pytest.approx((2.5, 0.9, 0.7))  # (z, y, x)
    out = write_volume(volume, tmp_path / f"copy{suffix}")
    again = read_volume(out)
    np.testing.assert_array_equal(again.array, volume.array)
    assert again.grid.same_as(volume.grid)


def test_index_to_ras_matches_sitk(tmp_path: Path) -> None:
    image = _oblique_image()
    grid = Grid(image.GetSize()[::-1], image.GetSpacing()[::-1], image.GetOrigin(), image.GetDirection())
    lps = image.TransformContinuousIndexToPhysicalPoint((3.0, 5.0, 7.0))  # (i, j, k)
    np.testing.assert_allclose(grid.index_to_lps(np.array([7.0, 5.0, 3.0])), lps, atol=1e-9)
    np.testing.assert_allclose(grid.index_to_ras(np.array([7.0, 5.0, 3.0])), [-lps[0], -lps[1], lps[2]], atol=1e-9)


@needs_mricron
def test_aal_names_come_from_sidecar_table(aal: Segmentation) -> None:
    assert len(aal.segments) == 116
    assert aal.find("hippocampus_l").value == 37  # case-insensitive name
    assert aal.find("38").name == "Hippocampus_R"  # by value
    mask = aal.mask("Hippocampus_L")
    assert mask.dtype == bool and mask.sum() == np.count_nonzero(aal.labelmap == 37)


@needs_mricron
def test_masks_by_value_and_name_agree(aal: Segmentation) -> None:
    masks = aal.masks(["Caudate_L", 72])
    assert set(masks) == {"Caudate_L", "Caudate_R"}
    np.testing.assert_array_equal(masks["Caudate_R"], aal.labelmap == 72)


def test_seg_nrrd_round_trip_keeps_names_values_and_layers(tmp_path: Path) -> None:
    grid = Grid((6, 8, 10), (2.0, 1.0, 0.5), (1.0, 2.0, 3.0))
    labelmap = np.zeros(grid.shape, np.uint8)
    labelmap[1:3, 2:5, 2:6] = 3
    labelmap[3:5, 4:7, 5:9] = 7
    seg = Segmentation.from_labelmap(labelmap, grid, {3: "liver", 7: "left kidney"})
    path = write_segmentation(seg, tmp_path / "s.seg.nrrd")
    back = read_segmentation(path)
    assert [(s.name, s.value) for s in back.segments] == [("liver", 3), ("left kidney", 7)]
    np.testing.assert_array_equal(back.labelmap, labelmap)
    assert back.grid.same_as(grid)
    # overlapping segments: two layers
    layers = np.stack([labelmap == 3, (labelmap > 0)]).astype(np.uint8)
    two = Segmentation(layers, grid, [seg.segments[0].__class__("liver", 1, 0),
                                      seg.segments[0].__class__("abdomen", 1, 1)], "two")
    back2 = read_segmentation(write_segmentation(two, tmp_path / "two.seg.nrrd"))
    np.testing.assert_array_equal(back2.mask("abdomen"), labelmap > 0)
    np.testing.assert_array_equal(back2.mask("liver"), labelmap == 3)


def test_dicom_series_is_read_as_a_volume(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 1000, size=(5, 16, 12)).astype(np.int16)
    series = tmp_path / "dicom"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        slice_image = sitk.GetImageFromArray(array[k])
        slice_image.SetSpacing((0.8, 0.8))
        for tag, value in (("0010|0010", "Phantom"), ("0020|000d", "1.2.3"), ("0020|000e", "1.2.3.4"),
                           ("0020|0032", f"0\\0\\{k * 2.0}"), ("0020|0013", str(k + 1)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0008|0060", "CT"), ("0018|0050", "2.0")):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(series / f"{k:03d}.dcm"))
        writer.Execute(slice_image)
    volume = read_volume(series)
    np.testing.assert_array_equal(volume.array, array.astype(np.float32))
    assert volume.spacing == pytest.approx((2.0, 0.8, 0.8))


def test_label_table_formats(tmp_path: Path) -> None:
    table = tmp_path / "labels.txt"
    table.write_text("# comment\n0 Background 0 0 0 0\n1 Liver 200 0 0 255\n2 \"Spleen\" 0 200 0 255\n")
    assert read_label_table(table) == {1: "Liver", 2: "Spleen"}
    (tmp_path / "bad.txt").write_text("no table here\n")
    with pytest.raises(InputError, match="bad.txt: no 'value name'"):
        read_label_table(tmp_path / "bad.txt")


def test_align_to_grid_pads_a_cropped_segmentation_exactly() -> None:
    grid = Grid((10, 12, 14), (2.0, 1.0, 1.0), (5.0, -3.0, 1.0))
    cropped = Grid((3, 4, 5), grid.spacing, tuple(np.array(grid.origin) + np.array([2.0, 3.0, 4.0 * 2.0])))
    labelmap = np.ones(cropped.shape, np.uint8)
    seg = Segmentation.from_labelmap(labelmap, cropped, {1: "x"}, name="crop.seg.nrrd")
    aligned = align_to_grid(seg, grid)
    assert aligned.grid.same_as(grid)
    assert aligned.labelmap.sum() == labelmap.sum()
    np.testing.assert_array_equal(np.argwhere(aligned.labelmap).min(0), [4, 3, 2])  # z, y, x offsets
    shifted = Grid(cropped.shape, cropped.spacing, tuple(np.array(cropped.origin) + 0.5))
    with pytest.raises(InputError, match="crop.seg.nrrd: geometry does not match"):
        align_to_grid(Segmentation.from_labelmap(labelmap, shifted, {1: "x"}, name="crop.seg.nrrd"), grid)


def test_geometry_check_names_the_segmentation_and_the_difference() -> None:
    image = Volume.from_array(np.zeros((4, 5, 6)), spacing=(2.0, 1.0, 1.0), name="ct.nii.gz")
    seg = Volume.from_array(np.zeros((4, 5, 6)), spacing=(2.0, 1.0, 1.5), name="seg.nii.gz")
    with pytest.raises(InputError, match=r"seg.nii.gz: geometry does not match ct.nii.gz: spacing"):
        check_same_grid(image, seg)


def test_binary_mask_selection_errors() -> None:
    grid = Grid((3, 4, 5))
    labelmap = np.zeros(grid.shape, np.uint8)
    labelmap[0, 0, :2], labelmap[1, 1, :2] = 1, 2
    seg = Segmentation.from_labelmap(labelmap, grid, name="multi.nii.gz")
    with pytest.raises(InputError, match="multi.nii.gz: has 2 labels .*choose one with --label"):
        binary_mask(seg, None)
    with pytest.raises(InputError, match="multi.nii.gz: unknown label '5'"):
        binary_mask(seg, "5")
    mask, segment = binary_mask(seg, "2")
    assert segment.value == 2 and mask.sum() == 2


def test_write_never_replaces_an_input(tmp_path: Path) -> None:
    volume = Volume.from_array(np.ones((2, 3, 4), np.float32))
    src = write_volume(volume, tmp_path / "in.nii.gz")
    before = src.read_bytes()
    with pytest.raises(InputError, match="would overwrite an input"):
        write_mask(np.ones((2, 3, 4), bool), volume.grid, src, inputs=[src])
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz"]  # no temp file left
