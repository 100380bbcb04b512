"""Seconds per image of the shipped QANet models, on CPU and, when present, CUDA, and whether the two
devices give the same scores.

Run: .venv/bin/python benchmarks/bench_qanet.py [--repeats 3] [--threads N]
Times ``assess_instances`` (patch tiling, the network, the per-instance bookkeeping) on one simulated
2D image (512 x 512 px) for ``qanet-nuclei-2d`` and one simulated 3D stack (48 x 256 x 256 px) for
``qanet-nuclei-3d``, scored with their exact labels eroded by one pixel (any labels cost about the
same). Prints the cold first call and the warm median per device and model, and the largest
difference between the CPU's and CUDA's image-level and per-patch scores.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy import ndimage

from SegQCLib.data.cells import simulate_cells
from SegQCLib.qc import load_model

CASES = {"qanet-nuclei-2d": ((512, 512), 60), "qanet-nuclei-3d": ((48, 256, 256), 60)}


def eroded(labels: np.ndarray) -> np.ndarray:
    """``labels`` with every instance eroded by one pixel (a plausible, imperfect segmentation)."""
    inner = ndimage.binary_erosion(labels > 0) & (ndimage.grey_erosion(labels, size=3) == labels)
    return np.where(inner, labels, 0).astype(labels.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, devices {devices}")
    for name, (shape, n_cells) in CASES.items():
        image, truth = simulate_cells(shape, n_cells, seed=0)
        labels = eroded(truth)
        scores = {}
        for device in devices:
            model = load_model(name, device)
            start = time.perf_counter()
            result = model.assess_instances(image, labels)
            cold = time.perf_counter() - start
            warm = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                model.assess_instances(image, labels)
                if device == "cuda":
                    torch.cuda.synchronize()
                warm.append(time.perf_counter() - start)
            scores[device] = (result.image_score, np.array([p["seg"] for p in result.to_json_dict()["patches"]]))
            print(f"{device:5s} {name:16s} {'x'.join(map(str, shape)):11s} {int(labels.max())} nuclei   "
                  f"cold {cold:6.2f} s   warm median {statistics.median(warm):6.2f} s   "
                  f"image SEG {result.image_score:.4f}   {len(scores[device][1])} patches")
        if "cuda" in scores:
            (cpu_image, cpu_patches), (gpu_image, gpu_patches) = scores["cpu"], scores["cuda"]
            print(f"      {name:16s} CPU vs CUDA: image SEG differs by {abs(cpu_image - gpu_image):.2e}, "
                  f"patches by at most {np.max(np.abs(cpu_patches - gpu_patches)):.2e}")


if __name__ == "__main__":
    main()
