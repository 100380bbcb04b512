"""Real labelled MRI that installs from package registries (see DATA.md), as in-memory subjects.

- **Colin27** (``apt-get install mricron-data``, ``/usr/share/mricron/templates``): the T1
  ``ch2.nii.gz`` with the AAL atlas (116 named regions, ``aal.nii.txt``), the Brodmann atlas (names
  ``BA<n>``), a brain mask (``ch2bet.nii.gz > 0``) or grey and white matter, all on one 1 mm grid
  (181 x 217 x 181). mricron-data ships no tissue map of Colin27, so its ``"tissue"`` labels are
  the two upper classes of a three-class Otsu threshold of the T1 inside the brain mask (CSF < grey
  < white matter): the same classes as the MNI152 maps, from intensity as tissue classifiers make
  them (on MNI152 the same rule agrees with the shipped maps at DSC 0.89 for grey, 0.92 for white
  matter).
- **MNI152 2009c sym** (``pip install nilearn``, the wheel ships it): the T1 template with grey and
  white matter from the shipped probability maps (prob > 0.5; 1 = GreyMatter, 2 = WhiteMatter), or
  a brain mask. nilearn ships no CSF map and no brain-mask file; its ``load_mni152_brain_mask``
  thresholds the (skull-stripped) T1 template at 0.2 of its maximum, and so do we (without
  importing nilearn).

Files reserved for external evaluation (the macaque ``inia19-*``, ``ch2better``) are deliberately
not exposed here. Reads are cached per process; the returned arrays are read-only so that a
caller cannot change the cached copy (``.copy()`` them to edit).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import DataSourceMissing
from ..io import Segmentation, read_label_table, read_segmentation, read_volume
from ..volume import Volume, check_same_grid

#: Folders searched for the mricron-data templates (tests replace this list).
MRICRON_SEARCH_PATH: list[Path] = [Path("/usr/share/mricron/templates")]
#: Folders searched for nilearn's shipped MNI152 files; empty = inside the installed nilearn package.
NILEARN_SEARCH_PATH: list[Path] = []

_COLIN_FILES = ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt", "brodmann.nii.gz", "ch2bet.nii.gz")
_MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
_MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
_MNI_FILES = (_MNI_T1, _MNI_GM, _MNI_WM)

MRICRON_INSTALL = "apt-get install mricron-data"
NILEARN_INSTALL = "pip install nilearn"

#: Probability above which a voxel of the MNI152 GM/WM maps (stored as 0..255) is labelled.
TISSUE_THRESHOLD = 0.5
#: nilearn's brain-mask rule: T1 template / its maximum > 0.2.
MNI_BRAIN_THRESHOLD = 0.2


@dataclass(frozen=True)
class LabelledSubject:
    """A real image with an expert (atlas) label map on its grid.

    ``image``: (z, y, x) float32 Volume; ``segmentation``: the label map with named segments;
    ``source``: where it came from, e.g. ``"mricron-data:aal"``; ``modality``: "MR" for these T1s.
    """

    subject: str
    image: Volume
    segmentation: Segmentation
    source: str
    modality: str = "MR"


# --------------------------------------------------------------------------- locating files
def _find_folder(search_path: list[Path], files: tuple[str, ...]) -> Path | None:
    for folder in search_path:
        if all((Path(folder) / f).is_file() for f in files):
            return Path(folder)
    return None


def _nilearn_search_path() -> list[Path]:
    if NILEARN_SEARCH_PATH:
        return list(NILEARN_SEARCH_PATH)
    spec = importlib.util.find_spec("nilearn")  # locate without importing (nilearn is slow to import)
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(p) / "datasets" / "data" for p in spec.submodule_search_locations]


def mricron_folder() -> Path:
    """The folder holding the Colin27 files; :class:`DataSourceMissing` names the install command."""
    folder = _find_folder(MRICRON_SEARCH_PATH, _COLIN_FILES)
    if folder is None:
        where = ", ".join(str(p) for p in MRICRON_SEARCH_PATH) or "(no folder)"
        raise DataSourceMissing(f"Colin27 templates ({', '.join(_COLIN_FILES)}) not found in {where}: "
                                f"install them with `{MRICRON_INSTALL}`")
    return folder


def nilearn_folder() -> Path:
    """The folder holding nilearn's MNI152 files; :class:`DataSourceMissing` names the install command."""
    search = _nilearn_search_path()
    folder = _find_folder(search, _MNI_FILES)
    if folder is None:
        where = ", ".join(str(p) for p in search) or "(nilearn is not installed)"
        raise DataSourceMissing(f"MNI152 template files ({', '.join(_MNI_FILES)}) not found in {where}: "
                                f"install them with `{NILEARN_INSTALL}`")
    return folder


def available_sources() -> dict[str, bool]:
    """Which sample sources are installed: {"colin27": bool, "mni152": bool}."""
    return {"colin27": _find_folder(MRICRON_SEARCH_PATH, _COLIN_FILES) is not None,
            "mni152": _find_folder(_nilearn_search_path(), _MNI_FILES) is not None}


# --------------------------------------------------------------------------- cached reads
def _read_only(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@lru_cache(maxsize=8)
def _cached_volume(path: str) -> Volume:
    volume = read_volume(path)
    _read_only(volume.array)
    return volume


def _labelled(image: Volume, labelmap: np.ndarray, names: dict[int, str], subject: str, source: str,
              file: str) -> LabelledSubject:
    seg = Segmentation.from_labelmap(labelmap, image.grid, names, name=file)
    _read_only(seg.layers)
    return LabelledSubject(subject, image, seg, source)


@lru_cache(maxsize=4)
def _colin27(folder: str, atlas: str) -> LabelledSubject:
    root = Path(folder)
    image = _cached_volume(str(root / "ch2.nii.gz"))
    if atlas == "aal":
        seg = read_segmentation(root / "aal.nii.gz", read_label_table(root / "aal.nii.txt"))
        check_same_grid(image.grid, seg.grid, str(root / "ch2.nii.gz"), seg.name)
        _read_only(seg.layers)
        return LabelledSubject("colin27", image, seg, "mricron-data:aal")
    if atlas == "brodmann":
        file = root / "brodmann.nii.gz"
        labels = read_segmentation(file)
        check_same_grid(image.grid, labels.grid, str(root / "ch2.nii.gz"), str(file))
        values = [int(v) for v in np.unique(labels.labelmap) if v != 0]
        return _labelled(image, labels.labelmap, {v: f"BA{v}" for v in values}, "colin27",
                         "mricron-data:brodmann", str(file))
    file = root / "ch2bet.nii.gz"
    bet = _cached_volume(str(file))
    check_same_grid(image.grid, bet.grid, str(root / "ch2.nii.gz"), str(file))
    brain = bet.array > 0
    if atlas == "tissue":
        return _labelled(image, _tissue_classes(image.array, brain), {1: "GreyMatter", 2: "WhiteMatter"},
                         "colin27", "mricron-data:ch2-tissue", str(root / "ch2.nii.gz"))
    return _labelled(image, brain.astype(np.uint8), {1: "Brain"}, "colin27", "mricron-data:ch2bet", str(file))


def _tissue_classes(t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """(z, y, x) uint8 labels 1 grey matter, 2 white matter: the middle and upper of three Otsu classes
    of the T1 intensities inside ``brain`` (the lowest class, CSF, and the outside stay 0)."""
    from skimage.filters import threshold_multiotsu

    low, high = threshold_multiotsu(t1[brain], classes=3)
    labels = np.zeros(t1.shape, dtype=np.uint8)
    labels[brain & (t1 > low)] = 1
    labels[brain & (t1 > high)] = 2
    return labels


@lru_cache(maxsize=2)
def _mni152(folder: str, labels: str) -> LabelledSubject:
    root = Path(folder)
    image = _cached_volume(str(root / _MNI_T1))
    if labels == "tissue":
        gm = read_volume(root / _MNI_GM)
        wm = read_volume(root / _MNI_WM)
        for prob in (gm, wm):
            check_same_grid(image.grid, prob.grid, _MNI_T1, prob.name)
        labelmap = np.zeros(image.shape, dtype=np.uint8)
        labelmap[_probability(gm) > TISSUE_THRESHOLD] = 1
        labelmap[_probability(wm) > TISSUE_THRESHOLD] = 2  # the maps never both exceed 0.5
        return _labelled(image, labelmap, {1: "GreyMatter", 2: "WhiteMatter"}, "mni152",
                         "nilearn:mni152-gm-wm", str(root / _MNI_GM))
    brain = (image.array / max(float(image.array.max()), 1e-12) > MNI_BRAIN_THRESHOLD).astype(np.uint8)
    return _labelled(image, brain, {1: "Brain"}, "mni152", "nilearn:mni152-brain", str(root / _MNI_T1))


def _probability(volume: Volume) -> np.ndarray:
    """A probability map stored as 0..255 (nilearn's converted files) or 0..1, as 0..1 floats."""
    scale = 255.0 if float(volume.array.max()) > 1.0 else 1.0
    return volume.array / scale


# --------------------------------------------------------------------------- public sources
def colin27(atlas: str = "aal") -> LabelledSubject:
    """Colin27's T1 (ch2) with an atlas: ``"aal"`` (116 named AAL regions), ``"brodmann"``
    (``BA<n>``), ``"brain"`` (one segment "Brain": ch2bet > 0) or ``"tissue"`` (1 GreyMatter,
    2 WhiteMatter: Otsu classes of the T1 in the brain, see the module docstring). 1 mm, RAS,
    181 x 217 x 181."""
    if atlas not in ("aal", "brodmann", "brain", "tissue"):
        raise ValueError(f"atlas must be 'aal', 'brodmann', 'brain' or 'tissue', got {atlas!r}")
    return _colin27(str(mricron_folder()), atlas)


def mni152(labels: str = "tissue") -> LabelledSubject:
    """The MNI152 2009c sym T1 with ``"tissue"`` (1 GreyMatter, 2 WhiteMatter: probability > 0.5)
    or ``"brain"`` (one segment "Brain": T1 / max > 0.2, nilearn's rule). 1 mm, 197 x 233 x 189 (x, y, z)."""
    if labels not in ("tissue", "brain"):
        raise ValueError(f"labels must be 'tissue' or 'brain', got {labels!r}")
    return _mni152(str(nilearn_folder()), labels)
