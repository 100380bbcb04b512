"""Real algorithmic segmentations of real images: realistic errors for QC models to score.

Synthetic degradations (:mod:`SegQCLib.degrade`) teach a QC model what a bad mask looks like; the
masks made here are what classical algorithms really produce on the real T1 images of
:mod:`SegQCLib.data.sources` (Colin27, MNI152): leaks into neighbouring tissue of similar
intensity, missed parts, ragged borders, registration misalignment. Each comes with its true DSC
against the atlas label, so a QC model can be trained and evaluated on them.

Methods (each a function of the image, the true mask and a seeded ``np.random.Generator``):

- :func:`threshold_segmentation`: inside a randomly enlarged bounding box of the structure, an
  (optionally smoothed) T1 is thresholded with multi-Otsu (2 or 3 classes, the class holding most
  of the structure kept) or with a random percentile window of the structure's intensities; the
  result is optionally restricted to a roughly "painted" area (the structure dilated by 1-6 mm)
  and opened, and the connected component(s) overlapping the structure most are kept, holes
  optionally filled.
- :func:`region_growing_segmentation`: SimpleITK ``ConfidenceConnected`` or ``ConnectedThreshold``
  from 1-5 seeds drawn inside the structure, random multiplier/window and iterations, on an
  optionally smoothed crop (a dilated bounding box, or a painted area, that growth cannot leave).
- :func:`registration_segmentation`: a structure of one subject is propagated to another by a
  Mattes-MI rigid or affine registration of the two T1 images (SimpleITK, two resolution levels,
  random sampling of 2 % of the voxels with a fixed seed) and nearest-neighbour resampling.
  Transforms are cached in-process per (moving, fixed, kind, variant).

Without the painted area, thresholds and region growing of deep grey nuclei leak into all the
grey matter in the box (DSC 0.05-0.3); with it, DSC spans about 0.1-0.9 over seeds (Caudate_L,
Thalamus_L, Hippocampus_L, Putamen_L, Precentral_L, whole brain). The MNI152 brain mask is itself
a T1 threshold, so thresholds can reproduce it almost exactly (DSC up to 1.0).

The truth a method sees is used only as a user would: to place a box, seeds, or an intensity
window. Randomness only comes from the ``rng`` argument, never from global state.

Pairs of built-in subjects that share a structure name, so that a registered mask has a truth
(:data:`REGISTRATION_ATLASES` lists the built-in atlases tried):

==========================  ==========================  ========  ======================================
moving                      fixed                       label     truth on the fixed subject
==========================  ==========================  ========  ======================================
``mni152("brain")``         ``colin27(...)``            Brain     ``colin27("brain")`` (ch2bet > 0)
``colin27("brain")``        ``mni152(...)``             Brain     ``mni152("brain")`` (T1 / max > 0.2)
``mni152("tissue")``        ``colin27(...)``            GM / WM   ``colin27("tissue")`` (Otsu classes of the T1)
``colin27("tissue")``       ``mni152(...)``             GM / WM   derived, not an atlas: not used (MNI152 samples stay fixed)
``colin27("aal")`` etc.     ``mni152(...)``             AAL, BA   none (MNI152 has no AAL labels): skip
==========================  ==========================  ========  ======================================

Both templates are already in MNI space, so even the identity gives a brain DSC of about 0.94; the
registration variants > 0 start from a seeded random rigid misalignment (a few degrees and mm)
that the coarse registration only partly undoes, as registrations of real subjects do.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import SimpleITK as sitk
from skimage.filters import threshold_multiotsu
from skimage.measure import label as connected_components

from ..metrics import dice
from ..volume import Volume
from .sources import LabelledSubject, available_sources, colin27, mni152

__all__ = [
    "METHODS",
    "REGISTRATION_ATLASES",
    "algorithmic_segmentations",
    "dilate_mm",
    "region_growing_segmentation",
    "registration_segmentation",
    "registration_transform",
    "register_onto",
    "threshold_segmentation",
    "volume_scale",
]

#: Method families of :func:`algorithmic_segmentations`.
METHODS: tuple[str, ...] = ("threshold", "region_growing", "registration")

#: Built-in atlases that :func:`algorithmic_segmentations` registers from when they hold the
#: structure and are another subject: (source function name, its argument).
REGISTRATION_ATLASES: tuple[tuple[str, str], ...] = (
    ("mni152", "brain"), ("mni152", "tissue"), ("colin27", "brain"), ("colin27", "aal"), ("colin27", "brodmann"),
)

#: Registration settings: two levels (shrink 4 then 2, Gaussian sigma 2 then 1 mm), Mattes MI with
#: 32 bins on a random 2 % of the voxels, regular-step gradient descent.
SHRINK_FACTORS: tuple[int, ...] = (4, 2)
SMOOTHING_SIGMAS_MM: tuple[float, ...] = (2.0, 1.0)
SAMPLING_PERCENTAGE = 0.02
HISTOGRAM_BINS = 32
ITERATIONS = 40
#: Start misalignment of registration variants > 0: standard deviation of each rotation angle (deg)
#: and of each translation (mm).
VARIANT_ROTATION_DEG = 6.0
VARIANT_TRANSLATION_MM = 8.0

Box = tuple[slice, slice, slice]


# --------------------------------------------------------------------------- helpers
def _check_truth(image: Volume, truth: np.ndarray) -> np.ndarray:
    truth = np.asarray(truth).astype(bool, copy=False)
    if truth.shape != image.shape:
        raise ValueError(f"truth shape {truth.shape} does not match the image shape {image.shape} (z, y, x)")
    if not truth.any():
        raise ValueError("the true mask is empty: there is no structure to segment")
    return truth


def _random_box(truth: np.ndarray, spacing: Sequence[float], rng: np.random.Generator,
                margin_mm: tuple[float, float]) -> Box:
    """The bounding box of ``truth`` grown on each side by its own random margin in ``margin_mm`` (mm)."""
    box = []
    for axis, (n, step) in enumerate(zip(truth.shape, spacing)):
        other = tuple(a for a in range(truth.ndim) if a != axis)
        present = np.flatnonzero(truth.any(axis=other))
        lo_mm, hi_mm = rng.uniform(*margin_mm, size=2)
        lo = max(int(present[0]) - int(round(lo_mm / step)), 0)
        hi = min(int(present[-1]) + 1 + int(round(hi_mm / step)), n)
        box.append(slice(lo, hi))
    return tuple(box)  # type: ignore[return-value]


def _crop_image(image: Volume, box: Box) -> sitk.Image:
    """The (z, y, x) crop ``box`` of ``image`` as a float32 SimpleITK image with the image's spacing
    (origin at 0: only spacing matters to the filters used on crops)."""
    crop = sitk.GetImageFromArray(np.ascontiguousarray(image.array[box], dtype=np.float32))
    crop.SetSpacing(image.grid.spacing_xyz)
    return crop


def _smooth(crop: sitk.Image, rng: np.random.Generator) -> tuple[sitk.Image, str]:
    """No smoothing, a Gaussian (sigma 0.5-1.5 mm) or curvature flow (edge-preserving), at random."""
    choice = int(rng.integers(3))
    if choice == 1:
        sigma = float(rng.uniform(0.5, 1.5))
        return sitk.SmoothingRecursiveGaussian(crop, sigma), f"gauss{sigma:.1f}"
    if choice == 2:
        iterations = int(rng.integers(3, 8))
        step = 0.05 * min(crop.GetSpacing())  # stable below min(spacing) / 2^(dimension + 1)
        return sitk.CurvatureFlow(crop, timeStep=step, numberOfIterations=iterations), f"cflow{iterations}"
    return crop, ""


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    filled = sitk.BinaryFillhole(sitk.GetImageFromArray(mask.astype(np.uint8)), fullyConnected=False,
                                 foregroundValue=1)
    return sitk.GetArrayFromImage(filled).astype(bool)


def _paste(shape: tuple[int, ...], box: Box, crop_mask: np.ndarray) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    out[box] = crop_mask
    return out


def dilate_mm(mask: np.ndarray, spacing: Sequence[float], radius_mm: float) -> np.ndarray:
    """Voxels within ``radius_mm`` (Euclidean, mm) of ``mask`` (z, y, x)."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    distance = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                            useImageSpacing=True)
    return sitk.GetArrayFromImage(distance) <= radius_mm


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological opening by a ball of ``radius`` voxels (breaks bridges thinner than it)."""
    opened = sitk.BinaryMorphologicalOpening(sitk.GetImageFromArray(mask.astype(np.uint8)), [radius] * 3,
                                             sitk.sitkBall, foregroundValue=1)
    return sitk.GetArrayFromImage(opened).astype(bool)


def _editable_area(inside: np.ndarray, spacing: Sequence[float], rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Where the algorithm may label voxels inside the crop: the whole crop (a box ROI), or, as a user
    restricting an editor to a roughly painted area, the structure dilated by a random 1-6 mm."""
    if rng.random() < 0.5:
        return np.ones_like(inside), "box"
    radius = float(rng.uniform(1.0, 6.0))
    return dilate_mm(inside, spacing, radius), f"painted{radius:.0f}mm"


def _with_tag(name: str, *tags: str) -> str:
    return ":".join([name, *[t for t in tags if t]])


# --------------------------------------------------------------------------- thresholding
def _threshold(image: Volume, truth: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    truth = _check_truth(image, truth)
    box = _random_box(truth, image.spacing, rng, (0.0, 10.0))
    crop, smoothing = _smooth(_crop_image(image, box), rng)
    values = sitk.GetArrayFromImage(crop)
    inside = truth[box]
    area, where = _editable_area(inside, image.spacing, rng)
    thresholds = None
    if rng.random() < 0.5:
        classes = int(rng.integers(2, 4))
        try:
            thresholds = threshold_multiotsu(values, classes=classes)
        except ValueError:  # fewer distinct intensities than classes: use a window instead
            thresholds = None
    if thresholds is not None:
        regions = np.digitize(values, thresholds)
        keep_class = int(np.bincount(regions[inside], minlength=classes).argmax())
        foreground = regions == keep_class
        how = f"otsu{classes}"
    else:
        q_lo, q_hi = rng.uniform(0.01, 0.35), rng.uniform(0.65, 0.99)
        lo, hi = np.quantile(values[inside], [q_lo, q_hi])
        shift = rng.normal(0.0, 0.15) * (hi - lo)
        foreground = (values >= lo + shift) & (values <= hi + shift)
        how = "window"
    foreground &= area
    opening = int(rng.integers(0, 3))
    if opening:
        foreground = _open(foreground, opening)
    connectivity = int(rng.integers(1, 4))  # 6-, 18- or 26-connected
    labels = connected_components(foreground, connectivity=connectivity)
    overlap = np.bincount(labels[inside], minlength=int(labels.max()) + 1)
    overlap[0] = 0
    n_keep = int(rng.choice([1, 1, 1, 2, 3]))
    keep = [c for c in np.argsort(overlap)[::-1][:n_keep] if overlap[c] > 0]
    mask = np.isin(labels, keep) if keep else np.zeros_like(inside)
    fill = rng.random() < 0.5
    if fill and mask.any():
        mask = _fill_holes(mask)
    return _paste(image.shape, box, mask), _with_tag(how, where, smoothing, f"open{opening}" if opening else "",
                                                     "filled" if fill else "")


def threshold_segmentation(image: Volume, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Segment a structure by thresholding the image near it, as a user with a threshold tool would.

    Inside the bounding box of ``truth`` grown by a random 0-10 mm per side, the image (optionally
    smoothed: Gaussian or curvature flow) is thresholded either with multi-Otsu (2 or 3 classes; the
    class holding most of the structure is kept) or with a window between random percentiles of the
    structure's intensities (lower 1-35 %, upper 65-99 %, shifted by a random fraction of its
    width). Half of the time the result is restricted to a roughly painted area (``truth`` dilated
    by 1-6 mm); it is optionally opened (ball of 1-2 voxels) to break thin bridges, the 1-3
    connected components (6/18/26-connectivity) overlapping the structure most are kept, and holes
    are optionally filled.

    Args:
        image: the (z, y, x) image, e.g. a T1 (spacing in mm is used for the margins and smoothing).
        truth: (z, y, x) bool mask of the structure on the image's grid; must not be empty.
        rng: the only source of randomness.

    Returns:
        (z, y, x) bool mask on the image's grid, zero outside the box. Its quality varies widely
        with the draw; it is empty (DSC 0) when no thresholded component touches the structure.

    Raises:
        ValueError: ``truth`` is empty or not on the image's grid.
    """
    return _threshold(image, truth, rng)[0]


# --------------------------------------------------------------------------- region growing
def _seeds(inside: np.ndarray, rng: np.random.Generator, n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct seed voxels inside the structure (preferably one voxel from its border), as ITK
    (x, y, z) indices."""
    eroded = sitk.GetArrayFromImage(sitk.BinaryErode(sitk.GetImageFromArray(inside.astype(np.uint8)),
                                                     [1, 1, 1], foregroundValue=1)).astype(bool)
    candidates = np.argwhere(eroded if eroded.any() else inside)
    chosen = candidates[rng.choice(len(candidates), size=min(n, len(candidates)), replace=False)]
    return [tuple(int(v) for v in p[::-1]) for p in chosen]


def _region_growing(image: Volume, truth: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    truth = _check_truth(image, truth)
    box = _random_box(truth, image.spacing, rng, (2.0, 10.0))
    crop, smoothing = _smooth(_crop_image(image, box), rng)
    inside = truth[box]
    area, where = _editable_area(inside, image.spacing, rng)
    values = sitk.GetArrayFromImage(crop)  # before masking: the statistics a user would see
    if not area.all():  # growth cannot enter voxels far below every intensity window
        outside = float(values.min()) - 1e6
        area_image = sitk.GetImageFromArray(area.astype(np.uint8))
        area_image.CopyInformation(crop)
        crop = sitk.Mask(crop, area_image, outsideValue=outside)
    seeds = _seeds(inside, rng, int(rng.integers(1, 6)))
    if rng.random() < 0.5:
        multiplier = float(rng.uniform(1.0, 3.0))
        grown = sitk.ConfidenceConnected(crop, seedList=seeds, numberOfIterations=int(rng.integers(0, 5)),
                                         multiplier=multiplier, initialNeighborhoodRadius=int(rng.integers(1, 3)),
                                         replaceValue=1)
        how = f"confidence{multiplier:.1f}"
    else:
        # the window a user reads off the seeds' neighbourhood: mean +- k standard deviations
        radius = int(rng.integers(1, 4))
        near = np.concatenate([values[max(z - radius, 0):z + radius + 1, max(y - radius, 0):y + radius + 1,
                                      max(x - radius, 0):x + radius + 1].ravel() for x, y, z in seeds])
        k = float(rng.uniform(1.0, 3.0))
        spread = max(float(near.std()), 1e-6)
        grown = sitk.ConnectedThreshold(crop, seedList=seeds, lower=float(near.mean() - k * spread),
                                        upper=float(near.mean() + k * spread), replaceValue=1)
        how = f"window{k:.1f}"
    mask = sitk.GetArrayFromImage(grown).astype(bool)
    fill = rng.random() < 0.5
    if fill and mask.any():
        mask = _fill_holes(mask)
    return _paste(image.shape, box, mask), _with_tag(how, where, smoothing, "filled" if fill else "")


def region_growing_segmentation(image: Volume, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Segment a structure by region growing from seeds inside it (SimpleITK), as a user clicking
    seeds would.

    1-5 seeds are drawn inside ``truth`` (away from its border where possible). On the image cropped
    to the bounding box of ``truth`` grown by a random 2-10 mm per side (growth stops at the crop),
    optionally smoothed (Gaussian or curvature flow), and half of the time restricted to a roughly
    painted area (``truth`` dilated by 1-6 mm), either ``ConfidenceConnected`` (multiplier 1-3, 0-4
    iterations, neighbourhood radius 1-2) or ``ConnectedThreshold`` (window: mean +- 1-3 standard
    deviations of the seeds' 3-7 voxel neighbourhoods) grows the region; holes are optionally filled.

    Args:
        image: the (z, y, x) image; spacing in mm is used for the margins and smoothing.
        truth: (z, y, x) bool mask of the structure on the image's grid; must not be empty.
        rng: the only source of randomness.

    Returns:
        (z, y, x) bool mask on the image's grid. It may be empty (DSC 0) when every seed falls
        outside the intensity interval of ``ConfidenceConnected`` (a seed unlike its neighbourhood).

    Raises:
        ValueError: ``truth`` is empty or not on the image's grid.
    """
    return _region_growing(image, truth, rng)[0]


# --------------------------------------------------------------------------- registration
@dataclass(frozen=True)
class _Keyed:
    """A volume that hashes and compares by ``key`` only, so that lru_cache can key on names."""

    key: tuple
    volume: Volume = field(compare=False, hash=False)


def _subject_key(subject: LabelledSubject) -> tuple:
    return (subject.subject, subject.image.name, subject.image.grid)


def _as_sitk(volume: Volume, array: np.ndarray | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array if array is None else array))
    image.SetSpacing(volume.grid.spacing_xyz)
    image.SetOrigin(volume.grid.origin)
    image.SetDirection(volume.grid.direction)
    return image


def _start_transform(fixed: sitk.Image, kind: str, variant: int, moving: sitk.Image | None = None) -> sitk.Transform:
    """Identity about the fixed image's centre (variant 0) or a seeded rigid misalignment of it.

    With ``moving``, the start first aligns the two images' centres of mass (intensity moments), so
    that a scanner's origin or a field of view that puts the head elsewhere in world space does not
    leave the optimiser far from the answer; variants then add their rotations about that start."""
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()])
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(centre)
    if moving is not None:
        moments = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                    sitk.CenteredTransformInitializerFilter.MOMENTS)
        rigid = sitk.Euler3DTransform(moments)
    if variant > 0:
        draw = np.random.default_rng(variant)
        angles = np.deg2rad(draw.normal(0.0, VARIANT_ROTATION_DEG, size=3))
        rigid.SetRotation(*(float(a) for a in angles))
        rigid.SetTranslation([float(a) + float(t) for a, t in zip(rigid.GetTranslation(),
                                                                   draw.normal(0.0, VARIANT_TRANSLATION_MM, size=3))])
    if kind == "rigid":
        return rigid
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    return affine


@lru_cache(maxsize=16)
def _cached_transform(moving: _Keyed, fixed: _Keyed, kind: str, variant: int, moments: bool = False) -> sitk.Transform:
    fixed_image = _as_sitk(fixed.volume, fixed.volume.array.astype(np.float32, copy=False))
    moving_image = _as_sitk(moving.volume, moving.volume.array.astype(np.float32, copy=False))
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING_PERCENTAGE, 1 + variant)  # seed 0 would be the wall clock
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=ITERATIONS,
                                                    relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    method.SetSmoothingSigmasPerLevel(list(SMOOTHING_SIGMAS_MM))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(_start_transform(fixed_image, kind, variant, moving_image if moments else None),
                               inPlace=False)
    return method.Execute(fixed_image, moving_image)


def registration_transform(moving: LabelledSubject, fixed: LabelledSubject, kind: str = "affine",
                           variant: int = 0) -> sitk.Transform:
    """The SimpleITK transform mapping points of ``fixed`` to ``moving`` (LPS mm), from a Mattes-MI
    registration of their images (see the module docstring for the settings).

    ``kind``: ``"affine"`` or ``"rigid"``. ``variant`` 0 starts from the identity; ``variant`` k > 0
    starts from a rigid misalignment drawn with seed k and samples the metric with seed k + 1.
    Results are cached per (moving subject, fixed subject, kind, variant) for the process
    (subjects are told apart by name, image file and grid); do not modify the returned transform.
    """
    if kind not in ("affine", "rigid"):
        raise ValueError(f"kind must be 'affine' or 'rigid', got {kind!r}")
    if variant < 0:
        raise ValueError(f"variant must be >= 0, got {variant}")
    return _cached_transform(_Keyed(_subject_key(moving), moving.image), _Keyed(_subject_key(fixed), fixed.image),
                             kind, int(variant))


def register_onto(moving: LabelledSubject, fixed: Volume, fixed_key: str, kind: str = "affine",
                  start: int = 0) -> sitk.Transform:
    """:func:`registration_transform` onto an image that is not a built-in subject, started from the
    images' aligned centres of mass (a user's image may lie anywhere in scanner space); ``start``
    k > 0 adds the seeded rotation of variant k (another start when one fails its check).
    ``fixed_key`` must identify the image's content (e.g. a hash of grid and voxels): it keys the cache."""
    if kind not in ("affine", "rigid"):
        raise ValueError(f"kind must be 'affine' or 'rigid', got {kind!r}")
    return _cached_transform(_Keyed(_subject_key(moving), moving.image), _Keyed(("image", fixed_key), fixed), kind,
                             int(start), moments=True)


def volume_scale(transform: sitk.Transform, at_mm: Sequence[float]) -> float:
    """|det| of the transform's Jacobian at ``at_mm`` (LPS), by finite differences of 1 mm: the
    ratio of the volumes it maps (fixed -> moving), whatever the transform's type."""
    p = np.asarray(at_mm, float)
    base = np.asarray(transform.TransformPoint(tuple(p)))
    jacobian = np.stack([np.asarray(transform.TransformPoint(tuple(p + e))) - base for e in np.eye(3)], axis=1)
    return float(abs(np.linalg.det(jacobian)))


def propagate_label(moving: LabelledSubject, fixed: Volume, label: str, transform: sitk.Transform) -> np.ndarray:
    """Structure ``label`` of ``moving`` resampled (nearest neighbour) onto ``fixed``'s grid through
    ``transform`` (fixed -> moving points): bool (z, y, x)."""
    moving_label = _as_sitk(moving.image, moving.segmentation.mask(label).astype(np.uint8))
    reference = _as_sitk(fixed, np.zeros(fixed.shape, dtype=np.uint8))
    warped = sitk.Resample(moving_label, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(warped).astype(bool)


def _registration(moving: LabelledSubject, fixed: LabelledSubject, label_moving: str, rng: np.random.Generator,
                  kind: str, variants: int) -> tuple[np.ndarray, str]:
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    variant = int(rng.integers(variants))
    mask = propagate_label(moving, fixed.image, label_moving, registration_transform(moving, fixed, kind, variant))
    return mask, _with_tag(kind, moving.subject, f"v{variant}")


def registration_segmentation(moving: LabelledSubject, fixed: LabelledSubject, label_moving: str,
                              rng: np.random.Generator, kind: str = "affine", variants: int = 1) -> np.ndarray:
    """Propagate structure ``label_moving`` of ``moving`` onto ``fixed`` by registering their images.

    The images are registered (Mattes MI, ``kind`` = ``"affine"`` or ``"rigid"``; see
    :func:`registration_transform`; about 5-10 s a pair on 2 cores, then cached) and the moving
    label is resampled onto the fixed grid with nearest-neighbour interpolation. ``rng`` picks one of
    ``variants`` registrations (variant 0 from the identity, others from seeded misalignments);
    with the default ``variants=1`` the result does not depend on ``rng`` (one draw is still taken).
    Which built-in pairs have a truth to compare with is listed in the module docstring.

    Args:
        moving: the atlas subject whose label is propagated.
        fixed: the subject to segment; the result lies on its image grid.
        label_moving: name (or value) of the structure in ``moving.segmentation``.
        rng: picks the variant.
        kind: ``"affine"`` (12 parameters) or ``"rigid"`` (6).
        variants: number of distinct registrations ``rng`` chooses among (each cached).

    Returns:
        (z, y, x) bool mask on ``fixed.image``'s grid; empty when the label maps outside the fixed
        image (a failed registration).
    """
    return _registration(moving, fixed, label_moving, rng, kind, variants)[0]


# --------------------------------------------------------------------------- mixing the methods
def _builtin_atlases(subject: LabelledSubject, structure: str) -> list[LabelledSubject]:
    """Installed built-in subjects other than ``subject`` that hold a segment named ``structure``."""
    installed = available_sources()
    atlases: list[LabelledSubject] = []
    for source, argument in REGISTRATION_ATLASES:
        if source == subject.subject or not installed.get(source, False):
            continue
        atlas = (mni152 if source == "mni152" else colin27)(argument)
        if any(s.name == structure for s in atlas.segmentation.segments) and atlas.segmentation.mask(structure).any():
            atlases.append(atlas)
    return atlases


def algorithmic_segmentations(subject: LabelledSubject, structure: str, rng: np.random.Generator, n: int,
                              methods: Sequence[str] = METHODS, atlases: Sequence[LabelledSubject] | None = None,
                              registration_kinds: Sequence[str] = ("affine", "rigid"),
                              registration_variants: int = 2) -> list[tuple[str, np.ndarray, float]]:
    """``n`` algorithmic segmentations of ``structure`` in ``subject``'s image, with their true DSC.

    Each mask comes from a method family drawn at random among ``methods`` ("threshold",
    "region_growing", "registration"). Registration is only possible from an atlas: another subject
    holding a segment of the same name (``atlases``, or by default the installed built-in ones of
    :data:`REGISTRATION_ATLASES`; in practice only "Brain" is shared between Colin27 and MNI152).
    Each (atlas, rigid/affine, variant) registration is used at most once, so registered masks
    never repeat; when they run out, or there is no atlas, the other families fill the ``n``.

    Args:
        subject: the image and its atlas labels (the truth).
        structure: segment name in ``subject.segmentation``, e.g. "Caudate_L" or "Brain".
        rng: the only source of randomness.
        n: number of masks (>= 0).
        methods: method families to draw from.
        atlases: subjects to register from (those without a segment named ``structure`` are
            skipped); None = the built-in ones.
        registration_kinds: registration kinds to use ("affine", "rigid").
        registration_variants: registration variants per (atlas, kind) (see
            :func:`registration_segmentation`); each costs one registration, then is cached.

    Returns:
        A list of ``n`` tuples ``(method, mask, dsc)``: ``method`` names the family and its draw,
        e.g. ``"threshold:otsu3:gauss0.8:filled"``, ``"region_growing:confidence2.1"``,
        ``"registration:affine:mni152:v0"``; ``mask`` is a (z, y, x) bool array on the subject's
        grid (possibly empty); ``dsc`` its Dice against the subject's ``structure`` mask, in [0, 1].

    Raises:
        ValueError: unknown method or kind, ``n`` < 0, an empty structure, or only "registration"
            asked for and fewer than ``n`` distinct registrations possible (e.g. no atlas holds
            ``structure``).
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose among {list(METHODS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    bad_kinds = set(registration_kinds) - {"affine", "rigid"}
    if bad_kinds:
        raise ValueError(f"unknown registration kinds {sorted(bad_kinds)}; choose among ['affine', 'rigid']")
    truth = _check_truth(subject.image, subject.segmentation.mask(structure))
    registrations: list[tuple[LabelledSubject, str, int]] = []
    if "registration" in methods and n > 0:
        sources = _builtin_atlases(subject, structure) if atlases is None else [
            a for a in atlases if any(s.name == structure for s in a.segmentation.segments)]
        registrations = [(atlas, kind, variant) for atlas in sources for kind in registration_kinds
                         for variant in range(registration_variants)]
    families = [m for m in methods if m != "registration"]
    if not families and n > len(registrations):
        raise ValueError(f"{n} masks asked for by registration only, but only {len(registrations)} distinct "
                         f"registrations of {structure!r} are possible (atlases holding it x kinds x variants)")
    out: list[tuple[str, np.ndarray, float]] = []
    for _ in range(n):
        choices = families + (["registration"] if registrations else [])
        family = choices[int(rng.integers(len(choices)))]
        if family == "threshold":
            mask, detail = _threshold(subject.image, truth, rng)
        elif family == "region_growing":
            mask, detail = _region_growing(subject.image, truth, rng)
        else:
            atlas, kind, variant = registrations.pop(int(rng.integers(len(registrations))))
            mask = propagate_label(atlas, subject.image, structure, registration_transform(atlas, subject, kind, variant))
            detail = _with_tag(kind, atlas.subject, f"v{variant}")
        out.append((_with_tag(family, detail), mask, float(dice(mask, truth))))
    return out

