"""Training and evaluation samples for Quality Sentinel from the real labelled MRI of DATA.md.

A *sample volume* is a structure of a subject, a mask of it (synthetically degraded into one of the
five nnQC DSC bands, nearly perfect, empty, the mask of another structure, or a real algorithmic
segmentation) and the true 3D DSC. From each we keep the 10 evenly spaced slices the volume score
uses (``in_volume``) and, for training, extra slices; every slice carries its true 2D DSC.

Splits (so that held-out numbers mean something):
- **test-subject**: MNI152 (grey matter, white matter, brain): a subject never seen in training;
- **test-structures**: AAL structures of Colin27 never seen in training (:data:`HELD_OUT_AAL`);
- **val**: other AAL structures, for model selection;
- **train**: Colin27 only, in two parts (:data:`TRAIN_PARTS`, each built and cached on its own):
  ``train-atlas``, the remaining AAL structures, the Brodmann areas and the brain; ``train-tissue``,
  grey and white matter (``colin27("tissue")``). Without the tissue part, grey and white matter were
  structure types the model had never seen, and on MNI152 it scored even their exact masks ~0.2:
  the held-out subject measured a held-out structure type instead.
  ``segqc train sentinel --synthetic-subjects N`` adds N warped copies of Colin27 (:func:`warped_pairs`),
  each sampled like the original: the only labelled training subject is otherwise one anatomy.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..data.slices import evenly_spaced_slices, foreground_slices
from ..data.sources import LabelledSubject, colin27, mni152
from ..degrade import DSC_BANDS, degrade_to_band
from ..fingerprint import ras_axes, to_ras
from ..metrics import dice
from ..models.sentinel import SentinelConfig, normalise_image, slice_inputs

#: AAL structures held out of training entirely (both hemispheres of some, one of others).
HELD_OUT_AAL = ("Hippocampus_L", "Hippocampus_R", "Putamen_R", "Thalamus_L", "Caudate_R", "Precentral_R",
                "Frontal_Mid_L", "Temporal_Sup_L", "Cuneus_R", "Insula_L", "Amygdala_R", "Lingual_L",
                "Cerebelum_6_R", "Vermis_4_5", "Olfactory_L")
VAL_AAL = ("Pallidum_L", "Occipital_Mid_R", "Parietal_Inf_L", "Cingulum_Ant_R", "Fusiform_L", "Cerebelum_Crus1_L")

KINDS = ("degraded", "good", "empty", "wrong", "algorithmic")
#: The parts the train split is built from (see the module docstring).
TRAIN_PARTS = ("train-atlas", "train-tissue")
#: Warped copy c of the built-in training subject uses the warp seed WARP_SEED + c (see :func:`warped_pairs`).
WARP_SEED = 5_000
#: Averaged copy c of the built-in training subject uses the seed AVERAGE_SEED + c (see :func:`averaged_pairs`).
AVERAGE_SEED = 7_000


@dataclass
class SampleSet:
    """Slices ready for the network plus what is true about them.

    x: (N, C, S, S) uint8 (image and mask channels scaled to 0..255); name: (N,) index into ``names``;
    dsc: (N,) true 2D DSC; area: (N,) mask pixels on the slice; volume: (N,) sample-volume id;
    in_volume: (N,) bool, one of the 10 volume slices. Per volume v: volume_dsc[v] (true 3D DSC),
    volume_name[v], volume_kind[v] (index into KINDS), volume_subject[v].
    """

    names: list[str]
    x: np.ndarray
    name: np.ndarray
    dsc: np.ndarray
    area: np.ndarray
    volume: np.ndarray
    in_volume: np.ndarray
    volume_dsc: np.ndarray
    volume_name: np.ndarray
    volume_kind: np.ndarray
    volume_subject: list[str] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, names=np.array(self.names), x=self.x, name=self.name, dsc=self.dsc, area=self.area,
                 volume=self.volume, in_volume=self.in_volume, volume_dsc=self.volume_dsc,
                 volume_name=self.volume_name, volume_kind=self.volume_kind,
                 volume_subject=np.array(self.volume_subject))
        return path

    @classmethod
    def concat(cls, sources: list["SampleSet | Path"]) -> "SampleSet":
        """One set holding all slices and volumes of ``sources`` (names merged, ids renumbered).

        A source may be the path of a saved set: it is loaded only when its turn comes and let go
        after its slices are copied, so joining saved parts holds their slices once (plus one part),
        not twice. Raises ValueError if the sources' slices differ in shape.
        """
        if not sources:
            raise ValueError("no sample sets to join")
        shapes = [s.x.shape if isinstance(s, SampleSet) else saved_slice_shape(s) for s in sources]
        if len({shape[1:] for shape in shapes}) > 1:
            raise ValueError(f"cannot join sample sets of different slice shapes: {sorted({sh[1:] for sh in shapes})}")
        x = np.empty((sum(shape[0] for shape in shapes),) + shapes[0][1:], np.uint8)
        names: list[str] = []
        parts: dict[str, list] = {k: [] for k in ("name", "dsc", "area", "volume", "in_volume", "volume_dsc",
                                                  "volume_name", "volume_kind")}
        subjects: list[str] = []
        offset = start = 0
        for source in sources:
            s = source if isinstance(source, SampleSet) else SampleSet.load(source)
            names += [n for n in s.names if n not in names]
            remap = np.array([names.index(n) for n in s.names], dtype=np.int32)
            x[start:start + len(s.x)] = s.x
            start += len(s.x)
            parts["name"].append(remap[s.name])
            parts["volume"].append(s.volume + offset)
            parts["volume_name"].append(remap[s.volume_name])
            for key in ("dsc", "area", "in_volume", "volume_dsc", "volume_kind"):
                parts[key].append(getattr(s, key))
            subjects += list(s.volume_subject)
            offset += len(s.volume_dsc)
            del s  # before the next part is loaded: rebinding ``s`` would hold two parts at once
        return cls(names=names, x=x, **{k: np.concatenate(v) for k, v in parts.items()}, volume_subject=subjects)

    @classmethod
    def load(cls, path: str | Path) -> "SampleSet":
        with np.load(path, allow_pickle=False) as data:
            return cls(names=[str(n) for n in data["names"]], x=data["x"], name=data["name"], dsc=data["dsc"],
                       area=data["area"], volume=data["volume"], in_volume=data["in_volume"],
                       volume_dsc=data["volume_dsc"], volume_name=data["volume_name"],
                       volume_kind=data["volume_kind"], volume_subject=[str(s) for s in data["volume_subject"]])


def saved_slice_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of the slices ``x`` of a set saved by :meth:`SampleSet.save`, read from the file's
    array header without loading the slices."""
    with zipfile.ZipFile(path) as archive, archive.open("x.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(read_header(f)[0])


def ensure_cached(file: str | Path, build: Callable[[], SampleSet], log=print) -> Path:
    """``file``, where ``build()`` is saved first if it is missing (atomically: a run cut off while
    saving leaves no half-written cache)."""
    file = Path(file)
    if not file.exists():
        file.parent.mkdir(parents=True, exist_ok=True)
        log(f"building samples -> {file}")
        tmp = file.with_name(file.stem + ".tmp.npz")
        build().save(tmp)
        tmp.replace(file)
    return file


def cached_samples(file: str | Path, build: Callable[[], SampleSet], log=print) -> SampleSet:
    """The sample set saved at ``file``, built and saved there first if missing (:func:`ensure_cached`)."""
    return SampleSet.load(ensure_cached(file, build, log))


def display_name(subject_source: str, name: str) -> str:
    """Structure names as a user would type them: Brodmann's ``BA4`` -> ``Brodmann area 4``."""
    return f"Brodmann area {name[2:]}" if name.startswith("BA") and name[2:].isdigit() else name


def split_structures(split: str) -> list[tuple[LabelledSubject, str]]:
    """(subject, structure name) pairs of a split: train (or one of :data:`TRAIN_PARTS`), val,
    test-structures or test-subject."""
    if split == "train":
        return [pair for part in TRAIN_PARTS for pair in split_structures(part)]
    if split == "train-tissue":
        tissue = colin27("tissue")
        return [(tissue, "GreyMatter"), (tissue, "WhiteMatter")]
    if split == "test-subject":
        tissue, brain = mni152("tissue"), mni152("brain")
        return [(tissue, "GreyMatter"), (tissue, "WhiteMatter"), (brain, "Brain")]
    aal = colin27("aal")
    names = [s.name for s in aal.segmentation.segments]
    if split == "test-structures":
        return [(aal, n) for n in HELD_OUT_AAL]
    if split == "val":
        return [(aal, n) for n in VAL_AAL]
    if split == "train-atlas":
        held = set(HELD_OUT_AAL) | set(VAL_AAL)
        brodmann = colin27("brodmann")
        return ([(aal, n) for n in names if n not in held]
                + [(brodmann, s.name) for s in brodmann.segmentation.segments]
                + [(colin27("brain"), "Brain")])
    raise ValueError(f"unknown split {split!r}")


def warped_pairs(pairs: list[tuple[LabelledSubject, str]], copy: int, seed: int) -> list[tuple[LabelledSubject, str]]:
    """``pairs`` with each subject replaced by its warped copy number ``copy`` (1, 2, ...), a new subject
    ``<subject>+warp<copy>`` drawn with ``seed`` (:func:`~SegQCLib.data.synthetic_subjects.warped_subject`).

    The same seed on the same image grid draws the same transform, so labellings of one image (Colin27's
    AAL, Brodmann, brain and tissue) stay one anatomy in a copy. The original subject then is another
    subject to the copy: its labels are registered onto it for the algorithmic masks, as any atlas's.
    """
    from ..data.synthetic_subjects import warped_subject

    if copy < 1:
        raise ValueError(f"warped copies are numbered from 1, got {copy}")
    return _on_copies(pairs, lambda subject: warped_subject(subject, seed=seed, name=f"{subject.subject}+warp{copy}"))


def _on_copies(pairs: list[tuple[LabelledSubject, str]],
               draw: Callable[[LabelledSubject], LabelledSubject]) -> list[tuple[LabelledSubject, str]]:
    """``pairs`` with each subject replaced by ``draw(subject)``, drawn once per subject."""
    copies: dict[int, LabelledSubject] = {}
    out = []
    for subject, structure in pairs:
        if id(subject) not in copies:
            copies[id(subject)] = draw(subject)
        out.append((copies[id(subject)], structure))
    return out


def _good_mask(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A nearly perfect mask: the truth, or its boundary moved by one voxel here and there."""
    from scipy import ndimage

    choice = rng.integers(3)
    if choice == 0:
        return truth.copy()
    moved = ndimage.binary_erosion(truth) if choice == 1 else ndimage.binary_dilation(truth)
    keep = rng.random(truth.shape) < rng.uniform(0.3, 1.0)
    return np.where(keep, moved, truth)


def _masks_for(subject: LabelledSubject, structure: str, others: list[str], rng: np.random.Generator,
               per_band: int, algorithmic: int, kinds: tuple[str, ...],
               atlases: list[LabelledSubject] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(kind, mask) sample masks of one structure, of the given kinds (``atlases``: see
    :func:`~SegQCLib.data.algorithmic.algorithmic_segmentations`)."""
    truth = subject.segmentation.mask(structure)
    if "degraded" in kinds:
        for band in range(len(DSC_BANDS)):
            for _ in range(per_band):
                yield "degraded", degrade_to_band(truth.astype(np.uint8), band, rng=rng)[0] > 0
    if "good" in kinds:
        for _ in range(per_band):
            yield "good", _good_mask(truth, rng)
    if "empty" in kinds:
        yield "empty", np.zeros_like(truth)
    if "wrong" in kinds and others:
        for other in rng.choice(len(others), size=min(per_band, len(others)), replace=False):
            yield "wrong", subject.segmentation.mask(others[int(other)])
    if "algorithmic" in kinds and algorithmic:
        try:
            from ..data.algorithmic import algorithmic_segmentations
        except ImportError:
            return
        for _, mask, _ in algorithmic_segmentations(subject, structure, rng, algorithmic, atlases=atlases):
            yield "algorithmic", np.asarray(mask, bool)


#: Skull-stripping radii (mm) of the brain mask a stripped training image is cut with.
STRIP_RADII_MM = (1.0, 2.0, 3.0)


def _brain_of(subject: LabelledSubject) -> np.ndarray | None:
    """The subject's own brain mask on its image grid (Colin27: ch2bet), or None if it has none."""
    if subject.subject != "colin27":
        return None
    brain = colin27("brain")
    return brain.segmentation.mask("Brain") if brain.image.grid == subject.image.grid else None


def _skull_stripped(image: np.ndarray, brain: np.ndarray, spacing, radius_mm: float) -> np.ndarray:
    """``image`` with everything farther than ``radius_mm`` from ``brain`` set to 0 (a skull-stripped T1)."""
    from ..data.algorithmic import dilate_mm

    return np.where(dilate_mm(brain, spacing, radius_mm), image, 0).astype(image.dtype, copy=False)


def _view(subject: LabelledSubject, brain: np.ndarray | None, radius_mm: float | None, config: SentinelConfig,
          cache: dict[tuple, tuple]) -> tuple:
    """(axes, flips, spacing_yx, image01) of the subject's image in RAS order, normalised, skull-stripped
    with ``brain`` at ``radius_mm`` (None: as it is); kept in ``cache`` per (grid, image, radius)."""
    key = (subject.image.grid, subject.image.name, radius_mm)
    if key not in cache:
        array = subject.image.array
        if radius_mm is not None:
            array = _skull_stripped(array, brain, subject.image.spacing, radius_mm)
        axes, flips = ras_axes(subject.image.grid.direction)
        spacing_yx = (subject.image.grid.spacing[axes[1]], subject.image.grid.spacing[axes[2]])
        cache[key] = (axes, flips, spacing_yx, normalise_image(to_ras(array, axes, flips), config))
    return cache[key]


def averaged_pairs(pairs: list[tuple[LabelledSubject, str]], copy: int, seed: int) -> list[tuple[LabelledSubject, str]]:
    """``pairs`` with each subject replaced by its template-like copy number ``copy`` (1, 2, ...), a new
    subject ``<subject>+avg<copy>`` drawn with ``seed`` (:func:`~SegQCLib.data.synthetic_subjects.averaged_subject`);
    one seed keeps the labellings of one image one anatomy, as in :func:`warped_pairs`."""
    from ..data.synthetic_subjects import averaged_subject

    if copy < 1:
        raise ValueError(f"averaged copies are numbered from 1, got {copy}")
    return _on_copies(pairs, lambda subject: averaged_subject(subject, seed=seed, name=f"{subject.subject}+avg{copy}"))


def build_samples(split: str, config: SentinelConfig, seed: int = 0, per_band: int = 3, extra_slices: int = 6,
                  algorithmic: int = 2, progress: bool = True, structures: list[str] | None = None,
                  kinds: tuple[str, ...] = KINDS, strip_prob: float = 0.0,
                  pairs: list[tuple[LabelledSubject, str]] | None = None,
                  atlases: list[LabelledSubject] | None = None) -> SampleSet:
    """Generate the sample set of ``split`` (see module docstring), seeded.

    per_band: degraded volumes per DSC band and structure; extra_slices: random slices of
    (mask | truth) added to the 10 volume slices of each sample volume (0 for evaluation sets).
    strip_prob: chance that a sample volume shows its subject's image skull-stripped (its own
    brain mask dilated by one of :data:`STRIP_RADII_MM`, then normalised on its own), where the
    subject has a brain mask: skull-stripped inputs are common, and the test subject MNI152 is one.
    pairs: (subject, structure) pairs to use instead of the split's own (a user's dataset, see
    ``sentinel_dataset``; ``split`` then only names the progress bar); atlases: subjects whose
    labels are registered onto each subject for the algorithmic masks (None: the built-in ones).
    """
    from ..progress import progress_bar

    rng = np.random.default_rng(seed)
    strip_rng = np.random.default_rng([seed, 1])  # its own stream: stripping never changes the masks drawn
    pairs = split_structures(split) if pairs is None else pairs
    if structures:
        pairs = [p for p in pairs if p[1] in structures]
    names: list[str] = []
    xs, name_idx, dscs, areas, vols, in_vol = [], [], [], [], [], []
    v_dsc, v_name, v_kind, v_subject = [], [], [], []
    views: dict[tuple, tuple] = {}  # see _view
    brains: dict = {}  # image grid -> the subject's brain mask (or None), for skull stripping
    with progress_bar(disable=not progress, transient=False) as bar:
        task = bar.add_task(f"samples {split}", total=len(pairs))
        for subject, structure in pairs:
            if strip_prob > 0 and subject.image.grid not in brains:
                brains[subject.image.grid] = _brain_of(subject)
            brain = brains.get(subject.image.grid)
            axes, flips, spacing_yx, _ = _view(subject, brain, None, config, views)
            truth = np.ascontiguousarray(to_ras(subject.segmentation.mask(structure), axes, flips))
            shown = display_name(subject.source, structure)
            if shown not in names:
                names.append(shown)
            others = [s.name for s in subject.segmentation.segments if s.name != structure]
            atlases_here = None if atlases is None else [a for a in atlases if a.subject != subject.subject]
            for kind, mask in _masks_for(subject, structure, others, rng, per_band, algorithmic, kinds, atlases_here):
                radius = None
                if brain is not None and strip_rng.random() < strip_prob:
                    radius = float(strip_rng.choice(STRIP_RADII_MM))
                image01 = _view(subject, brain, radius, config, views)[3]
                mask = np.ascontiguousarray(to_ras(mask, axes, flips))
                volume_id = len(v_dsc)
                v_dsc.append(dice(mask, truth))
                v_name.append(names.index(shown))
                v_kind.append(KINDS.index(kind))
                v_subject.append(subject.subject)
                chosen = evenly_spaced_slices(mask, config.volume_slices)
                pool = sorted(set(foreground_slices(mask | truth)) - set(chosen))
                extra = list(rng.choice(pool, size=min(extra_slices, len(pool)), replace=False)) if pool else []
                # the volume slices are kept whatever they hold; the extra ones hold mask or truth by construction
                for keep, flag in ((list(chosen), True), (extra, False)):
                    if not keep:
                        continue
                    xs.append((slice_inputs(image01, mask, keep, config, spacing_yx).numpy() * 255).round().astype(np.uint8))
                    for k in keep:
                        name_idx.append(names.index(shown))
                        dscs.append(dice(mask[k], truth[k]) if (mask[k].any() or truth[k].any()) else np.nan)
                        areas.append(int(mask[k].sum()))
                        vols.append(volume_id)
                        in_vol.append(flag)
            bar.advance(task)
    return SampleSet(names=names, x=np.concatenate(xs), name=np.asarray(name_idx, np.int32),
                     dsc=np.asarray(dscs, np.float32), area=np.asarray(areas, np.int32),
                     volume=np.asarray(vols, np.int32), in_volume=np.asarray(in_vol, bool),
                     volume_dsc=np.asarray(v_dsc, np.float32), volume_name=np.asarray(v_name, np.int32),
                     volume_kind=np.asarray(v_kind, np.int8), volume_subject=v_subject)
