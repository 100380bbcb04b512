"""Benchmark of SegQCLib.metrics on a large pair of masks, against MONAI.

Builds a (z, y, x) = 300x512x512 pair: a big ellipsoid and a perturbed copy (shifted, rescaled, with
blobs added and removed), times ``volume_metrics`` and ``slice_metrics`` (best of ``--repeats``) and
MONAI's ``compute_hausdorff_distance(percentile=95)`` + ``compute_average_surface_distance(symmetric=True)``
once, and prints the seconds, the ratio and the values side by side.

    .venv/bin/python benchmarks/bench_metrics.py [--shape 300 512 512] [--spacing 2.5 0.8 0.8]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from SegQCLib.metrics import slice_metrics, volume_metrics  # noqa: E402


def ellipsoid(shape: tuple[int, int, int], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Bool mask (shape) of an axis-aligned ellipsoid, centre and radii in voxels."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 <= 1


def make_pair(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pred, ref): a big ellipsoid (ref) and a shifted, rescaled copy with random blobs flipped (pred)."""
    rng = np.random.default_rng(seed)
    size = np.array(shape, dtype=float)
    ref = ellipsoid(shape, size / 2, 0.45 * size)
    pred = ellipsoid(shape, size / 2 + rng.normal(0, 3, 3), 0.45 * size * rng.uniform(0.95, 1.05, 3))
    seeds = rng.random(shape) < 2e-6
    blobs = ndi.binary_dilation(seeds, iterations=6)
    return pred ^ blobs, ref


def best_of(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall-clock seconds over ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def monai_hd95_asd(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> tuple[float, float]:
    """MONAI's HD95 and symmetric ASD (mm) of one pair."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    y_pred = torch.from_numpy(pred[None, None])
    y = torch.from_numpy(ref[None, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=list(spacing))
        asd = compute_average_surface_distance(y_pred, y, include_background=True, symmetric=True,
                                               spacing=list(spacing))
    return float(hd95[0, 0]), float(asd[0, 0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="array shape (z, y, x)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(2.5, 0.8, 0.8), help="mm (z, y, x)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of our functions (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-monai", action="store_true", help="do not run MONAI")
    args = parser.parse_args(argv)
    shape, spacing = tuple(args.shape), tuple(args.spacing)

    pred, ref = make_pair(shape, args.seed)
    print(f"masks {shape} (z, y, x), spacing {spacing} mm, foreground {ref.sum()} / {pred.sum()} voxels")

    t_volume, volume = best_of(lambda: volume_metrics(pred, ref, spacing), args.repeats)
    print(f"volume_metrics: {t_volume:.3f} s (best of {args.repeats})")
    print("  " + ", ".join(f"{k}={v:.4f}" for k, v in volume.items()))
    t_slices, rows = best_of(lambda: slice_metrics(pred, ref, spacing), args.repeats)
    print(f"slice_metrics:  {t_slices:.3f} s (best of {args.repeats}, {len(rows)} slices)")

    if args.skip_monai:
        return
    start = time.perf_counter()
    m_hd95, m_asd = monai_hd95_asd(pred, ref, spacing)
    t_monai = time.perf_counter() - start
    print(f"MONAI compute_hausdorff_distance(95) + compute_average_surface_distance(symmetric): "
          f"{t_monai:.3f} s (one run)")
    print(f"  MONAI hd95={m_hd95:.4f}, asd={m_asd:.4f} (ours hd95={volume['hd95']:.4f}, asd={volume['asd']:.4f})")
    print(f"ratio volume_metrics / MONAI = {t_volume / t_monai:.2f} "
          f"(volume_metrics also gives dsc, iou, mhd, mhd95, nemhd)")


if __name__ == "__main__":
    main()
