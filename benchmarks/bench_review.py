"""SegQC Review latency in a real browser: click on Run QC -> table + plot (+ pGT overlay) shown, and
click on Refine -> one HERMES slice's result shown, for each model, on Colin27 (181 x 217 x 181) and
on a CT-sized volume (300 x 512 x 512: Colin27 resampled, so the brain models see a brain).

    .venv/bin/python benchmarks/bench_review.py [--repeats 3] [--skip-large]

Each case starts ``segqc review`` on 127.0.0.1, opens it in Debian's chromium (Playwright), and
times from the click to the moment the page shows the result (waits on page content). The first
Run QC of a model in a server includes loading it; later ones are "warm". Prints a table.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = (("sentinel-brain-mr", "Hippocampus_L", False), ("atlas-brain-mr", "Brain", True),
          ("nnqc-Brain", "Brain", True))
LAUNCH_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]


def large_case(folder: Path) -> list[str]:
    """Colin27 and the demo's degraded masks resampled to 300 x 512 x 512 (z, y, x): image + label map."""
    from scipy import ndimage as ndi

    from SegQCLib.io import write_bytes_atomic, write_mask, write_volume
    from SegQCLib.volume import Grid, Volume
    from SegQCReview.inputs import demo_case

    image_path, checked = demo_case()
    from SegQCLib.io import read_volume

    image = read_volume(image_path)
    shape = (300, 512, 512)
    zoom = [n / s for n, s in zip(shape, image.shape)]
    spacing = tuple(sp / z for sp, z in zip(image.spacing, zoom))
    grid = Grid(shape, spacing, image.grid.origin, image.grid.direction)
    write_volume(Volume(ndi.zoom(image.array, zoom, order=1).astype(np.float32), grid, "large"), folder / "large.nii.gz")
    labels = np.zeros(shape, np.uint8)
    table = []
    for value, name in enumerate(("Brain", "Hippocampus_L"), start=1):  # Brain first: the hippocampus is on top
        labels[ndi.zoom(checked.masks[name].astype(np.uint8), zoom, order=0) > 0] = value
        table.append(f"{value} {name}")
    write_mask(labels, grid, folder / "large_seg.nii.gz")
    write_bytes_atomic(folder / "large_seg.nii.txt", "\n".join(table) + "\n")
    return [str(folder / "large.nii.gz"), str(folder / "large_seg.nii.gz")]


def start_server(args: list[str], out: Path):
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "SegQCLib.cli", "review", *args, "--port", "0", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=(out / "server.log").open("w"), text=True, encoding="utf-8",
                            errors="replace", env=env, cwd=out)
    start = time.perf_counter()
    for line in proc.stdout:
        match = re.search(r"SegQC Review: (http://\S+)", line)
        if match:
            return proc, match.group(1), time.perf_counter() - start
    raise RuntimeError(f"server did not start: {(out / 'server.log').read_text(errors='replace')[-2000:]}")


def select(page, model: str, structure: str) -> None:
    page.evaluate("""([model, structure]) => {
        const s = window.trame.state;
        const seg = s.get('qc_segments').find(x => x.title === structure);
        s.set('qc_model', model); s.set('qc_segment', seg.value); s.set('qc_refine_in_view', true); }""",
                  [model, structure])


def time_run_qc(page, pgt: bool) -> tuple[float, float]:
    """(seconds from the click to table + plot (+ overlay) shown, seconds the model took)."""
    runs = page.evaluate("window.trame.state.get('qc_runs')")
    page.click("#qc-tab-qc")
    start = time.perf_counter()
    page.click("#qc-run")
    page.wait_for_function(f"window.trame.state.get('qc_runs') > {runs}", timeout=600_000)
    page.wait_for_selector("#qc-table .qc-row", timeout=600_000)
    page.wait_for_selector("#qc-plot .qc-plot-point", timeout=600_000)
    if pgt:
        page.wait_for_selector("#qc-overlay", timeout=600_000)
    elapsed = time.perf_counter() - start
    return elapsed, float(page.evaluate("window.trame.state.get('qc_timing').model_s"))


def time_refine(page) -> float:
    page.click("#qc-tab-refine")
    page.evaluate("window.trame.state.set('qc_refined_name', '')")
    start = time.perf_counter()
    page.click("#qc-refine")
    page.wait_for_function("window.trame.state.get('qc_refined_name') !== '' && !window.trame.state.get('qc_busy')",
                           timeout=600_000)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="warm Run QC repetitions per model")
    parser.add_argument("--skip-large", action="store_true", help="only Colin27")
    parser.add_argument("--skip-small", action="store_true", help="only the 300 x 512 x 512 volume")
    options = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from SegQCLib.qc import available_models

    installed = {m.name for m in available_models()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="segqc-bench-review-") as tmp, sync_playwright() as playwright:
        tmp = Path(tmp)
        cases = [] if options.skip_small else [("Colin27 181x217x181", ["--demo"])]
        if not options.skip_large:
            t0 = time.perf_counter()
            cases.append(("CT-sized 300x512x512", large_case(tmp)))
            print(f"(large case written in {time.perf_counter() - t0:.1f} s)", flush=True)
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        for label, args in cases:
            out = tmp / re.sub(r"\W+", "_", label)
            out.mkdir()
            proc, url, startup = start_server(args, out)
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 900})
                t0 = time.perf_counter()
                page.goto(url)
                page.wait_for_selector("#qc-run", timeout=120_000)
                print(f"{label}: server ready in {startup:.1f} s, page in {time.perf_counter() - t0:.1f} s", flush=True)
                for model, structure, pgt in MODELS:
                    if model not in installed:
                        continue
                    select(page, model, structure)
                    cold, _cold_model = time_run_qc(page, pgt)
                    runs = [time_run_qc(page, pgt) for _ in range(options.repeats)]
                    warm, in_model = [r[0] for r in runs], [r[1] for r in runs]
                    refine = time_refine(page) if pgt else float("nan")
                    rows.append((label, model, cold, float(np.median(warm)), min(warm), float(np.median(in_model)),
                                 refine))
                    print(f"  {model:18s} Run QC first {cold:6.2f} s, warm median {np.median(warm):6.2f} s "
                          f"(min {min(warm):.2f}; model {np.median(in_model):.2f}), HERMES slice {refine:6.2f} s",
                          flush=True)
                page.close()
            finally:
                proc.terminate()
                proc.wait(timeout=30)
        browser.close()
    print("\n| volume | model | Run QC, first (s) | Run QC, warm median (s) | warm min (s) | of which model (s) "
          "| HERMES one slice (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, model, cold, warm, best, in_model, refine in rows:
        print(f"| {label} | {model} | {cold:.2f} | {warm:.2f} | {best:.2f} | {in_model:.2f} | "
              f"{'-' if np.isnan(refine) else f'{refine:.2f}'} |")


if __name__ == "__main__":
    main()
