"""Seconds per 3D mask (10 evenly spaced slices) of a Sentinel model, on CPU and, when present, CUDA.

Run: .venv/bin/python benchmarks/bench_sentinel.py [--model sentinel-brain-mr] [--repeats 10] [--segae]
Prints the cold first call (text encoder loading included) and the warm median/best, per device,
for a small (Hippocampus_L) and a large (whole brain) structure of Colin27, and, with CUDA, the
predicted DSC on each device (the two should agree).

``--segae`` also times SegAE's mode in the same run: a Sentinel whose encoder is BiomedCLIP's vision tower
architecture (timm ViT-B/16, 224 px, 512-d embedding; papers' two channels, no context view) with
random weights -- speed does not depend on the weights, which cannot be downloaded here -- and a
fixed 512-d text embedding (BiomedCLIP's text tower would run once per structure name).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from SegQCLib.data.sources import colin27
from SegQCLib.qc import load_model

#: BiomedCLIP's vision tower (open_clip_config.json of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224)
BIOMEDCLIP_VISION = {"model": "BiomedCLIP vision tower (architecture only)", "embed_dim": 512,
                     "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                    "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                     "quick_gelu": False, "image_size": [224, 224], "interpolation": "bicubic",
                     "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}


class _FixedText:
    """One 512-d embedding for every name (the text tower's cost is once per name, not per mask)."""

    name, dim = "fixed", 512

    def encode(self, names):
        return np.full((len(names), self.dim), 1.0 / np.sqrt(self.dim), np.float32)


def segae_model(device: str):
    """A SegAE-mode Sentinel of BiomedCLIP's size (random weights, the same on every device), on ``device``."""
    from SegQCLib.models.sentinel import SentinelConfig, SentinelNet, SentinelQC

    torch.manual_seed(0)

    config = SentinelConfig(backbone="openclip:biomedclip:(random weights)", size=224, text_dim=512,
                            openclip=BIOMEDCLIP_VISION)
    return SentinelQC("segae-biomedclip-size", SentinelNet(config), config, text_encoder=_FixedText(), device=device)


def time_calls(model, image, mask, name: str, repeats: int) -> tuple[float, list[float], float]:
    """Cold seconds, warm seconds of each repeat, and the volume's predicted DSC."""
    start = time.perf_counter()
    result = model.assess(image, mask, name, all_slices=False)
    cold = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.assess(image, mask, name, all_slices=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        warm.append(time.perf_counter() - start)
    return cold, warm, float(result.volume["dsc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="sentinel-brain-mr")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--segae", action="store_true", help="time SegAE's mode (BiomedCLIP-size ViT-B/16 tower)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    aal, brain = colin27("aal"), colin27("brain")
    cases = [("Hippocampus_L", aal.image, aal.segmentation.mask("Hippocampus_L")),
             ("Brain", brain.image, brain.segmentation.mask("Brain"))]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()}, devices {devices}")
    scores = {}
    for device in devices:
        models = [(args.model, load_model(args.model, device))]
        if args.segae:
            models.append(("segae (ViT-B/16)", segae_model(device)))
        medians = {}
        for label, model in models:
            for name, image, mask in cases:
                cold, warm, scores[device, label, name] = time_calls(model, image, mask, name, args.repeats)
                medians[label, name] = statistics.median(warm)
                print(f"{device:5s} {label:18s} {name:14s} cold {cold:7.3f} s   warm median {medians[label, name]:.3f} s"
                      f"   best {min(warm):.3f} s   ({int(np.count_nonzero(mask))} voxels, 10 slices)")
        if args.segae:
            for name, _, _ in cases:
                print(f"{device:5s} {name:14s} SegAE / {args.model}: "
                      f"{medians['segae (ViT-B/16)', name] / medians[args.model, name]:.1f}x the time")
    if "cuda" in devices:
        for (device, label, name), score in scores.items():
            if device == "cuda":
                print(f"      {label:18s} {name:14s} predicted DSC CPU {scores['cpu', label, name]:.4f}, "
                      f"CUDA {score:.4f}")

if __name__ == "__main__":
    main()
