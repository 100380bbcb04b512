"""Seconds per volume (100 axial slices) of nnQC pGT sampling: 5 vs 20 DDIM steps, batched vs one slice
at a time, in fp32 and, where it is usable, bf16 (CPUs with AMX/AVX512-BF16, CUDA GPUs that support it),
on CPU and, when present, CUDA; the "shipped path" line uses the precision "auto" picks.

Run: .venv/bin/python benchmarks/bench_nnqc.py [--card Resources/Models/nnqc-Brain.json] [--repeats 2]
     [--threads 1] [--batch-size N (default: the card's, a whole volume per pass)] [--device all|cpu|cuda]
Without a card, an untrained network of the CPU configuration (``nnqc_cli.CPU_CONFIG``) is timed
(the speed does not depend on the weights). The slices are 100 real Colin27 slices preprocessed
at the model's size; the blank mask forces every slice through the sampler. Prints one line per
(device, precision, steps) with batched and slice-by-slice seconds per volume and their ratio, and
the share of pGT pixels on which the precisions agree.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from SegQCLib.data.sources import colin27
from SegQCLib.fingerprint import compute_fingerprint, preprocess
from SegQCLib.models.nnqc import NNQCConfig, NNQCModel, build_net, load_model, resolve_precision
from SegQCLib.train.nnqc_cli import CPU_CONFIG


def seconds(model: NNQCModel, image: np.ndarray, labels: np.ndarray, positions: np.ndarray, batch_size: int,
            repeats: int) -> float:
    """Median seconds of ``model.pgt_slices`` over all slices with ``batch_size`` slices per pass."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.pgt_slices(image, labels, positions, batch_size=batch_size)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--card", default="", help="an nnQC model card (default: untrained CPU configuration)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=0, help="slices per pass (0: the model's default)")
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all",
                        help="time on this device only (all: CPU, then CUDA when present)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    subject = colin27("brain")
    fp = compute_fingerprint([subject], label="Brain")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.device != "all":
        if args.device not in devices:
            parser.error(f"--device {args.device}: no usable CUDA device here")
        devices = [args.device]
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, devices {devices}")
    for device in devices:
        auto = resolve_precision("auto", torch.device(device))  # the precision the shipped path uses
        bf16_usable = auto == "bf16" or (device == "cuda" and torch.cuda.is_bf16_supported())
        precisions = ["fp32"] + (["bf16"] if bf16_usable else [])
        pgts, timed = {}, {}
        for precision in precisions:
            if args.card:
                model = load_model(args.card, device, precision=precision)
            else:
                config = NNQCConfig(**CPU_CONFIG)
                model = NNQCModel("untrained", build_net(config), fp, device=device, precision=precision)
            batch_size = args.batch_size or model.batch_size
            pre = preprocess(subject.image, subject.segmentation.mask("Brain"), model.fingerprint, model.config.size)
            start = (pre.transform.n_slices - args.slices) // 2
            index = np.arange(start, start + args.slices)
            image, positions = pre.image[index], pre.transform.slice_positions()[index]
            labels = np.zeros((len(index), model.config.size, model.config.size), np.uint8)
            model.pgt_slices(image[:2], labels[:2], positions[:2])  # warm-up
            pgts[precision] = model.pgt_slices(image, labels, positions, batch_size=batch_size)
            for steps in (5, 20):
                model.ddim_steps = steps
                batched = seconds(model, image, labels, positions, batch_size, args.repeats)
                single = seconds(model, image, labels, positions, 1, max(1, args.repeats // 2))
                timed[precision, steps] = batched, single
                print(f"{device:<5} {precision} DDIM {steps:>2} steps, {args.slices} slices of {model.config.size}px: "
                      f"batched ({batch_size}) {batched:7.2f} s/volume, slice by slice {single:7.2f} s/volume, "
                      f"ratio {single / batched:5.2f}x", flush=True)
        for steps in (5, 20):
            shipped = timed[auto, steps][0]
            fastest_loop = min(timed[p, steps][1] for p in precisions)
            print(f"{device:<5} DDIM {steps:>2} steps: shipped path (batched, {auto}) {shipped:.2f} s/volume "
                  f"vs the fastest slice-by-slice loop {fastest_loop:.2f} s/volume: {fastest_loop / shipped:.2f}x")
        if "bf16" in pgts:
            agree = float(np.mean(pgts["fp32"] == pgts["bf16"]))
            print(f"{device:<5} pGT pixels equal in fp32 and bf16 (5 steps): {100 * agree:.2f}%")

if __name__ == "__main__":
    main()
