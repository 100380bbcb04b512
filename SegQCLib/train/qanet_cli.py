"""Plain functions behind `segqc train qanet`, `segqc eval <qanet card>` and `segqc qc --model qanet-...`.

- :func:`train_qanet` builds (or reuses) the simulated train/val/test patches, trains, evaluates on
  the held-out simulated test split and writes ``OUT/<name>.json`` + ``.safetensors``.
- :func:`evaluate_qanet` re-evaluates any QANet card on its held-out simulated test split (rebuilt
  from the seeds stored in the card when not cached).
- :func:`qc_instances` scores an image + instance-label file pair.
- :func:`ship_model` copies trained weights (float16) with a completed model card.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..models.qanet import (DEFAULT_TARGETS, DISTANCE_TARGETS, STACK_DOMAIN, QANetConfig, QANetQC, QANetResult,
                            load_model, save_model)
from .qanet_data import SAMPLES_VERSION, SPLIT_SEEDS, QANetSamples, balance, generate_samples, seg_histogram

#: Default sizes per dimensionality: simulated images per split, balanced training patches, epochs,
#: patch side, width, rib convs, nucleus radius range (px) and the matching diameter range; for 2D
#: also simulated 3D stacks per split whose z slices are added (``stack_*``, see ``generate_samples``).
DEFAULTS: dict[int, dict[str, Any]] = {
    2: {"train": 1600, "val": 120, "test": 150, "train_patches": 28000, "epochs": 12, "patch": 64, "width": 0.5,
        "rib_convs": 1, "batch_size": 64, "radius_range": (5.0, 15.0), "diameter_range": (10.0, 30.0),
        "stack_train": 360, "stack_val": 40, "stack_test": 60},
    3: {"train": 520, "val": 40, "test": 60, "train_patches": 8000, "epochs": 14, "patch": 24, "width": 0.25,
        "rib_convs": 1, "batch_size": 32, "radius_range": (4.5, 8.5), "diameter_range": (8.0, 17.0)},
}


#: Added to a split's seed for its simulated stacks, so that no stack shares a seed with a 2D image.
STACK_SEED_OFFSET = 100


def sample_set(data_dir: Path, dims: int, split: str, n_images: int, patch: int,
               targets: tuple[str, ...] = DEFAULT_TARGETS, stack_slices: bool = False, progress: bool = True,
               log=print) -> QANetSamples:
    """The (unbalanced) patches of ``split`` (train / val / test), built once and cached in ``data_dir``;
    ``stack_slices``: 2D patches of z slices of ``n_images`` simulated 3D stacks instead."""
    if split not in SPLIT_SEEDS:
        raise InputError(split, f"unknown split (choose {', '.join(SPLIT_SEEDS)})")
    data_dir = Path(data_dir)
    kind = "-stack" if stack_slices else ""
    path = data_dir / f"{split}-{dims}d{kind}-p{patch}-n{n_images}-{'+'.join(targets)}-v{SAMPLES_VERSION}.npz"
    if path.exists():
        return QANetSamples.load(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    log(f"simulating {n_images} {'3D stacks (2D slices)' if stack_slices else f'{dims}D images'} for the {split} split -> {path}")
    radius_range = DEFAULTS[dims]["radius_range"]
    seed = SPLIT_SEEDS[split] + (STACK_SEED_OFFSET if stack_slices else 0)
    samples = generate_samples(dims, n_images, seed=seed, patch=patch, radius_range=radius_range,
                               targets=targets, stack_slices=stack_slices, progress=progress)
    samples.save(path)
    log(f"  {len(samples)} patches, SEG histogram {seg_histogram(samples.seg)}")
    return samples


def train_qanet(out: Path, dims: int = 2, name: str | None = None, fusion: str = "ribcage",
                encoding: str = "trinary", width: float | None = None, patch: int | None = None,
                epochs: int | None = None, batch_size: int | None = None, lr: float = 2e-3,
                targets: tuple[str, ...] = DEFAULT_TARGETS, train_images: int | None = None,
                val_images: int | None = None, test_images: int | None = None, train_patches: int | None = None,
                stack_images: tuple[int, int, int] | None = None, data_dir: Path | None = None, threads: int = 1,
                device: str = "auto", max_minutes: float | None = None, seed: int = 0,
                extend: Path | None = None, progress: bool = True, log=print) -> tuple[Path, dict]:
    """Train a QANet on simulated nuclei and write ``out/<name>.{json,safetensors}``.

    Args:
        out: run folder (checkpoint.pt, history.json, best.*, the final card); rerun to resume.
        dims: 2 or 3. name: model name (default ``qanet-nuclei-<dims>d``).
        fusion / encoding: ``ribcage|naive|siamese`` / ``trinary|binary`` (ablations).
        width, patch, epochs, batch_size, lr, train/val/test_images, train_patches: override
            :data:`DEFAULTS`. targets: predicted measures (``"seg"`` first).
        stack_images: (train, val, test) simulated 3D stacks whose z-slice patches join the 2D
            splits (default ``DEFAULTS[2]["stack_*"]``; (0, 0, 0) for plain 2D images only).
        data_dir: sample cache (default ``out/../qanet-data``, shared by runs).
        extend: the card of a trained model to extend with the distance heads in ``targets``
            (:data:`~SegQCLib.models.qanet.DISTANCE_TARGETS`): its network is loaded and frozen and
            only the new head trains (on sample sets holding ``seg`` and the distances), so its other
            predictions stay the same. Its dims, patch, architecture and name are kept (``name``
            overrides); fusion, encoding and width are ignored. The card's metrics are kept and the
            distances' held-out metrics added.
        threads: torch CPU threads; device: auto | cpu | cuda; max_minutes: stop after the epoch
            that passes this wall-clock budget.

    Returns:
        (card path, held-out simulated test report: per target n, lcc, srocc, mae, rmse, bias, auc).
    """
    from .qanet_train import QANetTrainOptions, train

    base = load_model(extend, "cpu") if extend else None
    if base is not None:
        dims = base.config.dims
        new = tuple(t for t in targets if t not in base.config.targets)
        if not new or any(t not in DISTANCE_TARGETS for t in new) or base.net.distance_head is not None:
            raise InputError("--extend", f"a trained model can only gain distance heads {DISTANCE_TARGETS} it does not "
                                         f"have; {base.name} predicts {base.config.targets}, asked for {tuple(targets)}")
    if dims not in DEFAULTS:
        raise InputError("--dims", f"must be 2 or 3, got {dims}")
    d = DEFAULTS[dims]
    out = Path(out)
    data_dir = Path(data_dir) if data_dir else out.parent / "qanet-data"
    if base is not None:
        config = QANetConfig.from_dict({**base.config.to_dict(), "targets": base.config.targets + new})
        name, patch, sample_targets = name or base.name, config.patch, ("seg",) + new
        fusion, encoding = config.fusion, config.encoding
    else:
        name = name or f"qanet-nuclei-{dims}d"
        patch = int(patch or d["patch"])
        config = QANetConfig(dims=dims, fusion=fusion, encoding=encoding, width=float(width or d["width"]),
                             rib_convs=d["rib_convs"], patch=patch, targets=tuple(targets),
                             diameter_range=d["diameter_range"])
        sample_targets = config.targets
    n_img = {"train": train_images or d["train"], "val": val_images or d["val"], "test": test_images or d["test"]}
    n_stack = dict(zip(("train", "val", "test"), stack_images if stack_images is not None else
                       (d.get("stack_train", 0), d.get("stack_val", 0), d.get("stack_test", 0))))

    def split_set(split: str) -> QANetSamples:
        planar = sample_set(data_dir, dims, split, n_img[split], patch, sample_targets, progress=progress, log=log)
        if dims != 2 or not n_stack[split]:
            return planar
        stacks = sample_set(data_dir, dims, split, n_stack[split], patch, sample_targets, stack_slices=True,
                            progress=progress, log=log)
        return QANetSamples.concat([planar, stacks])

    pool = split_set("train")
    train_set = balance(pool, n=min(train_patches or d["train_patches"], len(pool)), seed=seed)
    val_set = split_set("val")
    log(f"training patches (balanced): {len(train_set)}, SEG histogram {seg_histogram(train_set.seg)}")
    options = QANetTrainOptions(epochs=int(epochs or d["epochs"]), batch_size=int(batch_size or d["batch_size"]),
                                lr=lr, seed=seed, threads=threads, device=device, max_minutes=max_minutes)
    best = train(out, train_set, val_set, config, options, progress=progress, log=log,
                 base=base.net.state_dict() if base is not None else None)
    model = load_model(best, device)
    from .qanet_train import evaluate_model

    test_set = sample_set(data_dir, dims, "test", n_img["test"], patch, sample_targets, progress=progress, log=log)
    report = evaluate_model(model, test_set)
    metrics = {"test_simulated": report}
    if dims == 2 and n_stack["test"]:
        stack_test = sample_set(data_dir, dims, "test", n_stack["test"], patch, sample_targets, stack_slices=True,
                                progress=progress, log=log)
        metrics["test_simulated_stack_slices"] = evaluate_model(model, stack_test)
    if base is not None:
        sizes = {"images": n_img, "stack_images": n_stack if dims == 2 else {}, "seeds": dict(SPLIT_SEEDS),
                 "samples_version": SAMPLES_VERSION, "train_patches": len(train_set), "test_patches": len(test_set)}
        return _extended_card(base, model, out / name, metrics, options, new, sizes, log), report
    card = json.loads(best.read_text())
    card.update({
        "name": name,
        "description": f"QANet {dims}D ({fusion}, {encoding}): predicted SEG of fluorescence-nuclei instance "
                       "segmentations, trained on simulated nuclei only",
        "priority": 0,
        "metrics": metrics,
        "data": {"simulator": "SegQCLib.data.cells (parameters randomised around cells3d and the scratch assay)",
                 "images": n_img, "stack_images": n_stack if dims == 2 else {}, "seeds": dict(SPLIT_SEEDS),
                 "stack_seed_offset": STACK_SEED_OFFSET, "patch": patch, "samples_version": SAMPLES_VERSION,
                 "seg_target": "seg: SEG of the cropped patch (the paper's); seg_objects: mean whole-image SEG "
                               "score of the GT objects in the patch, averaged into the image score",
                 "radius_range_px": list(d["radius_range"]), "train_patches": len(train_set),
                 "train_seg_histogram": seg_histogram(train_set.seg), "test_patches": len(test_set),
                 "test_seg_histogram": seg_histogram(test_set.seg)},
        "training": {k: v for k, v in options.__dict__.items()},
    })
    net = model.net.cpu()
    card_path = save_model(net, config, out / name, card)
    log(format_report(metrics))
    return card_path, report


def _extended_card(base: QANetQC, model: QANetQC, stem: Path, metrics: dict[str, Any], options: Any,
                   new: tuple[str, ...], data: dict[str, Any], log=print) -> Path:
    """Write the extended model: the base card with the new targets' held-out metrics merged in."""
    card = json.loads(json.dumps(base.card))
    for split, report in metrics.items():
        merged = card.setdefault("metrics", {}).setdefault(split, {})
        merged.update({t: report[t] for t in new if t in report})
    card["distance_heads"] = {
        "targets": list(new), "units": "px of the input image (the network predicts on the working grid)",
        "training": "network of the base model frozen (weights and batch-norm statistics); only the distance "
                    "head trained, Huber loss (delta 1 px)",
        "trained_epochs": model.card.get("trained_epochs"),
        "val": {t: v for t, v in model.card.get("val", {}).items() if t in new},
        "data": data, "options": {k: v for k, v in options.__dict__.items()}}
    card_path = save_model(model.net.cpu(), model.config, stem, card)
    log(format_report({split: {t: r[t] for t in new if t in r} for split, r in metrics.items()}))
    return card_path


def evaluate_qanet(card: str | Path, data_dir: Path | None = None, device: str = "auto", progress: bool = True,
                   log=print) -> dict[str, Any]:
    """Agreement (Pearson r, SROCC, MAE, RMSE, bias, hit-rate AUC per target, SEG by perturbation kind) of
    a QANet card on its held-out simulated test split, rebuilt from the seeds in the card when not
    cached in ``data_dir`` (default ``runs/qanet-data``). Returns ``{"test_simulated": report}`` (and
    ``"test_simulated_stack_slices"`` for a 2D model trained with stacks). A model with distance heads is
    scored on them on the patches of the same scenes that hold matched instances (their own sample set)."""
    from .qanet_train import evaluate_model

    card = Path(card)
    model = load_model(card, device)
    info = model.card.get("data", {})
    dims = model.config.dims
    n_images = int(info.get("images", {}).get("test", DEFAULTS[dims]["test"]))
    n_stacks = int(info.get("stack_images", {}).get("test", 0))
    data_dir = Path(data_dir) if data_dir else Path("runs") / "qanet-data"
    distances = tuple(t for t in model.config.targets if t in DISTANCE_TARGETS)
    distance_data = model.card.get("distance_heads", {}).get("data", {})
    sizes = {DEFAULT_TARGETS: (n_images, n_stacks),
             ("seg",) + distances: (int(distance_data.get("images", {}).get("test", n_images)),
                                    int(distance_data.get("stack_images", {}).get("test", n_stacks)))}
    results: dict[str, Any] = {}
    for targets in (DEFAULT_TARGETS, ("seg",) + distances) if distances else (DEFAULT_TARGETS,):
        n_planar, n_stacked = sizes[targets]
        for split, n, stacks in (("test_simulated", n_planar, False), ("test_simulated_stack_slices", n_stacked, True)):
            if not n:
                continue
            samples = sample_set(data_dir, dims, "test", n, model.config.patch, targets, stack_slices=stacks,
                                 progress=progress, log=log)
            report = evaluate_model(model, samples)
            if split not in results:
                results[split] = report
            else:  # the distances from their own sample set
                results[split].update({t: report[t] for t in distances})
    return results


#: Seed offset of the whole scenes the image-level calibration scores: apart from every training split and
#: from the scenes of ``benchmarks/qanet_image_level.py`` (offsets up to 80 000).
CALIBRATION_SCENE_OFFSET = 90_000


def calibration_pairs(model: QANetQC, data_dir: Path | None = None, scenes: int | None = None,
                      progress: bool = True, log=print):
    """Held-out (predicted, true) pairs of a loaded QANet for its interval calibration.

    ``patch`` level: every head (SEG, distances) on the patches of the held-out simulated test split
    (the card's :func:`evaluate_qanet` data; a 2D model's stack slices are a split of their own).
    ``volume`` level: the image score (JSON ``image_score.seg``) and the image distances against the
    true image SEG / mean MHD95 and ASD (px) on whole simulated test scenes with one perturbed
    segmentation each (``scenes`` of them, default 150 in 2D and 100 in 3D; z stacks scored slice by
    slice for a 2D model, 30). All simulated: the card says so; a pair's case is its scene. Pairs of z
    stacks scored by a 2D model are the domain :data:`~SegQCLib.models.qanet.STACK_DOMAIN`: their patch
    errors are larger than those of 2D images (cross-fitted 90 % intervals pooled with them cover 81 %
    of stack patches), so their intervals are calibrated apart."""
    from ..calibration import PairCollector
    from ..metrics import seg_measure
    from .qanet_data import perturb_instances, simulate_scene
    from .qanet_real import _slice_seg, _true_distance
    from .qanet_train import predict_samples

    from ..progress import progress_bar

    dims = model.config.dims
    data_dir = Path(data_dir) if data_dir else Path("runs") / "qanet-data"
    distances = tuple(t for t in model.config.targets if t in DISTANCE_TARGETS)
    info, distance_info = model.card.get("data", {}), model.card.get("distance_heads", {}).get("data", {})
    collected = PairCollector()

    def add(level: str, metric: str, pred, true, split: str, cases, stack: bool) -> None:
        collected.add(level, metric, pred, true, STACK_DOMAIN if stack else "in", split,
                      [f"{split}/{c}" for c in cases], "nuclei")

    for targets, source in ((DEFAULT_TARGETS, info), (("seg",) + distances, distance_info)):
        if targets != DEFAULT_TARGETS and not distances:
            continue
        for split, key, stacks in (("simulated patches", "images", False), ("simulated stack-slice patches",
                                                                              "stack_images", True)):
            n = int(source.get(key, {}).get("test", DEFAULTS[dims]["test"] if key == "images" else 0))
            if not n:
                continue
            samples = sample_set(data_dir, dims, "test", n, model.config.patch, targets, stack_slices=stacks,
                                 progress=progress, log=log)
            shown = [t for t in targets if t in model.config.targets] if targets == DEFAULT_TARGETS else list(distances)
            pred = predict_samples(model.net, samples, model.config.encoding, device=model.device)
            for t in shown:
                add("patch", t, pred[:, model.config.targets.index(t)], samples.target[:, samples.targets.index(t)],
                    split, samples.group.tolist(), stacks)

    n_scenes = int(scenes if scenes is not None else (150 if dims == 2 else 100))
    kinds = [("simulated images" if dims == 2 else "simulated volumes", False, n_scenes)]
    if dims == 2:
        kinds.append(("simulated z stacks", True, max(1, n_scenes // 5)))
    shape, radius_range = ((192, 192), (5.0, 15.0)) if dims == 2 else ((32, 72, 72), (4.5, 8.5))
    with progress_bar(disable=not progress) as bar:
        for split, stack, n in kinds:
            task = bar.add_task(f"calibration scenes: {split}", total=n)
            for i in range(n):
                rng = np.random.default_rng(SPLIT_SEEDS["test"] * 1_000_003 + CALIBRATION_SCENE_OFFSET
                                            + (50_000 if stack else 0) + i)
                params, image, gt = simulate_scene(rng, 3 if stack else dims, shape, radius_range, stack=stack)
                bar.advance(task)
                if not gt.any():
                    continue
                pred, _ = perturb_instances(gt, rng, image, params.radius)
                if not pred.any():
                    continue
                result = model.assess_instances(image, pred)
                true_seg = _slice_seg(pred, gt)[0] if stack else seg_measure(pred, gt)
                add("volume", "seg", [result.image_score], [true_seg], split, [i], stack)
                for t in distances:
                    value = _true_distance(pred, gt, t, slices=stack)
                    if np.isfinite(value):
                        add("volume", t, [result.extra["image_scores"][t]], [value], split, [i], stack)
    return collected.pairs()


def format_report(results: dict[str, Any]) -> str:
    """Plain-text table: split, target, n, Pearson r, SROCC, MAE, RMSE, bias, AUC; then SEG by kind."""
    lines = [f"{'split':<28}{'target':<12}{'n':>7}{'r':>8}{'SROCC':>8}{'MAE':>8}{'RMSE':>8}{'bias':>8}{'AUC':>8}"]
    for split, report in results.items():
        for target, r in report.items():
            if target == "by_kind":
                continue
            lines.append(f"{split:<28}{target:<12}{r['n']:>7}{r['lcc']:>8.3f}{r['srocc']:>8.3f}{r['mae']:>8.3f}"
                         f"{r['rmse']:>8.3f}{r['bias']:>+8.3f}{r['auc']:>8.3f}")
        kinds = ", ".join(f"{k}: true {v['mean_true']:.2f} / pred {v['mean_pred']:.2f} (MAE {v['mae']:.3f})"
                          for k, v in report.get("by_kind", {}).items())
        if kinds:
            lines.append(f"{'':<28}SEG by kind — {kinds}")
    return "\n".join(lines)


@contextlib.contextmanager
def _tifffile_messages(into: list[str]):
    """Collect what tifffile logs (a corrupt file's page table, say) into ``into`` instead of stderr."""
    logger = logging.getLogger("tifffile")
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: into.append(record.getMessage())  # type: ignore[method-assign]
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def read_instance_image(path: str | Path) -> np.ndarray:
    """A 2D or 3D array from a TIFF (tifffile, singleton axes squeezed) or any SimpleITK-readable file
    (NIfTI, NRRD, MHA, PNG...; (z, y, x) order). Raises InputError when unreadable or not 2D/3D."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file")
    messages: list[str] = []
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with _tifffile_messages(messages):
                import tifffile

                array = np.asarray(tifffile.imread(str(path)))
        else:
            import SimpleITK as sitk

            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except Exception as err:  # readers raise many types for corrupt files
        raise InputError(path, f"cannot read image ({str(err).splitlines()[0][:200]})") from None
    if array.size == 0:  # tifffile logs a broken page table and returns nothing rather than raising
        why = f" ({messages[0][:200]})" if messages else ""
        raise InputError(path, f"cannot read image: no image data, the file is corrupt or empty{why}")
    array = np.squeeze(array)
    if array.ndim not in (2, 3):
        raise InputError(path, f"expected a 2D or 3D image, got shape {array.shape} (split channels/time first)")
    return array


def qc_instances(model: str | Path | QANetQC, image: str | Path | np.ndarray, labels: str | Path | np.ndarray,
                 patch: int | None = None, overlap: float = 0.5, scale: float | None = None,
                 device: str = "auto") -> QANetResult:
    """Score an instance segmentation: ``model`` is a loaded QANetQC, a card path, or a registered
    name (``qanet-nuclei-2d``); ``image`` / ``labels`` arrays or file paths (:func:`read_instance_image`).
    Returns the :class:`~SegQCLib.models.qanet.QANetResult` (``.to_json_dict()`` for the CLI)."""
    if isinstance(model, QANetQC):
        qc = model
    elif isinstance(model, Path) or str(model).endswith(".json"):
        qc = load_model(model, device)
    else:
        from ..qc import load_model as load_registered

        qc = load_registered(str(model), device)  # type: ignore[assignment]
        if not isinstance(qc, QANetQC):
            raise InputError(str(model), "is not a QANet (instance segmentation) model")
    image_array = read_instance_image(image) if isinstance(image, (str, Path)) else np.asarray(image)
    label_array = read_instance_image(labels) if isinstance(labels, (str, Path)) else np.asarray(labels)
    files = {"image": image, "labels": labels}
    try:
        return qc.assess_instances(image_array, label_array, patch, overlap=overlap, scale=scale)
    except InputError as err:  # name the user's file, not the argument
        if err.source in files and isinstance(files[err.source], (str, Path)):
            raise InputError(files[err.source], err.problem) from None
        raise


def ship_model(card: str | Path, out_stem: str | Path, name: str, extra: dict[str, Any] | None = None) -> Path:
    """Copy a trained QANet (``card`` + its weights) to ``out_stem.{json,safetensors}`` as float16,
    renamed ``name``, with ``extra`` merged into the card (e.g. the real-data table)."""
    from safetensors.torch import load_file, save_file

    card = Path(card)
    data = json.loads(card.read_text())
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(card.parent / data["weights"])).items()}
    save_file(state, str(out_stem.with_suffix(".safetensors")))
    data.update(extra or {})
    data.update({"name": name, "weights": out_stem.with_suffix(".safetensors").name})
    out_stem.with_suffix(".json").write_text(json.dumps(_finite(data), indent=2))
    return out_stem.with_suffix(".json")


def _finite(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


__all__ = ["DEFAULTS", "sample_set", "train_qanet", "evaluate_qanet", "format_report", "read_instance_image",
           "qc_instances", "ship_model"]
