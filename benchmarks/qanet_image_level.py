"""QANet image-level SEG on held-out simulated images: instance vs patch aggregation of patch scores.

Run: .venv/bin/python benchmarks/qanet_image_level.py [--model CARD] [--model3d CARD] [--images N]
[--stacks N] [--holed N] [--kissing N] [--volumes N] [--json OUT]
Default models: the shipped Resources/Models/qanet-nuclei-{2d,3d}.json.

The model predicts SEG per patch; the image score is an average of patch predictions. This script
measures, on whole simulated scenes of the test split (seed ``SPLIT_SEEDS["test"]``, never used for
training), how well the two averages in :meth:`QANetQC.assess_instances` track the true image SEG:

- ``instances`` (the image score): each instance's score is the mean prediction of the patches holding
  it, weighted by its pixels in each; the image score is their mean, an instance weighing
  max(1, size / typical size). Measured twice: ``necks off`` and ``necks on`` (instances also cut at
  narrow necks into the bodies they join, :func:`split_necks`; the default is on for a 3D model and
  off for a 2D one);
- ``patches``: patch predictions weighted by the number of instances in each patch.

Both are measured on the head the image score uses (``seg_objects`` when the model has it) and, for
a model with that head, also on its ``seg`` head (the paper's patch SEG): ``instances (seg head)``.

For a model with distance heads, its image-level MHD95 and ASD (instance averages, px) are also
compared with the true ones (means over the matched instances, :func:`instance_metrics`; for stacks,
over the labelled z slices weighted by their objects).

2D images are the training geometry (192 x 192); stacks are z stacks scored slice by slice, true SEG
pooled over slices weighted by their GT objects (as for real cells3d). One erroneous segmentation
(:func:`perturb_instances`) per scene. ``2d-holes`` are further 2D scenes whose segmentation also has
1-3 small holes (radius 0.1-0.3 of the nucleus radius) in 10-60 % of its instances, as thresholds
leave at dim nucleoli (cells3d): training never shows holes, :func:`scored_pieces` fills them and
charges their share. ``2d-kissing`` and ``3d-kissing`` scenes keep clumped neighbours apart (``KISSING``)
so that they kiss at a point; ``3d`` and ``3d-kissing`` volumes (32 x 72 x 72) are scored by the 3D
model with its true 3D SEG. Prints Pearson r, MAE and the mean |pred - true| / true.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from rich.progress import track
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from SegQCLib.models.qanet import DISTANCE_TARGETS, IMAGE_TARGET, load_model  # noqa: E402
from SegQCLib.train.qanet_data import SPLIT_SEEDS, perturb_instances, simulate_scene  # noqa: E402
from SegQCLib.train.qanet_real import _slice_seg, _true_distance  # noqa: E402
from SegQCLib.metrics import seg_measure  # noqa: E402


def _summary(true: np.ndarray, pred: np.ndarray) -> dict:
    ok = true > 0
    return {"n": int(len(true)), "r": float(np.corrcoef(true, pred)[0, 1]), "mae": float(np.abs(pred - true).mean()),
            "mean_rel_err": float(np.mean(np.abs(pred[ok] - true[ok]) / true[ok]))}


#: max_overlap range of the ``-kissing`` scenes: a third of them keep clumped neighbours apart by up to
#: 10 % of their radii, so that they kiss at a point and merges join them through a narrow neck.
KISSING = (-0.1, 0.2)


def punch_holes(labels: np.ndarray, rng: np.random.Generator, radius: float) -> np.ndarray:
    """A copy of 2D ``labels`` with 1-3 disc holes (radius U(0.1, 0.3) * ``radius`` px) in a random
    10-60 % of the instances, each hole kept 2 px inside its instance's outline."""
    out = labels.copy()
    ids = np.unique(labels)[1:]
    yy, xx = np.mgrid[:labels.shape[0], :labels.shape[1]]
    for value in ids[rng.random(ids.size) < rng.uniform(0.1, 0.6)]:
        inner = ndi.binary_erosion(labels == value, iterations=2)
        points = np.argwhere(inner)
        if len(points) == 0:
            continue
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = points[rng.integers(len(points))]
            r = rng.uniform(0.1, 0.3) * radius
            out[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & inner] = 0
    return out


#: Scene kinds: (simulated dims, scored as a stack, holes punched, max_overlap range or None).
KINDS = {
    "2d": (2, False, False, None),
    "stack": (3, True, False, None),
    "2d-holes": (2, False, True, None),
    "2d-kissing": (2, False, False, KISSING),
    "3d": (3, False, False, None),
    "3d-kissing": (3, False, False, KISSING),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "Resources" / "Models" / "qanet-nuclei-2d.json")
    parser.add_argument("--model3d", type=Path, default=ROOT / "Resources" / "Models" / "qanet-nuclei-3d.json")
    parser.add_argument("--images", type=int, default=80, help="2D scenes")
    parser.add_argument("--stacks", type=int, default=20, help="z stacks scored slice by slice")
    parser.add_argument("--holed", type=int, default=80, help="2D scenes with holes in the segmentation")
    parser.add_argument("--kissing", type=int, default=0, help="2D scenes whose neighbours kiss across a gap")
    parser.add_argument("--volumes", type=int, default=0, help="3D scenes for the 3D model (and as many kissing ones)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = load_model(args.model, "cpu")
    model3d = load_model(args.model3d, "cpu") if args.volumes > 0 else None
    out = {"model": str(args.model), "model3d": str(args.model3d)}
    counts = {"2d": args.images, "stack": args.stacks, "2d-holes": args.holed, "2d-kissing": args.kissing,
              "3d": args.volumes, "3d-kissing": args.volumes}
    offsets = {"2d": 0, "stack": 0, "2d-holes": 50_000, "2d-kissing": 60_000, "3d": 70_000, "3d-kissing": 80_000}
    for kind, (dims, stack, holes, overlap) in KINDS.items():
        n = counts[kind]
        if n <= 0:
            continue
        scorer = model3d if dims == 3 and not stack else model
        head = IMAGE_TARGET if IMAGE_TARGET in scorer.config.targets else "seg"
        shape, radius_range = ((192, 192), (5.0, 15.0)) if scorer.config.dims == 2 else ((32, 72, 72), (4.5, 8.5))
        true, necks_off, necks_on, by_patch, by_seg_head, cut = [], [], [], [], [], 0
        distances = [t for t in DISTANCE_TARGETS if t in scorer.config.targets]
        true_dist, pred_dist = {t: [] for t in distances}, {t: [] for t in distances}
        for i in track(range(n), description=f"{kind} scenes"):
            rng = np.random.default_rng(SPLIT_SEEDS["test"] * 1_000_003 + i + offsets[kind])
            params, image, gt = simulate_scene(rng, dims, shape, radius_range, stack=stack, overlap_range=overlap)
            if not gt.any():
                continue
            pred, _ = perturb_instances(gt, rng, image, params.radius)
            if holes:
                pred = punch_holes(pred, rng, params.radius)
            if not pred.any():
                continue
            true.append(_slice_seg(pred, gt)[0] if stack else seg_measure(pred, gt))
            off = scorer.assess_instances(image, pred, necks=False)
            on = scorer.assess_instances(image, pred, necks=True)
            necks_off.append(off.image_score)
            necks_on.append(on.image_score)
            cut += on.extra["instances_cut_at_necks"]
            result = on if scorer.necks_by_default else off
            by_patch.append(result.extra["image_scores_patch_weighted"][head])
            by_seg_head.append(result.extra["image_scores"]["seg"])
            for t in distances:  # px; means over the matched instances (per labelled z slice for stacks)
                value = _true_distance(pred, gt, t, slices=stack)
                if np.isfinite(value):
                    true_dist[t].append(value)
                    pred_dist[t].append(result.extra["image_scores"][t])
        t = np.array(true)
        out[kind] = {"instances, necks off": _summary(t, np.array(necks_off)),
                     "instances, necks on": _summary(t, np.array(necks_on)) | {"instances_cut": cut},
                     "patches": _summary(t, np.array(by_patch))}
        if IMAGE_TARGET in scorer.config.targets:
            out[kind]["instances (seg head)"] = _summary(t, np.array(by_seg_head))
        for target in distances:
            out[kind][f"{target} (px), instances"] = _summary(np.array(true_dist[target]), np.array(pred_dist[target]))
    print(f"model {args.model}, 3D model {args.model3d}\n\n"
          "| scenes | aggregation | n | r | MAE | mean rel. error |\n|---|---|---|---|---|---|")
    for kind in KINDS:
        for agg, s in out.get(kind, {}).items():
            print(f"| {kind} | {agg} | {s['n']} | {s['r']:.3f} | {s['mae']:.3f} | {100 * s['mean_rel_err']:.1f} % |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
