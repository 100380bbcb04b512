"""Plain functions behind `segqc train nnqc` and `segqc eval <nnqc card>`.

- :func:`train_nnqc` builds (or reuses) the slices of one structure, trains the three stages
  (resumable: run it again with the same ``out`` to continue; more steps continue further),
  evaluates the best model on the held-out subject and writes ``OUT/nnqc-<structure>.{json,safetensors}``.
- :func:`evaluate_nnqc` measures a card on the held-out subject: the whole test volume degraded into
  each of the five DSC bands (``per_band`` volumes each), plus a blank mask and the truth itself;
  Pearson r / SROCC / MAE of pseudo-DSC and pseudo-HD95 (mask vs pGT) against the true ones (mask vs
  truth), per volume and per slice, and DSC(pGT, truth).
- :func:`format_report` prints those numbers as a table.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..models.nnqc import NNQCConfig, NNQCModel, load_model
from .evaluation import agreement
from .nnqc_data import subjects_for, training_sets
from .nnqc_train import TrainOptions, train

#: The model size trained on CPU in this project (see the model card for what it reaches).
CPU_CONFIG = dict(size=64, vae_channels=(16, 32, 32), unet_channels=(32, 64), unet_attention=(False, True))


def default_strip_prob(structure: str) -> float:
    """Skull-stripping augmentation for the whole brain (the held-out MNI152 image is skull-stripped,
    Colin27 is not); none for other structures."""
    return 0.3 if structure.lower() == "brain" else 0.0


def train_nnqc(out: str | Path, structure: str = "Brain", config: NNQCConfig | None = None,
               options: TrainOptions | None = None, per_band: int = 3, device: str = "auto",
               evaluate: bool = True, eval_per_band: int = 3, progress: bool = True, log=print) -> Path:
    """Train an nnQC model of ``structure`` in ``out`` and return its model card path.

    out: run folder (data cache ``out/data``, checkpoints ``dae.pt``/``vae.pt``/``ldm.pt``, ``best.*``,
    ``history.json``, ``run.json``, the final ``nnqc-<structure>.{json,safetensors}``).
    config: defaults to :data:`CPU_CONFIG` for ``structure``; options: steps, batch size, ... (a
    ``strip_prob`` of 0.3 is used for "Brain" unless options are given). per_band: degraded masks per
    slice and DSC band in the training data. evaluate: measure on the held-out subject and put the
    numbers in the card (``eval_per_band`` volumes per band).
    """
    out = Path(out)
    config = config or NNQCConfig(structures=(structure,), **CPU_CONFIG)
    if options is None:
        options = TrainOptions(strip_prob=default_strip_prob(structure))
    train_set, val_set, fingerprint = training_sets(out / "data", structure, config, per_band, progress, log)
    best = train(out, train_set, val_set, config, fingerprint, options, device, progress, log)
    results: dict[str, Any] = {}
    if evaluate:
        results = evaluate_nnqc(best, structure, per_band=eval_per_band, device=device, progress=progress, log=log)
        log(format_report(results))
    return write_nnqc_card(best, out / f"nnqc-{structure}", structure, results, options, len(train_set))


def write_nnqc_card(best_json: Path, stem: Path, structure: str, results: dict[str, Any], options: TrainOptions,
                    n_train: int) -> Path:
    """The shipped form of a run's best model: float16 weights + card with data, training, metrics."""
    from ..qc import json_value
    from .sentinel_cli import write_card

    test = "MNI152 2009c T1 (skull-stripped) + brain mask" if structure.lower() == "brain" else \
        "Colin27 mirrored left-right with the other hemisphere's AAL label"
    extra = {
        "description": f"nnQC latent-diffusion pseudo ground truth for {structure} (brain MRI T1): DSC/HD95 vs pGT",
        "priority": 0,
        "data": {"train": f"Colin27 T1 + {'ch2bet brain mask' if structure.lower() == 'brain' else 'AAL ' + structure}"
                          " (mricron-data), 2D axial slices, masks degraded into the 5 nnQC DSC bands + truth + "
                          "blank + near-empty", "train_slices": int(n_train),
                 "val": "the training subject, other degradations + a fixed random affine (model selection only)",
                 "test": test},
        "training": dict(options.__dict__),
        "limitations": "Trained on one subject (Colin27) and tested on one held-out subject; the perceptual loss "
                       "of the paper is left out (no offline LPIPS); E2 is a small denoising autoencoder trained "
                       "here, not UniMedCLIP; the UNet predicts v, not the noise (see SegQCLib/models/nnqc.py).",
    }
    if options.strip_prob > 0:
        extra["limitations"] += (f" Training images were skull-stripped with a dilated truth mask with probability "
                                 f"{options.strip_prob:g} (the MNI152 test image is skull-stripped): the blank-mask "
                                 "pGT of a skull-stripped image is easier than that of a whole head.")
    return write_card(best_json, stem, f"nnqc-{structure}", json_value(results), json_value(extra))


def _finite(a: list[float], b: list[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    return a[ok], b[ok]


def evaluate_nnqc(card_or_model, structure: str | None = None, per_band: int = 3, ddim_steps: int | None = None,
                  device: str = "auto", seed: int = 7, progress: bool = True, log=print) -> dict[str, Any]:
    """Agreement of nnQC's pseudo-scores with the true scores on the held-out subject of ``structure``.

    Returns {"volume": {"dsc": agreement, "hd95": agreement, "n"}, "slice": {...}, "by_band": [...],
    "blank": {"pgt_dsc"}, "truth": {"pgt_dsc", "pseudo_dsc"}, "seconds_per_volume", "ddim_steps"}.
    HD95 agreement uses the volumes/slices where both values are finite.
    """
    from ..progress import progress_bar

    from ..degrade import DSC_BANDS, degrade_to_band
    from ..metrics import dice, slice_metrics, volume_metrics
    from ..qc import resolve_device

    model: NNQCModel = (load_model(card_or_model, resolve_device(device)) if isinstance(card_or_model, (str, Path))
                        else card_or_model)
    if ddim_steps:
        model.ddim_steps = int(ddim_steps)
    structure = structure or model.config.structures[0]
    _, test = subjects_for(structure)
    truth = test.segmentation.mask(structure)
    spacing = test.image.spacing
    rng = np.random.default_rng(seed)
    vol = {"pseudo_dsc": [], "true_dsc": [], "pseudo_hd95": [], "true_hd95": [], "band": []}
    sl = {"pseudo_dsc": [], "true_dsc": [], "pseudo_hd95": [], "true_hd95": []}
    seconds = []
    with progress_bar(disable=not progress) as bar:
        task = bar.add_task(f"eval {structure} ({test.subject})", total=len(DSC_BANDS) * per_band + 2)
        for band in range(len(DSC_BANDS)):
            for _ in range(per_band):
                mask = degrade_to_band(truth.astype(np.uint8), band, rng=rng)[0] > 0
                result = model.assess(test.image, mask, structure)
                seconds.append(result.runtime_s)
                true = volume_metrics(mask, truth, spacing)
                vol["pseudo_dsc"].append(result.volume["dsc"])
                vol["pseudo_hd95"].append(result.volume["hd95"])
                vol["true_dsc"].append(true["dsc"])
                vol["true_hd95"].append(true["hd95"])
                vol["band"].append(band)
                true_rows = {r["index"]: r for r in slice_metrics(mask, truth, spacing)}
                for row in result.slices:  # input axis 0 is axial for these RAS/LPS-stored volumes
                    if row["index"] in true_rows and np.asarray(mask[row["index"]]).any():
                        sl["pseudo_dsc"].append(row["dsc"])
                        sl["true_dsc"].append(true_rows[row["index"]]["dsc"])
                        sl["pseudo_hd95"].append(row["hd95"])
                        sl["true_hd95"].append(true_rows[row["index"]]["hd95"])
                bar.advance(task)
        blank = model.assess(test.image, np.zeros_like(truth), structure)
        bar.advance(task)
        good = model.assess(test.image, truth, structure)
        bar.advance(task)
    report: dict[str, Any] = {"subject": test.subject, "structure": structure, "ddim_steps": model.ddim_steps,
                              "per_band": per_band}
    report["volume"] = {"dsc": agreement(vol["pseudo_dsc"], vol["true_dsc"]),
                        "hd95": agreement(*_finite(vol["pseudo_hd95"], vol["true_hd95"]))}
    report["slice"] = {"dsc": agreement(sl["pseudo_dsc"], sl["true_dsc"]),
                       "hd95": agreement(*_finite(sl["pseudo_hd95"], sl["true_hd95"]))}
    bands = np.asarray(vol["band"])
    report["by_band"] = [{"band": list(DSC_BANDS[b]),
                          "true_dsc": float(np.mean(np.asarray(vol["true_dsc"])[bands == b])),
                          "pseudo_dsc": float(np.mean(np.asarray(vol["pseudo_dsc"])[bands == b])),
                          "mae_dsc": float(np.mean(np.abs(np.asarray(vol["pseudo_dsc"]) - vol["true_dsc"])[bands == b]))}
                         for b in range(len(DSC_BANDS))]
    report["blank"] = {"pgt_dsc": float(dice(blank.pgt, truth))}
    report["truth"] = {"pgt_dsc": float(dice(good.pgt, truth)), "pseudo_dsc": float(good.volume["dsc"])}
    report["seconds_per_volume"] = float(np.mean(seconds)) if seconds else math.nan
    report["volumes"] = {k: [float(x) for x in v] for k, v in vol.items()}
    return report


def format_report(results: dict[str, Any]) -> str:
    """A plain-text summary of :func:`evaluate_nnqc`'s numbers."""
    if not results:
        return "(not evaluated)"
    lines = [f"nnQC {results['structure']} on {results['subject']} (DDIM {results['ddim_steps']} steps, "
             f"{results['per_band']} volumes per band, {results['seconds_per_volume']:.1f} s/volume)",
             f"{'level':<8}{'metric':<8}{'n':>6}{'r':>8}{'SROCC':>8}{'MAE':>9}"]
    for level in ("volume", "slice"):
        for metric in ("dsc", "hd95"):
            a = results[level][metric]
            lines.append(f"{level:<8}{metric:<8}{a['n']:>6}{a['lcc']:>8.3f}{a['srocc']:>8.3f}{a['mae']:>9.3f}")
    lines.append("by band: " + ", ".join(f"[{b['band'][0]:.2f},{b['band'][1]:.2f}) true {b['true_dsc']:.2f} "
                                         f"pseudo {b['pseudo_dsc']:.2f}" for b in results["by_band"]))
    lines.append(f"blank mask: DSC(pGT, truth) {results['blank']['pgt_dsc']:.3f}; truth as mask: DSC(pGT, truth) "
                 f"{results['truth']['pgt_dsc']:.3f}, pseudo-DSC {results['truth']['pseudo_dsc']:.3f}")
    return "\n".join(lines)


__all__ = ["train_nnqc", "evaluate_nnqc", "format_report", "write_nnqc_card", "CPU_CONFIG", "default_strip_prob"]
