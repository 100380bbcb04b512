"""QANet training and test samples: simulated nuclei, perturbed ground truth, patch-level true SEG.

One *sample* is a patch of a simulated image (:func:`SegQCLib.data.cells.simulate_cells`, parameters
drawn by :func:`~SegQCLib.data.cells.random_parameters`), the same patch of an erroneous
segmentation made from the exact ground truth, and the true quality of that patch:
``seg_measure(erroneous_patch, gt_patch)`` (and optionally the negative-exponential MHD).

Erroneous segmentations (:func:`perturb_instances`), one kind per perturbed image:

- ``qanet``: QANet's pipeline (:func:`SegQCLib.degrade.qanet_perturbation`: one morphological
  operation of random kind and radius 1-4 on every instance, then a smooth non-rigid deformation);
- ``mixed``: instances in up to three random groups, each group its own morphological operation,
  then the non-rigid deformation (methods err differently on dim and bright cells);
- ``near``: only a weaker non-rigid deformation (QANet's amplitude times U(0, 0.6) and
  min(1, radius / 15 px); 15 % untouched): near-perfect segmentations;
- ``algorithmic``: a real method run on the simulated image (global Otsu/Li/triangle threshold with
  a random offset or a local threshold, connected components, optionally split by a distance
  watershed), the kind of error real pipelines make;

then, independently, merges of neighbours (:func:`SegQCLib.degrade.merge_neighbours`, p 0.3),
splits of instances into two along a random line (p 0.2), dropped instances (p 0.15) and small
false-positive blobs (p 0.1; SEG does not penalise them, and the model should learn that).

Patch targets: a GT object counts in a patch when at least ``max(8, 0.1 * median object size)``
of its voxels lie inside (slivers cut by the patch edge are removed from the GT patch before
scoring; the network input is not changed). Patches without a counted GT object are skipped
(SEG is undefined there). Two SEG targets:

- ``seg``: SEG of the cropped patches, the paper's patch score (GT objects matched inside the patch);
- ``seg_objects``: the mean of the counted GT objects' **whole-image** SEG scores (IoU with their
  match in the full image, 0 unmatched). Cropping forgives merges: a merged object cut by the patch
  edge still covers more than half of the nucleus inside. Patch truths averaged as
  :meth:`~SegQCLib.models.qanet.QANetQC.assess_instances` averages them gave 0.82 with ``seg`` for
  a threshold segmentation of cells3d whose SEG is 0.70, and 0.77 with ``seg_objects``
  (``benchmarks/qanet_merges.py``). The image score is averaged from this head when a model has it.

``nemhd`` (negative-exponential MHD) is patch-level. The histogram of ``seg`` is then flattened
(:func:`balance`).

For the 2D model, part of the pool are patches of z slices of simulated 3D stacks
(``stack_slices``): a 2D model scoring a real z stack slice by slice meets nucleus caps cut by the
focal plane and z blur, which plain 2D images never show.

Splits are fixed by seed (train 0, val 1, test 2): a held-out test set never shares a simulated
image with training.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy import ndimage as ndi

from ..data.cells import random_parameters, simulate_cells
from ..degrade import merge_neighbours, morphology_perturbation, nonrigid_perturbation
from ..metrics import instance_metrics, seg_measure, seg_per_object
from ..models.qanet import DEFAULT_TARGETS, normalise_image, trinary

KINDS = ("qanet", "mixed", "near", "algorithmic")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


@dataclass
class QANetSamples:
    """Patches ready for the network and what is true about them.

    image: (N, *P) float16 normalised image patches (:func:`~SegQCLib.models.qanet.normalise_image`
    of the whole image, then cropped); tri: (N, *P) uint8 trinary maps of the erroneous segmentation;
    target: (N, k) float32 true qualities in the order of ``targets``; n_gt / n_pred: (N,) GT objects
    counted / evaluated instances present in the patch; group: (N,) simulated image id; kind: (N,)
    index into :data:`KINDS`.
    """

    image: np.ndarray
    tri: np.ndarray
    target: np.ndarray
    n_gt: np.ndarray
    n_pred: np.ndarray
    group: np.ndarray
    kind: np.ndarray
    targets: tuple[str, ...] = ("seg",)

    def __len__(self) -> int:
        return int(len(self.image))

    @property
    def seg(self) -> np.ndarray:
        return self.target[:, 0]

    def subset(self, index: np.ndarray) -> "QANetSamples":
        return QANetSamples(**{f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "targets"},
                            targets=self.targets)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{f.name: getattr(self, f.name) for f in fields(self) if f.name != "targets"},
                 targets=np.array(self.targets))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "QANetSamples":
        with np.load(path) as data:
            kw = {f.name: data[f.name] for f in fields(cls) if f.name != "targets"}
            return cls(**kw, targets=tuple(str(t) for t in data["targets"]))

    @classmethod
    def concat(cls, sets: Iterable["QANetSamples"]) -> "QANetSamples":
        sets = list(sets)
        offset, groups = 0, []
        for s in sets:
            groups.append(s.group + offset)
            offset += int(s.group.max()) + 1 if len(s) else 0
        kw = {f.name: np.concatenate([getattr(s, f.name) for s in sets]) for f in fields(cls)
              if f.name not in ("targets", "group")}
        return cls(**kw, group=np.concatenate(groups), targets=sets[0].targets)


# ------------------------------------------------------------------------------ perturbations
def _split_instances(labels: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Cut a ``fraction`` of the instances in two along a random plane through their centroid (the
    second half gets a new label), an over-segmentation error."""
    out = labels.copy()
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return out
    chosen = rng.choice(ids, size=max(1, int(round(fraction * ids.size))), replace=False)
    next_label = int(labels.max()) + 1
    boxes = ndi.find_objects(labels)
    for value in chosen:
        box = boxes[int(value) - 1]
        if box is None:
            continue
        mask = labels[box] == value
        coords = np.argwhere(mask).astype(np.float64)
        normal = rng.normal(size=labels.ndim)
        if labels.ndim == 3:
            normal[0] *= 0.3  # mostly vertical cuts of flat nuclei
        side = (coords - coords.mean(axis=0) + rng.normal(0, 1.0, labels.ndim)) @ normal > 0
        region = out[box]
        pts = coords[side].astype(int)
        if 0 < len(pts) < len(coords):
            region[tuple(pts.T)] = next_label
            next_label += 1
    return out


def _drop_instances(labels: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Remove a ``fraction`` of the instances (missed cells)."""
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return labels.copy()
    chosen = rng.choice(ids, size=max(1, int(round(fraction * ids.size))), replace=False)
    return np.where(np.isin(labels, chosen), 0, labels).astype(labels.dtype)


def _false_positives(labels: np.ndarray, rng: np.random.Generator, radius: float) -> np.ndarray:
    """Add 1-4 small blobs (radius ~ 0.3-0.7 ``radius``) in the background as new instances."""
    out = labels.copy()
    next_label = int(labels.max()) + 1
    background = np.argwhere(labels == 0)
    if len(background) == 0:
        return out
    grid = np.indices(labels.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 5))):
        c = background[rng.integers(len(background))]
        r = radius * rng.uniform(0.3, 0.7)
        dist2 = sum((g - ci) ** 2 for g, ci in zip(grid, c))
        blob = (dist2 <= r * r) & (out == 0)
        out[blob] = next_label
        next_label += 1
    return out


def _mixed_morphology(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each of up to three random groups of instances gets its own random morphological operation."""
    ids = np.unique(labels[labels > 0])
    if ids.size == 0:
        return labels.copy()
    groups = rng.integers(0, int(rng.integers(2, 4)), size=ids.size)
    out = np.zeros_like(labels)
    for g in np.unique(groups):
        part = np.where(np.isin(labels, ids[groups == g]), labels, 0).astype(labels.dtype)
        changed = morphology_perturbation(part, rng)
        free = out == 0
        out[free] = changed[free]
    return out


def algorithmic_segmentation(image: np.ndarray, rng: np.random.Generator, radius: float) -> np.ndarray:
    """A real, randomly configured classical segmentation of a nuclei image (labels int32).

    Smoothing sigma ~ U(0.5, 2) px; a global threshold (Otsu, Li or triangle) scaled by
    U(0.75, 1.3), or a local mean threshold (block ~ 4 ``radius``); holes filled; then either
    connected components or a watershed on the distance transform from its maxima at least
    ``U(0.5, 1.2) * radius`` apart (splitting touching nuclei, sometimes over-splitting).
    """
    from skimage.filters import threshold_li, threshold_local, threshold_otsu, threshold_triangle
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    smooth = ndi.gaussian_filter(image.astype(np.float32), rng.uniform(0.5, 2.0))
    method = int(rng.integers(4))
    if method == 3:
        block = int(4 * radius) | 1
        if image.ndim == 2:
            mask = smooth > threshold_local(smooth, block, offset=-rng.uniform(0, 0.1) * float(smooth.std()))
        else:
            local = ndi.uniform_filter(smooth, block)
            mask = smooth > local + rng.uniform(-0.05, 0.2) * float(smooth.std())
        mask &= smooth > threshold_otsu(smooth) * 0.6
    else:
        t = (threshold_otsu, threshold_li, threshold_triangle)[method](smooth)
        mask = smooth > t * rng.uniform(0.75, 1.3)
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask))
    if rng.random() < 0.5:
        return ndi.label(mask)[0].astype(np.int32)
    dist = ndi.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=max(1, int(rng.uniform(0.5, 1.2) * radius)), labels=ndi.label(mask)[0],
                           exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask).astype(np.int32)


def perturb_instances(labels: np.ndarray, rng: np.random.Generator, image: np.ndarray | None = None,
                      radius: float = 10.0) -> tuple[np.ndarray, str]:
    """An erroneous segmentation of the GT ``labels`` and its kind (see the module docstring).

    labels: (y, x) or (z, y, x) GT instances; image: the simulated image (needed for
    ``algorithmic``); radius: typical nucleus radius in px. Returns (int32 labels, kind).
    """
    labels = labels.astype(np.int32)
    r = rng.random()
    if image is not None and r < 0.2:
        kind, out = "algorithmic", algorithmic_segmentation(image, rng, radius)
    elif r < 0.3:
        kind = "near"  # small deformations: QANet's field scaled down with the nucleus size
        amplitude = 512.0 * rng.uniform(0.0, 0.6) * min(1.0, radius / 15.0)
        out = nonrigid_perturbation(labels, rng, amplitude=amplitude,
                                    max_displacement_vox=4.0 * amplitude / 512.0) if rng.random() < 0.85 else labels.copy()
    elif r < 0.55:
        kind, out = "mixed", nonrigid_perturbation(_mixed_morphology(labels, rng), rng)
    else:
        kind, out = "qanet", nonrigid_perturbation(morphology_perturbation(labels, rng), rng)
    n = int(len(np.unique(out))) - 1
    if n >= 2 and rng.random() < 0.3:
        out = merge_neighbours(out, rng, n_merges=int(rng.integers(1, max(2, n // 4) + 1)),
                               max_gap_vox=float(rng.uniform(1.0, 4.0)))
    if n >= 1 and rng.random() < 0.2:
        out = _split_instances(out, rng, float(rng.uniform(0.05, 0.4)))
    if n >= 1 and rng.random() < 0.15:
        out = _drop_instances(out, rng, float(rng.uniform(0.05, 0.4)))
    if rng.random() < 0.1:
        out = _false_positives(out, rng, radius)
    return out.astype(np.int32), kind


# ------------------------------------------------------------------------------ patches
def object_score_lookup(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(gt.max() + 1,) float64: each GT object's SEG score over the whole image (0 for unused ids)."""
    ids, scores = seg_per_object(pred, gt)
    lookup = np.zeros(int(gt.max()) + 1)
    lookup[ids] = scores
    return lookup


def patch_targets(pred: np.ndarray, gt: np.ndarray, min_voxels: int, targets: tuple[str, ...],
                  object_scores: np.ndarray | None = None) -> list[float] | None:
    """True qualities of one patch (GT slivers below ``min_voxels`` removed); None without GT object.

    targets: names among :data:`~SegQCLib.models.qanet.TARGETS`. object_scores:
    :func:`object_score_lookup` of the whole image, needed for ``seg_objects`` (the mean whole-image
    score of the GT objects counted in the patch); ``seg`` is SEG of the two cropped patches.
    """
    ids, counts = np.unique(gt[gt > 0], return_counts=True)
    small = ids[counts < min_voxels]
    if small.size:
        gt = np.where(np.isin(gt, small), 0, gt)
    if not np.any(gt):
        return None
    values: dict[str, float] = {}
    if "seg_objects" in targets:
        if object_scores is None:
            raise ValueError("the seg_objects target needs the whole image's object_scores")
        values["seg_objects"] = float(object_scores[ids[counts >= min_voxels]].mean())
    patch_level = [t for t in targets if t != "seg_objects"]
    if patch_level == ["seg"]:
        values["seg"] = seg_measure(pred, gt)
    elif patch_level:
        values.update(instance_metrics(pred, gt))
    return [float(values[t]) for t in targets]


#: Share of a simulated image covered by nuclei (log-uniform): sparse to crowded.
FILL_RANGE = (0.01, 0.5)
#: Version of the simulated training data: part of the sample-cache file names, so that a cache made
#: by an older simulator or sampler is not reused (2: sparse scenes, FILL_RANGE from 0.01; 3: touching
#: clusters of nuclei, CellSimParameters.clustering; 4: SEG target from whole-image object scores;
#: 5: both, ``seg`` from the cropped patches again and ``seg_objects`` from whole-image object scores).
SAMPLES_VERSION = 5


def _default_geometry(dims: int, patch: int) -> dict:
    if dims == 2:
        return {"image_shape": (3 * patch, 3 * patch), "radius_range": (5.0, 15.0), "patches": 8}
    return {"image_shape": (max(patch + 8, 32), 3 * patch, 3 * patch), "radius_range": (4.5, 8.5), "patches": 6}


def _stack_depth(params, rng: np.random.Generator) -> int:
    """Depth (z px) of a simulated stack whose z slices become 2D samples: 1-3 nucleus heights, so that
    slices through the middle, the caps and the out-of-focus haze of nuclei all occur."""
    height = 2.0 * params.radius * params.z_ratio
    return int(np.clip(rng.uniform(1.0, 3.0) * height, 8, 48))


def simulate_scene(rng: np.random.Generator, dims: int, shape: tuple[int, ...], radius_range: tuple[float, float],
                   fill_range: tuple[float, float] = FILL_RANGE, stack: bool = False,
                   overlap_range: tuple[float, float] | None = None):
    """One simulated training scene: ``(params, image float32, gt int32 labels)``.

    dims: 2 or 3 (the simulation's); shape: image shape, in-plane only when ``stack`` (a 3D stack
    whose depth is :func:`_stack_depth`); parameters from :func:`random_parameters`, nuclei
    covering a share of the image drawn log-uniformly from ``fill_range``. overlap_range: when
    given, ``max_overlap`` is redrawn uniformly from it (negative values: neighbours kiss across a
    gap, as in cells3d); None keeps :func:`random_parameters`' draw and random stream.
    """
    params = random_parameters(rng, radius_range, ndim=dims)
    if overlap_range is not None:
        params = replace(params, max_overlap=float(rng.uniform(*overlap_range)))
    sim_shape = (_stack_depth(params, rng),) + tuple(shape) if stack else tuple(shape)
    # share of the image covered by nuclei, log-uniform from sparse (a few nuclei, wide empty
    # background, as in a scratch assay) to crowded: with 0.08-0.5 only, exact labels of sparse
    # simulated scenes were scored 0.89 instead of ~1
    fill = float(np.exp(rng.uniform(np.log(fill_range[0]), np.log(fill_range[1]))))
    per_cell = np.pi * params.radius ** 2 if dims == 2 else 4.0 / 3.0 * np.pi * params.radius ** 3 * params.z_ratio
    n_cells = max(1, int(fill * np.prod(sim_shape) / per_cell))
    image, gt = simulate_cells(sim_shape, n_cells, seed=int(rng.integers(2 ** 31)), params=params)
    return params, image, gt.astype(np.int32)


def generate_samples(dims: int, n_images: int, seed: int, patch: int = 64, perturbations: int = 3,
                     patches_per_perturbation: int | None = None, image_shape: tuple[int, ...] | None = None,
                     radius_range: tuple[float, float] | None = None,
                     targets: tuple[str, ...] = DEFAULT_TARGETS,
                     fill_range: tuple[float, float] = FILL_RANGE, stack_slices: bool = False,
                     progress: bool = True, log=print) -> QANetSamples:
    """A pool of samples from ``n_images`` simulated images (``perturbations`` erroneous segmentations
    each, ``patches_per_perturbation`` random patches of each).

    dims: 2 or 3; patch: side in px; image_shape: simulated image shape (default 3 patches wide;
    3D at least patch + 8 deep); radius_range: in-plane nucleus radius range in px (default 5-15 in
    2D, 4.5-8.5 in 3D); fill_range: share of the image covered by nuclei (drawn log-uniformly).
    Image ``i`` uses seed ``seed * 1_000_003 + i``, so splits with different
    ``seed`` never share an image. Not balanced: see :func:`balance`.

    stack_slices (2D only): each "image" is a simulated 3D stack (in-plane ``image_shape``, depth
    :func:`_stack_depth`, 3D PSF), perturbed in 3D as a 3D method would err, and the 2D samples are
    patches of random z slices, the image normalised over the whole stack — exactly what the 2D
    model sees when it scores a z stack slice by slice (:meth:`QANetQC.assess_instances` on a 3D
    input). Plain 2D images have no nucleus caps cut by the focal plane nor z blur, and a 2D model
    trained only on them failed on the top and bottom slices of real stacks (cells3d).
    """
    whole = "seg_objects" in targets  # whole-image object scores are needed
    if stack_slices and dims != 2:
        raise ValueError("stack_slices is for 2D samples (slices of simulated 3D stacks)")
    geometry = _default_geometry(dims, patch)
    shape = tuple(image_shape or geometry["image_shape"])
    radius_range = tuple(radius_range or geometry["radius_range"])
    per = int(patches_per_perturbation or geometry["patches"])
    images, tris, tgts, n_gt, n_pred, group, kinds = [], [], [], [], [], [], []
    from ..progress import progress_bar

    with progress_bar(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"simulating {dims}D (seed {seed})", total=n_images)
        for i in range(n_images):
            rng = np.random.default_rng(seed * 1_000_003 + i)
            params, image, gt = simulate_scene(rng, 3 if stack_slices else dims, shape, radius_range, fill_range,
                                               stack=stack_slices)
            sim_shape = image.shape
            if gt.max() == 0:
                bar.advance(task)
                continue
            norm = normalise_image(image)  # a stack: percentiles over the whole stack, as at inference
            sizes = np.bincount(gt.ravel())[1:]
            # slivers: below 10 % of the median object (for stack slices, of a nucleus's largest cross-section)
            typical = np.pi * params.radius ** 2 if stack_slices else float(np.median(sizes[sizes > 0]))
            min_vox = max(8, int(0.1 * typical))
            for _ in range(perturbations):
                pred, kind = perturb_instances(gt, rng, image, params.radius)
                tri = None if stack_slices else trinary(pred)
                # seg_objects: whole-image scores of the GT objects in the patch (per z slice for stack
                # slices, as the 2D model is evaluated slice by slice)
                scores = {} if stack_slices or not whole else {None: object_score_lookup(pred, gt)}
                kept = 0
                for _try in range(per * 3):  # random corners; keep `per` patches holding a GT object
                    corner = [int(rng.integers(0, n - patch + 1)) for n in shape]
                    box = tuple(slice(c, c + patch) for c in corner)
                    if stack_slices:  # a patch of one z slice; labels and trinary map of that slice
                        box = (int(rng.integers(0, sim_shape[0])),) + box
                    z = box[0] if stack_slices else None
                    if whole and z not in scores:
                        scores[z] = object_score_lookup(pred[z], gt[z])
                    values = patch_targets(pred[box], gt[box], min_vox, targets, scores.get(z))
                    if values is None or any(not np.isfinite(v) for v in values):
                        continue
                    images.append(norm[box].astype(np.float16))
                    tris.append(trinary(pred[box[0]])[box[1:]] if stack_slices else tri[box])
                    tgts.append(values)
                    n_gt.append(int(np.count_nonzero(np.unique(gt[box]))))
                    n_pred.append(int(np.count_nonzero(np.unique(pred[box]))))
                    group.append(i)
                    kinds.append(KINDS.index(kind))
                    kept += 1
                    if kept >= per:
                        break
            bar.advance(task)
    k = len(targets)
    return QANetSamples(
        image=np.stack(images) if images else np.zeros((0,) + (patch,) * dims, np.float16),
        tri=np.stack(tris) if tris else np.zeros((0,) + (patch,) * dims, np.uint8),
        target=np.asarray(tgts, np.float32).reshape(-1, k),
        n_gt=np.asarray(n_gt, np.int16), n_pred=np.asarray(n_pred, np.int16),
        group=np.asarray(group, np.int32), kind=np.asarray(kinds, np.uint8), targets=tuple(targets))


def balance(samples: QANetSamples, n: int | None = None, bins: int = 10, seed: int = 0,
            max_ratio: float = 3.0) -> QANetSamples:
    """Flatten the histogram of true SEG over ``bins`` equal bins of [0, 1].

    Every bin keeps at most ``max_ratio`` times the mean count of the non-empty bins (exactly
    ``n`` / bins when ``n`` is given, then topped up from the leftovers to ``n``); extra samples of crowded bins are dropped at random, so
    crowded SEG ranges do not dominate training. Returns the kept samples in random order.
    """
    rng = np.random.default_rng(seed)
    seg = samples.seg
    which = np.clip((seg * bins).astype(int), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    cap = (n / bins) if n else counts[counts > 0].mean()
    cap = int(max_ratio * cap) if not n else int(cap)
    keep = []
    for b in range(bins):
        idx = np.flatnonzero(which == b)
        rng.shuffle(idx)
        keep.append(idx[:cap])
    kept = np.concatenate(keep)
    if n and len(kept) < n:  # fill from the leftovers, uniformly
        rest = np.setdiff1d(np.arange(len(seg)), kept)
        kept = np.concatenate([kept, rng.choice(rest, size=min(n - len(kept), len(rest)), replace=False)])
    rng.shuffle(kept)
    return samples.subset(kept)


def seg_histogram(seg: np.ndarray, bins: int = 10) -> list[int]:
    """Counts of true SEG per bin of [0, 1] (for logs and model cards)."""
    return np.bincount(np.clip((np.asarray(seg) * bins).astype(int), 0, bins - 1), minlength=bins).tolist()
