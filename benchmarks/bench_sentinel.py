"""Seconds per 3D mask (10 evenly spaced slices) of a Sentinel model, on CPU and, when present, CUDA.

Run: .venv/bin/python benchmarks/bench_sentinel.py [--model sentinel-brain-mr] [--repeats 10]
Prints the cold first call (text encoder loading included) and the warm median/best, per device,
for a small (Hippocampus_L) and a large (whole brain) structure of Colin27.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from SegQCLib.data.sources import colin27
from SegQCLib.qc import load_model


def time_calls(model, image, mask, name: str, repeats: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    model.assess(image, mask, name, all_slices=False)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.assess(image, mask, name, all_slices=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        warm.append(time.perf_counter() - start)
    return cold, warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sentinel-brain-mr")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    aal, brain = colin27("aal"), colin27("brain")
    cases = [("Hippocampus_L", aal.image, aal.segmentation.mask("Hippocampus_L")),
             ("Brain", brain.image, brain.segmentation.mask("Brain"))]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, devices {devices}")
    for device in devices:
        model = load_model(args.model, device)
        for name, image, mask in cases:
            cold, warm = time_calls(model, image, mask, name, args.repeats)
            print(f"{device:5s} {name:14s} cold {cold:7.3f} s   warm median {statistics.median(warm):.3f} s"
                  f"   best {min(warm):.3f} s   ({int(np.count_nonzero(mask))} voxels, 10 slices)")


if __name__ == "__main__":
    main()
