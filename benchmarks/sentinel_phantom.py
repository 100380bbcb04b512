"""Quality Sentinel with many training subjects: the procedural CT phantom, held-out subjects.

The brain MRI model trains on one subject (Colin27): no package ships more. This asks what the same
recipe reaches when a dataset has many subjects: it writes ``--subjects`` phantom CT subjects
(``SegQCLib.data.phantom``; liver, spleen, kidneys) as an MSD folder and runs
``segqc train sentinel --dataset`` on it with the shipped model's settings; the card it writes holds
LCC / SROCC / MAE on the held-out subjects (split by subject, 15 % val, 15 % test). Synthetic data:
the numbers say what the method does with enough subjects, not how it does on real CT.

Run: .venv/bin/python benchmarks/sentinel_phantom.py [--subjects 40] [--out runs/sentinel-phantom] [--epochs 10]
     [--train-subjects K]
(resumable: the dataset, the samples and the training checkpoint are kept in ``--out``). With
``--train-subjects K`` only K of the training subjects train (run folder ``run-k<K>``, same val and
test subjects and samples): the learning curve over the number of subjects; ``--synthetic-subjects N``
adds N warped copies of each (run folder ``run-k<K>-w<N>``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from SegQCLib.cli import main as segqc
from SegQCLib.data.phantom import write_phantom_dataset


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("runs/sentinel-phantom"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-subjects", type=int, default=None)
    parser.add_argument("--synthetic-subjects", type=int, default=0)
    args, extra = parser.parse_known_args()
    dataset = args.out / "PhantomCT"
    if not (dataset / "dataset.json").exists():
        print(f"writing {args.subjects} phantom subjects -> {dataset}")
        write_phantom_dataset(dataset, args.subjects, seed=args.seed)
    run, curve = "run", []
    if args.train_subjects is not None:
        run, curve = f"run-k{args.train_subjects}", ["--train-subjects", str(args.train_subjects)]
    if args.synthetic_subjects:
        run, curve = f"{run}-w{args.synthetic_subjects}", curve + ["--synthetic-subjects", str(args.synthetic_subjects)]
    run = args.out / run
    return segqc(["train", "sentinel", "--dataset", str(dataset), "--out", str(run), "--data-dir", str(args.out / "data"),
                  "--epochs", str(args.epochs), "--seed", str(args.seed), *curve, *extra])


if __name__ == "__main__":
    sys.exit(main())
