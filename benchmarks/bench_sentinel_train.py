"""Seconds per training step of the shipped Sentinel architecture on CPU: contiguous vs channels-last.

Run: .venv/bin/python benchmarks/bench_sentinel_train.py [--model sentinel-brain-mr] [--threads 2] [--steps 10]
One step = forward, MSE loss, backward and Adam update on a random batch of the card's input shape
(batch 64). Both memory formats are timed in the same run, alternating, twice each; the script prints
each timing and the ratio of the medians. ``segqc train sentinel`` uses channels-last on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from SegQCLib.models.sentinel import SentinelConfig, SentinelNet
from SegQCLib.qc import load_model


def seconds_per_step(config: SentinelConfig, channels_last: bool, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    net = SentinelNet(config)
    x = torch.rand(batch, config.in_channels, config.size, config.size)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    text, true = torch.rand(batch, config.text_dim), torch.rand(batch)
    optimiser = torch.optim.Adam(net.parameters(), 1e-3)
    for step in range(steps + 3):  # 3 warm-up steps
        if step == 3:
            started = time.perf_counter()
        loss = ((net(x, text) - true) ** 2).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sentinel-brain-mr")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_model(args.model, "cpu").config
    print(f"{args.model}: {config.backbone} x{config.widen}, {config.in_channels} channels, {config.size} px, "
          f"batch {args.batch}, {torch.get_num_threads()} thread(s)")
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        for channels_last in (False, True):
            times[channels_last].append(seconds_per_step(config, channels_last, args.steps, args.batch))
            print(f"  {'channels-last' if channels_last else 'contiguous   '}  {times[channels_last][-1]:.3f} s/step")
    contiguous, last = statistics.median(times[False]), statistics.median(times[True])
    print(f"median: contiguous {contiguous:.3f} s, channels-last {last:.3f} s, ratio {contiguous / last:.2f}x")


if __name__ == "__main__":
    main()
