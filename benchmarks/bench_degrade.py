"""Seconds per `degrade_to_band` call on a brain-sized (181 x 217 x 181) mask, per DSC band.

Run: .venv/bin/python benchmarks/bench_degrade.py [--repeats 4]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from SegQCLib.degrade import DSC_BANDS, degrade_to_band


def brain_like_mask(shape=(181, 217, 181)) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [s / 2 for s in shape]
    return ((z - c[0]) / 70) ** 2 + ((y - c[1]) / 85) ** 2 + ((x - c[2]) / 70) ** 2 <= 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    mask = brain_like_mask().astype(np.uint8)
    print(f"mask {mask.shape}, {int(mask.sum())} voxels")
    for band in DSC_BANDS:
        times = []
        for seed in range(args.repeats):
            start = time.perf_counter()
            _, dsc = degrade_to_band(mask, band, seed=seed)
            times.append(time.perf_counter() - start)
        print(f"band [{band[0]:.2f}, {band[1]:.2f}): median {np.median(times):.3f} s, max {max(times):.3f} s")


if __name__ == "__main__":
    main()
