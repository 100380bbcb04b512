"""Synthetic degradations of segmentations, seeded and reproducible.

Three families, all on integer label maps shaped (z, y, x) or (y, x) with 0 = background:

1. **nnQC degradations** (semantic label maps, one value per class): blank holes, iterative erosion,
   false-positive blobs, class collapse and class swap, and :func:`degrade_to_band`, which combines
   them and tunes their strength until the Dice (DSC) against the input lands in one of the five
   nnQC quality bands :data:`DSC_BANDS`.
2. **QANet perturbations** (instance label maps, one positive value per cell): per-instance
   morphology, a smooth non-rigid deformation, both in sequence, and merging of neighbours.
3. **Plain sweeps**: erosion/dilation of a binary mask by physical radii.

Randomness only ever comes from the ``rng: np.random.Generator`` argument (or ``seed`` in
:func:`degrade_to_band`), never from global state, so the same seed always gives the same output.
No function modifies its input: each returns a new array with the input's shape and dtype (bool
masks are read as 0/1 and come back as uint8; :func:`erosion_dilation_sweep` returns bool masks).

Distances are Euclidean distance transforms computed with SimpleITK's Maurer filter (exact, and
about 5x faster than ``scipy.ndimage.distance_transform_edt`` on whole-brain masks). Erosion by a
radius r keeps the voxels whose distance to the background exceeds r; growing a blob or a hole to
radius r takes the voxels within distance r of its centre.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi
from skimage.segmentation import expand_labels

from SegQCLib.errors import InputError
from SegQCLib.metrics import dice

__all__ = [
    "DSC_BANDS",
    "add_false_positive_blobs",
    "add_holes",
    "collapse_classes",
    "degrade_to_band",
    "dsc_in_band",
    "erosion_dilation_sweep",
    "iterative_erosion",
    "merge_neighbours",
    "morphology_perturbation",
    "multiclass_dice",
    "nonrigid_perturbation",
    "qanet_perturbation",
    "swap_classes",
]

#: The five nnQC quality levels as DSC intervals: [lo, hi) except the last, which is closed [0.75, 0.95].
DSC_BANDS: tuple[tuple[float, float], ...] = ((0.05, 0.10), (0.10, 0.25), (0.25, 0.50), (0.50, 0.75), (0.75, 0.95))

#: QANet's five morphology states, in the order the random state is drawn.
MORPHOLOGY_OPERATIONS: tuple[str, ...] = ("identity", "erosion", "dilation", "opening", "closing")

Box = tuple[slice, ...]


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _as_label_map(labels: np.ndarray) -> np.ndarray:
    """Check a (y, x) or (z, y, x) integer label map (bool is read as 0/1); returns it as an ndarray."""
    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"label map must be 2D (y, x) or 3D (z, y, x), got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.view(np.uint8)
    if labels.dtype.kind not in "iu":
        raise ValueError(f"label map must have an integer dtype, got {labels.dtype}")
    if labels.dtype.kind == "i" and labels.size and labels.min() < 0:
        raise ValueError("label map has negative values; labels are 0 (background) or positive")
    return labels


def _class_volumes(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Present classes (sorted positive labels, shape (n,)) and their volumes in voxels (shape (n,))."""
    if labels.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    if int(labels.max()) > 4 * labels.size + 1024:  # sparse huge label values: sort instead of a table
        classes, counts = np.unique(labels, return_counts=True)
        return classes[classes > 0], counts[classes > 0]
    counts = np.bincount(labels.ravel())
    classes = np.flatnonzero(counts)
    classes = classes[classes > 0]
    return classes, counts[classes]


def _bbox(mask: np.ndarray, margin: int = 0) -> Box | None:
    """Bounding box of the True voxels of ``mask``, grown by ``margin`` voxels and clipped to the array."""
    box = ndi.find_objects(mask.astype(np.uint8))
    if not box:
        return None
    return _grow(box[0], mask.shape, margin)


def _grow(box: Box, shape: tuple[int, ...], margin: int) -> Box:
    """``box`` grown by ``margin`` voxels on every side, clipped to an array of ``shape``."""
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _edt(mask: np.ndarray, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Euclidean distance from each True voxel to the nearest False voxel (0 on False voxels).

    Same values as ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)`` but computed with
    SimpleITK's multi-threaded Maurer filter. Shape = ``mask.shape``, float32, in voxels (or in mm
    when ``spacing``, in array order, is given). ``inf`` everywhere if ``mask`` has no False voxel.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.all():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    image = sitk.GetImageFromArray((~mask).astype(np.uint8))
    if spacing is not None:
        image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    dist = sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                        useImageSpacing=spacing is not None)
    out = sitk.GetArrayFromImage(dist)
    np.maximum(out, 0.0, out=out)
    return out


def _inner_depth(mask: np.ndarray) -> np.ndarray:
    """Distance of each True voxel to the nearest False voxel, outside the array counting as False."""
    padded = np.pad(mask, 1)
    return _edt(padded)[(slice(1, -1),) * mask.ndim]


def _equivalent_radius(volume: float, ndim: int) -> float:
    """Radius (voxels) of the disk (2D) or ball (3D) with ``volume`` voxels."""
    if ndim == 2:
        return float(np.sqrt(volume / np.pi))
    return float((3.0 * volume / (4.0 * np.pi)) ** (1.0 / 3.0))


def _erode(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary erosion of ``mask`` by a disk/ball of ``radius`` voxels (the voxels within distance r).

    Equals ``ndi.binary_erosion`` with skimage's ``disk(r)``/``ball(r)`` element, computed as the
    thresholded distance transform: p survives iff no background voxel lies within r of it. Voxels
    outside the array do not count as background.
    """
    return _edt(mask) > radius


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of ``mask`` by a disk/ball of ``radius`` voxels: voxels within r of the mask."""
    if not mask.any():
        return mask.copy()
    return _edt(~mask) <= radius


def _apply_class_map(labels: np.ndarray, classes: np.ndarray, new_classes: np.ndarray) -> np.ndarray:
    """Copy of ``labels`` with each ``classes[i]`` replaced by ``new_classes[i]`` (a lookup table)."""
    lut = np.arange(int(labels.max()) + 1, dtype=labels.dtype)
    lut[classes] = new_classes
    return lut[labels]


def multiclass_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """DSC of two label maps: mean over the classes present in ``ref`` of the binary Dice of each class.

    ``pred`` and ``ref`` are integer label maps of the same shape (0 = background). A class absent
    from ``pred`` scores 0; classes only in ``pred`` are ignored. If ``ref`` has no foreground at all,
    the foreground masks are compared (1.0 when ``pred`` is empty too, else 0.0).
    """
    pred, ref = _as_label_map(pred), _as_label_map(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: pred {pred.shape} vs ref {ref.shape}")
    classes, _ = _class_volumes(ref)
    if classes.size == 0:
        return float(dice(pred != 0, ref != 0))
    ref_boxes = ndi.find_objects(ref)
    pred_boxes = ndi.find_objects(pred, max_label=int(classes.max()))
    scores = []
    for c in classes:  # each class on the union of its boxes in both maps: the same Dice, less work
        box = ref_boxes[c - 1]
        if c <= len(pred_boxes) and pred_boxes[c - 1] is not None:
            box = tuple(slice(min(r.start, p.start), max(r.stop, p.stop)) for r, p in zip(box, pred_boxes[c - 1]))
        scores.append(dice(pred[box] == c, ref[box] == c))
    return float(np.mean(scores))


# --------------------------------------------------------------------------------------------------
# nnQC degradations
# --------------------------------------------------------------------------------------------------


def _random_points(mask: np.ndarray, rng: np.random.Generator, n: int) -> np.ndarray:
    """Up to ``n`` distinct True voxels of ``mask`` drawn uniformly: integer indices, shape (k, ndim)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0 or n <= 0:
        return np.empty((0, mask.ndim), dtype=np.int64)
    picked = rng.choice(idx, size=min(int(n), idx.size), replace=False)
    return np.stack(np.unravel_index(picked, mask.shape), axis=1)


def _distance_to_points(shape: tuple[int, ...], points: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxels, float32, ``shape``) from each voxel to the nearest of ``points`` (k, ndim).

    Computed directly from broadcast coordinate differences (cheaper than a distance transform for a
    few points); ``inf`` everywhere when there are no points.
    """
    nearest = np.full(shape, np.inf, dtype=np.float32)
    axes = [np.arange(n, dtype=np.float32) for n in shape]
    for point in points:
        squared = np.zeros(shape, dtype=np.float32)
        for axis, (coords, centre) in enumerate(zip(axes, point)):
            squared += ((coords - centre) ** 2).reshape([-1 if a == axis else 1 for a in range(len(shape))])
        np.minimum(nearest, squared, out=nearest)
    return np.sqrt(nearest, out=nearest)


def add_holes(labels: np.ndarray, rng: np.random.Generator, n_holes: int = 3,
              radius_vox: float = 3.0) -> np.ndarray:
    """Punch ``n_holes`` blank (background) balls of radius ``radius_vox`` voxels into each class.

    labels: (z, y, x) or (y, x) integer label map. Hole centres are drawn uniformly among the class's
    voxels that lie more than ``radius_vox + 1`` deep inside it (so each hole stays enclosed by at
    least one voxel of the class), or among all its voxels when it is thinner than that, in which
    case a hole may open onto the border.
    Returns a new label map, same shape and dtype; only voxels of the classes become 0.
    """
    labels = _as_label_map(labels)
    out = labels.copy()
    for value, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        cls = labels[box] == value
        depth = _inner_depth(cls)
        deep = depth > radius_vox + 1.0
        centres = _random_points(deep if deep.any() else cls, rng, n_holes)
        hole = cls & (_distance_to_points(cls.shape, centres) <= radius_vox)
        out[box][hole] = 0
    return out


def iterative_erosion(labels: np.ndarray, rng: np.random.Generator, iterations: int = 1) -> np.ndarray:
    """Erode each class separately ``iterations`` times with a 3x3(x3) structuring element.

    labels: (z, y, x) or (y, x) integer label map. Each iteration ``rng`` picks the element's
    connectivity (the cross, connectivity 1, or the full box, connectivity ``ndim``), so repeated
    erosion is less regular than a fixed kernel. Other classes and the image border count as
    background. Classes may vanish. Returns a new label map, same shape and dtype.
    """
    labels = _as_label_map(labels)
    out = np.zeros_like(labels)
    for value, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        cls = labels[box] == value
        for _ in range(int(iterations)):
            connectivity = 1 if rng.random() < 0.5 else labels.ndim
            cls = ndi.binary_erosion(cls, ndi.generate_binary_structure(labels.ndim, connectivity))
            if not cls.any():
                break
        out[box][cls] = value
    return out


def _fp_seed_region(labels: np.ndarray, value: int, max_distance: float) -> np.ndarray:
    """Background voxels (bool, shape of ``labels``) within ``max_distance`` voxels of class ``value``.

    Falls back to the background voxels nearest to the class when none lies that close.
    """
    background = labels == 0
    dist = _edt(labels != value)
    near = background & (dist <= max_distance)
    if not near.any() and background.any():
        near = background & (dist <= dist[background].min() + 1.0)
    return near


def add_false_positive_blobs(labels: np.ndarray, rng: np.random.Generator, n_blobs: int = 3,
                             radius_vox: float = 3.0) -> np.ndarray:
    """Add ``n_blobs`` false-positive balls of radius ``radius_vox`` voxels near the structures.

    labels: (z, y, x) or (y, x) integer label map. Each blob takes a class drawn uniformly among the
    present ones and is centred on a background voxel at most ``2 * radius_vox + 1`` voxels from
    that class, so blobs are either bumps on the structure or islands next to it, always inside the
    image. Blobs only fill background: existing labels are never overwritten.
    Returns a new label map, same shape and dtype (unchanged if the map is empty).
    """
    labels = _as_label_map(labels)
    out = labels.copy()
    classes, _ = _class_volumes(labels)
    if classes.size == 0 or n_blobs <= 0:
        return out
    reach = 2.0 * radius_vox + 1.0
    box = _bbox(labels != 0, margin=int(np.ceil(reach + radius_vox)) + 1)
    crop, crop_out = labels[box], out[box]
    blob_classes = rng.choice(classes, size=int(n_blobs))
    for value in np.unique(blob_classes):
        near = _fp_seed_region(crop, int(value), reach)
        seeds = _random_points(near, rng, int(np.count_nonzero(blob_classes == value)))
        blob = (_distance_to_points(crop.shape, seeds) <= radius_vox) & (crop_out == 0)
        crop_out[blob] = value
    return out


def _collapse_map(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New class of each of ``classes`` (shape (n,)): a random subset of >= 2 merged into one of them."""
    new = classes.copy()
    if classes.size < 2:
        return new
    size = int(rng.integers(2, classes.size + 1))
    merged = rng.choice(classes.size, size=size, replace=False)
    new[merged] = classes[rng.choice(merged)]
    return new


def _swap_map(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """New class of each of ``classes`` (shape (n,)): a random permutation that moves at least one class."""
    if classes.size < 2:
        return classes.copy()
    while True:
        new = rng.permutation(classes)
        if np.any(new != classes):
            return new


def collapse_classes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Merge a random subset of >= 2 classes into one of them (multi-class masks only).

    labels: (z, y, x) or (y, x) integer label map. The merged classes all take the value of one
    member of the subset, drawn at random. No-op (a plain copy) when fewer than two classes are
    present, e.g. on a binary mask. Returns a new label map, same shape and dtype.
    """
    labels = _as_label_map(labels)
    classes, _ = _class_volumes(labels)
    if classes.size < 2:
        return labels.copy()
    return _apply_class_map(labels, classes, _collapse_map(classes, rng))


def swap_classes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute the values of the present classes (a random permutation other than the identity).

    labels: (z, y, x) or (y, x) integer label map. No-op (a plain copy) when fewer than two classes
    are present. Returns a new label map, same shape and dtype.
    """
    labels = _as_label_map(labels)
    classes, _ = _class_volumes(labels)
    if classes.size < 2:
        return labels.copy()
    return _apply_class_map(labels, classes, _swap_map(classes, rng))


# --------------------------------------------------------------------------------------------------
# degrade_to_band: a degraded copy whose DSC against the input lies in a quality band
# --------------------------------------------------------------------------------------------------


def resolve_band(band: tuple[float, float] | int) -> tuple[float, float]:
    """The band of :data:`DSC_BANDS` given by its index or by its (lo, hi) bounds; ValueError otherwise."""
    if isinstance(band, (int, np.integer)) and not isinstance(band, bool):
        if 0 <= band < len(DSC_BANDS):
            return DSC_BANDS[band]
    else:
        try:
            lo, hi = (float(b) for b in band)
        except (TypeError, ValueError):
            lo = hi = np.nan
        for known in DSC_BANDS:
            if np.isclose(lo, known[0], atol=1e-9) and np.isclose(hi, known[1], atol=1e-9):
                return known
    raise ValueError(f"unknown DSC band {band!r}: expected an index 0-{len(DSC_BANDS) - 1} or one of {DSC_BANDS}")


def dsc_in_band(dsc: float, band: tuple[float, float] | int) -> bool:
    """Whether ``dsc`` lies in ``band`` (one of :data:`DSC_BANDS` or its index): [lo, hi), last band [lo, hi]."""
    lo, hi = resolve_band(band)
    return lo <= dsc < hi or (hi == DSC_BANDS[-1][1] and dsc == hi)


@dataclass(frozen=True)
class _Plan:
    """One random degradation recipe of :func:`degrade_to_band`.

    At strength s in [0, 1], each class c loses ``round(s * max_removal * |c|)`` voxels (its shallowest
    voxels for erosion, those nearest to hole centres for holes; at least one voxel is kept), gains
    ``round(s * max_fp * |c|)`` false-positive voxels (capped by the background available), and the
    classes are then relabelled by ``new_classes``.
    """

    removal: str | None  # "erosion", "holes" or None
    max_removal: float  # fraction of each class removed at strength 1
    max_fp: float  # false-positive volume at strength 1, as a multiple of the class volume
    new_classes: np.ndarray  # (n,) value each present class ends up with


@dataclass
class _VoxelOrder:
    """Voxels of one class (or candidate voxels around it) in the order a degradation takes them.

    ``flat`` indexes the C-order flattened ``box`` of the label map; lower ``score`` = taken first.
    """

    box: Box
    flat: np.ndarray  # (m,) int64
    score: np.ndarray  # (m,) float32

    def take(self, count: int) -> tuple[np.ndarray, ...]:
        """Indices (a tuple of arrays, relative to ``box``) of the ``count`` lowest-score voxels."""
        shape = tuple(s.stop - s.start for s in self.box)
        if count <= 0:
            return np.unravel_index(np.empty(0, dtype=np.int64), shape)
        if count < self.flat.size:
            chosen = self.flat[np.argpartition(self.score, count - 1)[:count]]
        else:
            chosen = self.flat
        return np.unravel_index(chosen, shape)


class _BandDegrader:
    """State of one :func:`degrade_to_band` call: class volumes and lazily computed voxel orders.

    The DSC of a plan at a strength follows exactly from voxel counts (removed voxels come from the
    class, false positives from the background, so no overlap has to be measured), which makes the
    strength search cheap; the label map is only built once, for the chosen strength.
    """

    #: Std (voxels) of the smooth random jitter added to distances: it breaks ties in the partial
    #: last layer in coherent patches (a box-filtered noise, width 5), rather than as speckle.
    JITTER_STD = 0.25

    def __init__(self, labels: np.ndarray, rng: np.random.Generator):
        self.labels = labels
        self.rng = rng
        self.classes, volumes = _class_volumes(labels)
        self.volumes = volumes.astype(np.float64)
        objects = ndi.find_objects(labels)
        self.boxes = [objects[c - 1] for c in self.classes]
        self._removal: dict[str, list[_VoxelOrder]] = {}
        self._fp: list[_VoxelOrder] | None = None

    # ---- voxel orders ---------------------------------------------------------------------------
    def _jittered(self, dist: np.ndarray) -> np.ndarray:
        """``dist`` (any shape, voxels) plus a spatially smooth noise of std :attr:`JITTER_STD`; float32."""
        noise = ndi.uniform_filter(self.rng.random(dist.shape, dtype=np.float32), size=5)
        noise -= noise.mean()
        noise *= self.JITTER_STD / max(float(noise.std()), 1e-6)
        return dist.astype(np.float32) + noise

    def removal_order(self, kind: str) -> list[_VoxelOrder]:
        """Per class, its voxels by erosion depth (``"erosion"``) or by distance to hole centres."""
        if kind not in self._removal:
            orders = []
            for value, box in zip(self.classes, self.boxes):
                cls = self.labels[box] == value
                if kind == "erosion":
                    dist = _inner_depth(cls)
                else:
                    n_holes = int(self.rng.integers(1, 6))
                    dist = _distance_to_points(cls.shape, _random_points(cls, self.rng, n_holes))
                flat = np.flatnonzero(cls)
                orders.append(_VoxelOrder(box, flat, self._jittered(dist).ravel()[flat]))
            self._removal[kind] = orders
        return self._removal[kind]

    def fp_order(self) -> list[_VoxelOrder]:
        """Per class, the background voxels that its false-positive blobs grow into, nearest first.

        Each class gets 1-3 blob seeds in the background within ``max(2, 0.3 * r)`` voxels of it
        (r: its equivalent radius), or in the background nearest to it when none is that close.
        Its blobs may grow into the background of its bounding box plus a margin of ``max(4, r)``
        voxels; a background voxel reachable by several classes belongs to the blob of its nearest
        seed (a Voronoi split, so blobs of different classes never overlap). All work is done on
        these per-class boxes, so the cost grows with the classes' sizes, not their number.
        """
        if self._fp is not None:
            return self._fp
        ndim, shape = self.labels.ndim, self.labels.shape
        local_boxes = [_grow(box, shape, int(np.ceil(max(4.0, _equivalent_radius(volume, ndim)))))
                       for box, volume in zip(self.boxes, self.volumes)]
        union = tuple(slice(min(b[a].start for b in local_boxes), max(b[a].stop for b in local_boxes))
                      for a in range(ndim))
        relative = [tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(box, union))
                    for box in local_boxes]
        best = np.full(tuple(u.stop - u.start for u in union), np.inf, dtype=np.float32)
        owner = np.full(best.shape, -1, dtype=np.int32)
        for i, (value, volume, box) in enumerate(zip(self.classes, self.volumes, local_boxes)):
            local = self.labels[box]
            background = local == 0
            if not background.any():
                continue
            near = _fp_seed_region(local, int(value), max(2.0, 0.3 * _equivalent_radius(volume, ndim)))
            seeds = _random_points(near, self.rng, int(self.rng.integers(1, 4)))
            dist = self._jittered(_distance_to_points(local.shape, seeds))
            dist[~background] = np.inf
            best_view, owner_view = best[relative[i]], owner[relative[i]]
            nearer = dist < best_view
            best_view[nearer] = dist[nearer]
            owner_view[nearer] = i
        self._fp = []
        for i, box in enumerate(local_boxes):
            flat = np.flatnonzero(owner[relative[i]] == i)
            self._fp.append(_VoxelOrder(box, flat, best[relative[i]].ravel()[flat]))
        return self._fp

    # ---- the count model ------------------------------------------------------------------------
    def counts(self, plan: _Plan, strength: float) -> tuple[np.ndarray, np.ndarray]:
        """Voxels removed from and added to each class at ``strength``: two arrays of shape (n,)."""
        removed = np.zeros_like(self.volumes)
        added = np.zeros_like(self.volumes)
        if plan.removal is not None:
            removed = np.minimum(np.rint(strength * plan.max_removal * self.volumes), self.volumes - 1)
        if plan.max_fp > 0:
            capacity = np.array([order.flat.size for order in self.fp_order()], dtype=np.float64)
            added = np.minimum(np.rint(strength * plan.max_fp * self.volumes), capacity)
        return removed, added

    def model_dsc(self, plan: _Plan, strength: float) -> float:
        """Exact multi-class DSC of ``plan`` at ``strength``, from voxel counts alone."""
        removed, added = self.counts(plan, strength)
        kept = self.volumes - removed
        target = np.searchsorted(self.classes, plan.new_classes)
        predicted = np.bincount(target, weights=kept + added, minlength=self.classes.size)
        overlap = np.where(target == np.arange(self.classes.size), kept, 0.0)
        return float(np.mean(2.0 * overlap / (self.volumes + predicted)))

    def build(self, plan: _Plan, strength: float) -> np.ndarray:
        """The degraded label map of ``plan`` at ``strength`` (same shape and dtype as the input)."""
        removed, added = self.counts(plan, strength)
        out = self.labels.copy()
        if plan.removal is not None:
            for order, count in zip(self.removal_order(plan.removal), removed):
                out[order.box][order.take(int(count))] = 0
        if plan.max_fp > 0:
            for value, order, count in zip(self.classes, self.fp_order(), added):
                out[order.box][order.take(int(count))] = value
        if np.any(plan.new_classes != self.classes):
            out = _apply_class_map(out, self.classes, plan.new_classes)
        return out

    # ---- random plans ---------------------------------------------------------------------------
    def sample_plan(self, large_fp: bool = False) -> _Plan:
        """A random recipe: removal (erosion/holes), false positives, relabelling, or a combination.

        ``large_fp`` allows false positives of up to 40x the class volume when combined with removal
        (instead of 2x): tiny structures need them for the low bands, since every class keeps a voxel.
        """
        rng = self.rng
        relabel = "none"
        if self.classes.size >= 2:
            relabel = ("none", "none", "collapse", "swap")[int(rng.integers(4))]
        removal = (None, "erosion", "holes")[int(rng.integers(3))]
        with_fp = bool(rng.random() < 0.5)
        if removal is None and not with_fp and relabel == "none":
            removal = "erosion"
        if removal is not None and with_fp:
            max_removal, max_fp = float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.1, 40.0 if large_fp else 2.0))
        else:
            max_removal, max_fp = (1.0 if removal else 0.0), (3.0 if with_fp else 0.0)
        if relabel == "collapse":
            new_classes = _collapse_map(self.classes, rng)
        elif relabel == "swap":
            new_classes = _swap_map(self.classes, rng)
        else:
            new_classes = self.classes.copy()
        return _Plan(removal, max_removal, max_fp, new_classes)


def _bisect_strength(dsc_of: Callable[[float], float], target: float,
                     accept: Callable[[float], bool], iterations: int = 50) -> float | None:
    """Strength s in [0, 1] whose DSC is nearest to ``target`` and accepted; None if neither neighbour is.

    ``dsc_of`` must be non-increasing in s, with dsc_of(0) >= target >= dsc_of(1). Bisection keeps
    dsc_of(lo) >= target > dsc_of(hi), ending on the two strengths that bracket the target.
    """
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if dsc_of(mid) >= target:
            lo = mid
        else:
            hi = mid
    for strength in sorted((lo, hi), key=lambda s: abs(dsc_of(s) - target)):
        if accept(dsc_of(strength)):
            return strength
    return None


def degrade_to_band(labels: np.ndarray, band: tuple[float, float] | int, seed: int | None = None,
                    rng: np.random.Generator | None = None, max_tries: int = 50) -> tuple[np.ndarray, float]:
    """A degraded copy of ``labels`` whose DSC against ``labels`` lies in ``band``, and that DSC.

    labels: (z, y, x) or (y, x) integer label map, 0 = background; one or more classes.
    band: one of :data:`DSC_BANDS` (or its index 0-4); [lo, hi), the last one closed.
    seed / rng: the randomness (pass one; the same seed gives the same output).
    max_tries: random recipes tried before giving up (most cost no array pass: a recipe's reach is
    known from voxel counts); the second half also tries false positives of up to 40x the volume.

    DSC is :func:`multiclass_dice` (mean per-class Dice over the input's classes). Each try draws a
    random recipe (nnQC's degradations): erosion, blank holes, false-positive blobs near the
    structure, class collapse or class swap (multi-class maps only), or a combination such as
    erosion + blobs; then a random target DSC inside the band (and inside the recipe's reach), and
    bisects the recipe's strength s in [0, 1] to hit it. Strength is continuous: it is the fraction
    of each class's volume removed (erosion = thresholding the inner distance transform, i.e. a
    continuous erosion radius; holes = balls around 1-5 random centres, a continuous hole radius)
    and the false-positive volume added (1-3 blobs grown around seeds next to the class, a
    continuous blob radius), as a multiple of the class volume. Ties in distance are broken by a
    smooth random jitter (std 0.25 voxel), so a partial last layer goes in patches. Every class
    keeps at least one of its own voxels, so the result is never all background. Work is cropped
    to bounding boxes (with a margin for blobs); about 1 s on a 181x217x181 whole-brain mask.

    Returns (degraded label map with the input's shape and dtype, achieved DSC).
    Raises InputError if ``labels`` is empty, ValueError for an unknown band, RuntimeError if no
    recipe reached the band within ``max_tries`` (not seen in practice).
    """
    labels = _as_label_map(labels)
    lo, hi = resolve_band(band)
    if seed is not None and rng is not None:
        raise ValueError("pass either seed or rng, not both")
    if rng is None:
        rng = np.random.default_rng(seed)
    if not np.any(labels):
        raise InputError(None, "mask is empty: nothing to degrade")

    degrader = _BandDegrader(labels, rng)
    accept = lambda d: dsc_in_band(d, (lo, hi))  # noqa: E731
    for attempt in range(int(max_tries)):
        plan = degrader.sample_plan(large_fp=attempt >= max_tries // 2)
        dsc_of = lambda s, plan=plan: degrader.model_dsc(plan, s)  # noqa: E731
        reach_lo, reach_hi = max(lo, dsc_of(1.0)), min(hi, dsc_of(0.0))
        if reach_lo > reach_hi:
            continue
        target = float(rng.uniform(reach_lo, reach_hi))
        strength = _bisect_strength(dsc_of, target, accept)
        if strength is None:
            continue
        degraded = degrader.build(plan, strength)
        achieved = multiclass_dice(degraded, labels)
        if accept(achieved):
            return degraded, achieved
    raise RuntimeError(f"no degradation reached DSC band {(lo, hi)} in {max_tries} tries")


# --------------------------------------------------------------------------------------------------
# QANet perturbations (instance label maps)
# --------------------------------------------------------------------------------------------------


def _binary_morphology(mask: np.ndarray, operation: str, radius: int) -> np.ndarray:
    """``mask`` (bool) after ``operation`` with a disk/ball of ``radius`` voxels; same shape.

    Distance-transform based (:func:`_erode`, :func:`_dilate`), so large kernels cost no more.
    """
    if operation == "erosion":
        return _erode(mask, radius)
    if operation == "dilation":
        return _dilate(mask, radius)
    if operation == "opening":
        return _dilate(_erode(mask, radius), radius)
    return _erode(_dilate(mask, radius), radius)  # closing


def morphology_perturbation(labels: np.ndarray, rng: np.random.Generator, operation: str | None = None,
                            kernel_radius: int | None = None) -> np.ndarray:
    """QANet's morphological stage: one of {identity, erosion, dilation, opening, closing} per image.

    labels: (z, y, x) or (y, x) instance label map (each positive value = one cell).
    operation: one of :data:`MORPHOLOGY_OPERATIONS`; drawn uniformly by ``rng`` when None.
    kernel_radius: the kernel size sigma, a disk/ball of radius sigma voxels; drawn from U{1..4}
    when None (and the operation is not the identity).

    The operation is applied to every instance separately. Outside the image each instance is
    assumed to continue (edge padding), so cells cut by the border are not eroded from it.
    Growth (dilation, closing) only claims background: overlaps resolve to the existing label, and
    between two growing instances the lower label wins. Instances may vanish or come to touch.
    Returns a new label map, same shape and dtype.
    """
    labels = _as_label_map(labels)
    if operation is None:
        operation = MORPHOLOGY_OPERATIONS[int(rng.integers(len(MORPHOLOGY_OPERATIONS)))]
    if operation not in MORPHOLOGY_OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; expected one of {MORPHOLOGY_OPERATIONS}")
    if operation == "identity":
        return labels.copy()
    radius = int(rng.integers(1, 5)) if kernel_radius is None else int(kernel_radius)
    pad = 2 * radius + 1
    padded = np.pad(labels, pad, mode="edge")
    grows = operation in ("dilation", "closing")
    out = padded.copy() if grows else np.zeros_like(padded)
    for value, box in enumerate(ndi.find_objects(padded), start=1):
        if box is None:
            continue
        box = _grow(box, padded.shape, pad)
        cell = padded[box] == value
        changed = _binary_morphology(cell, operation, radius)
        region = out[box]
        if grows:
            region[changed & (region == 0)] = value
        else:
            region[changed] = value
    return out[(slice(pad, -pad),) * labels.ndim]


def _smooth_displacement_2d(shape: tuple[int, int], rng: np.random.Generator, sigma_px: float,
                            amplitude: float) -> np.ndarray:
    """(2, y, x) displacement (px): per-pixel U(-amplitude, amplitude) noise smoothed by a Gaussian."""
    noise = rng.uniform(-amplitude, amplitude, size=(2,) + tuple(shape))
    return np.stack([ndi.gaussian_filter(component, sigma_px) for component in noise])


def _bspline_displacement_3d(shape: tuple[int, int, int], rng: np.random.Generator, control_points: int,
                             max_displacement_vox: float) -> np.ndarray:
    """(3, z, y, x) displacement (voxels) from a cubic B-spline on a coarse control grid.

    Each of the ``control_points``^3 control points (spanning the image corner to corner) gets a
    displacement of length U(0, max_displacement_vox) in a uniformly random direction; they are the
    B-spline coefficients (as in ITK's BSplineTransform), so the dense field is a convex combination
    of them and never longer than ``max_displacement_vox``.
    """
    grid = (control_points,) * 3
    direction = rng.normal(size=(3,) + grid)
    direction /= np.maximum(np.linalg.norm(direction, axis=0), 1e-12)
    control = direction * rng.uniform(0.0, max_displacement_vox, size=grid)
    zoom = np.array(shape, dtype=float) / control_points
    field = np.stack([ndi.zoom(c, zoom, order=3, mode="nearest", prefilter=False, grid_mode=False)
                      for c in control])
    if field.shape[1:] != tuple(shape):  # zoom rounds the output shape; never seen, but be exact
        coords = [np.linspace(0, control_points - 1, n) for n in shape]
        mesh = np.meshgrid(*coords, indexing="ij")
        field = np.stack([ndi.map_coordinates(c, mesh, order=3, mode="nearest", prefilter=False)
                          for c in control])
    return field


def nonrigid_perturbation(labels: np.ndarray, rng: np.random.Generator, sigma_px: float = 38.0,
                          amplitude: float = 512.0, control_points: int = 8,
                          max_displacement_vox: float = 4.0) -> np.ndarray:
    """QANet's non-rigid stage: resample the label map through a smooth random displacement field.

    labels: (y, x) or (z, y, x) instance (or class) label map.
    2D: v_x, v_y ~ U(-amplitude, amplitude) independently per pixel, each smoothed by a Gaussian of
    ``sigma_px`` px (QANet: +-512, sigma 38). Smoothing white noise of std a/sqrt(3) by a 2D
    Gaussian divides its std by 2*sqrt(pi)*sigma, so the defaults give small, smooth displacements
    (theory: 2.2 px per component). Measured on 20 fields of 420x420 px: away from the border
    (> 2 sigma) |v| has median 2.6 px, RMS 3.1 px, 99th percentile 6.5 px; over the whole image
    (the reflected border noise averages less) median 2.9 px, RMS 3.6 px, 99th percentile 8.5 px,
    max 12 px.
    3D: ``control_points``^3 B-spline control points with displacements of length
    U(0, ``max_displacement_vox``) (QANet: 8 points, D = 4), see :func:`_bspline_displacement_3d`;
    every displacement is at most ``max_displacement_vox`` voxels.
    The output at p is the input at p + v(p), nearest neighbour (``map_coordinates`` order 0), so
    labels stay labels and the output's labels are a subset of the input's; outside the image is
    background. Returns a new label map, same shape and dtype.
    """
    labels = _as_label_map(labels)
    if labels.ndim == 2:
        field = _smooth_displacement_2d(labels.shape, rng, sigma_px, amplitude)
    else:
        field = _bspline_displacement_3d(labels.shape, rng, control_points, max_displacement_vox)
    coords = np.indices(labels.shape, dtype=np.float64) + field
    return ndi.map_coordinates(labels, coords, order=0, mode="constant", cval=0, output=labels.dtype)


def qanet_perturbation(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """QANet's synthetic erroneous segmentation: :func:`morphology_perturbation`, then :func:`nonrigid_perturbation`.

    labels: (y, x) or (z, y, x) instance label map. Returns a new label map, same shape and dtype.
    """
    return nonrigid_perturbation(morphology_perturbation(labels, rng), rng)


def _neighbour_pairs(labels: np.ndarray, max_gap_vox: float) -> set[tuple[int, int]]:
    """Pairs (a, b), a < b, of instances that touch or are at most ``max_gap_vox`` voxels apart."""
    grown = expand_labels(labels, distance=max_gap_vox / 2.0) if max_gap_vox > 0 else labels
    pairs: set[tuple[int, int]] = set()
    for axis in range(labels.ndim):
        a = np.moveaxis(grown, axis, 0)[:-1].ravel()
        b = np.moveaxis(grown, axis, 0)[1:].ravel()
        touching = (a != b) & (a > 0) & (b > 0)
        low, high = np.minimum(a[touching], b[touching]), np.maximum(a[touching], b[touching])
        pairs.update(map(tuple, np.unique(np.stack([low, high], axis=1), axis=0).tolist()))
    return pairs


def merge_neighbours(labels: np.ndarray, rng: np.random.Generator, n_merges: int = 1,
                     max_gap_vox: float = 2.0) -> np.ndarray:
    """Merge ``n_merges`` random pairs of neighbouring instances into one (an under-segmentation error).

    labels: (y, x) or (z, y, x) instance label map. Neighbours touch or are at most ``max_gap_vox``
    voxels apart. Each merge picks a random neighbouring pair among the current instances (so a
    merged instance can merge again) and gives both the lower label; the background gap between
    them is bridged by a closing of the merged instance (only background is filled). Stops early when
    no neighbouring pair is left. Returns a new label map, same shape and dtype.
    """
    labels = _as_label_map(labels)
    pairs = sorted(_neighbour_pairs(labels, max_gap_vox))
    parent: dict[int, int] = {}
    for _ in range(int(n_merges)):
        if not pairs:
            break
        keep, drop = pairs[int(rng.integers(len(pairs)))]
        parent[drop] = keep
        renamed = ((keep if a == drop else a, keep if b == drop else b) for a, b in pairs)
        pairs = sorted({(min(a, b), max(a, b)) for a, b in renamed if a != b})
    if not parent:
        return labels.copy()

    def root(value: int) -> int:
        while value in parent:
            value = parent[value]
        return value

    dropped = np.array(sorted(parent), dtype=np.int64)
    out = _apply_class_map(labels, dropped, np.array([root(v) for v in dropped], dtype=labels.dtype))
    radius = int(np.ceil(max_gap_vox / 2.0)) + 1
    for value in sorted({root(v) for v in parent}):
        box = _bbox(out == value, margin=radius + 1)
        region = out[box]
        closed = _binary_morphology(region == value, "closing", radius)
        region[closed & (region == 0)] = value
    return out


# --------------------------------------------------------------------------------------------------
# Plain sweeps
# --------------------------------------------------------------------------------------------------


def erosion_dilation_sweep(mask: np.ndarray, radii_mm: Sequence[float],
                           spacing: Sequence[float] | None = None) -> list[tuple[float, np.ndarray]]:
    """Erode (radius < 0) or dilate (radius > 0) a binary mask by each of ``radii_mm``.

    mask: (z, y, x) or (y, x) array, nonzero = foreground. spacing: voxel size in mm in array order
    (default 1 mm). Uses the signed Euclidean distance in mm: erosion by r keeps the voxels more
    than r mm from the background (outside the image counts as background), dilation by r adds
    the voxels at most r mm from the foreground; radius 0 returns the mask itself.
    Returns [(radius_mm, bool mask of the input's shape), ...] in the order of ``radii_mm``.
    """
    fg = np.asarray(mask) != 0
    if fg.ndim not in (2, 3):
        raise ValueError(f"mask must be 2D or 3D, got shape {fg.shape}")
    spacing = tuple(float(s) for s in (spacing if spacing is not None else (1.0,) * fg.ndim))
    if len(spacing) != fg.ndim:
        raise ValueError(f"spacing {spacing} does not match a {fg.ndim}D mask")
    inside = outside = None
    results = []
    for radius in (float(r) for r in radii_mm):
        if radius < 0:
            if inside is None:
                inside = _edt(np.pad(fg, 1), spacing)[(slice(1, -1),) * fg.ndim]
            results.append((radius, inside > -radius))
        elif radius > 0:
            if outside is None:
                outside = _edt(~fg, spacing) if fg.any() else np.full(fg.shape, np.inf, np.float32)
            results.append((radius, fg | (outside <= radius)))
        else:
            results.append((radius, fg.copy()))
    return results
