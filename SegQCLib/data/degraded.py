"""Datasets of degraded Colin27 segmentations, written as a CSV of pairs: for demos, tests and benchmarks.

Each case is a label map of some AAL structures of Colin27, every structure degraded by SegQC's
nnQC-style degradations into a DSC band, with the truth as the reference and a label table, so
batch QC, reports and model ranking can be exercised on real MRI with known true scores.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..degrade import DSC_BANDS, degrade_to_band
from ..io import Segmentation, write_segmentation, write_volume
from ..volume import Grid, Volume
from .sources import colin27

#: DSC bands (indices into DSC_BANDS) drawn for each method of :func:`degraded_dataset`.
METHOD_BANDS = {"better": (3, 4), "worse": (0, 1, 2), "any": (0, 1, 2, 3, 4)}


def crop_to_labels(image: Volume, labels: np.ndarray, margin: int) -> tuple[Volume, np.ndarray]:
    """Image and labels cropped to the labels' bounding box plus ``margin`` voxels (origin kept exact)."""
    idx = np.argwhere(labels > 0)
    lo, hi = np.maximum(idx.min(0) - margin, 0), np.minimum(idx.max(0) + margin + 1, labels.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    grid = image.grid
    offset_xyz = lo[::-1] * np.asarray(grid.spacing)[::-1]
    origin = np.asarray(grid.origin) + np.asarray(grid.direction).reshape(3, 3) @ offset_xyz
    cropped = Grid(tuple(labels[box].shape), grid.spacing, tuple(float(v) for v in origin), grid.direction)
    return Volume(image.array[box].copy(), cropped, image.name), labels[box]


def _resample(image: Volume, labels: np.ndarray, shape: tuple[int, int, int]) -> tuple[Volume, np.ndarray]:
    """Image (linear) and labels (nearest) resampled to ``shape`` over the same field of view."""
    from scipy.ndimage import zoom

    factors = np.asarray(shape) / np.asarray(image.shape)
    grid = Grid(tuple(shape), tuple(float(s) for s in np.asarray(image.spacing) / factors), image.grid.origin,
                image.grid.direction)
    return Volume(zoom(image.array, factors, order=1).astype(np.float32), grid, image.name), zoom(labels, factors, order=0)


def degraded_dataset(folder: str | Path, n_cases: int, structures: Sequence[str], *,
                     methods: Sequence[str] = ("any",), crop_margin: int | None = None,
                     shape: tuple[int, int, int] | None = None, seed: int = 0) -> Path:
    """Write ``n_cases`` degraded label maps of Colin27's AAL ``structures`` and return ``pairs.csv``.

    Case ``c`` is made by method ``methods[c % len(methods)]`` (``better``: DSC bands 0.50-0.95,
    ``worse``: 0.05-0.50, ``any``: all five bands) and belongs to subject ``case{c // len(methods)}``,
    so the same case appears once per method. ``crop_margin`` crops every file to the structures'
    box plus that many voxels (smaller files); ``shape`` resamples to another grid (e.g. CT-sized).
    Files: ``t1.nii.gz``, ``truth.nii.gz``, ``labels.txt`` and ``seg<c>.nii.gz`` in ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    subject = colin27("aal")
    image, truth = subject.image, np.zeros(subject.image.shape, np.uint8)
    for value, name in enumerate(structures, 1):
        truth[subject.segmentation.mask(name)] = value
    if crop_margin is not None:
        image, truth = crop_to_labels(image, truth, crop_margin)
    if shape is not None:
        image, truth = _resample(image, truth, shape)
    table = dict(enumerate(structures, 1))
    write_volume(image, folder / "t1.nii.gz")
    write_segmentation(Segmentation.from_labelmap(truth, image.grid, table), folder / "truth.nii.gz")
    (folder / "labels.txt").write_text("".join(f"{v} {n}\n" for v, n in table.items()))
    rng = np.random.default_rng(seed)
    lines = ["case_id,image,segmentation,reference,label_table,method"]
    for c in range(n_cases):
        method = methods[c % len(methods)]
        labels = np.zeros_like(truth)
        for value in table:
            band = DSC_BANDS[rng.choice(METHOD_BANDS[method])]
            degraded, _ = degrade_to_band((truth == value).astype(np.uint8), band, seed=seed * 1000 + c * 10 + value)
            labels[degraded > 0] = value
        write_segmentation(Segmentation.from_labelmap(labels, image.grid, table), folder / f"seg{c}.nii.gz")
        lines.append(f"case{c // len(methods)},t1.nii.gz,seg{c}.nii.gz,truth.nii.gz,labels.txt,{method}")
    csv = folder / "pairs.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv
