"""Batch QC throughput: cases per minute in process, on 1 and on 2 Dask workers, and the per-case cost.

Run: .venv/bin/python benchmarks/bench_batch.py [--cases 16] [--model sentinel-brain-mr] [--ct-cases 2]

Data: Colin27 (181x217x181, 1 mm) with 8 AAL structures per case, each degraded into a random DSC
band, with the truth as reference (so true DSC/HD95 are computed too, as a curator's run with
references does). ``--ct-cases`` more cases are resampled to a CT-sized grid (512x512x300) to
measure how the per-case cost grows with the voxel count. Prints one table; all numbers of one run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


from SegQCLib.batch import read_results, run_batch
from SegQCLib.data.degraded import degraded_dataset

STRUCTURES = ("Hippocampus_L", "Hippocampus_R", "Caudate_L", "Caudate_R", "Putamen_L", "Putamen_R",
              "Thalamus_L", "Thalamus_R")


def timed_run(csv: Path, model: str, out: Path, workers: int) -> dict[str, float]:
    """Wall time of a whole run, time to the first finished case (start-up), and steady throughput."""
    finished: list[float] = []
    start = time.perf_counter()
    summary = run_batch(csv, model, out, workers=workers, device="cpu", write_pgt=False,
                        progress=lambda done, total, case: finished.append(time.perf_counter() - start))
    wall = time.perf_counter() - start
    table = read_results(summary.results)
    assert (table.status == "ok").all(), table[table.status != "ok"].error.tolist()
    n = len(finished)
    steady = (n - 1) / (finished[-1] - finished[0]) * 60 if n > 1 and finished[-1] > finished[0] else float("nan")
    return {"cases": n, "wall_s": wall, "startup_s": finished[0] if finished else float("nan"),
            "cases_per_min": n / wall * 60, "steady_cases_per_min": steady,
            "model_s_per_structure": float(table.runtime_s.mean()), "structures": len(table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--ct-cases", type=int, default=2)
    parser.add_argument("--model", default="sentinel-brain-mr")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="segqc-bench-batch-"))
    try:
        csv = degraded_dataset(work / "brain", args.cases, STRUCTURES)
        print(f"{args.cases} cases x {len(STRUCTURES)} structures, Colin27 181x217x181, {os.cpu_count()} cores, "
              f"model {args.model}")
        print(f"{'run':22s} {'wall s':>8s} {'start-up s':>10s} {'cases/min':>10s} {'steady/min':>10s} "
              f"{'model s/structure':>18s}")
        results = {}
        for label, workers in (("in process (no Dask)", 0), ("Dask, 1 worker", 1), ("Dask, 2 workers", 2)):
            r = timed_run(csv, args.model, work / f"out-{workers}", workers)
            results[workers] = r
            print(f"{label:22s} {r['wall_s']:8.1f} {r['startup_s']:10.1f} {r['cases_per_min']:10.1f} "
                  f"{r['steady_cases_per_min']:10.1f} {r['model_s_per_structure']:18.3f}")
        one, two = results[1]["steady_cases_per_min"], results[2]["steady_cases_per_min"]
        print(f"2 workers vs 1 (steady throughput): {two / one:.2f}x")
        per_case = 60.0 / results[0]["steady_cases_per_min"]
        print(f"per-case cost in process (read, 8 structures scored, true DSC/HD95): {per_case:.2f} s "
              f"= {per_case / len(STRUCTURES):.3f} s per structure")
        if args.ct_cases:
            ct_csv = degraded_dataset(work / "ct", args.ct_cases, STRUCTURES, shape=(300, 512, 512))
            r = timed_run(ct_csv, args.model, work / "out-ct", 0)
            ct_case = 60.0 / r["steady_cases_per_min"] if args.ct_cases > 1 else r["wall_s"]
            print(f"CT-sized case 300x512x512, 8 structures, in process: {ct_case:.1f} s per case "
                  f"({ct_case / per_case:.1f}x the brain case)")
            worker_case = 60.0 / one * ct_case / per_case  # a single-threaded Dask worker on a CT-sized case
            worker_hours = 5000 * worker_case / 3600
            print(f"extrapolation: one Dask worker takes ~{worker_case:.1f} s per CT case, so 5,000 CT x 8 structures "
                  f"= {worker_hours:.1f} worker-hours: ~{worker_hours / (two / one):.1f} h on this 2-core machine, "
                  f"~{worker_hours / 64 * 60:.0f} min on 64 workers (start-up aside, scaling as measured 1 -> 2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
