"""Choosing the axial slices a slice-based QC model looks at.

Axial slices are ``array[k]`` of a (z, y, x) array (see :mod:`SegQCLib.volume`); after
:func:`SegQCLib.fingerprint.preprocess` axis 0 runs inferior -> superior.
"""
from __future__ import annotations

import numpy as np


def foreground_slices(mask: np.ndarray) -> list[int]:
    """Indices ``k`` of the axial slices ``mask[k]`` holding at least one foreground voxel.

    ``mask``: (z, y, x) bool or label array (nonzero = foreground). Returns ascending indices.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be a (z, y, x) array, got shape {mask.shape}")
    return [int(k) for k in np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))]


def evenly_spaced_slices(mask: np.ndarray, n: int = 10) -> list[int]:
    """``n`` axial indices spread evenly over the mask's z-extent (Quality Sentinel samples 10).

    - More than ``n`` foreground slices: ``n`` of them, evenly spaced by rank from the first to the
      last foreground slice (for a mask without gaps in z this is evenly spaced in position; every
      index returned holds foreground, none repeats).
    - ``n`` or fewer foreground slices: all of them.
    - Empty mask: ``n`` indices spread over the whole volume (all slices when it has fewer than ``n``).

    ``mask``: (z, y, x); returns ascending slice indices.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    slices = foreground_slices(mask)
    if not slices:
        slices = list(range(np.asarray(mask).shape[0]))
    if len(slices) <= n:
        return slices
    ranks = np.round(np.linspace(0, len(slices) - 1, n)).astype(int)
    return [slices[r] for r in ranks]
