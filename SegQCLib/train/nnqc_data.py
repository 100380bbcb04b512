"""nnQC training and evaluation data: 2D axial slices of real MRI with masks to check.

One model per structure (as the paper). Subjects and splits (DATA.md sources, real images):

- ``"Brain"``: **train/val** Colin27 T1 (with skull) + its brain mask (ch2bet); **test** the MNI152
  2009c T1 (skull-stripped) + its brain mask, a subject never seen in training.
- an AAL structure of one hemisphere (``Hippocampus_L``, ``Caudate_L``, ``Putamen_L``,
  ``Thalamus_L``, ...): **train/val** Colin27 with that AAL label; **test** Colin27 mirrored left-right
  with the *other* hemisphere's label (e.g. Hippocampus_R seen as a left one): real anatomy never
  seen in training, but the same subject and scanner, so a weaker test than MNI152 for the brain.
- **val** (model selection) is the training subject with other degradations (another seed) and one
  fixed random in-plane affine/intensity augmentation: it checks fitting, not generalisation.

Slices come from :func:`SegQCLib.fingerprint.preprocess` with the ground truth as the mask (the
crop is centred on the structure; training adds random shifts so that the crop a degraded or
empty mask gives at test time is covered). For every slice holding the structure, the masks to
check are the truth degraded in 2D into each of the five nnQC DSC bands (``per_band`` each,
:func:`SegQCLib.degrade.degrade_to_band`), the truth itself, a blank mask and a near-empty one (a
few pixels); slices without the structure get a blank and a near-empty mask, so the pGT of a
blank input has to come from the image and the slice position.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.sources import LabelledSubject, colin27, mni152
from ..degrade import DSC_BANDS, degrade_to_band
from ..errors import InputError
from ..fingerprint import Fingerprint, compute_fingerprint, preprocess, ras_axes
from ..io import Segmentation
from ..metrics import dice
from ..models.nnqc import NNQCConfig

#: Kinds of masks to check: the five DSC bands, then these.
KINDS = tuple(f"band{b}" for b in range(len(DSC_BANDS))) + ("truth", "blank", "near-empty")
TRUTH, BLANK, NEAR_EMPTY = len(DSC_BANDS), len(DSC_BANDS) + 1, len(DSC_BANDS) + 2


@dataclass
class SliceSet:
    """Preprocessed training slices.

    image: (N, S, S) float16 normalised intensities; gt: (N, S, S) uint8 truth labels (0/1);
    mask: (N, S, S) uint8 mask to check; position: (N,) float32 slice ratio in [0, 1];
    kind: (N,) int8 index into :data:`KINDS`; dsc: (N,) float32 true 2D DSC of mask vs gt (NaN
    when both are empty).
    """

    image: np.ndarray
    gt: np.ndarray
    mask: np.ndarray
    position: np.ndarray
    kind: np.ndarray
    dsc: np.ndarray

    def __len__(self) -> int:
        return len(self.gt)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez_compressed(path, **{k: getattr(self, k) for k in self.__dataclass_fields__})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "SliceSet":
        with np.load(path, allow_pickle=False) as data:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def subset(self, index: np.ndarray) -> "SliceSet":
        return SliceSet(**{k: getattr(self, k)[index] for k in self.__dataclass_fields__})


def mirrored(subject: LabelledSubject, source_label: str, name: str) -> LabelledSubject:
    """``subject`` flipped left-right (its image and the mask of ``source_label``, renamed ``name``)."""
    axes, _ = ras_axes(subject.image.grid.direction)
    lr = axes[2]  # the array axis that runs left-right
    image = subject.image.with_array(np.flip(subject.image.array, axis=lr).copy(), name=subject.image.name + " (mirrored)")
    labels = np.flip(subject.segmentation.mask(source_label), axis=lr).astype(np.uint8)
    seg = Segmentation.from_labelmap(labels, image.grid, {1: name}, name=f"{subject.source}:{source_label} mirrored")
    return LabelledSubject(subject.subject + "-mirrored", image, seg, subject.source + ":mirrored", subject.modality)


def _other_side(structure: str) -> str | None:
    for a, b in (("_L", "_R"), ("_R", "_L")):
        if structure.endswith(a):
            return structure[: -len(a)] + b
    return None


def subjects_for(structure: str) -> tuple[LabelledSubject, LabelledSubject]:
    """(train subject, held-out test subject) for ``structure``; both hold a segment of that name."""
    if structure.lower() == "brain":
        return colin27("brain"), mni152("brain")
    aal = colin27("aal")
    names = [s.name for s in aal.segmentation.segments]
    if structure not in names:
        raise InputError(structure, "not a Colin27 AAL structure or 'Brain' (e.g. Hippocampus_L, Caudate_L)")
    other = _other_side(structure)
    if other is None or other not in names:
        raise InputError(structure, "needs a left/right AAL structure (its mirror image is the held-out test)")
    return aal, mirrored(aal, other, structure)


def structure_fingerprint(structure: str) -> Fingerprint:
    """The fingerprint of the training subject, restricted to ``structure``."""
    train, _ = subjects_for(structure)
    return compute_fingerprint([train], label=structure)


def _near_empty(shape: tuple[int, int], region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A mask of 1-3 small blobs (a few pixels) placed inside ``region`` (anywhere when it is empty)."""
    from scipy import ndimage

    out = np.zeros(shape, bool)
    where = np.argwhere(region) if region.any() else np.argwhere(np.ones(shape, bool))
    for _ in range(int(rng.integers(1, 4))):
        y, x = where[rng.integers(len(where))]
        out[y, x] = True
    return ndimage.binary_dilation(out, iterations=int(rng.integers(0, 2)))


def build_slices(subject: LabelledSubject, structure: str, config: NNQCConfig, fingerprint: Fingerprint,
                 seed: int = 0, per_band: int = 3, progress: bool = True,
                 slice_indices: Sequence[int] | None = None) -> SliceSet:
    """Training slices of ``structure`` in ``subject`` (see the module docstring), seeded;
    ``slice_indices`` restricts them to those preprocessed (RAS) slices."""
    from ..progress import progress_bar

    rng = np.random.default_rng(seed)
    truth = subject.segmentation.mask(structure)
    pre = preprocess(subject.image, truth, fingerprint, config.size)
    positions = pre.transform.slice_positions().astype(np.float32)
    images, gts, masks, pos, kinds, dscs = [], [], [], [], [], []

    def add(k: int, mask: np.ndarray, kind: int) -> None:
        gt = pre.mask[k]
        images.append(pre.image[k].astype(np.float16))
        gts.append(gt.astype(np.uint8))
        masks.append(mask.astype(np.uint8))
        pos.append(positions[k])
        kinds.append(kind)
        dscs.append(dice(mask, gt) if (mask.any() or gt.any()) else np.nan)

    head = pre.image > np.percentile(pre.image, 60)
    n = pre.transform.n_slices
    with progress_bar(disable=not progress) as bar:
        chosen = range(n) if slice_indices is None else [int(k) for k in slice_indices]
        task = bar.add_task(f"slices {structure} ({subject.subject})", total=len(chosen))
        for k in chosen:
            gt = pre.mask[k]
            if gt.any():
                for band in range(len(DSC_BANDS)):
                    for _ in range(per_band):
                        try:
                            add(k, degrade_to_band(gt.astype(np.uint8), band, rng=rng)[0] > 0, band)
                        except (RuntimeError, InputError):
                            pass  # a structure of a few pixels cannot reach every band
                add(k, gt, TRUTH)
            add(k, np.zeros_like(gt), BLANK)
            add(k, _near_empty(gt.shape, gt if gt.any() else head[k], rng), NEAR_EMPTY)
            bar.advance(task)
    return SliceSet(np.stack(images), np.stack(gts), np.stack(masks), np.asarray(pos, np.float32),
                    np.asarray(kinds, np.int8), np.asarray(dscs, np.float32))


def training_sets(data_dir: str | Path, structure: str, config: NNQCConfig, per_band: int = 3,
                  progress: bool = True, log=print) -> tuple[SliceSet, SliceSet, Fingerprint]:
    """(train, val, fingerprint) of ``structure`` for ``config.size``, built once and cached in ``data_dir``.

    Train: seed 0; val: seed 1 (its fixed augmentation is applied by the trainer)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    fp_path = data_dir / f"fingerprint-{structure}.json"
    if fp_path.exists():
        fingerprint = Fingerprint.from_json(fp_path)
    else:
        fingerprint = structure_fingerprint(structure)
        fingerprint.to_json(fp_path)
    train_subject, _ = subjects_for(structure)
    sets = []
    for split, seed in (("train", 0), ("val", 1)):
        path = data_dir / f"{split}-{structure}-s{config.size}-b{per_band}.npz"
        if path.exists():
            sets.append(SliceSet.load(path))
            continue
        log(f"building {split} slices -> {path}")
        data = build_slices(train_subject, structure, config, fingerprint, seed=seed, per_band=per_band,
                            progress=progress)
        tmp = path.with_name(path.stem + ".tmp.npz")
        data.save(tmp)
        tmp.replace(path)
        sets.append(data)
    return sets[0], sets[1], fingerprint


__all__ = ["SliceSet", "KINDS", "subjects_for", "structure_fingerprint", "build_slices", "training_sets", "mirrored"]
