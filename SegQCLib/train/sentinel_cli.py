"""`segqc train sentinel` and `segqc eval` for Sentinel models: data building, training, evaluation."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..models.sentinel import SentinelConfig, load_model
from .sentinel_data import (
    AVERAGE_SEED,
    KINDS,
    TRAIN_PARTS,
    WARP_SEED,
    SampleSet,
    averaged_pairs,
    build_samples,
    ensure_cached,
    split_structures,
    warped_pairs,
)

EVAL_SPLITS = ("test-subject", "test-structures")
#: seeds of the splits (and of the parts of the train split), fixed so that every evaluation of
#: every model sees the same samples
SPLIT_SEEDS = {"train-atlas": 0, "val": 1, "test-structures": 2, "test-subject": 3, "train-tissue": 4}


def sample_set(data_dir: Path, split: str, config: SentinelConfig, per_band: int = 3, algorithmic: int = 4,
               progress: bool = True, log=print, strip_prob: float = 0.0, synthetic: int = 0,
               averaged: int = 0) -> SampleSet:
    """The samples of ``split`` for ``config``'s input geometry, built once and cached in ``data_dir``
    (the train split: its :data:`TRAIN_PARTS`, each cached on its own, joined).
    ``strip_prob`` (skull-stripped images, see :func:`build_samples`) applies to the train split only;
    so do ``synthetic`` and ``averaged``: the train split then also holds that many warped copies of its
    parts (:func:`~SegQCLib.train.sentinel_data.warped_pairs`) and that many template-like averaged
    copies (:func:`~SegQCLib.train.sentinel_data.averaged_pairs`), each part and copy cached on its own
    (copies are never skull-stripped: they have no brain mask of their own). Memory: about 2.1 GB of
    slices per copy at the default geometry (parts are joined from their files, one at a time)."""
    if split == "train":
        copies = [("warp", c) for c in range(synthetic + 1)] + [("avg", c) for c in range(1, averaged + 1)]
        return SampleSet.concat([_part_file(data_dir, part, copy, config, per_band, algorithmic, progress, log,
                                            strip_prob, kind)
                                 for kind, copy in copies for part in TRAIN_PARTS])
    return SampleSet.load(_part_file(data_dir, split, 0, config, per_band, algorithmic, progress, log, 0.0))


#: kind of copy of a train part -> (cache-file letter, offset of its mask seeds, its pairs, base of its subject seeds)
_COPY_KINDS = {"warp": ("w", 0, warped_pairs, WARP_SEED), "avg": ("t", 10_000, averaged_pairs, AVERAGE_SEED)}


def _part_file(data_dir: Path, split: str, copy: int, config: SentinelConfig, per_band: int, algorithmic: int,
               progress: bool, log, strip_prob: float, kind: str = "warp") -> Path:
    """The cache file of one split, train part, or copy ``copy`` (> 0) of a train part, built first if
    missing: a warped copy (``kind`` "warp") or a template-like averaged one ("avg")."""
    training = split in TRAIN_PARTS
    strip_prob = strip_prob if training else 0.0
    letter, seed_offset, copy_pairs, subject_seed = _COPY_KINDS[kind]
    tag = f"{split}" + (f"-{letter}{copy}" if copy else "")
    tag += f"-s{config.size}-m{config.margin_px}-c{config.context_mm:g}-b{per_band}-a{algorithmic}"
    tag += f"-p{strip_prob:g}" if strip_prob > 0 else ""
    # each copy draws its own masks: the seed differs from the original part's and from other copies'
    seed = SPLIT_SEEDS[split] + 100 * copy + (seed_offset if copy else 0)

    def build() -> SampleSet:  # the copy's subjects are drawn only when its file is missing
        pairs = copy_pairs(split_structures(split), copy, subject_seed + copy) if copy else None
        return build_samples(split + (f"+{kind}{copy}" if copy else ""), config, seed=seed, per_band=per_band,
                             extra_slices=6 if training else 0, algorithmic=algorithmic, progress=progress,
                             strip_prob=strip_prob, pairs=pairs)

    return ensure_cached(data_dir / f"{tag}.npz", build, log)


def evaluate_model(card_or_model, data_dir: Path, splits=EVAL_SPLITS, device: str = "cpu",
                   progress: bool = True, log=print) -> dict[str, Any]:
    """Evaluate a Sentinel model (card path or loaded SentinelQC) on held-out splits."""

    model = load_model(card_or_model, device) if isinstance(card_or_model, (str, Path)) else card_or_model
    return evaluate_sets(model, {split: sample_set(data_dir, split, model.config, progress=progress, log=log)
                                 for split in splits})


def evaluate_sets(model, sets: dict[str, SampleSet]) -> dict[str, Any]:
    """Slice- and volume-level agreement (LCC, SROCC, MAE, MAP@k, by kind) of a loaded Sentinel
    model on each named sample set."""
    from .sentinel_train import evaluate_predictions, predict_set, text_table_for

    results = {}
    for split, samples in sets.items():
        table = text_table_for(samples.names, model.text_encoder)
        report = evaluate_predictions(samples, predict_set(model.net, samples, table, device=str(model.device)))
        report.pop("volume_pred")
        results[split] = report
    return results


def calibration_pairs(model, data_dir: Path, splits=("val",) + EVAL_SPLITS, progress: bool = True, log=print):
    """Held-out (predicted, true) DSC pairs of a loaded Sentinel model for its interval calibration:
    ``{"volume": {"dsc": Pairs}, "slice": {"dsc": Pairs}}`` over ``splits`` (validation and test
    structures are names the model was not trained on: domain ``out``; the test subject's are known:
    ``in``). A pair's case is its sample volume; its structure is (split, structure name)."""
    from ..calibration import PairCollector
    from .sentinel_train import evaluate_predictions, predict_set, text_table_for

    trained = set(model.trained_structures or ())
    collected = PairCollector()
    for split in splits:
        samples = sample_set(data_dir, split, model.config, progress=progress, log=log)
        pred = predict_set(model.net, samples, text_table_for(samples.names, model.text_encoder),
                           device=str(model.device))
        names = np.asarray(samples.names)
        ok = ~np.isnan(samples.dsc)
        for level, p, t, named, cases in (
                ("volume", evaluate_predictions(samples, pred)["volume_pred"], samples.volume_dsc,
                 names[samples.volume_name].tolist(), range(len(samples.volume_dsc))),
                ("slice", pred[ok], samples.dsc[ok], names[samples.name[ok]].tolist(), samples.volume[ok].tolist())):
            collected.add(level, "dsc", p, t, ["in" if n in trained else "out" for n in named], split,
                          [f"{split}/{c}" for c in cases], [f"{split}/{n}" for n in named])
    return collected.pairs()


def format_report(results: dict[str, Any]) -> str:
    """A plain-text table of LCC / SROCC / MAE / MAP@5 / MAP@10 per split and level."""
    lines = [f"{'split':<18}{'level':<13}{'n':>6}{'LCC':>8}{'SROCC':>8}{'MAE':>8}{'MAP@5':>8}{'MAP@10':>8}"]
    for split, report in results.items():
        for level in ("volume", "volume_bands", "slice"):
            r = report[level]
            lines.append(f"{split:<18}{level:<13}{r['n']:>6}{r['lcc']:>8.3f}{r['srocc']:>8.3f}{r['mae']:>8.3f}"
                         f"{r.get('map@5', float('nan')):>8.3f}{r.get('map@10', float('nan')):>8.3f}")
        kinds = ", ".join(f"{k}: pred {v['mean_pred']:.2f} / true {v['mean_true']:.2f} (max pred {v['max_pred']:.2f})"
                          for k, v in report["by_kind"].items())
        lines.append(f"{'':<18}by kind — {kinds}")
    return "\n".join(lines)


def describe_network(config: SentinelConfig) -> str:
    """"resnet18 x0.5, 96 px, context 128 mm, minilm text" (or the SegAE tower): for card descriptions."""
    encoder = (f"SegAE, open_clip tower {config.openclip['model']}{' frozen' if config.freeze_backbone else ''}"
               if config.is_openclip else f"{config.backbone} x{config.widen}")
    return f"{encoder}, {config.size} px, context {config.context_mm:g} mm, {config.text_encoder} text"


def card_extra(config: SentinelConfig, options, train_set: SampleSet, val_set: SampleSet,
               strip_prob: float = 0.0, synthetic: int = 0, averaged: int = 0) -> dict[str, Any]:
    """What a Sentinel model card says about its data, splits and training (besides measured metrics)."""
    from .sentinel_data import HELD_OUT_AAL, VAL_AAL

    return {
        "description": f"Quality Sentinel ({describe_network(config)}) for brain MRI (T1)",
        "priority": 10,
        "data": {
            "source": "Colin27 T1 + AAL/Brodmann atlases and brain mask (Debian mricron-data); MNI152 2009 sym "
                      "T1 + grey/white matter and brain mask (nilearn) — real images, atlas labels",
            "train": "Colin27: AAL structures except the held-out and validation ones, 41 Brodmann areas, brain, "
                     "grey and white matter (three-class Otsu of the T1 in the brain mask)",
            "val": list(VAL_AAL),
            "test-structures": list(HELD_OUT_AAL),
            "test-subject": "MNI152: GreyMatter, WhiteMatter, Brain (a subject never seen in training)",
            "masks": "per structure: 3 degraded masks in each of the 5 nnQC DSC bands, 3 nearly perfect, 1 empty, "
                     "3 of another structure, 4 algorithmic (threshold / region growing / registration)",
            "train_skull_stripped": (f"each training volume shown skull-stripped (Colin27's brain mask dilated "
                                     f"1-3 mm) with probability {strip_prob:g}") if strip_prob > 0 else "none",
            "train_warped_copies": (f"{synthetic} randomly warped copies of Colin27 (affine + B-spline warp of "
                                    "image and labels, contrast scaled), sampled like the original; the original's "
                                    "labels are registered onto them for algorithmic masks") if synthetic else "none",
            "train_averaged_copies": (f"{averaged} template-like copies of Colin27 (one random warp seen through 8 "
                                      "residual 2 mm B-spline deformations: images averaged, labels voted)"
                                      if averaged else "none"),
            "train_slices": int(len(train_set.x)), "train_volumes": int(len(train_set.volume_dsc)),
            "val_slices": int(len(val_set.x)),
        },
        "training": dict(options.__dict__),
        "limitations": "Trained on one adult brain T1 (Colin27, with its warped copies when asked) and tested on a "
                       "second (MNI152): not validated on CT, other organs, pathology or other MR contrasts; "
                       "scores of unseen structure types and of other subjects are less reliable.",
    }


def write_card(best_json: Path, out: Path, name: str, results: dict[str, Any], extra: dict[str, Any]) -> Path:
    """Write the best weights (float16) to ``out`` (stem) with a model card holding the measured numbers."""
    from safetensors.torch import load_file, save_file

    card = json.loads(best_json.read_text())
    weights = best_json.parent / card["weights"]
    out.parent.mkdir(parents=True, exist_ok=True)
    # shipped as float16 (half the size; loading casts back to float32)
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}
    save_file(state, str(out.with_suffix(".safetensors")))
    card.update(extra)
    card.update({"name": name, "weights": out.with_suffix(".safetensors").name, "metrics": results})
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out.with_suffix(".json")


__all__ = ["sample_set", "evaluate_model", "evaluate_sets", "format_report", "write_card", "KINDS"]
