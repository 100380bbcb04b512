"""`segqc calibrate`: fit a model card's interval calibration on its held-out data and write it to the card.

Each kind of model gathers its own held-out (predicted, true) pairs (:func:`collect_pairs`):

- Sentinel: its validation and test sample sets (:func:`~SegQCLib.train.sentinel_cli.calibration_pairs`);
- pGT models (nnQC, atlas): masks degraded into the five nnQC DSC bands, plus the exact and an
  empty mask, on held-out subjects (:func:`pgt_model_pairs`);
- QANet: held-out simulated patches and whole scenes (:func:`~SegQCLib.train.qanet_cli.calibration_pairs`).

:func:`~SegQCLib.calibration.fit_calibration` then fits the intervals and measures their coverage on
data they were not fitted on; the card gets ``calibration`` (what the models read) with
``measured_coverage`` and ``data`` beside it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..calibration import DEFAULT_COVERAGE, PairCollector, Pairs, fit_calibration
from ..errors import InputError

#: Masks degraded into each DSC band per held-out subject of a pGT model.
PER_BAND = 16


def pgt_model_pairs(model, cases: list[tuple[Any, np.ndarray, str, str]], per_band: int = PER_BAND, seed: int = 11,
                    progress: bool = True) -> dict[str, dict[str, Pairs]]:
    """Pairs of a pGT model's pseudo-DSC / pseudo-HD95 with the true ones, volume and slice level.

    ``cases``: (image Volume, truth bool (z, y, x), structure name, split name) of held-out subjects.
    Per case: ``per_band`` masks degraded into each of the five nnQC DSC bands, the truth itself and an
    empty mask (both things a segmenter gives). Slice pairs: slices where the mask or the truth has
    foreground, with the index along the axis the model reports (``extra["slice_axis"]``)."""
    from ..degrade import DSC_BANDS, degrade_to_band
    from ..metrics import slice_metrics, volume_metrics
    from ..progress import progress_bar

    rng = np.random.default_rng(seed)
    collected = PairCollector()

    def add(level: str, metric: str, pred: float, true: float, split: str, case: str, structure: str) -> None:
        collected.add(level, metric, pred, true, "in", split, case, f"{split}/{structure}")

    with progress_bar(disable=not progress) as bar:
        task = bar.add_task("calibration masks", total=len(cases) * (len(DSC_BANDS) * per_band + 2))
        for c, (image, truth, structure, split) in enumerate(cases):
            masks = [degrade_to_band(truth.astype(np.uint8), band, rng=rng)[0] > 0
                     for band in range(len(DSC_BANDS)) for _ in range(per_band)]
            for m, mask in enumerate(masks + [truth.copy(), np.zeros_like(truth)]):
                result = model.assess(image, mask, structure)
                case = f"{c}/{m}"
                true = volume_metrics(mask, truth, image.spacing)
                for metric in ("dsc", "hd95"):
                    add("volume", metric, result.volume[metric], true[metric], split, case, structure)
                axis = int(result.extra.get("slice_axis", 0))
                true_rows = {r["index"]: r for r in slice_metrics(mask, truth, image.spacing, axis=axis)}
                for row in result.slices:
                    truth_row = true_rows.get(row["index"])
                    if truth_row is None:
                        continue
                    for metric in ("dsc", "hd95"):
                        add("slice", metric, row[metric], truth_row[metric], split, case, structure)
                bar.advance(task)
    return collected.pairs()


def collect_pairs(card_path: Path, card: dict[str, Any], device: str, data_dir: Path | None, progress: bool,
                  log=print) -> tuple[dict[str, dict[str, Pairs]], str]:
    """The held-out pairs of the model of ``card`` and a sentence saying what they are."""
    architecture = card.get("architecture")
    if architecture == "sentinel":
        from ..models.sentinel import load_model
        from .sentinel_cli import calibration_pairs

        pairs = calibration_pairs(load_model(card_path, device), data_dir or Path("runs/eval-data"),
                                  progress=progress, log=log)
        return pairs, ("Sentinel sample sets val (6 AAL structures), test-structures (15 AAL structures; both "
                       "names the model was not trained on: domain out) and test-subject (MNI152 grey/white "
                       "matter and brain: domain in), every mask kind (degraded, good, empty, wrong, algorithmic)")
    if architecture == "nnqc":
        from ..models.nnqc import load_model
        from .nnqc_data import subjects_for

        model = load_model(card_path, device)
        structure = model.config.structures[0]
        _, test = subjects_for(structure)
        pairs = pgt_model_pairs(model, [(test.image, test.segmentation.mask(structure), structure,
                                         f"test-subject ({test.subject})")], progress=progress)
        return pairs, (f"{structure} of the held-out subject {test.subject}: {PER_BAND} masks in each of the five "
                       "nnQC DSC bands, the truth and an empty mask")
    if architecture == "atlas":
        from ..data.sources import colin27, mni152
        from ..models.atlas import load_model

        subjects = [(mni152("brain"), "test-subject (MNI152)"), (colin27("brain"), "test-subject (Colin27)")]
        pairs = pgt_model_pairs(load_model(device), [(s.image, s.segmentation.mask("Brain"), "Brain", split)
                                                     for s, split in subjects], progress=progress)
        return pairs, (f"Brain of MNI152 and of Colin27 (each registered from the other atlas): {PER_BAND} masks in "
                       "each of the five nnQC DSC bands, the truth and an empty mask")
    if architecture == "qanet":
        from ..models.qanet import load_model
        from .qanet_cli import calibration_pairs

        pairs = calibration_pairs(load_model(card_path, device), data_dir, progress=progress, log=log)
        return pairs, ("simulated nuclei (our simulator, held-out test seeds): patches of the test split and "
                       "whole scenes with one perturbed segmentation each; no real image")
    raise InputError(card_path, f"no calibration for architecture {architecture!r}")


def calibrate_card(card_path: str | Path, coverage: float = DEFAULT_COVERAGE, device: str = "cpu",
                   data_dir: Path | None = None, progress: bool = True, log=print) -> dict[str, Any]:
    """Fit the card's calibration and write it into the card (atomically); returns the card's new entry."""
    from ..io import write_bytes_atomic

    card_path = Path(card_path)
    if not 0.5 <= coverage < 1.0:
        raise InputError("--coverage", f"must be in [0.5, 1), got {coverage}")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(card_path, f"is not a readable model card ({err})") from None
    pairs, data = collect_pairs(card_path, card, device, data_dir, progress, log)
    calibration, measured = fit_calibration(pairs, coverage)
    entry = {**calibration.to_dict(), "data": data, "measured_coverage": measured,
             "measured_how": "cross-fitted: 5 folds of the cases (by case) or of the structures (by structure); "
                             "each fold measured with a calibration fitted on the others"}
    # re-read: the collection takes minutes, and the card may have gained other entries meanwhile
    current = json.loads(card_path.read_text())
    current["calibration"] = entry
    write_bytes_atomic(card_path, json.dumps(current, indent=2))
    return entry


def format_coverage(entry: dict[str, Any]) -> str:
    """A plain-text table of the measured coverage and widths of a card's calibration."""
    lines = [f"nominal coverage {100 * entry['coverage']:.0f} %",
             f"{'level':<8}{'metric':<13}{'held out by':<12}{'split':<34}{'n':>6}{'coverage':>10}{'mean width':>12}"]
    for level, by_metric in entry["measured_coverage"].items():
        for metric, by_unit in by_metric.items():
            for unit, splits in by_unit.items():
                for split, r in splits.items():
                    width = r["mean_width"]
                    lines.append(f"{level:<8}{metric:<13}{unit:<12}{split[:33]:<34}{r['n']:>6}"
                                 f"{100 * r['coverage']:>9.1f}%{width if math.isfinite(width) else math.inf:>12.3f}")
    return "\n".join(lines)


__all__ = ["calibrate_card", "collect_pairs", "pgt_model_pairs", "format_coverage"]
