"""`Volume`: a 3D array in (z, y, x) order with its physical geometry, and geometry checks.

Conventions (the same as SimpleITK/ITK, so files round-trip exactly):
- ``array`` is indexed ``[z, y, x]`` (slowest axis first); axial slices are ``array[k]``.
- ``spacing`` is in mm **in array order** ``(z, y, x)``, so it can be handed straight to functions
  on arrays (metrics, distance transforms). ``spacing_xyz`` gives ITK order.
- ``origin`` is the LPS position in mm of the centre of voxel ``[0, 0, 0]``, ITK order (x, y, z).
- ``direction`` is ITK's 3x3 direction matrix: column ``c`` is the LPS unit vector of index axis
  ``c`` in ITK order (i = x, j = y, k = z).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InputError

#: Tolerance of geometry comparisons: 1e-3 mm on spacing/origin, 1e-4 on direction cosines.
SPACING_TOL_MM = 1e-3
DIRECTION_TOL = 1e-4


@dataclass(frozen=True)
class Grid:
    """The sampling grid of a volume: shape (z, y, x), spacing (z, y, x) mm, LPS origin and direction."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(s) for s in self.origin))
        object.__setattr__(self, "direction", tuple(float(s) for s in np.asarray(self.direction).ravel()))
        if len(self.shape) != 3 or len(self.spacing) != 3 or len(self.origin) != 3 or len(self.direction) != 9:
            raise ValueError(f"a Grid is 3D: got shape {self.shape}, spacing {self.spacing}")
        if min(self.spacing) <= 0:
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        """Spacing in ITK order (x, y, z), mm."""
        return self.spacing[::-1]

    @property
    def direction_matrix(self) -> np.ndarray:
        """Direction as a 3x3 array (ITK: columns are the index axes i, j, k)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_lps(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical LPS positions (mm, x,y,z) of continuous indices given as (..., 3) in (z, y, x) order."""
        ijk = np.asarray(index_zyx, dtype=float)[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing_xyz)) @ self.direction_matrix.T

    def index_to_ras(self, index_zyx: np.ndarray) -> np.ndarray:
        """Physical RAS positions (mm), as Slicer shows them, of (z, y, x) indices."""
        lps = self.index_to_lps(index_zyx)
        return lps * np.array([-1.0, -1.0, 1.0])

    def same_as(self, other: "Grid") -> bool:
        return not self.differences(other)

    def differences(self, other: "Grid") -> list[str]:
        """Human-readable differences to ``other`` (empty when the grids match within tolerance)."""
        out = []
        if self.shape != other.shape:
            out.append(f"shape {self.shape} vs {other.shape} (z, y, x)")
        if not np.allclose(self.spacing, other.spacing, atol=SPACING_TOL_MM):
            out.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)} mm (z, y, x)")
        if not np.allclose(self.origin, other.origin, atol=SPACING_TOL_MM):
            out.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)} mm")
        if not np.allclose(self.direction, other.direction, atol=DIRECTION_TOL):
            out.append("direction differs")
        return out


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@dataclass(frozen=True)
class Volume:
    """A 3D array (z, y, x) on a :class:`Grid`. ``name`` is where it came from (for error messages)."""

    array: np.ndarray
    grid: Grid
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a Volume holds a 3D (z, y, x) array, got shape {self.array.shape}")
        if tuple(self.array.shape) != self.grid.shape:
            raise ValueError(f"array shape {self.array.shape} does not match grid shape {self.grid.shape}")

    @classmethod
    def from_array(cls, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                   direction=None, name: str = "") -> "Volume":
        """A Volume from a (z, y, x) array; ``spacing`` in (z, y, x) mm, ``origin`` LPS (x, y, z) mm."""
        array = np.asarray(array)
        grid = Grid(array.shape, spacing, origin, direction if direction is not None else np.eye(3).ravel())
        return cls(array, grid, name)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Spacing (z, y, x) in mm."""
        return self.grid.spacing

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.grid.shape

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Volume":
        """Same grid, another array (of the same shape)."""
        return replace(self, array=np.asarray(array), name=self.name if name is None else name)


def check_same_grid(image: Volume | Grid, seg: Volume | Grid, image_name: str = "", seg_name: str = "") -> None:
    """Raise :class:`InputError` naming the segmentation file when its grid differs from the image's."""
    g1 = image.grid if isinstance(image, Volume) else image
    g2 = seg.grid if isinstance(seg, Volume) else seg
    diffs = g2.differences(g1)
    if diffs:
        who = seg_name or (seg.name if isinstance(seg, Volume) else "") or "segmentation"
        ref = image_name or (image.name if isinstance(image, Volume) else "") or "the image"
        raise InputError(who, f"geometry does not match {ref}: " + "; ".join(diffs))


def check_finite(volume: Volume) -> None:
    """Raise :class:`InputError` when the image holds NaN or infinite values."""
    if np.issubdtype(volume.array.dtype, np.floating):
        bad = ~np.isfinite(volume.array)
        if bad.any():
            raise InputError(volume.name or "image", f"contains {int(bad.sum())} NaN or infinite voxels")
