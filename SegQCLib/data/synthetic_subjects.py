"""New "subjects" from a labelled one: a random smooth warp of its anatomy and a change of its intensities.

A QC model trained on few subjects learns their anatomy rather than what a good mask looks like
(``benchmarks/sentinel_phantom.md``: held-out subjects of the CT phantom, 1 training subject against 28).
:func:`warped_subject` draws a plausible other subject from one: a random affine (per-axis scale,
small rotation) plus a smooth B-spline deformation of the whole image, applied with SimpleITK to the
image (linear) and to its label map (nearest neighbour, so the labels stay exact), and a random
linear intensity change. ``segqc train sentinel [--dataset ...] --synthetic-subjects N`` adds N of
them per training subject (:func:`~SegQCLib.train.sentinel_data.warped_pairs`).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..io import Segmentation, _to_sitk
from .sources import LabelledSubject

#: Defaults of :func:`warped_subject`: per-axis scale range, rotation SD (degrees), B-spline
#: control-point displacement SD (mm) on a mesh of ``MESH`` cells per axis, intensity scale range.
SCALE = (0.9, 1.1)
ROTATION_DEG = 4.0
DISPLACEMENT_MM = 4.0
MESH = 4
INTENSITY_SCALE = (0.92, 1.08)


def random_warp(reference: sitk.Image, rng: np.random.Generator, displacement_mm: float = DISPLACEMENT_MM) -> sitk.Transform:
    """A random affine about the image centre followed by a smooth B-spline deformation (physical mm)."""
    centre = reference.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in reference.GetSize()])
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    angles = np.deg2rad(rng.normal(0.0, ROTATION_DEG, 3))
    rotation = sitk.Euler3DTransform(centre, *(float(a) for a in angles))
    matrix = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.diag(rng.uniform(*SCALE, 3))
    affine.SetMatrix(matrix.ravel().tolist())
    bspline = sitk.BSplineTransformInitializer(reference, [MESH] * 3, order=3)
    params = rng.normal(0.0, displacement_mm, len(bspline.GetParameters()))
    bspline.SetParameters(params.tolist())
    return sitk.CompositeTransform([affine, bspline])


def warped_subject(subject: LabelledSubject, seed: int, name: str | None = None) -> LabelledSubject:
    """Another subject drawn from ``subject``: image and labels warped together on the same grid.

    The image is resampled linearly (outside the original field of view: its minimum, i.e. air or
    background) and its contrast scaled by a random factor about the median of the labelled voxels
    (so labelled tissue keeps its typical value); the label map is resampled by
    nearest neighbour, so every voxel keeps one exact label. ``name``: the new subject id (default
    ``<subject>+warp<seed>``). Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    image = subject.image
    reference = _to_sitk(np.ascontiguousarray(image.array, dtype=np.float32), image.grid)
    transform = random_warp(reference, rng)
    low = float(image.array.min())
    warped = sitk.GetArrayFromImage(sitk.Resample(reference, reference, transform, sitk.sitkLinear, low))
    seg = subject.segmentation
    labelled = (seg.layers > 0).any(axis=0)
    middle = float(np.median(image.array[labelled])) if labelled.any() else float(np.median(image.array))
    warped = (middle + (warped - middle) * rng.uniform(*INTENSITY_SCALE)).astype(np.float32)
    layers = np.stack([sitk.GetArrayFromImage(sitk.Resample(_to_sitk(np.ascontiguousarray(layer), image.grid), reference,
                                                            transform, sitk.sitkNearestNeighbor, 0))
                       for layer in seg.layers])
    new_id = name or f"{subject.subject}+warp{seed}"
    return LabelledSubject(subject=new_id, image=image.with_array(warped, name=f"{image.name}+warp{seed}"),
                           segmentation=Segmentation(layers.astype(seg.layers.dtype), seg.grid, list(seg.segments),
                                                     seg.name, seg.named),
                           source=f"{subject.source}+warp{seed}", modality=subject.modality)
