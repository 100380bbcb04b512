"""HERMES on held-out real MRI: true DSC before/after QC-driven prompt refinement, and QC accuracy.

Run: nice -n 10 .venv/bin/python benchmarks/hermes_eval.py [--step 4] [--segmenters grabcut randomwalker]
         [--thresholds 0.7 0.8 0.9] [--datasets mni152 colin27] [--out benchmarks/hermes_results.md]

Data (held out: the pGT comes from *another* subject registered onto the image by ``atlas-brain-mr``;
the image's own labels are used only as the truth to report against):

- ``mni152``: the MNI152 2009c T1 (skull-stripped template), truth = its brain mask; atlas = Colin27 (ch2bet).
- ``colin27``: the Colin27 T1 *with skull* (ch2), truth = ch2bet brain mask; atlas = MNI152 brain.

Every ``--step``-th axial slice where the truth has at least ``--min-area`` pixels (default 100 px =
1 cm^2: Colin27's ch2bet mask has stray 1-pixel slices at the ends) is used. Each slice starts with no mask:
the segmenter's first mask comes from a box over the whole slice (random walker: the box border as
background seed, a disk at its centre as foreground seed). Then ``refine_volume`` runs the HERMES
loop on those slices with the segmenter's own refinement strategy (GrabCut: pGT box + error clicks;
random walker: pGT scribbles + error clicks), at each pseudo-DSC threshold. ``NAME:STRATEGY`` in
``--segmenters`` (e.g. ``grabcut:scribbles``) refines with another prompt strategy.

Columns: mean true DSC of the initial (whole-box) masks and of the final masks, their difference,
mean refinement iterations; and QC at flagging masks below 0.8, over the initial masks and over
every candidate mask the loop scored (initial + each iteration):

- QC accuracy as the paper's Table 3 defines it: of the masks the truth says are below 0.8
  (true DSC < 0.8), the share the QC flags too (pseudo-DSC < 0.8);
- specificity: of the masks at or above 0.8, the share the QC leaves unflagged (a QC that flags
  everything scores 100 % on the first and 0 % here, so both are reported);
- agreement: the share of all masks where the flag is the same as the truth's.
"""
from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from SegQCLib.metrics import dice
from SegQCLib.qc import load_model
from SegQCLib.refine.loop import refine_volume
from SegQCLib.refine.prompts import initial_prompts
from SegQCLib.refine.segmenters import segmenter_from_name

FLAG_AT = 0.8


def load_case(name: str):
    """(image Volume, truth bool (z, y, x), description) of a held-out case."""
    from SegQCLib.data.sources import colin27, mni152

    if name == "mni152":
        subject = mni152("brain")
        return subject.image, subject.segmentation.mask("Brain"), "MNI152 T1 (skull-stripped), Brain; atlas Colin27"
    if name == "colin27":
        subject = colin27("brain")
        return subject.image, subject.segmentation.mask("Brain"), "Colin27 T1 (with skull), Brain; atlas MNI152"
    raise SystemExit(f"unknown dataset {name!r} (mni152, colin27)")


def whole_box_masks(image, slices: list[int], segmenter) -> np.ndarray:
    """The segmenter's masks from a box over the whole slice, on ``slices`` (others empty): bool (z, y, x)."""
    masks = np.zeros(image.shape, bool)
    for k in slices:
        prompts = initial_prompts("box", image.array[k].shape, np.random.default_rng(k))
        masks[k] = segmenter.segment(image.array[k], prompts)
    return masks


def evaluate(dataset: str, segmenter_name: str, thresholds: list[float], step: int, model,
             min_area: int = 100) -> list[dict]:
    image, truth, description = load_case(dataset)
    slices = [k for k in range(truth.shape[0]) if truth[k].sum() >= min_area][::step]
    name, _, strategy = segmenter_name.partition(":")
    segmenter = segmenter_from_name(name)
    start = time.perf_counter()
    initial = whole_box_masks(image, slices, segmenter)
    initial_s = time.perf_counter() - start
    rows = []
    for threshold in thresholds:
        start = time.perf_counter()
        result = refine_volume(image, initial, "Brain", model, segmenter, threshold=threshold, slices=slices,
                               strategy=strategy or None)
        seconds = time.perf_counter() - start + initial_s  # the whole-box masks' time counted in each row
        first = [dice(initial[t.index], truth[t.index]) for t in result.traces]
        final = [dice(result.mask[t.index], truth[t.index]) for t in result.traces]
        iterations = [len(t.iterations) - 1 for t in result.traces]
        flags = {"all": [], "initial": []}  # (QC flags it, truth flags it) per scored mask
        for t in result.traces:
            for i, it in enumerate(t.iterations):
                pair = (it.pseudo_dsc < FLAG_AT, dice(it.mask, truth[t.index]) < FLAG_AT)
                flags["all"].append(pair)
                if i == 0:
                    flags["initial"].append(pair)
        rows.append({
            "dataset": dataset, "description": description,
            "segmenter": f"{name} ({strategy or segmenter.strategy})", "threshold": threshold,
            "n": len(slices), "initial": float(np.mean(first)), "final": float(np.mean(final)),
            "final_sd": float(np.std(final)), "iterations": float(np.mean(iterations)),
            "pgt_dsc": float(np.mean([dice(result.qc.pgt[k], truth[k]) for k in slices])),
            **{f"{key}_{which}": value for which, pairs in flags.items() for key, value in qc_scores(pairs).items()},
            "seconds": seconds,
        })
        row = rows[-1]
        print(f"  {dataset:8s} {row['segmenter']:22s} thr {threshold:.1f}: initial {row['initial']:.3f} -> final "
              f"{row['final']:.3f}, {row['iterations']:.2f} it, QC accuracy {row['accuracy_initial']:.1%} initial, "
              f"{row['accuracy_all']:.1%} all ({seconds:.0f} s)",
              flush=True)
    return rows


def qc_scores(pairs: list[tuple[bool, bool]]) -> dict[str, float]:
    """Paper Table 3 accuracy (flagged by QC among truly bad), specificity, agreement and counts."""
    qc = np.array([p[0] for p in pairs], bool)
    bad = np.array([p[1] for p in pairs], bool)
    return {"accuracy": float(qc[bad].mean()) if bad.any() else float("nan"), "n_bad": int(bad.sum()),
            "specificity": float((~qc[~bad]).mean()) if (~bad).any() else float("nan"), "n_good": int((~bad).sum()),
            "agreement": float(np.mean(qc == bad)) if len(pairs) else float("nan")}


def markdown(rows: list[dict]) -> str:
    head = ("| data | segmenter | pDSC thr | slices | pGT true DSC | initial true DSC | final true DSC (sd) | gain "
            "| mean iterations | s |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['dataset']} | {r['segmenter']} | {r['threshold']:.1f} | {r['n']} | {r['pgt_dsc']:.3f} "
             f"| {r['initial']:.3f} | {r['final']:.3f} ({r['final_sd']:.3f}) | {r['final'] - r['initial']:+.3f} "
             f"| {r['iterations']:.2f} | {r['seconds']:.0f} |" for r in rows]
    qc_head = ("\n\nQC at flagging masks below 0.8 (accuracy as paper Table 3 / specificity / agreement; n = truly "
               "bad / good masks):\n\n| data | segmenter | pDSC thr | initial masks | all candidate masks |\n"
               "|---|---|---|---|---|\n")
    qc_lines = [f"| {r['dataset']} | {r['segmenter']} | {r['threshold']:.1f} | "
                + " | ".join(f"{r[f'accuracy_{w}']:.1%} / {r[f'specificity_{w}']:.1%} / {r[f'agreement_{w}']:.1%} "
                             f"(n={r[f'n_bad_{w}']}/{r[f'n_good_{w}']})" for w in ("initial", "all")) + " |"
                for r in rows]
    return head + "\n".join(lines) + qc_head + "\n".join(qc_lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["mni152", "colin27"])
    parser.add_argument("--segmenters", nargs="+", default=["grabcut", "grabcut:scribbles", "randomwalker"],
                        help="grabcut, randomwalker, optionally NAME:STRATEGY (box, scribbles, clicks)")
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.7, 0.8, 0.9])
    parser.add_argument("--step", type=int, default=4, help="use every step-th axial slice with truth")
    parser.add_argument("--min-area", type=int, default=100, help="least truth pixels of a slice used")
    parser.add_argument("--model", default="atlas-brain-mr", help="the pGT model (it must not have seen the data)")
    parser.add_argument("--no-tissue", action="store_true",
                        help="atlas-brain-mr only: keep the bare registered atlas label (no cut to the image's tissue)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("hermes_results.md"))
    args = parser.parse_args()

    model = load_model(args.model, "cpu")
    if args.no_tissue:
        if not hasattr(model, "tissue"):
            raise SystemExit(f"--no-tissue applies to atlas-brain-mr, not {args.model}")
        model.tissue = False
    start = time.perf_counter()
    rows = []
    for dataset in args.datasets:
        for name in args.segmenters:
            rows += evaluate(dataset, name, args.thresholds, args.step, model, args.min_area)
    table = markdown(rows)
    print(table)
    notes = "\n".join(f"- {d}: {desc}" for d, desc in {r["dataset"]: r["description"] for r in rows}.items())
    text = (f"# HERMES on held-out brain MRI\n\nMeasured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC with "
            f"`benchmarks/hermes_eval.py --step {args.step} --min-area {args.min_area} --model {args.model}"
            f"{' --no-tissue' if args.no_tissue else ''}` on {platform.machine()} CPU "
            f"({time.perf_counter() - start:.0f} s in all, shared cores).\n\n{notes}\n\n"
            "Start: no mask; the first mask is the segmenter's output for a box over the whole slice. pGT: "
            f"`{args.model}`{' without the tissue cut' if args.no_tissue else ''}. QC accuracy (paper Table 3): of the masks with true DSC < 0.8, the share with "
            "pseudo-DSC < 0.8; specificity and agreement as the script's docstring says. pGT true DSC: mean per-slice DSC of the "
            "pGT itself against the truth (what the loop steers towards). s: seconds per row (whole-box masks + "
            "refinement) on shared cores.\n\n" + table)
    args.out.write_text(text)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
