"""New "subjects" from a labelled one: a random smooth warp of its anatomy and a change of its intensities.

A QC model trained on few subjects learns their anatomy rather than what a good mask looks like
(``benchmarks/sentinel_phantom.md``: held-out subjects of the CT phantom, 1 training subject against 28).
:func:`warped_subject` draws a plausible other subject from one: a random affine (per-axis scale,
small rotation) plus a smooth B-spline deformation of the whole image, applied with SimpleITK to the
image (linear) and to its label map (nearest neighbour, so the labels stay exact), and a random
linear intensity change. ``segqc train sentinel [--dataset ...] --synthetic-subjects N`` adds N of
them per training subject (:func:`~SegQCLib.train.sentinel_data.warped_pairs`).

:func:`averaged_subject` draws a template-like subject: the mean of several copies of one warped anatomy,
each misregistered by a small residual deformation, with labels by majority vote. Population templates
(MNI152, study templates) are built that way, and their images look smoother than any one subject's:
``--averaged-subjects N`` adds N of them (:func:`~SegQCLib.train.sentinel_data.averaged_pairs`).
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
#: Defaults of :func:`averaged_subject`: members averaged, and the SD (mm) of their residual
#: misregistration, a B-spline deformation on the same mesh (a prior for nonlinear registration to a
#: template, not tuned on any test image).
AVERAGE_MEMBERS = 8
RESIDUAL_MM = 2.0


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


def _contrast_scaled(array: np.ndarray, subject: LabelledSubject, rng: np.random.Generator) -> np.ndarray:
    """``array`` with its contrast scaled by a random factor about the median of ``subject``'s labelled
    voxels (so labelled tissue keeps its typical value)."""
    labelled = (subject.segmentation.layers > 0).any(axis=0)
    middle = float(np.median(subject.image.array[labelled])) if labelled.any() else float(np.median(subject.image.array))
    return (middle + (array - middle) * rng.uniform(*INTENSITY_SCALE)).astype(np.float32)


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
    warped = _contrast_scaled(warped, subject, rng)
    layers = np.stack([sitk.GetArrayFromImage(sitk.Resample(_to_sitk(np.ascontiguousarray(layer), image.grid), reference,
                                                            transform, sitk.sitkNearestNeighbor, 0))
                       for layer in seg.layers])
    new_id = name or f"{subject.subject}+warp{seed}"
    return LabelledSubject(subject=new_id, image=image.with_array(warped, name=f"{image.name}+warp{seed}"),
                           segmentation=Segmentation(layers.astype(seg.layers.dtype), seg.grid, list(seg.segments),
                                                     seg.name, seg.named),
                           source=f"{subject.source}+warp{seed}", modality=subject.modality)


def averaged_subject(subject: LabelledSubject, seed: int, name: str | None = None, members: int | None = None,
                     residual_mm: float = RESIDUAL_MM) -> LabelledSubject:
    """A template-like subject drawn from ``subject``: one random warp (as :func:`warped_subject`) seen
    through ``members`` residual B-spline deformations (SD ``residual_mm``), whose images are averaged
    (linear resampling) and whose label maps are voted (``sitk.LabelVotingImageFilter``: the label most
    members give a voxel, background where that is tied), then the contrast change of a warped copy.

    Deterministic for a seed: labellings of one image (AAL, Brodmann, brain, tissue) drawn with one seed
    stay one anatomy. ``name``: the new subject id (default ``<subject>+avg<seed>``); ``members``: default
    :data:`AVERAGE_MEMBERS`. With one member and no residual, the labels are :func:`warped_subject`'s.
    """
    members = AVERAGE_MEMBERS if members is None else members
    if members < 1:
        raise ValueError(f"an average needs at least one member, got {members}")
    rng = np.random.default_rng(seed)
    image = subject.image
    reference = _to_sitk(np.ascontiguousarray(image.array, dtype=np.float32), image.grid)
    anatomy = random_warp(reference, rng)
    low = float(image.array.min())
    seg = subject.segmentation
    layers = [_to_sitk(np.ascontiguousarray(layer, dtype=np.uint16), image.grid) for layer in seg.layers]
    total = np.zeros(image.array.shape, np.float64)
    members_labels: list[list[sitk.Image]] = [[] for _ in layers]
    for _ in range(members):
        residual = sitk.BSplineTransformInitializer(reference, [MESH] * 3, order=3)
        residual.SetParameters(rng.normal(0.0, residual_mm, len(residual.GetParameters())).tolist())
        member = sitk.CompositeTransform([anatomy, residual])
        total += sitk.GetArrayFromImage(sitk.Resample(reference, reference, member, sitk.sitkLinear, low))
        for labels, layer in zip(members_labels, layers):
            labels.append(sitk.Resample(layer, reference, member, sitk.sitkNearestNeighbor, 0))
    averaged = _contrast_scaled((total / members).astype(np.float32), subject, rng)
    voting = sitk.LabelVotingImageFilter()
    voting.SetLabelForUndecidedPixels(0)
    voted = np.stack([sitk.GetArrayFromImage(voting.Execute(labels)) for labels in members_labels])
    new_id = name or f"{subject.subject}+avg{seed}"
    return LabelledSubject(subject=new_id, image=image.with_array(averaged, name=f"{image.name}+avg{seed}"),
                           segmentation=Segmentation(voted.astype(seg.layers.dtype), seg.grid, list(seg.segments),
                                                     seg.name, seg.named),
                           source=f"{subject.source}+avg{seed}", modality=subject.modality)
