"""Dataset fingerprint and the slice preprocessing it drives (nnQC / nnU-Net style).

A :class:`Fingerprint` summarises a labelled dataset: median spacing, median foreground box,
orientation, foreground intensity statistics, labels, modality. :func:`preprocess` uses it to turn
an image (and mask) of any grid into fixed-size axial slices for a slice-based model, and
:func:`postprocess` maps the model's mask slices back onto the input grid.

Geometry is always described in **RAS array order** (after :func:`reorient_to_ras`): array axis 0
runs inferior -> superior, axis 1 posterior -> anterior, axis 2 left -> right (SimpleITK calls this
orientation "RAS"). Spacings are (z, y, x) mm in that order.

The preprocessing steps and when they are exact:

1. **Reorient to RAS**: an axis permutation and flips chosen from the direction matrix (nearest
   axes for oblique volumes, as ``DICOMOrient`` does); no interpolation, always exact.
2. **In-plane resampling** to the fingerprint's median in-plane spacing, only when the case's
   spacing differs by more than 1e-3 mm (image linear, mask nearest neighbour). Slices are never
   resampled along z.
3. **Crop / pad** to ``size`` x ``size`` around the centre of the mask's in-plane bounding box (the
   image foreground's centre, by Otsu, when there is no mask). The window is centred so that the
   whole structure lies inside whenever it fits. Padding uses the image minimum.
   *Oversize rule*: when the structure's box or the fingerprint's median box is wider than ``size``
   voxels at the fingerprint spacing, the in-plane spacing is enlarged by one factor (``zoom < 1``)
   so that the larger of the two fits. The model input keeps its fixed size and every case of the
   dataset sees the same scale; the price is a resampling, so that case's round trip is no longer
   exact.
4. **Intensity normalisation**: CT: clip to the fingerprint's foreground [p0.5, p99.5], then
   z-score with its foreground mean/std. MR and others: clip to the case's own [p0.5, p99.5] of
   nonzero voxels and scale to [0, 1].

:func:`postprocess` is the exact inverse of steps 1-3 for masks: without resampling,
``postprocess(preprocess(image, mask, fp).mask, transform)`` returns ``mask`` unchanged whenever the
in-plane spacing matches the fingerprint's and both the mask's in-plane box and the fingerprint's
median box fit in ``size`` x ``size`` (``transform.exact``). With resampling the round trip is
approximate (nearest neighbour both ways; measured on MNI152: DSC 0.99 for GM/WM at 0.8 x 1.3 mm,
0.99 for a brain zoomed into 128 x 128, 0.97 for the thin GM ribbon at 0.7 mm). Whatever lies
outside the crop window comes back as background.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import SimpleITK as sitk

from .data.cases import Case, dataset_modality, read_dataset
from .data.sources import LabelledSubject
from .errors import InputError
from .io import Segmentation
from .volume import SPACING_TOL_MM, Grid, Volume

FINGERPRINT_VERSION = 1
#: Foreground voxels sampled per case for the intensity statistics (nnU-Net samples 10k too).
MAX_SAMPLES_PER_CASE = 10_000
#: Intensity percentiles of the fingerprint and of MR normalisation.
PERCENTILES = (0.5, 99.5)

CaseLike = Union[Case, LabelledSubject]


# --------------------------------------------------------------------------- fingerprint
@dataclass
class Fingerprint:
    """Summary of a labelled dataset (geometry in RAS array order, see the module docstring).

    spacing: median voxel spacing (z, y, x) mm.
    box_voxels / box_mm: median size (z, y, x) of the foreground bounding box, voxels / mm.
    orientation: most common input orientation code ("RAS", "LPS", ... as SimpleITK names them).
    intensity_*: foreground intensity percentiles 0.5 / 99.5, mean and std (sampled voxels).
    labels: label value -> structure name.  modality: "CT", "MR", ... or "unknown".
    n_cases: cases read; n_foreground_cases: those with a non-empty foreground.
    """

    spacing: tuple[float, float, float]
    box_voxels: tuple[float, float, float]
    box_mm: tuple[float, float, float]
    orientation: str
    intensity_p0_5: float
    intensity_p99_5: float
    intensity_mean: float
    intensity_std: float
    labels: dict[int, str] = field(default_factory=dict)
    modality: str = "unknown"
    n_cases: int = 0
    n_foreground_cases: int = 0
    version: int = FINGERPRINT_VERSION

    @property
    def in_plane_spacing(self) -> tuple[float, float]:
        """Median in-plane spacing (y, x) mm."""
        return self.spacing[1], self.spacing[2]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (label values become string keys)."""
        data = asdict(self)
        data["labels"] = {str(v): n for v, n in sorted(self.labels.items())}
        for key in ("spacing", "box_voxels", "box_mm"):
            data[key] = [float(x) for x in data[key]]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Fingerprint":
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        version = int(data.get("version", FINGERPRINT_VERSION))
        if version > FINGERPRINT_VERSION:
            raise InputError("fingerprint", f"version {version} is newer than this SegQC reads ({FINGERPRINT_VERSION})")
        data["labels"] = {int(v): str(n) for v, n in (data.get("labels") or {}).items()}
        for key in ("spacing", "box_voxels", "box_mm"):
            data[key] = tuple(float(x) for x in data[key])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path: str | Path) -> Path:
        """Write the fingerprint as JSON; returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> "Fingerprint":
        """Read a fingerprint written by :meth:`to_json`."""
        path = Path(path)
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise InputError(path, "no such file") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise InputError(path, f"not a SegQC fingerprint ({err})") from None


def _load_case(item: CaseLike) -> tuple[str, Volume, Segmentation]:
    if isinstance(item, LabelledSubject):
        return item.subject, item.image, item.segmentation
    image, seg = item.load()
    return item.case_id, image, seg


def _foreground(seg: Segmentation, label: str | int | None) -> np.ndarray:
    """(z, y, x) bool: one structure, or every labelled voxel when ``label`` is None."""
    return seg.mask(label) if label is not None else (seg.layers != 0).any(axis=0)


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive (lo, hi) voxel corners of the mask's bounding box, or None when it is empty."""
    if not mask.any():
        return None
    lo, hi = [], []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(hits[0])
        hi.append(hits[-1])
    return np.array(lo), np.array(hi)


@dataclass
class _CaseStats:
    """What one case contributes: RAS spacing (z, y, x) mm, orientation code, RAS foreground box
    size (voxels; None when empty) and sampled foreground intensities."""

    spacing: np.ndarray
    orientation: str
    box: np.ndarray | None
    samples: np.ndarray


def _case_stats(image: Volume, seg: Segmentation, label: str | int | None, rng: np.random.Generator) -> _CaseStats:
    axes = list(ras_axes(image.grid.direction)[0])
    spacing = np.asarray(image.spacing, dtype=float)[axes]
    mask = _foreground(seg, label)
    box = bounding_box(mask)
    values = image.array[mask]
    if values.size > MAX_SAMPLES_PER_CASE:
        values = rng.choice(values, MAX_SAMPLES_PER_CASE, replace=False)
    return _CaseStats(spacing, orientation_code(image.grid.direction),
                      None if box is None else (box[1] - box[0] + 1)[axes], values.astype(np.float64))


def _add_labels(labels: dict[int, str], seg: Segmentation, label: str | int | None) -> None:
    """Collect value -> name; a real name replaces a made-up one (the value as text), never another name."""
    for segment in seg.segments if label is None else [seg.find(label)]:
        if labels.get(segment.value, str(segment.value)) == str(segment.value):
            labels[segment.value] = segment.name


def compute_fingerprint(cases: Sequence[CaseLike], progress: bool = False, label: str | int | None = None,
                        modality: str | None = None, seed: int = 0) -> Fingerprint:
    """Fingerprint of ``cases`` (:class:`Case` or :class:`LabelledSubject`).

    ``label`` restricts the foreground to one structure (value or name); by default every labelled
    voxel counts. ``modality`` overrides the subjects' own (Cases carry none: "unknown").
    Intensities: at most :data:`MAX_SAMPLES_PER_CASE` foreground voxels per case, drawn with
    ``seed``, pooled over cases. ``progress`` prints one line per case on stderr.
    Raises :class:`InputError` when no case has any foreground.
    """
    if not cases:
        raise InputError("fingerprint", "no cases given")
    stats, labels, modalities = [], {}, Counter()
    for index, item in enumerate(cases):
        name, image, seg = _load_case(item)
        if progress:
            print(f"fingerprint: {index + 1}/{len(cases)} {name}", file=sys.stderr, flush=True)
        stats.append(_case_stats(image, seg, label, np.random.default_rng([seed, index])))
        _add_labels(labels, seg, label)
        modalities[getattr(item, "modality", "unknown")] += 1
    with_fg = [s for s in stats if s.box is not None]
    if not with_fg:
        what = f"label {label!r}" if label is not None else "any label"
        raise InputError("fingerprint", f"no foreground voxels of {what} in any of the {len(cases)} segmentations")
    pooled = np.concatenate([s.samples for s in with_fg])
    p_lo, p_hi = np.percentile(pooled, PERCENTILES)
    as_tuple = lambda values: tuple(float(v) for v in np.median(values, axis=0))  # noqa: E731
    return Fingerprint(
        spacing=as_tuple([s.spacing for s in stats]),
        box_voxels=as_tuple([s.box for s in with_fg]),
        box_mm=as_tuple([s.box * s.spacing for s in with_fg]),
        orientation=Counter(s.orientation for s in stats).most_common(1)[0][0],
        intensity_p0_5=float(p_lo), intensity_p99_5=float(p_hi),
        intensity_mean=float(pooled.mean()), intensity_std=float(pooled.std()),
        labels=dict(sorted(labels.items())), modality=modality or modalities.most_common(1)[0][0],
        n_cases=len(cases), n_foreground_cases=len(with_fg))


def fingerprint_dataset(path: str | Path, progress: bool = False, label: str | int | None = None) -> Fingerprint:
    """Fingerprint of an MSD / nnU-Net folder or a CSV of pairs (see :func:`read_dataset`)."""
    return compute_fingerprint(read_dataset(path), progress=progress, label=label, modality=dataset_modality(path))


# --------------------------------------------------------------------------- orientation
def orientation_code(direction: Sequence[float] | np.ndarray) -> str:
    """SimpleITK's three-letter orientation of an ITK direction matrix ("RAS", "LPS", ...).

    Letter ``c`` is where index axis ``c`` (i = x, j = y, k = z) points: "RAS" = x towards the
    patient's right, y anterior, z superior.
    """
    return sitk.DICOMOrientImageFilter_GetOrientationFromDirectionCosines(
        [float(v) for v in np.asarray(direction, dtype=float).ravel()])


def ras_axes(direction: Sequence[float] | np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """The axis permutation and flips that bring a (z, y, x) array to RAS array order.

    ``direction`` is ITK's 3x3 direction (columns = index axes i, j, k in LPS). Returns
    ``axes`` (RAS array axis ``t`` takes input array axis ``axes[t]``) and ``flips`` (then reversed
    along RAS array axis ``t``). Each index axis is matched to the world axis it is closest to,
    largest cosines first, so oblique volumes get their nearest orthogonal orientation.
    """
    ras = np.asarray(direction, dtype=float).reshape(3, 3) * np.array([-1.0, -1.0, 1.0])[:, None]
    axes, flips = [-1, -1, -1], [False, False, False]
    used_world, used_index = set(), set()
    for flat in np.argsort(-np.abs(ras), axis=None, kind="stable"):
        world, index = divmod(int(flat), 3)  # world: 0 R, 1 A, 2 S; index: 0 i(x), 1 j(y), 2 k(z)
        if world in used_world or index in used_index:
            continue
        used_world.add(world)
        used_index.add(index)
        axes[2 - world] = 2 - index  # array axes are (z, y, x) = reversed ITK order
        flips[2 - world] = bool(ras[world, index] < 0)
    return (axes[0], axes[1], axes[2]), (flips[0], flips[1], flips[2])


def slice_axis(grid) -> int:
    """The slice contract: the array axis (0, 1 or 2 of (z, y, x)) whose direction is closest to the
    patient's superior-inferior axis (:func:`ras_axes`). Every per-slice score of SegQC is along it,
    its ``index`` an index of that input array axis, and the JSON names it (``slice_axis``)."""
    return int(ras_axes(grid.direction)[0][0])


def to_ras(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """Permute and flip a (z, y, x) array (or (..., z, y, x) with leading axes) to RAS order."""
    lead = array.ndim - 3
    out = np.transpose(array, [*range(lead), *(lead + a for a in axes)])
    flipped = [lead + t for t in range(3) if flips[t]]
    return np.flip(out, axis=flipped) if flipped else out


def from_ras(array: np.ndarray, axes: Sequence[int], flips: Sequence[bool]) -> np.ndarray:
    """Inverse of :func:`to_ras`: a RAS-order array back to the input's array order."""
    lead = array.ndim - 3
    flipped = [lead + t for t in range(3) if flips[t]]
    out = np.flip(array, axis=flipped) if flipped else array
    inverse = np.argsort(axes)
    return np.transpose(out, [*range(lead), *(lead + int(a) for a in inverse)])


def reorient_grid(grid: Grid, axes: Sequence[int], flips: Sequence[bool]) -> Grid:
    """The grid of ``to_ras(array, axes, flips)``: same voxels in space, RAS index axes."""
    shape = np.asarray(grid.shape)
    corner = np.zeros(3)  # the input (z, y, x) index of the new voxel [0, 0, 0]
    direction = np.zeros((3, 3))
    old = grid.direction_matrix
    for t in range(3):
        a = axes[t]
        corner[a] = shape[a] - 1 if flips[t] else 0
        direction[:, 2 - t] = old[:, 2 - a] * (-1.0 if flips[t] else 1.0)
    spacing = tuple(grid.spacing[a] for a in axes)
    return Grid(tuple(int(shape[a]) for a in axes), spacing, tuple(grid.index_to_lps(corner)), direction.ravel())


def reorient_to_ras(volume: Volume) -> Volume:
    """The volume with its array permuted/flipped to RAS order (exact; no interpolation)."""
    axes, flips = ras_axes(volume.grid.direction)
    array = np.ascontiguousarray(to_ras(volume.array, axes, flips))
    return Volume(array, reorient_grid(volume.grid, axes, flips), volume.name)


# --------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class SliceTransform:
    """How :func:`preprocess` mapped an input (z, y, x) grid to (n, size, size) slices.

    axes, flips: the RAS reorientation (see :func:`ras_axes`).
    ras_spacing: (z, y, x) mm after reorientation.
    plane_shape, plane_spacing: in-plane (y, x) shape and mm after resampling (unchanged when not
        resampled). zoom: < 1 when the oversize rule enlarged the spacing (see module docstring).
    crop_start: (y, x) of the window's first voxel in the resampled plane; negative or beyond the
        plane where the window was padded.
    """

    input_shape: tuple[int, int, int]
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    ras_spacing: tuple[float, float, float]
    plane_shape: tuple[int, int]
    plane_spacing: tuple[float, float]
    crop_start: tuple[int, int]
    size: int
    zoom: float = 1.0

    @property
    def ras_shape(self) -> tuple[int, int, int]:
        """(z, y, x) shape after reorientation, before resampling."""
        return tuple(self.input_shape[a] for a in self.axes)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return self.ras_shape[0]

    @property
    def resampled(self) -> bool:
        """True when the slices were resampled in-plane (the mask round trip is then approximate)."""
        return tuple(self.plane_shape) != tuple(self.ras_shape[1:]) or not np.allclose(
            self.plane_spacing, self.ras_spacing[1:], atol=SPACING_TOL_MM)

    @property
    def exact(self) -> bool:
        """True when :func:`postprocess` inverts the geometry exactly (no resampling)."""
        return not self.resampled

    def slice_positions(self) -> np.ndarray:
        """(n,) relative position of each slice from inferior (0) to superior (1)."""
        n = self.n_slices
        return np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)


@dataclass
class Preprocessed:
    """Model-ready axial slices. image: (n, size, size) float32; mask: (n, size, size) bool or None."""

    image: np.ndarray
    mask: np.ndarray | None
    transform: SliceTransform


def ct_window(array: np.ndarray, level: float, width: float) -> np.ndarray:
    """CT windowing: clip to [level - width/2, level + width/2] (HU) and scale to [0, 1] (float32)."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = level - width / 2.0
    return ((np.clip(np.asarray(array, dtype=np.float32), lo, lo + width) - lo) / width).astype(np.float32)


def foreground_percentiles(image: np.ndarray, percentiles: Sequence[float], max_samples: int | None = None) -> list[float]:
    """Percentiles of an MR-like image's voxels above its minimum (the background, 0 in most files but
    the scanner's offset in others), all voxels when none is above: so that any scale and offset of the
    raw units (x 7.3 + 100) give the same normalised image. ``max_samples``: a regular subsample."""
    array = np.asarray(image)
    values = array[array > array.min()] if array.size else array.ravel()
    values = values if values.size else array.ravel()
    if max_samples:
        values = values[:: max(1, values.size // max_samples)]
    return [float(v) for v in np.percentile(values, list(percentiles))]


def intensity_parameters(image: np.ndarray, fp: Fingerprint) -> tuple[float, float, float, float]:
    """(clip_lo, clip_hi, shift, scale) so that ``(clip(x, lo, hi) - shift) / scale`` normalises.

    CT: the fingerprint's foreground [p0.5, p99.5], mean and std (z-score). MR/other: the image's
    own [p0.5, p99.5] of the voxels above its background (:func:`foreground_percentiles`), scaled to [0, 1].
    """
    if fp.modality.upper() == "CT":
        return fp.intensity_p0_5, fp.intensity_p99_5, fp.intensity_mean, max(fp.intensity_std, 1e-8)
    lo, hi = foreground_percentiles(image, PERCENTILES)
    return lo, hi, lo, max(hi - lo, 1e-8)


def normalise_intensity(array: np.ndarray, params: tuple[float, float, float, float]) -> np.ndarray:
    """Apply :func:`intensity_parameters`: float32 array of the same shape."""
    lo, hi, shift, scale = params
    return ((np.clip(array.astype(np.float32), lo, hi) - shift) / scale).astype(np.float32)


def _resample_plane(array: np.ndarray, spacing: Sequence[float], new_spacing: Sequence[float],
                    new_shape: Sequence[int], nearest: bool) -> np.ndarray:
    """Resample (n, h, w) slices from in-plane ``spacing`` (y, x) mm to ``new_spacing`` / ``new_shape``.

    The two grids share their outer edges (the first voxel's corner), not their first centres, so a
    2x coarser grid covers exactly the same field of view. Beyond the input, nearest values extend it.
    """
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing((float(spacing[1]), float(spacing[0]), 1.0))
    origin = ((new_spacing[1] - spacing[1]) / 2.0, (new_spacing[0] - spacing[0]) / 2.0, 0.0)
    out = sitk.Resample(image, (int(new_shape[1]), int(new_shape[0]), array.shape[0]), sitk.Transform(),
                        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, origin,
                        (float(new_spacing[1]), float(new_spacing[0]), 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                        0, image.GetPixelID(), True)
    return sitk.GetArrayFromImage(out)


def _window(start: int, size: int, length: int) -> tuple[slice, slice]:
    """Matching (source, destination) slices of a window [start, start+size) on an axis of ``length``."""
    lo, hi = max(start, 0), min(start + size, length)
    hi = max(hi, lo)
    return slice(lo, hi), slice(lo - start, hi - start)


def crop_plane(array: np.ndarray, start: Sequence[int], size: int, fill: float) -> np.ndarray:
    """(n, size, size) window of (n, h, w) slices starting at ``start`` (y, x); outside -> ``fill``."""
    out = np.full((array.shape[0], size, size), fill, dtype=array.dtype)
    (ys, yd), (xs, xd) = _window(start[0], size, array.shape[1]), _window(start[1], size, array.shape[2])
    out[:, yd, xd] = array[:, ys, xs]
    return out


def uncrop_plane(slices: np.ndarray, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`crop_plane`: (n, h, w) array, zero outside the window."""
    size = slices.shape[1]
    out = np.zeros((slices.shape[0], int(shape[0]), int(shape[1])), dtype=slices.dtype)
    (ys, yd), (xs, xd) = _window(start[0], size, out.shape[1]), _window(start[1], size, out.shape[2])
    out[:, ys, xs] = slices[:, yd, xd]
    return out


def _otsu_foreground(image: np.ndarray) -> np.ndarray:
    """(z, y, x) bool: voxels above the image's Otsu threshold (empty for a constant image)."""
    if float(image.min()) == float(image.max()):
        return np.zeros(image.shape, dtype=bool)
    otsu = sitk.OtsuThresholdImageFilter()
    otsu.Execute(sitk.GetImageFromArray(np.ascontiguousarray(image, dtype=np.float32)))
    return image > otsu.GetThreshold()


def _plane_box_mm(mask: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Centre (mm from voxel [., 0, 0]'s centre) and extent (mm) of the mask's in-plane box."""
    box = bounding_box(mask.any(axis=0))
    if box is None:
        return None
    lo, hi = box
    spacing = np.asarray(spacing, dtype=float)
    return (lo + hi) / 2.0 * spacing, (hi - lo + 1) * spacing


def plan_slices(ras_image: np.ndarray, ras_mask: np.ndarray | None, ras_spacing: Sequence[float],
                fp: Fingerprint, size: int) -> tuple[tuple[float, float], tuple[int, int], tuple[int, int], float]:
    """Choose the in-plane spacing, resampled shape, crop start and zoom (see the module docstring).

    Returns (plane_spacing (y, x) mm, plane_shape (y, x), crop_start (y, x), zoom).
    """
    spacing = np.asarray(ras_spacing[1:], dtype=float)
    shape = np.asarray(ras_image.shape[1:])
    target = np.asarray(fp.in_plane_spacing, dtype=float)
    box = _plane_box_mm(ras_mask, spacing) if ras_mask is not None else None
    fp_extent = np.asarray(fp.box_mm[1:], dtype=float)
    if box is None:  # no structure: the fingerprint-size box around the image foreground's centre
        fg = _plane_box_mm(_otsu_foreground(ras_image), spacing)
        centre = fg[0] if fg is not None else (shape - 1) / 2.0 * spacing
        extent = fp_extent
    else:
        centre, extent = box
    widest = float(np.max(np.maximum(extent, fp_extent) / target))
    zoom = 1.0 if widest <= size else size / (widest + 2.0)  # 1 voxel of slack each side
    plane_spacing = target / zoom
    if np.all(np.abs(plane_spacing - spacing) <= SPACING_TOL_MM):
        plane_spacing, plane_shape = spacing, shape
        centre_vox = centre / spacing
    else:
        plane_shape = np.maximum(1, np.round(shape * spacing / plane_spacing)).astype(int)
        centre_vox = (centre - (plane_spacing - spacing) / 2.0) / plane_spacing
    start = np.floor(centre_vox - size / 2.0 + 0.5).astype(int)
    return ((float(plane_spacing[0]), float(plane_spacing[1])), (int(plane_shape[0]), int(plane_shape[1])),
            (int(start[0]), int(start[1])), float(zoom))


def preprocess(image: Volume, mask: np.ndarray | None, fp: Fingerprint, size: int = 256) -> Preprocessed:
    """Axial (n, size, size) slices of ``image`` (and ``mask``) for a slice-based model.

    ``mask``: (z, y, x) bool on the image grid, or None. n = number of axial slices after RAS
    reorientation (slices are never resampled along z). Steps and exactness: module docstring.
    """
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise InputError(image.name or "image", f"mask shape {mask.shape} differs from the image's {image.shape}")
        mask = mask.astype(bool, copy=False)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    axes, flips = ras_axes(image.grid.direction)
    ras_spacing = tuple(image.spacing[a] for a in axes)
    ras_image = to_ras(image.array, axes, flips)
    ras_mask = to_ras(mask, axes, flips) if mask is not None else None
    plane_spacing, plane_shape, start, zoom = plan_slices(ras_image, ras_mask, ras_spacing, fp, size)
    transform = SliceTransform(tuple(image.shape), axes, flips, ras_spacing, plane_shape, plane_spacing,
                               start, size, zoom)
    params = intensity_parameters(ras_image, fp)
    fill = float(ras_image.min())
    slices = ras_image.astype(np.float32, copy=False)
    if transform.resampled:
        slices = _resample_plane(slices, ras_spacing[1:], plane_spacing, plane_shape, nearest=False)
    out_image = normalise_intensity(crop_plane(slices, start, size, fill), params)
    out_mask = None
    if ras_mask is not None:
        plane_mask = ras_mask.astype(np.uint8)
        if transform.resampled:
            plane_mask = _resample_plane(plane_mask, ras_spacing[1:], plane_spacing, plane_shape, nearest=True)
        out_mask = crop_plane(plane_mask, start, size, 0).astype(bool)
    return Preprocessed(out_image, out_mask, transform)


def postprocess(mask_slices: np.ndarray, transform: SliceTransform,
                slice_indices: Sequence[int] | None = None) -> np.ndarray:
    """Map model mask slices back to a (z, y, x) bool mask on the input grid of :func:`preprocess`.

    ``mask_slices``: (n, size, size) bool/label/probability (float: > 0.5 is foreground), one per
    preprocessed slice; or (k, size, size) for the slices ``slice_indices`` only (indices into the
    preprocessed slices), every other slice being background. Un-crops (outside the window:
    background), resamples back (nearest) when preprocessing resampled, and undoes the reorientation.
    """
    slices = np.asarray(mask_slices)
    slices = slices > 0.5 if np.issubdtype(slices.dtype, np.floating) else slices.astype(bool)
    size, n = transform.size, transform.n_slices
    if slices.ndim != 3 or slices.shape[1:] != (size, size):
        raise InputError("mask slices", f"expected (n, {size}, {size}) slices, got shape {slices.shape}")
    if slice_indices is not None:
        indices = np.asarray(slice_indices, dtype=int)
        if indices.shape != (slices.shape[0],) or (indices.size and (indices.min() < 0 or indices.max() >= n)):
            raise InputError("mask slices", f"slice_indices must give one index in [0, {n}) per slice")
        full = np.zeros((n, size, size), dtype=bool)
        full[indices] = slices
        slices = full
    elif slices.shape[0] != n:
        raise InputError("mask slices", f"expected {n} slices (one per preprocessed slice), got {slices.shape[0]}")
    plane = uncrop_plane(slices.astype(np.uint8), transform.crop_start, transform.plane_shape)
    if transform.resampled:
        plane = _resample_plane(plane, transform.plane_spacing, transform.ras_spacing[1:],
                                transform.ras_shape[1:], nearest=True)
    return np.ascontiguousarray(from_ras(plane, transform.axes, transform.flips)).astype(bool)
