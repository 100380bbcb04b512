"""Copies of a case as another scanner would store it: the same anatomy on another grid.

For metamorphic tests and benchmarks of geometry invariance (a QC result must not depend on how the
array is laid out, only on the anatomy). Each function takes an image :class:`~SegQCLib.volume.Volume`
and its masks (bool (z, y, x) arrays on the image grid) and returns the copy's image and masks:

- :func:`permuted` / :func:`flipped`: the same voxels in another array order, the header saying so
  (a sagittal or coronal acquisition; LPS vs RAS vs other axis codes): exact, no resampling;
- :func:`resampled`: a new grid (spacing in mm, a rotation of the axes, e.g. an oblique acquisition),
  image linearly and masks nearest-neighbour interpolated (SimpleITK);
- :func:`cropped`: a smaller field of view (the head cut at the vertex or the cerebellum);
- :func:`shifted`: another origin (the whole scene moved in the scanner);

and what another scanner does to intensities: :func:`rescaled` (raw units x 7.3 + 100, 12-bit integers),
:func:`bias_field`, :func:`rician_noise`, :func:`gamma_contrast`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from ..volume import Grid, Volume


def _with_grid(volume: Volume, array: np.ndarray, grid: Grid) -> Volume:
    return Volume(np.ascontiguousarray(array), grid, name=volume.name)


def permuted(image: Volume, masks: Sequence[np.ndarray], order: Sequence[int]) -> tuple[Volume, list[np.ndarray]]:
    """The array axes reordered (``order``: new (z, y, x) axis ``t`` is old axis ``order[t]``), with spacing,
    direction and origin updated so every voxel keeps its world position."""
    order = tuple(int(o) for o in order)
    old = image.grid
    itk_old = [2 - a for a in order][::-1]  # new ITK axis c (x, y, z) is old ITK axis itk_old[c]
    direction = old.direction_matrix[:, itk_old]
    grid = Grid(tuple(old.shape[a] for a in order), tuple(old.spacing[a] for a in order), old.origin,
                tuple(direction.ravel()))
    return (_with_grid(image, np.transpose(image.array, order), grid),
            [np.ascontiguousarray(np.transpose(m, order)) for m in masks])


def flipped(image: Volume, masks: Sequence[np.ndarray], axes: Sequence[int]) -> tuple[Volume, list[np.ndarray]]:
    """The array reversed along ``axes`` (array (z, y, x) axes), the header's direction and origin following."""
    old = image.grid
    direction = old.direction_matrix.copy()
    origin = np.asarray(old.origin, float)
    for a in axes:
        c = 2 - int(a)  # ITK column of array axis a
        origin = origin + direction[:, c] * old.spacing[a] * (old.shape[a] - 1)
        direction[:, c] = -direction[:, c]
    grid = Grid(old.shape, old.spacing, tuple(origin), tuple(direction.ravel()))
    flip = tuple(int(a) for a in axes)
    return (_with_grid(image, np.flip(image.array, flip), grid),
            [np.ascontiguousarray(np.flip(m, flip)) for m in masks])


def _sitk(volume_array: np.ndarray, grid: Grid) -> sitk.Image:
    out = sitk.GetImageFromArray(np.ascontiguousarray(volume_array))
    out.SetSpacing(grid.spacing_xyz)
    out.SetOrigin(grid.origin)
    out.SetDirection(grid.direction)
    return out


def rotation_matrix(degrees: Sequence[float]) -> np.ndarray:
    """3x3 rotation (LPS) by ``degrees`` about the x, y and z axes, applied in that order."""
    rx, ry, rz = (np.deg2rad(float(d)) for d in degrees)
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    mx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    my = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    mz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return mz @ my @ mx


def resampled(image: Volume, masks: Sequence[np.ndarray], spacing: Sequence[float] | None = None,
              rotation_deg: Sequence[float] = (0.0, 0.0, 0.0)) -> tuple[Volume, list[np.ndarray]]:
    """The case on a new grid covering the same field of view: ``spacing`` (z, y, x) mm (default the
    image's) and axes rotated by ``rotation_deg`` (about x, y, z, degrees) around the image centre.

    Image: linear interpolation (outside the old field of view: the image's minimum); masks: nearest
    neighbour. The new grid is sized to hold the whole rotated field of view."""
    old = image.grid
    spacing = tuple(float(s) for s in (spacing or old.spacing))
    direction = rotation_matrix(rotation_deg) @ old.direction_matrix
    corners = np.array([[z, y, x] for z in (0, old.shape[0] - 1) for y in (0, old.shape[1] - 1)
                        for x in (0, old.shape[2] - 1)], float)
    world = old.index_to_lps(corners)
    centre = world.mean(axis=0)
    # extent of the old field of view along the new axes (ITK order x, y, z)
    along = (world - centre) @ direction
    lo, hi = along.min(axis=0), along.max(axis=0)
    spacing_xyz = np.asarray(spacing[::-1])
    size_xyz = np.maximum(np.ceil((hi - lo) / spacing_xyz).astype(int) + 1, 1)
    origin = centre + direction @ lo
    grid = Grid(tuple(int(s) for s in size_xyz[::-1]), spacing, tuple(origin), tuple(direction.ravel()))
    reference = _sitk(np.zeros(grid.shape, np.uint8), grid)

    def warp(array: np.ndarray, interpolator: int, default: float) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.Resample(_sitk(array, old), reference, sitk.Transform(), interpolator,
                                                    default))

    new_image = warp(image.array.astype(np.float32), sitk.sitkLinear, float(image.array.min()))
    new_masks = [warp(m.astype(np.uint8), sitk.sitkNearestNeighbor, 0).astype(bool) for m in masks]
    return _with_grid(image, new_image.astype(np.float32), grid), new_masks


def cropped(image: Volume, masks: Sequence[np.ndarray], box: Sequence[slice]) -> tuple[Volume, list[np.ndarray]]:
    """The field of view cut to ``box`` (three slices of the (z, y, x) array); the origin moves so that
    every kept voxel keeps its world position."""
    box = tuple(box)
    start = np.array([s.indices(n)[0] for s, n in zip(box, image.shape)], float)
    origin = image.grid.index_to_lps(start)
    array = image.array[box]
    grid = Grid(array.shape, image.grid.spacing, tuple(origin), image.grid.direction)
    return _with_grid(image, array, grid), [np.ascontiguousarray(m[box]) for m in masks]


def shifted(image: Volume, masks: Sequence[np.ndarray], offset_mm: Sequence[float]) -> tuple[Volume, list[np.ndarray]]:
    """The origin moved by ``offset_mm`` (LPS x, y, z): the same voxels, elsewhere in the scanner."""
    grid = Grid(image.shape, image.grid.spacing, tuple(np.asarray(image.grid.origin) + np.asarray(offset_mm, float)),
                image.grid.direction)
    return _with_grid(image, image.array, grid), [m.copy() for m in masks]


# --------------------------------------------------------------------------- intensities
def rescaled(image: Volume, scale: float = 7.3, offset: float = 100.0, dtype=np.float32) -> Volume:
    """Raw units of another scanner: ``image * scale + offset`` in ``dtype`` (an integer dtype rounds,
    e.g. 12-bit data stored as uint16)."""
    array = image.array.astype(np.float64) * scale + offset
    if np.issubdtype(np.dtype(dtype), np.integer):
        array = np.round(array)
    return image.with_array(array.astype(dtype))


def bias_field(image: Volume, strength: float = 0.3, seed: int = 0) -> Volume:
    """A smooth multiplicative bias field (coil inhomogeneity): exp of a random linear + quadratic
    function of position, spanning about ``strength`` (log units) across the field of view."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*(np.linspace(-1.0, 1.0, n) for n in image.shape), indexing="ij")
    field = sum(rng.normal() * g + 0.5 * rng.normal() * g ** 2 for g in grids)
    field = field / max(float(np.ptp(field)), 1e-9) * strength
    return image.with_array((image.array * np.exp(field)).astype(np.float32))


def rician_noise(image: Volume, sigma_fraction: float = 0.03, seed: int = 0) -> Volume:
    """Rician noise (magnitude of complex Gaussian noise) of standard deviation ``sigma_fraction`` of the
    image's 99th percentile, as magnitude MR images carry."""
    rng = np.random.default_rng(seed)
    sigma = sigma_fraction * float(np.percentile(image.array, 99))
    real = image.array + rng.normal(0.0, sigma, image.shape)
    imaginary = rng.normal(0.0, sigma, image.shape)
    return image.with_array(np.hypot(real, imaginary).astype(np.float32))


def gamma_contrast(image: Volume, gamma: float = 0.7) -> Volume:
    """A gamma change of contrast, ``(x - min) ** gamma`` (another sequence's grey-white contrast)."""
    return image.with_array(((image.array - image.array.min()) ** gamma).astype(np.float32))


__all__ = ["permuted", "flipped", "resampled", "cropped", "shifted", "rotation_matrix", "rescaled", "bias_field",
           "rician_noise", "gamma_contrast"]
