"""Quality Sentinel on a user's own labelled dataset (an MSD / nnU-Net folder or a CSV of pairs).

The method developer's job: ``segqc train sentinel --dataset DATASET`` builds the training samples
from the dataset's labels exactly as from the built-in brain MRI (masks degraded into the five DSC
bands, nearly perfect, empty, another structure's, algorithmic ones -- thresholds, region growing
and registration of *other training subjects'* labels), trains, and evaluates on held-out subjects.

Split: by subject (a case's ``subject``, else its case id), seeded, so no subject is in two splits;
``val`` picks the best epoch, ``test`` is scored once at the end. The card records the split's
subject ids, so ``segqc eval CARD --dataset DATASET`` scores only the held-out subjects of the
dataset it was trained on (and every subject of any other dataset).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.cases import Case, dataset_modality, read_dataset
from ..data.sources import LabelledSubject
from ..errors import InputError
from ..models.sentinel import SentinelConfig
from .sentinel_data import SampleSet, build_samples, cached_samples, warped_pairs

#: Seeds of the samples of a dataset's splits (fixed, so every evaluation sees the same masks).
DATASET_SEEDS = {"train": 10, "val": 11, "test": 12}
#: How many other training subjects are registered onto each subject for algorithmic masks.
ATLASES_PER_SUBJECT = 2


def subject_of(case: Case) -> str:
    """The subject a case belongs to: its ``subject`` (CSV column) or else its case id."""
    return case.subject or case.case_id


def split_subjects(subjects: Sequence[str], val_fraction: float = 0.15, test_fraction: float = 0.15,
                   seed: int = 0) -> dict[str, list[str]]:
    """Subject ids -> {"train", "val", "test"}: disjoint sorted lists, seeded.

    Each held-out split gets round(fraction * n) subjects, at least one; the rest train. Needs at
    least three subjects (one per split).
    """
    unique = sorted(set(subjects))
    if len(unique) < 3:
        raise InputError("--dataset", f"needs at least 3 subjects to split into train/val/test, found {len(unique)}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise InputError("--dataset", f"val and test fractions must be in (0, 1) with a sum below 1, "
                                      f"got {val_fraction} and {test_fraction}")
    order = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    n_test = max(1, round(test_fraction * len(unique)))
    n_val = max(1, round(val_fraction * len(unique)))
    if n_test + n_val >= len(unique):
        n_test, n_val = 1, 1
    return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
            "train": sorted(order[n_test + n_val:])}


def dataset_cases(path: str | Path) -> list[Case]:
    """The cases of a labelled dataset; each must name its labels (dataset.json ``labels`` or a
    CSV ``label_table``), since the model is conditioned on the structure's name."""
    cases = read_dataset(path)
    unnamed = [c.case_id for c in cases if not c.label_table]
    if unnamed:
        raise InputError(path, f"cases without label names ({', '.join(unnamed[:3])}): give dataset.json "
                               "'labels' or a CSV 'label_table' (Sentinel is conditioned on the structure's name)")
    return cases


def load_subject(case: Case, modality: str) -> LabelledSubject:
    """One case as a labelled subject: its image and its segmentation (the truth) on the image grid."""
    image, segmentation = case.load()
    return LabelledSubject(subject=subject_of(case), image=image, segmentation=segmentation,
                           source=f"dataset:{case.case_id}", modality=modality)


def dataset_tag(path: str | Path, cases: Sequence[Case]) -> str:
    """A short hash of the dataset's location and case list (cache file names)."""
    text = json.dumps([str(Path(path).resolve())] + sorted(c.case_id for c in cases))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def dataset_samples(path: str | Path, subjects: Sequence[str], atlas_subjects: Sequence[str], config: SentinelConfig,
                    seed: int = 0, per_band: int = 3, algorithmic: int = 4, extra_slices: int = 0,
                    synthetic: int = 0, progress: bool = True, log=print) -> SampleSet:
    """The samples of every labelled structure of every case of ``subjects``, seeded per case.

    Algorithmic masks register the labels of up to :data:`ATLASES_PER_SUBJECT` cases of
    ``atlas_subjects`` (the training subjects; never the case's own subject) onto each case. Cases
    are read one at a time (only the atlases stay in memory). ``synthetic``: also that many
    :func:`~SegQCLib.train.sentinel_data.warped_pairs` copies of each case, each sampled as a
    subject of its own (its original is not among its atlases).
    """
    cases = dataset_cases(path)
    modality = dataset_modality(path)
    wanted = set(subjects)
    chosen = [c for c in cases if subject_of(c) in wanted]
    if not chosen:
        raise InputError(path, f"no case of subjects {sorted(wanted)[:3]}")
    pool = [c for c in cases if subject_of(c) in set(atlas_subjects)]
    rng = np.random.default_rng([seed, 7])
    atlas_cases = [pool[i] for i in rng.permutation(len(pool))[:ATLASES_PER_SUBJECT + 1]] if algorithmic else []
    atlases = [load_subject(c, modality) for c in atlas_cases]
    sets = []
    for index, case in enumerate(chosen):
        subject = load_subject(case, modality)
        structures = [s.name for s in subject.segmentation.segments if subject.segmentation.mask(s.name).any()]
        if not structures:
            log(f"{case.case_id}: no labelled structure, skipped")
            continue
        others = [a for a in atlases if a.subject != subject.subject][:ATLASES_PER_SUBJECT]
        case_seed = seed * 100_003 + index
        pairs = [(subject, s) for s in structures]
        for copy in range(synthetic + 1):  # copy 0: the case itself, with the seed it always had
            copy_seed = case_seed if copy == 0 else case_seed * 1_000 + copy
            sets.append(build_samples(case.case_id + (f"+warp{copy}" if copy else ""), config, seed=copy_seed,
                                      per_band=per_band, extra_slices=extra_slices, algorithmic=algorithmic,
                                      progress=progress, pairs=warped_pairs(pairs, copy, copy_seed) if copy else pairs,
                                      atlases=others))
    if not sets:
        raise InputError(path, "no case with a labelled structure")
    return SampleSet.concat(sets)


def dataset_config(path: str | Path, config: SentinelConfig) -> SentinelConfig:
    """``config`` with the dataset's modality (CT: HU window; anything else: per-volume percentiles)."""
    modality = dataset_modality(path)
    config.modality = "CT" if modality == "CT" else "MR"
    return config


def cached_dataset_samples(data_dir: Path, path: str | Path, split: str, subjects: Sequence[str],
                           atlas_subjects: Sequence[str], config: SentinelConfig, seed: int, per_band: int,
                           algorithmic: int, training: bool, synthetic: int = 0, progress: bool = True,
                           log=print) -> SampleSet:
    """:func:`dataset_samples` built once per (dataset, split, input geometry) and cached in ``data_dir``."""
    cases = dataset_cases(path)
    who = hashlib.sha1(json.dumps([sorted(subjects), sorted(atlas_subjects)]).encode()).hexdigest()[:8]
    tag = (f"dataset-{dataset_tag(path, cases)}-{split}-{who}-s{config.size}-m{config.margin_px}"
           f"-c{config.context_mm:g}-{config.modality}-b{per_band}-a{algorithmic}" + (f"-w{synthetic}" if synthetic else ""))
    return cached_samples(Path(data_dir) / f"{tag}.npz", lambda: dataset_samples(
        path, subjects, atlas_subjects, config, seed=seed, per_band=per_band, algorithmic=algorithmic,
        extra_slices=6 if training else 0, synthetic=synthetic, progress=progress, log=log), log)



def training_sets(path: str | Path, data_dir: Path, config: SentinelConfig, per_band: int, algorithmic: int,
                  val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                  train_subjects: int | None = None, synthetic: int = 0,
                  log=print) -> tuple[dict[str, list[str]], list[str], SampleSet, SampleSet]:
    """The subject split of a dataset, the atlas subjects, and the train and val sample sets (cached
    in ``data_dir``).

    ``train_subjects`` keeps only that many of the split's training subjects (a learning curve);
    val and test stay as they are, and so do their registered masks, which always come from all the
    split's training subjects (returned as the atlas subjects). ``synthetic``: warped copies per
    training subject (:func:`dataset_samples`); val and test hold real subjects only.
    """
    split = split_subjects([subject_of(c) for c in dataset_cases(path)], val_fraction, test_fraction, seed)
    atlases = list(split["train"])
    if train_subjects is not None:
        if not 1 <= train_subjects <= len(atlases):
            raise InputError("--train-subjects", f"must be in [1, {len(atlases)}] for this split, got {train_subjects}")
        split["train"] = atlases[:train_subjects]
    log(f"{Path(path).name}: {len(split['train'])} training, {len(split['val'])} validation and "
        f"{len(split['test'])} test subjects ({config.modality})")
    sets = [cached_dataset_samples(data_dir, path, name, split[name], split["train"] if name == "train" else atlases,
                                   config, DATASET_SEEDS[name], per_band, algorithmic, training=name == "train",
                                   synthetic=synthetic if name == "train" else 0, log=log)
            for name in ("train", "val")]
    return split, atlases, sets[0], sets[1]


def test_set(path: str | Path, data_dir: Path, config: SentinelConfig, subjects: Sequence[str] | None,
             atlas_subjects: Sequence[str] | None = None, per_band: int = 3, algorithmic: int = 4,
             log=print) -> SampleSet:
    """Evaluation samples of ``subjects`` of a dataset (None: every subject); algorithmic masks
    register ``atlas_subjects`` (None: the other evaluated subjects)."""
    every = sorted({subject_of(c) for c in dataset_cases(path)})
    subjects = every if subjects is None else list(subjects)
    atlas_subjects = subjects if atlas_subjects is None else list(atlas_subjects)
    return cached_dataset_samples(data_dir, path, "test", subjects, atlas_subjects, config, DATASET_SEEDS["test"],
                                  per_band, algorithmic, training=False, log=log)


def held_out_subjects(card: dict[str, Any], path: str | Path) -> list[str] | None:
    """The test subjects a card records for the dataset at ``path`` (None when it was trained on
    another dataset, or on the built-in data: then every subject of ``path`` is held out)."""
    data = card.get("data") or {}
    if data.get("dataset") == str(Path(path).resolve()):
        return list(data["subjects"]["test"])
    return None


def seen_subjects(card: dict[str, Any]) -> set[str]:
    """Subjects a dataset-trained card was trained or validated on (empty for other cards)."""
    subjects = (card.get("data") or {}).get("subjects") or {}
    return set(subjects.get("train", [])) | set(subjects.get("val", []))


def dataset_card_extra(config: SentinelConfig, options, path: str | Path, split: dict[str, list[str]],
                       atlases: list[str], train_set: SampleSet, val_set: SampleSet, per_band: int,
                       algorithmic: int) -> dict[str, Any]:
    """What the card of a dataset-trained model says about its data, split and training."""
    from .sentinel_cli import describe_network

    name = Path(path).name
    return {
        "description": f"Quality Sentinel ({describe_network(config)}) trained on the dataset {name} ({config.modality})",
        "priority": 5,
        "data": {"dataset": str(Path(path).resolve()), "modality": config.modality, "split": "by subject, seeded",
                 "subjects": split, "atlas_subjects": atlases, "structures": sorted(set(train_set.names)),
                 "masks": f"per structure and case: {per_band} degraded masks in each of the 5 nnQC DSC bands, "
                          f"{per_band} nearly perfect, 1 empty, {per_band} of another structure of the case, "
                          f"{algorithmic} algorithmic (threshold / region growing / registration of other "
                          f"training subjects' labels)",
                 "per_band": per_band, "algorithmic": algorithmic,
                 "train_slices": int(len(train_set.x)), "train_volumes": int(len(train_set.volume_dsc)),
                 "val_slices": int(len(val_set.x))},
        "training": dict(options.__dict__),
        "limitations": f"Trained on {len(split['train'])} subjects of {name} only; measured on its "
                       f"{len(split['test'])} held-out subjects (metrics.test).",
    }


def evaluate_on_dataset(card: str | Path, path: str | Path, data_dir: Path, device: str = "cpu",
                        log=print) -> dict[str, Any]:
    """``segqc eval CARD --dataset PATH``: a Sentinel model scored on a labelled dataset.

    A model trained on this very dataset is scored on the held-out subjects its card records
    (result key "test", algorithmic masks registered from its training subjects, as at training);
    any other model on every subject (key "dataset"), after checking the modalities agree, except
    subjects whose ids the model was trained or validated on (a moved copy of its training set).
    """
    from ..models.sentinel import load_model
    from .sentinel_cli import evaluate_sets

    card_data = json.loads(Path(card).read_text())
    model = load_model(card, device)
    data = card_data.get("data") or {}
    held_out = held_out_subjects(card_data, path)
    modality = dataset_modality(path)
    if held_out is None and modality not in ("unknown", model.config.modality):
        raise InputError(path, f"is a {modality} dataset; the model was trained on {model.config.modality}")
    if held_out is not None:
        atlases = data.get("atlas_subjects", data["subjects"]["train"])
        log(f"{Path(path).name}: the {len(held_out)} held-out subjects of the model")
    else:
        # a moved or copied training set must not be scored on what the model trained on
        every = sorted({subject_of(c) for c in dataset_cases(path)})
        seen = seen_subjects(card_data) & set(every)
        held_out = [s for s in every if s not in seen]
        if not held_out:
            raise InputError(path, "every subject of it has the id of a subject the model was trained or "
                                   "validated on: nothing held out to score")
        atlases = None
        log(f"{Path(path).name}: {len(held_out)} subjects" + (f" ({len(seen)} left out: the model was trained or "
                                                               f"validated on subjects with their ids)" if seen else ""))
    samples = test_set(path, data_dir, model.config, held_out, atlases, per_band=int(data.get("per_band", 3)),
                       algorithmic=int(data.get("algorithmic", 4)), log=log)
    return evaluate_sets(model, {"test" if atlases is not None else "dataset": samples})
