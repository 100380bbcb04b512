"""`segqc`: the command line. Command names, options and JSON keys are a public contract: keep them.

Bad input prints one line ``error: <file>: <problem>`` on stderr and exits with code 2.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, List, Optional

import click
import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .domain import domain_warning
from .errors import DataSourceMissing, InputError, SegQCError
from .fingerprint import slice_axis
from .qc import DEFAULT_FLAG_THRESHOLD, QCResult

#: The parser's usage errors. typer >= 0.2x vendors click (``typer._click``): its exceptions derive
#: from ``typer.TyperException``, not from the installed click's, which older typer raises.
_USAGE_ERRORS = (click.ClickException,) + ((typer.TyperException,) if hasattr(typer, "TyperException") else ())

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quality control of medical image segmentations without ground truth.")
console = Console()


# --------------------------------------------------------------------------- helpers
def write_json(data: dict[str, Any], path: Path, inputs: tuple[str | Path, ...] = ()) -> None:
    """Write ``data`` as JSON atomically (temp file + rename); never over an input file."""
    from .io import write_bytes_atomic

    _check_new_output(Path(path), inputs)
    write_bytes_atomic(path, json.dumps(data, indent=2))


def _check_new_output(path: Optional[Path], inputs: tuple[str | Path, ...]) -> None:
    """Fail before any work when an output path is unusable."""
    from .io import check_output_path

    if path is not None:
        check_output_path(path, inputs)


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else ("-" if math.isnan(value) else f"{value:.3f}")
    return str(value)


def _with_interval(row: dict[str, Any], key: str) -> str:
    """``0.712 [0.41, 0.93]``: a score with its calibrated interval when the row has one."""
    text = _fmt(row.get(key, math.nan))
    if f"{key}_lo" in row and f"{key}_hi" in row:
        lo, hi = (float(row[f"{key}_{end}"]) for end in ("lo", "hi"))
        text += " [" + ", ".join(f"{v:.2f}" if math.isfinite(v) else str(v) for v in (lo, hi)) + "]"
    return text


def interval_note(extra: dict[str, Any]) -> str | None:
    """The line saying how sure the intervals are, or None for a model without a calibration."""
    interval = extra.get("interval")
    if not interval:
        return None
    line = f"intervals: {100 * interval['coverage']:.0f} % calibrated on the model's held-out data"
    if interval.get("domain") == "out":
        line += ("; [yellow]this input is outside the model's domain[/yellow]"
                 + ("" if interval.get("domain_calibrated") else
                    " and its interval was never measured on such inputs: treat the score as a guess"))
    return line


def print_result(result: QCResult, truth: QCResult | None = None, keys: tuple[str, ...] = ("dsc", "hd95")) -> None:
    """Per-slice table (and truth beside it when given), then the volume scores, each pseudo-score
    with its calibrated interval when the model has one."""
    table = Table(title=f"{result.model} — {result.label}", show_lines=False)
    table.add_column("slice", justify="right")
    shown = [k for k in keys if any(k in row for row in result.slices)]
    for key in shown:
        table.add_column(key if truth is None else f"pred {key}", justify="right")
    truth_rows = {row["index"]: row for row in truth.slices} if truth else {}
    if truth:
        for key in shown:
            table.add_column(f"true {key}", justify="right")
    table.add_column("flagged")
    for row in result.slices:
        cells = [str(row["index"])] + [_with_interval(row, k) for k in shown]
        if truth:
            cells += [_fmt(truth_rows.get(row["index"], {}).get(k, math.nan)) for k in shown]
        table.add_row(*cells, _fmt(row["flagged"]))
    console.print(table)
    scores = [k for k in result.volume if not k.endswith(("_lo", "_hi"))]
    console.print("volume: " + ", ".join(f"{k}={_with_interval(result.volume, k)}" for k in scores))
    if truth:
        console.print("truth:  " + ", ".join(f"{k}={_fmt(v)}" for k, v in truth.volume.items()))
    console.print(f"flagged slices (dsc < {result.threshold:g}): {len(result.flagged)} of {len(result.slices)}"
                  f"; runtime {result.runtime_s:.2f} s")
    if not result.slices:
        console.print("no slice to show: the mask and the pGT are both empty (the structure is not in the image)")
    note = interval_note(result.extra)
    if note:
        console.print(note)
    warning = domain_warning(result.model, result.extra.get("domain"))
    if warning:
        console.print(f"[yellow]{escape(warning)}[/yellow]", soft_wrap=True)
    if result.extra.get("structure_seen_in_training") is False:
        console.print(f"note: {result.model} was not trained on a structure named '{result.label}' (nearest name it "
                      f"knows: '{result.extra.get('nearest_trained_structure')}'); it reads the mask against what that "
                      "name suggests, so its scores are less reliable (see the model card's test-structures metrics)")


def _load_pair(image_path: Path, seg_path: Path, label: Optional[str]):
    from .io import align_to_grid, binary_mask, read_segmentation, read_volume

    image = read_volume(image_path)
    seg = align_to_grid(read_segmentation(seg_path), image.grid)
    mask, segment = binary_mask(seg, label)
    return image, seg, mask, segment


# --------------------------------------------------------------------------- commands
@app.command("models")
def models_cmd() -> None:
    """List the installed QC models."""
    from .qc import available_models

    entries = available_models()
    if not entries:
        console.print("No QC model is installed yet. `segqc metrics` computes true metrics against a reference.")
        return
    table = Table("name", "kind", "description")
    for entry in entries:
        table.add_row(entry.name, entry.kind, entry.description)
    console.print(table)


@app.command("qc")
def qc_cmd(
    image: Path = typer.Argument(..., help="Image volume (NIfTI, NRRD, MHA or DICOM folder)."),
    seg: Path = typer.Argument(..., help="Segmentation (label map, binary mask or .seg.nrrd)."),
    label: Optional[str] = typer.Option(None, "--label", help="Structure to score: label value or name."),
    name: Optional[str] = typer.Option(None, "--name", help="Structure name for an unnamed mask (text models)."),
    model: Optional[str] = typer.Option(None, "--model", help="QC model (see `segqc models`); default: best installed."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    threshold: float = typer.Option(DEFAULT_FLAG_THRESHOLD, "--threshold", help="Flag slices with pseudo-DSC below this."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
    pgt_out: Optional[Path] = typer.Option(None, "--pgt", help="Write the pseudo ground truth here (pGT models)."),
    heatmap_out: Optional[Path] = typer.Option(None, "--heatmap", help="Write the per-patch score map here (instance models: QANet)."),
) -> None:
    """Score a segmentation without ground truth: per-slice and volume pseudo-scores.

    With an instance model (QANet), IMAGE is a microscopy image and SEG an instance label image
    (TIFF, NIfTI, ...): per-patch predicted SEG, an image score and a patch heat map.
    """
    from .io import write_mask
    from .qc import available_models, choose_model, load_model, resolve_device

    inputs = (image, seg)
    _check_new_output(json_out, inputs)
    _check_new_output(pgt_out, inputs)
    _check_new_output(heatmap_out, inputs)
    resolved = resolve_device(device)
    entries = {e.name: e for e in available_models()}
    if model is None and not entries:
        raise InputError("--model", "no QC model is installed yet (`segqc models` lists them)")
    entry = entries.get(model) if model else None
    if entry is not None and entry.kind == "instance":
        _qc_instances(model, image, seg, resolved, json_out, heatmap_out)
        return
    if heatmap_out is not None:
        raise InputError("--heatmap", f"model {model or 'chosen'} scores slices, not patches: the heat map is for "
                                      "instance models (--model qanet-...)")
    img, segmentation, mask, segment = _load_pair(image, seg, label)
    structure = name or (segment.name if segmentation.named and segment.name else None)
    if model is None:  # the best model whose domain fits the image and the structure, or an error saying none does
        model, passed = choose_model(img, structure)
        entry = entries[model]
        if passed:
            console.print(f"model: {model} (" + "; ".join(f"{n} passed over: {', '.join(r)}" for n, r in passed.items())
                          + ")", soft_wrap=True)
    if entry is not None and pgt_out is not None and entry.kind != "reconstruction":
        raise InputError("--pgt", f"model {model} gives no pseudo ground truth")
    structure = structure or _unnamed_structure(entry, model, seg)
    qc_model = load_model(model, resolved)
    result = qc_model.assess(img, mask, structure, threshold=threshold)
    print_result(result)
    if json_out:
        write_json(result.to_json_dict(), json_out, inputs)
    if pgt_out is not None and result.pgt is not None:
        write_mask(result.pgt, img.grid, pgt_out, inputs)


def _unnamed_structure(entry, model: str, seg: Path) -> str:
    """The structure an unnamed binary mask is scored as: the one structure of a single-structure pGT
    model (nnQC trained on one); any other model reads the name (a text-conditioned model would read
    a label value "1" as a name: Brodmann area 1), so an :class:`InputError` asks for ``--name``."""
    structures = ((entry.domain if entry is not None else None) or {}).get("structures") or []
    if entry is not None and entry.kind == "reconstruction" and len(structures) == 1:
        return structures[0]
    raise InputError(seg, f"is an unnamed mask and {model} needs the structure's name (a label value would be read "
                          "as a name): give it with --name, e.g. --name Hippocampus_L")


def _qc_instances(model_name: str, image: Path, labels: Path, device: str, json_out: Optional[Path],
                  heatmap_out: Optional[Path]) -> None:
    """`segqc qc` with an instance model: per-patch table, image score, JSON and heat map."""
    from .io import atomic_output
    from .train.qanet_cli import qc_instances

    result = qc_instances(model_name, image, labels, device=device)
    table = Table(title=f"{result.model} — patches", show_lines=False)
    corner = [k for k in ("z0", "y0", "x0") if result.patches and k in result.patches[0]]
    whole = bool(result.patches) and "seg_objects" in result.patches[0]
    for column in (*corner, "size", "instances", "pred SEG", *(("pred whole-object SEG",) if whole else ())):
        table.add_column(column, justify="right")
    for row in sorted(result.patches, key=lambda r: r["seg"]):
        table.add_row(*(str(row[k]) for k in corner), str(row["size"]), str(row["n_instances"]), _with_interval(row, "seg"),
                      *((_fmt(float(row["seg_objects"])),) if whole else ()))
    console.print(table)
    source = "whole-object SEG" if whole else "patch SEG"
    how = ("the instance average" if any(row["n_instances"] for row in result.patches)
           else "no instance in the segmentation: the mean")
    # the JSON's image_score.seg is the headline score; its interval keys sit beside the heads' scores
    scores = {**result.extra.get("image_scores", {}), "seg": float(result.image_score)}
    console.print(f"image SEG (predicted): {_with_interval(scores, 'seg')}, {how} of the {source} "
                  f"of {len(result.patches)} patches; runtime {result.runtime_s:.2f} s")
    if "mhd95" in scores or "asd" in scores:
        distances = [(label, key) for key, label in (("mhd95", "MHD95"), ("asd", "ASD")) if key in scores]
        if all(math.isfinite(scores[key]) for _, key in distances):
            console.print("boundary distances (predicted, instance averages, px of the image): "
                          + ", ".join(f"{label} {_with_interval(scores, key)}" for label, key in distances))
        else:
            console.print("boundary distances: none, the segmentation has no instance to measure")
    in_pieces = int(result.extra.get("instances_in_pieces", 0))
    if in_pieces:
        console.print(f"{in_pieces} instance(s) lie in several pieces under one id (counted per z slice when a 2D "
                      "model scores a volume): scored as merges, each piece times its share of the instance")
    with_holes = int(result.extra.get("instances_with_holes", 0))
    if with_holes:
        console.print(f"{with_holes} instance(s) have holes (counted per z slice when a 2D model scores a volume): "
                      "filled for the network, each scored times the share of its filled outline it covers")
    note = interval_note(result.extra)
    if note:
        console.print(note)
    cut_at_necks = int(result.extra.get("instances_cut_at_necks", 0))
    if cut_at_necks:
        console.print(f"{cut_at_necks} instance(s) join bodies through a narrow neck (3D models): scored as merges, "
                      "each body times its share of the instance")
    if json_out:
        write_json(result.to_json_dict(), json_out, (image, labels))
    if heatmap_out:
        import SimpleITK as sitk
        import tifffile

        suffix = "".join(heatmap_out.suffixes[-2:]) if heatmap_out.name.endswith(".gz") else heatmap_out.suffix
        with atomic_output(heatmap_out, suffix) as tmp:
            if heatmap_out.suffix.lower() in (".tif", ".tiff"):
                tifffile.imwrite(tmp, result.heatmap.astype("float32"))
            else:
                sitk.WriteImage(sitk.GetImageFromArray(result.heatmap.astype("float32")), str(tmp))
        console.print(f"heat map: {heatmap_out}")


@app.command("metrics")
def metrics_cmd(
    seg: Path = typer.Argument(..., help="Segmentation to evaluate."),
    ref: Path = typer.Argument(..., help="Reference (ground truth) segmentation on the same grid."),
    label: Optional[str] = typer.Option(None, "--label", help="Structure: label value or name (in each multi-label file)."),
    threshold: float = typer.Option(DEFAULT_FLAG_THRESHOLD, "--threshold", help="Flag slices with DSC below this."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result as JSON here."),
) -> None:
    """True metrics against a reference: DSC, IoU, HD95, ASD, MHD, MHD95, neg-exp MHD, per slice and volume."""
    from .io import align_to_grid, read_segmentation
    from .qc import compare_to_reference

    _check_new_output(json_out, (seg, ref))
    pred_file = read_segmentation(seg)
    reference = read_segmentation(ref)
    pred = align_to_grid(pred_file, reference.grid)
    ref_segment = reference.find(label if len(reference.segments) != 1 else None)
    pred_segment = pred.find(label if len(pred.segments) != 1 else None) if pred.segments else None
    ref_mask = reference.layers[ref_segment.layer] == ref_segment.value
    pred_mask = (pred.layers[pred_segment.layer] == pred_segment.value) if pred_segment else pred.layers[0] > 0
    result = compare_to_reference(pred_mask, ref_mask, reference.grid.spacing, ref_segment.name, threshold,
                                  slice_axis(reference.grid))
    print_result(result, keys=("dsc", "iou", "hd95", "asd"))
    if json_out:
        write_json(result.to_json_dict(), json_out, (seg, ref))


def _dsc_band(band: tuple[float, float]) -> tuple[float, float]:
    """``--dsc-band LO HI`` checked: the degradations reach the nnQC bands only."""
    from .degrade import DSC_BANDS, resolve_band

    try:
        return resolve_band(tuple(band))
    except ValueError:
        bands = ", ".join(f"{a:g} {b:g}" for a, b in DSC_BANDS)
        raise InputError("--dsc-band", f"{band[0]:g} {band[1]:g} is not one of the DSC bands ({bands})") from None


@app.command("degrade")
def degrade_cmd(
    seg: Path = typer.Argument(..., help="Segmentation to degrade (label map or binary mask)."),
    dsc_band: tuple[float, float] = typer.Option(..., "--dsc-band", help="Target DSC band LO HI: one of the nnQC bands 0.05 0.1, 0.1 0.25, 0.25 0.5, 0.5 0.75, 0.75 0.95."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same output)."),
    label: Optional[str] = typer.Option(None, "--label", help="Degrade only this structure (value or name)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output file (.nii.gz, .nrrd or .seg.nrrd)."),
) -> None:
    """Synthetic degradation of a segmentation into a requested DSC band (nnQC's degradations)."""
    import numpy as np

    from .degrade import degrade_to_band
    from .io import Segmentation, read_segmentation, write_segmentation

    lo, hi = _dsc_band(dsc_band)  # before reading anything
    _check_new_output(out, (seg,))
    source = read_segmentation(seg)
    if label is not None:
        segment = source.find(label)
        labels = (source.layers[segment.layer] == segment.value).astype(np.uint8)
        names = {1: segment.name}
    else:
        labels, names = source.labelmap, {s.value: s.name for s in source.segments}
    if not labels.any():
        raise InputError(seg, "mask is empty: nothing to degrade")
    try:
        degraded, achieved = degrade_to_band(labels, (lo, hi), seed=seed)
    except RuntimeError as err:  # no recipe reached the band (a mask too small for it): one line, exit 1
        raise SegQCError(f"{seg}: {err}") from None
    out_seg = Segmentation.from_labelmap(degraded, source.grid, names if source.named or label else None,
                                         name=str(out))
    write_segmentation(out_seg, out, (seg,))
    console.print(f"wrote {out}: DSC vs input = {achieved:.4f} (band [{lo}, {hi}], seed {seed})")


@app.command("fingerprint")
def fingerprint_cmd(
    dataset: Path = typer.Argument(..., help="MSD / nnU-Net folder with dataset.json, or a CSV of pairs."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Write the fingerprint JSON here."),
) -> None:
    """Dataset fingerprint: median spacing, foreground size, orientation, intensity percentiles, labels."""
    from .fingerprint import fingerprint_dataset

    _check_new_output(out, (dataset,))
    fp = fingerprint_dataset(dataset)
    text = json.dumps(fp.to_dict(), indent=2)
    console.print_json(text)
    if out:
        write_json(fp.to_dict(), out, (dataset,))


@app.command("demo")
def demo_cmd(
    structure: str = typer.Option("Brain", "--structure", help="MNI152 structure: Brain, GreyMatter or WhiteMatter."),
    band: tuple[float, float] = typer.Option((0.5, 0.75), "--dsc-band", help="DSC band of the mask whose slices are shown."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    png: Path = typer.Option(Path("segqc-demo.png"), "--png", help="Write the worst slices' outlines here."),
) -> None:
    """On installed sample data: the best installed model on a subject it was not trained on (MNI152),
    one mask degraded into each DSC band: predicted vs true volume DSC and their r, the per-slice
    table of one with the truth beside it, and a PNG of its worst slices (segmentation, pGT, truth)."""
    from .data.sources import mni152
    from .degrade import DSC_BANDS, degrade_to_band
    from .io import write_bytes_atomic
    from .qc import available_models, choose_model, compare_to_reference, load_model, resolve_device

    band = _dsc_band(band)
    _check_new_output(png, ())
    subject = mni152("tissue" if structure.lower() in ("greymatter", "whitematter") else "brain")
    segment = subject.segmentation.find(structure)
    truth_mask = subject.segmentation.mask(segment.name)
    image, axis = subject.image, slice_axis(subject.image.grid)
    installed = {e.name for e in available_models() if e.kind != "instance"}
    model_name = next((n for n in DEMO_MODELS if n in installed), None)
    if model_name is None and installed:
        model_name = choose_model(image, segment.name)[0]
    masks = {b: degrade_to_band(truth_mask.astype("uint8"), b, seed=seed) for b in DSC_BANDS}
    shown_mask = masks[band][0] > 0
    truth = compare_to_reference(shown_mask, truth_mask, image.spacing, segment.name, slice_axis=axis)
    console.print(f"MNI152 {segment.name} ({subject.source}): one mask degraded into each DSC band (seed {seed})")
    if model_name is None:
        console.print("[yellow]No QC model is installed yet: showing the true metrics only. "
                      "Models come with SegQC's model issues (Quality Sentinel, nnQC, QANet).[/yellow]")
        print_result(truth)
        return
    qc_model = load_model(model_name, resolve_device(device))
    results = {b: qc_model.assess(image, m > 0, segment.name) for b, (m, _) in masks.items()}
    table = Table(title=f"{model_name} on MNI152 {segment.name} (never trained on this subject)")
    for column in ("DSC band", "true DSC", "predicted DSC"):
        table.add_column(column, justify="right")
    for b, (_, achieved) in masks.items():
        table.add_row(f"{b[0]}-{b[1]}", f"{achieved:.3f}", _with_interval(results[b].volume, "dsc"))
    console.print(table)
    true = np.array([achieved for _, achieved in masks.values()])
    pred = np.array([r.volume["dsc"] for r in results.values()])
    console.print(f"volume DSC over the {len(true)} masks: Pearson r = {np.corrcoef(pred, true)[0, 1]:.3f}, "
                  f"MAE = {np.abs(pred - true).mean():.3f}")
    result = results[band]
    console.print(f"per slice, the mask of band {band[0]}-{band[1]} (true DSC {masks[band][1]:.3f}):")
    print_result(result, truth)
    write_bytes_atomic(png, _worst_slices_png(image, shown_mask, result, truth_mask, axis))
    console.print(f"worst slices (red: segmentation, green: pGT, yellow: truth): {png}")


#: The demo's models, best first (nnQC: volume DSC r 0.987 on held-out MNI152; see the model cards).
DEMO_MODELS = ("nnqc-Brain", "atlas-brain-mr", "sentinel-brain-mr")


def _worst_slices_png(image, mask, result: QCResult, truth_mask, axis: int, n: int = 4) -> bytes:
    """PNG of the ``n`` worst slices of ``result`` among those where the truth is at least a quarter of its
    largest slice (the edges, where a stray blob scores 0, show little), with the outlines of the
    segmentation, the pGT (when the model gives one) and the truth, in the report's colours."""
    from . import report

    area = truth_mask.sum(axis=tuple(i for i in range(3) if i != axis))
    rows = [r for r in result.worst_slices() if area[r["index"]] >= 0.25 * area.max()] or result.worst_slices()
    views = []
    for row in sorted(rows[:n], key=lambda r: r["index"]):
        k = row["index"]
        plane = lambda a: np.take(a, k, axis=axis)[::-1]  # noqa: E731  (anterior / superior up in RAS arrays)
        outlines = [(plane(truth_mask), report.REF_COLOUR, report.REF_WIDTH)]
        if result.pgt is not None:
            outlines.append((plane(result.pgt), report.PGT_COLOUR, report.PGT_WIDTH))
        outlines.append((plane(mask), report.SEG_COLOUR, report.SEG_WIDTH))
        views.append((plane(image.array), outlines, f"slice {k}: pred {row['dsc']:.2f}"))
    spacing = tuple(s for i, s in enumerate(image.spacing) if i != axis)
    return report.slice_views_png(views, spacing)


@app.command("batch")
def batch_cmd(
    source: Path = typer.Argument(..., help="MSD / nnU-Net folder (dataset.json), CSV of pairs, or Slicer .mrb scene."),
    model: Optional[str] = typer.Option(None, "--model", help="QC model (see `segqc models`); default: best installed."),
    out: Path = typer.Option(..., "--out", help="Output folder: results.csv (resumable journal), report.html, pGTs."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Dask LocalCluster workers (default: core count; 0: no Dask)."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Address of an existing Dask scheduler (tcp://host:8786)."),
    memory_limit: str = typer.Option("auto", "--memory-limit", help="Memory limit per local worker, e.g. 4GB (auto: RAM / workers)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N cases."),
    structures: Optional[str] = typer.Option(None, "--structures", help="Comma-separated structure names or label values."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (for the workers)."),
    threshold: float = typer.Option(DEFAULT_FLAG_THRESHOLD, "--threshold", help="Flag slices and cases below this pseudo-DSC."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Run again the cases that failed in an earlier run."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write report.html and its tables at the end."),
    worst_n: int = typer.Option(12, "--worst-n", help="Worst cases shown with thumbnails."),
    top_n: int = typer.Option(20, "--top-n", help="Length of the active-learning and self-training lists."),
    target_risk: float = typer.Option(0.05, "--target-risk", help="Failure rate (0-1) the report's triage threshold "
                                      "may accept among the cases it passes (needs references)."),
) -> None:
    """QC every case and structure of a dataset; resumable (a rerun skips finished cases), local or on Dask."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .progress import progress_bar

    from .batch import RESULTS_FILE, read_results, run_batch
    from .qc import default_model_name

    model_name = model or default_model_name()
    if model_name is None:
        raise InputError("--model", "no QC model is installed yet (`segqc models` lists them)")
    if not 0.0 <= target_risk < 1.0:
        raise InputError("--target-risk", f"must be in [0, 1), got {target_risk:g}")
    wanted = [s.strip() for s in structures.split(",") if s.strip()] if structures else None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn())
    with progress_bar(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting", total=None)

        def progress(done: int, total: int, case_id: str) -> None:
            bar.update(task, total=total, completed=done, description=f"QC {case_id}")

        summary = run_batch(source, model_name, out, device=device, threshold=threshold, structures=wanted,
                            limit=limit, workers=workers, scheduler=scheduler, memory_limit=memory_limit,
                            retry_errors=retry_errors, progress=progress)
    console.print(f"{summary.done} case(s) scored now, {summary.skipped} already finished, {summary.errors} with errors; "
                  f"{summary.seconds:.1f} s on {summary.workers or 'no'} Dask worker(s) -> {out / RESULTS_FILE}")
    if summary.interrupted:
        console.print("[yellow]interrupted: every finished case is saved; run the same command again to resume[/yellow]")
        raise typer.Exit(130)
    table = read_results(out / RESULTS_FILE)
    if report and len(table):
        from .report import write_report

        html = write_report(table, out, threshold=threshold, worst_n=worst_n, top_n=top_n, target_risk=target_risk)
        console.print(f"report: {html}")
    if summary.all_failed:  # nothing was scored: a script running the batch must notice (exit 1)
        first = next((e for e in table.error if e), "")
        raise SegQCError(f"{out / RESULTS_FILE}: every case failed ({summary.errors} of {summary.done}); "
                         f"first error: {first[:300]}")


@app.command("refine")
def refine_cmd(
    image: Path = typer.Argument(..., help="Image volume (NIfTI, NRRD, MHA or DICOM folder)."),
    seg: Optional[Path] = typer.Argument(None, help="Segmentation to correct; omit to segment from scratch."),
    out: Path = typer.Option(..., "-o", "--out", help="Refined mask (never an input file)."),
    segmenter: str = typer.Option("grabcut", "--segmenter", help="grabcut, randomwalker or medsam."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="Prompts derived from the pGT: box, scribbles or clicks (default: the segmenter's own)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Local MedSAM checkpoint (medsam_vit_b.pth)."),
    threshold: float = typer.Option(DEFAULT_FLAG_THRESHOLD, "--threshold", help="Refine slices below this pseudo-DSC; stop when reached."),
    model: str = typer.Option("atlas-brain-mr", "--model", help="QC model that gives a pseudo ground truth."),
    label: Optional[str] = typer.Option(None, "--label", help="Structure in SEG (value or name)."),
    name: Optional[str] = typer.Option(None, "--name", help="Structure name for the QC model (required without SEG)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the trace (prompts, pseudo-DSC per iteration)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    max_iterations: int = typer.Option(20, "--max-iterations", help="Iterations per slice at most."),
    all_slices: bool = typer.Option(False, "--all-slices", help="Refine every slice, not only the flagged ones."),
) -> None:
    """HERMES: refine a segmentation by moving the prompts of a segmenter until the pseudo-DSC passes."""
    from .refine.cli import refine_command

    result = refine_command(image, seg, out, segmenter=segmenter, checkpoint=checkpoint, threshold=threshold,
                            model=model, label=label, name=name, json_out=json_out, device=device,
                            max_iterations=max_iterations, only_flagged=not all_slices, strategy=strategy)
    table = Table("slice", "iterations", "pseudo-DSC before", "pseudo-DSC after", "stop", title=f"HERMES — {result.qc.label}")
    for trace in result.traces:
        table.add_row(str(trace.index), str(len(trace.iterations) - 1), _fmt(trace.initial_pseudo_dsc),
                      _fmt(trace.best_pseudo_dsc), trace.stop_reason)
    console.print(table)
    console.print(f"{len(result.traces)} slice(s) refined -> {out}")


train_app = typer.Typer(no_args_is_help=True, help="Train a QC model on labelled data.")
app.add_typer(train_app, name="train")


@train_app.command("sentinel")
def train_sentinel_cmd(
    out: Path = typer.Option(Path("runs/sentinel"), "--out", help="Run folder: data cache, checkpoints, best model."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Cache folder of the samples (default OUT/data; "
                                            "runs sharing one build their samples once)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Train on your own labelled dataset (MSD / nnU-Net "
                                           "folder with dataset.json, or a CSV of pairs) instead of the built-in brain "
                                           "MRI, split by subject into train / val / test."),
    val_fraction: float = typer.Option(0.15, "--val-fraction", help="With --dataset: share of subjects for validation."),
    test_fraction: float = typer.Option(0.15, "--test-fraction", help="With --dataset: share of subjects held out for the test."),
    train_subjects: Optional[int] = typer.Option(None, "--train-subjects", help="With --dataset: train on only this "
                                                 "many of the split's training subjects (a learning curve; val and "
                                                 "test unchanged)."),
    synthetic_subjects: int = typer.Option(0, "--synthetic-subjects", help="Add this many randomly warped copies "
                                           "of each training subject (anatomy and intensities; Colin27 for the "
                                           "built-in data; benchmarks/sentinel_phantom.md)."),
    averaged_subjects: int = typer.Option(0, "--averaged-subjects", help="Add this many template-like copies of "
                                          "Colin27 (the mean of 8 misregistered copies of one warp, labels by "
                                          "vote; as MNI152 and study templates are made). Built-in data only "
                                          "(benchmarks/sentinel_warped_brain.md: did not lift MNI152)."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the trained model (default: sentinel-brain-mr, "
                                       "or sentinel-<dataset folder> with --dataset)."),
    init: Optional[str] = typer.Option(None, "--init", help="Fine-tune: start from this model's weights (an "
                                       "installed name such as sentinel-brain-mr, or a model card); its network "
                                       "settings must equal this run's."),
    epochs: int = typer.Option(12, "--epochs"),
    batch_size: int = typer.Option(64, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    rank_weight: float = typer.Option(1.0, "--rank-weight", help="Weight of the optimal-pair ranking loss (0: MSE only)."),
    text_encoder: str = typer.Option("minilm", "--text-encoder", help="minilm, onehot or openclip:<model>:<checkpoint>."),
    backbone: str = typer.Option("resnet18", "--backbone", help="resnet10, resnet18, resnet34, resnet50, or "
                                 "openclip:<model>:<checkpoint> (SegAE: a local open_clip vision tower such as "
                                 "BiomedCLIP's, fine-tuned on the image with its mask blended in; use --size 224)."),
    freeze_backbone: bool = typer.Option(False, "--freeze-backbone/--train-backbone", help="Keep an openclip "
                                         "backbone's pretrained weights fixed (only the gates and head train)."),
    widen: float = typer.Option(0.5, "--widen", help="Channel width factor of the ResNet."),
    size: int = typer.Option(96, "--size", help="Model input side in pixels (papers: 256)."),
    context_mm: float = typer.Option(128.0, "--context-mm", help="Side of the fixed-size context view in mm (0: off, the papers' 2 channels)."),
    per_band: int = typer.Option(3, "--per-band", help="Degraded volumes per DSC band and structure."),
    algorithmic: int = typer.Option(4, "--algorithmic", help="Algorithmic segmentations per structure."),
    strip_prob: float = typer.Option(0.0, "--strip-prob", help="Chance a training volume is shown skull-stripped "
                                     "(0: never; benchmarks/sentinel_skull_strip.md measures 0.3)."),
    intensity_prob: float = typer.Option(0.0, "--intensity-prob", help="Chance a training sample gets a random "
                                         "bias field and noise (0: never)."),
    flip_names: bool = typer.Option(False, "--flip-names/--keep-names", help="A left-right flip of a lateral "
                                    "structure's sample also swaps its name's side (Putamen_L -> Putamen_R); "
                                    "samples whose other side is not a training name are not flipped "
                                    "(benchmarks/sentinel_tissue.md: worse on held-out structures)."),
    text_noise: float = typer.Option(0.0, "--text-noise", help="Norm of random noise added to the training "
                                     "text embeddings, relative to theirs (0: none; benchmarks/sentinel_tissue.md "
                                     "measures 0.5)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (where the network trains and is evaluated)."),
    install: bool = typer.Option(False, "--install", help="Copy the best model into Resources/Models with its card."),
) -> None:
    """Train Quality Sentinel on the real MRI of DATA.md, or on your own labelled dataset with --dataset
    (resumes from OUT/checkpoint.pt)."""
    from .models.encoders import OneHotTextEncoder, text_encoder_from_spec
    from .models.sentinel import SentinelConfig, resolve_backbone
    from .models.sentinel import load_model as load_sentinel
    from .qc import resolve_device
    from .train import sentinel_dataset
    from .train.sentinel_cli import card_extra, evaluate_model, evaluate_sets, format_report, sample_set, write_card
    from .train.sentinel_train import TrainOptions, train

    data_dir = data_dir or out / "data"
    if freeze_backbone and not backbone.startswith("openclip:"):
        raise InputError("--freeze-backbone", "only an openclip:<model>:<checkpoint> backbone is pretrained")
    device = resolve_device(device)
    config = resolve_backbone(SentinelConfig(backbone=backbone, widen=widen, size=size, context_mm=context_mm,
                                             freeze_backbone=freeze_backbone))
    if not 0.0 <= strip_prob <= 1.0:
        raise InputError("--strip-prob", f"must be in [0, 1], got {strip_prob}")
    if not 0.0 <= intensity_prob <= 1.0:
        raise InputError("--intensity-prob", f"must be in [0, 1], got {intensity_prob}")
    if text_noise < 0:
        raise InputError("--text-noise", f"must be >= 0, got {text_noise}")
    if dataset is None and train_subjects is not None:
        raise InputError("--train-subjects", "applies to --dataset only (the built-in data has one training subject)")
    if synthetic_subjects < 0:
        raise InputError("--synthetic-subjects", f"must be >= 0, got {synthetic_subjects}")
    if averaged_subjects < 0:
        raise InputError("--averaged-subjects", f"must be >= 0, got {averaged_subjects}")
    if dataset is not None and averaged_subjects:
        raise InputError("--averaged-subjects", "applies to the built-in brain MRI only, not with --dataset")
    if dataset is not None and strip_prob > 0:
        raise InputError("--strip-prob", "skull-stripped views exist for the built-in brain MRI only, not with --dataset")
    if dataset is not None:
        config = sentinel_dataset.dataset_config(dataset, config)
    init_card = None
    if init is not None:  # fail before any data is built; the text encoder is checked by train()
        from .models import find_card
        from .train.sentinel_train import check_same_network

        init_card = find_card(init)
        check_same_network(init_card, config, ignore=("text_encoder", "text_dim"))
    if dataset is None:
        train_set = sample_set(data_dir, "train", config, per_band, algorithmic, log=console.print, strip_prob=strip_prob,
                               synthetic=synthetic_subjects, averaged=averaged_subjects)
        val_set = sample_set(data_dir, "val", config, per_band, algorithmic, log=console.print)
    else:
        split_ids, atlases, train_set, val_set = sentinel_dataset.training_sets(
            dataset, data_dir, config, per_band, algorithmic, val_fraction, test_fraction, seed, train_subjects,
            synthetic_subjects, log=console.print)
    name = name or ("sentinel-brain-mr" if dataset is None else f"sentinel-{dataset.stem.lower()}")
    if text_encoder == "onehot":
        encoder = OneHotTextEncoder(sorted(set(train_set.names) | set(val_set.names)))
    else:
        encoder = text_encoder_from_spec(text_encoder)
    config.text_encoder, config.text_dim = encoder.name, encoder.dim
    options = TrainOptions(epochs=epochs, batch_size=batch_size, lr=lr, rank_weight=rank_weight, seed=seed,
                           intensity_prob=intensity_prob, text_noise=text_noise, flip_names=flip_names)
    best = train(out, train_set, val_set, config, options, encoder, log=console.print, device=device, init=init_card)
    if dataset is None:
        results = evaluate_model(best, data_dir, device=device, log=console.print)
        extra = card_extra(config, options, train_set, val_set, strip_prob, synthetic_subjects, averaged_subjects)
    else:
        held_out = sentinel_dataset.test_set(dataset, data_dir, config, split_ids["test"], atlases,
                                             per_band, algorithmic, log=console.print)
        results = evaluate_sets(load_sentinel(best, device), {"test": held_out})
        extra = sentinel_dataset.dataset_card_extra(config, options, dataset, split_ids, atlases, train_set, val_set,
                                                    per_band, algorithmic)
    base_card = json.loads(init_card.read_text()) if init_card is not None else {}
    if init_card is not None:
        extra["fine_tuned_from"] = base_card.get("name", init_card.stem)
    # the names the network learnt, so that inference can say when a name is new to it (unknown when the
    # model it was fine-tuned from does not list its own)
    if init_card is None or "trained_structures" in base_card:
        extra["trained_structures"] = sorted(set(train_set.names) | set(base_card.get("trained_structures", [])))
    console.print(format_report(results))
    card = write_card(best, out / name, name, results, extra)
    console.print(f"model card: {card}")
    if install:
        shipped = Path(__file__).resolve().parents[1] / "Resources" / "Models"
        console.print(f"installed: {write_card(best, shipped / name, name, results, extra)}")


@train_app.command("nnqc")
def train_nnqc_cmd(
    out: Path = typer.Option(Path("runs/nnqc"), "--out", help="Run folder: checkpoints per stage, best model, card."),
    structure: str = typer.Option("Brain", "--structure", help="Structure of the model (one model per structure): Brain or an AAL name."),
    dae_steps: int = typer.Option(150, "--dae-steps", help="Steps of the image denoising autoencoder (expert E2)."),
    vae_steps: int = typer.Option(500, "--vae-steps", help="Steps of the mask VAE-GAN (stage 1)."),
    ldm_steps: int = typer.Option(4000, "--ldm-steps", help="Steps of the latent diffusion model (stage 2); more continues a run."),
    batch_size: int = typer.Option(16, "--batch-size"),
    val_every: int = typer.Option(1000, "--val-every", help="Validate (and keep the best) every N steps."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 was 8x faster than 2 on a busy 2-core machine)."),
    experts: str = typer.Option("full", "--experts", help="Team of Experts ablation: full (position queries image), position or image."),
    device: str = typer.Option("auto", "--device"),
    install: bool = typer.Option(False, "--install", help="Copy the trained model into Resources/Models."),
) -> None:
    """Train nnQC (DAE image expert, VAE-GAN, LDM with the Team of Experts) on the real MRI of DATA.md;
    resumes from OUT (finished stages are skipped); Ctrl-C or kill saves a checkpoint first."""
    import shutil

    from .models.nnqc import EXPERTS, NNQCConfig
    from .train.nnqc_cli import CPU_CONFIG, default_strip_prob, train_nnqc
    from .train.nnqc_train import TrainOptions

    if experts not in EXPERTS:
        raise InputError("--experts", f"unknown mode {experts!r} (choose {', '.join(EXPERTS)})")
    options = TrainOptions(dae_steps=dae_steps, vae_steps=vae_steps, ldm_steps=ldm_steps, batch_size=batch_size,
                           val_every=val_every, val_samples=96, adv_start=min(150, vae_steps // 3),
                           strip_prob=default_strip_prob(structure), threads=threads)
    config = NNQCConfig(structures=(structure,), experts=experts, **CPU_CONFIG)
    card = train_nnqc(out, structure, config=config, options=options, device=device, log=console.print)
    console.print(f"model card: {card}")
    if install:
        shipped = Path(__file__).resolve().parents[1] / "Resources" / "Models"
        weights = json.loads(Path(card).read_text())["weights"]
        for file in (Path(card), Path(card).parent / weights):
            shutil.copy2(file, shipped / file.name)
        console.print(f"installed into {shipped}")


@train_app.command("qanet")
def train_qanet_cmd(
    out: Path = typer.Option(Path("runs/qanet"), "--out", help="Run folder: simulated data cache, checkpoints, best model."),
    dims: int = typer.Option(2, "--dims", help="2 or 3."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name (default qanet-nuclei-<dims>d)."),
    fusion: str = typer.Option("ribcage", "--fusion", help="ribcage, naive or siamese (ablations)."),
    encoding: str = typer.Option("trinary", "--encoding", help="trinary or binary (ablation)."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    max_minutes: Optional[float] = typer.Option(None, "--max-minutes", help="Stop (and keep the best) after this long."),
    device: str = typer.Option("auto", "--device"),
    seed: int = typer.Option(0, "--seed", help="Training seed (network start, patch choice and order); the simulated "
                             "data and its held-out split stay the same."),
    extend: Optional[Path] = typer.Option(None, "--extend", help="Card of a trained QANet: add the boundary-distance "
                                          "heads (MHD95, ASD in px) on its frozen network; its other outputs stay the same."),
) -> None:
    """Train QANet on simulated nuclei (our simulator) and evaluate on held-out simulated images; resumable."""
    from .models.qanet import DISTANCE_TARGETS
    from .train.qanet_cli import train_qanet

    if dims not in (2, 3):
        raise InputError("--dims", f"must be 2 or 3, got {dims}")
    extra = {"extend": extend, "targets": ("seg",) + DISTANCE_TARGETS} if extend else {}
    card, _ = train_qanet(out, dims=dims, name=name, fusion=fusion, encoding=encoding, epochs=epochs,
                          max_minutes=max_minutes, device=device, seed=seed, log=console.print, **extra)
    console.print(f"model card: {card}")


@app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Argument(..., help="Installed model name or a model card (.json)."),
    coverage: float = typer.Option(0.9, "--coverage", help="Nominal coverage of the intervals (0.5-0.99)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Cache folder of the evaluation samples."),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Fit calibrated intervals on the model's held-out data and write them into its model card.

    Every later score of the model (JSON, tables, batch, report, Slicer) carries its interval
    (``dsc_lo`` / ``dsc_hi``, ...); the card states the coverage measured on held-out data."""
    from .models import find_card
    from .qc import resolve_device
    from .train.calibrate import calibrate_card, format_coverage

    entry = calibrate_card(find_card(model), coverage, resolve_device(device), data, log=console.print)
    console.print(format_coverage(entry), soft_wrap=True)


@app.command("eval")
def eval_cmd(
    model: str = typer.Argument(..., help="Installed model name or a model card (.json)."),
    data: Path = typer.Option(Path("runs/eval-data"), "--data", help="Cache folder of the evaluation samples."),
    split: List[str] = typer.Option(["test-subject", "test-structures"], "--split", help="Held-out split(s)."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help="Sentinel models: evaluate on a labelled dataset "
                                           "(MSD / nnU-Net folder or CSV of pairs): its held-out subjects if the "
                                           "model was trained on it, else every subject."),
    device: str = typer.Option("auto", "--device"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the numbers as JSON here."),
) -> None:
    """Evaluate a QC model on held-out data: r (LCC), SROCC, MAE, MAP@5/10 at volume and slice level."""
    from .models import find_card
    from .qc import resolve_device
    from .train.sentinel_cli import evaluate_model, format_report

    card = find_card(model)
    _check_new_output(json_out, (card,))
    try:
        architecture = json.loads(card.read_text()).get("architecture")
    except (OSError, ValueError):
        raise InputError(card, "is not a readable model card (JSON)") from None
    if dataset is not None and architecture != "sentinel":
        raise InputError("--dataset", f"only Sentinel models are evaluated on a dataset ({card.name} is {architecture})")
    if dataset is not None:
        from .train.sentinel_dataset import evaluate_on_dataset

        results = evaluate_on_dataset(card, dataset, data, resolve_device(device), log=console.print)
        console.print(format_report(results))
    elif architecture == "qanet":
        from .train import qanet_cli

        results = qanet_cli.evaluate_qanet(card, None if data == Path("runs/eval-data") else data,
                                           device=resolve_device(device), log=console.print)
        console.print(qanet_cli.format_report(results))
    elif architecture == "nnqc":
        from .train import nnqc_cli

        results = nnqc_cli.evaluate_nnqc(card, device=resolve_device(device), log=console.print)
        console.print(nnqc_cli.format_report(results))
    elif architecture == "sentinel":
        results = evaluate_model(card, data, tuple(split), device=resolve_device(device), log=console.print)
        console.print(format_report(results))
    else:
        raise InputError(card, f"no evaluation for architecture {architecture!r}")
    if json_out:
        write_json(results, json_out, (card,))


@app.command("review")
def review_cmd(
    inputs: Optional[List[str]] = typer.Argument(None, help="IMAGE [SEG ...], a scene .mrb, or a `segqc batch` output folder."),
    demo: bool = typer.Option(False, "--demo", help="Colin27 with degraded AAL structures (needs mricron-data)."),
    model: Optional[str] = typer.Option(None, "--model", help="QC model preselected (default: a pGT model if installed)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the review to the network."),
    port: int = typer.Option(8080, "--port", help="Port to listen on (0: any free port)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder Save writes into (default: the working directory)."),
) -> None:
    """The SegQC panel beside Slicer's Segment Editor, in a browser (trame-slicer; `pip install segqc[review]`)."""
    if not inputs and not demo:
        raise InputError("review", "name an image (and segmentations), a scene .mrb, a QC folder, or --demo")
    try:  # the web app lives beside the library (it imports MRML; SegQCLib never does)
        from SegQCReview.serve import serve
    except ImportError as err:
        raise InputError("review", f"the web app is not installed ({err}): pip install 'segqc[review]'") from err
    serve(list(inputs or []), demo=demo, model=model, device=device, host=host, port=port,
          out_dir=str(out) if out else None)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"segqc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                       help="Print the version and exit.")) -> None:
    # eager with a callback: it runs while the options are parsed, before the group asks for a
    # command (a plain option would only be seen after "Missing command" stopped `segqc --version`)
    pass


# --------------------------------------------------------------------------- entry point
def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; bad input -> one line on stderr and exit code 2.

    Usage errors (an unknown option, a bare ``segqc`` or ``segqc train``, which print the help) exit
    with click's code 2; a command that fails as a whole (every case of a batch) with 1.
    """
    try:
        code = app(args=argv, prog_name="segqc", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) is returned, not raised, in this mode
            return code
    except (InputError, DataSourceMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except typer.Exit as err:
        return err.exit_code
    except _USAGE_ERRORS as err:
        if hasattr(err, "show"):
            err.show()  # the usage line and "Error: ..."; a bare group's NoArgsIsHelpError shows its help
        else:
            print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SegQCError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
