"""Datasets of image/segmentation pairs: MSD and nnU-Net v2 folders, and CSV files of pairs.

:func:`read_dataset` turns any of them into a list of :class:`Case` (paths only, nothing is read);
:meth:`Case.load` reads one pair and puts the segmentation on the image grid.

Layouts understood:

- **nnU-Net v2**: ``dataset.json`` with ``channel_names`` ({"0": "CT"}), ``labels`` (name -> value,
  "background": 0) and ``file_ending``; images ``imagesTr/<case>_0000<file_ending>`` (channel 0 is
  the image SegQC uses), segmentations ``labelsTr/<case><file_ending>``. A ``dataset`` entry
  ({case: {"images": [...], "label": ...}}) replaces the folder listing when present.
- **MSD**: ``dataset.json`` with ``training`` ([{"image": "./imagesTr/x.nii.gz", "label": ...}]),
  ``labels`` (value -> name, {"0": "background"}) and ``modality`` ({"0": "CT"}).
- **CSV**: columns ``image`` and ``segmentation``; optional ``reference`` (a ground truth to compare
  with), ``case_id``, ``label`` (the structure to assess: value or name; it also names an unnamed
  binary mask), ``label_table`` (a text label table of the segmentation, also used for a reference
  that has no table of its own), ``subject`` and ``method`` (the segmentation method that made the
  mask, for model ranking). Relative paths are taken from the CSV's folder.

A segmentation and its reference are compared structure by structure through their names
(:func:`SegQCLib.batch.select_structures`), so each file keeps its own table: a reference with a
sidecar table (``aal.nii.txt`` next to ``aal.nii.gz``) or a ``.seg.nrrd`` header is read with it.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import (IMAGE_SUFFIXES, Segmentation, align_to_grid, read_label_table, read_segmentation, read_volume,
                  sidecar_label_table)
from ..volume import Grid, Volume

#: Modality names of dataset.json files mapped to SegQC's modality codes.
_MR_NAMES = {"MR", "MRI", "T1", "T1W", "T1GD", "T1C", "T1CE", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD", "HBV",
             "CINE", "LGE", "DE"}
_US_NAMES = {"US", "ULTRASOUND"}


@dataclass(frozen=True)
class Case:
    """One image/segmentation pair of a dataset (paths; :meth:`load` reads them).

    ``reference`` is an optional ground-truth segmentation of the same image; ``label_table`` maps
    label values to names (from dataset.json or a CSV's ``label_table``); ``label`` is the structure
    to assess when the dataset names one (CSV ``label`` column); ``subject`` groups cases of one
    patient (for subject-wise splits); ``method`` names the segmentation method (model) that made
    the segmentation, so that methods can be ranked by their QC scores.
    """

    case_id: str
    image: Path
    segmentation: Path
    reference: Path | None = None
    label_table: dict[int, str] | None = None
    subject: str | None = None
    label: str | None = None
    method: str | None = None

    def load(self) -> tuple[Volume, Segmentation]:
        """Read the image (float32 (z, y, x)) and the segmentation, aligned to the image grid.

        Raises :class:`InputError` naming the file that cannot be read or whose geometry does not
        match the image (a segmentation on the same voxel lattice but cropped is padded exactly).
        """
        image = read_volume(self.image)
        seg = read_segmentation(self.segmentation, self.label_table)
        return image, align_to_grid(seg, image.grid)

    def load_reference(self, grid: Grid | None = None) -> Segmentation | None:
        """The reference segmentation on the image grid, or None when the case has none.

        ``grid``: the image's grid when the caller has read the image already (else it is read).
        Names come from the reference's own table (``.seg.nrrd`` header, sidecar text table) and
        only without one from the case's ``label_table``: a table written for the segmentation must
        not rename the reference's values (the structures are then matched by name).
        """
        if self.reference is None:
            return None
        grid = read_volume(self.image).grid if grid is None else grid
        table = None if sidecar_label_table(self.reference) is not None else self.label_table
        return align_to_grid(read_segmentation(self.reference, table), grid)


# --------------------------------------------------------------------------- entry points
def read_dataset(path: str | Path) -> list[Case]:
    """The cases of an MSD / nnU-Net v2 folder (with ``dataset.json``) or of a CSV file of pairs.

    Every listed file is checked to exist; a missing one is an :class:`InputError` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        meta = _read_dataset_json(path)
        cases = _msd_cases(path, meta) if _is_msd(meta) else _nnunet_cases(path, meta)
    elif path.suffix.lower() == ".csv":
        cases = _csv_cases(path)
    else:
        raise InputError(path, "not a dataset: give a folder with dataset.json (MSD / nnU-Net) or a .csv of pairs")
    if not cases:
        raise InputError(path, "dataset lists no cases")
    return cases


def dataset_modality(path: str | Path) -> str:
    """The imaging modality of a dataset: "CT", "MR", "US", another name as written, or "unknown".

    Taken from channel 0 of ``channel_names`` (nnU-Net v2) or ``modality`` (MSD) in dataset.json;
    a CSV may carry a ``modality`` column (first row used), else it is "unknown".
    """
    path = Path(path)
    if path.is_dir():
        meta = _read_dataset_json(path)
        channels = meta.get("channel_names") or meta.get("modality") or {}
        if isinstance(channels, Mapping) and channels:
            first = channels.get("0", next(iter(channels.values())))
            return normalise_modality(str(first))
        return "unknown"
    if path.suffix.lower() == ".csv":
        rows = _read_csv_rows(path)
        value = (rows[0].get("modality") or "").strip() if rows else ""
        return normalise_modality(value) if value else "unknown"
    raise InputError(path, "not a dataset: give a folder with dataset.json (MSD / nnU-Net) or a .csv of pairs")


def normalise_modality(name: str) -> str:
    """Map a modality name ("CT", "MRI", "T2", "FLAIR", ...) to "CT", "MR", "US" or itself."""
    key = name.strip().upper().replace("-", "").replace(" ", "")
    if key == "CT":
        return "CT"
    if key in _MR_NAMES or key.startswith("MR"):
        return "MR"
    if key in _US_NAMES:
        return "US"
    return name.strip()


# --------------------------------------------------------------------------- dataset.json folders
def _read_dataset_json(folder: Path) -> dict[str, Any]:
    file = folder / "dataset.json"
    if not file.is_file():
        raise InputError(folder, "no dataset.json: not an MSD / nnU-Net dataset folder "
                                 "(give such a folder, or a .csv with columns image,segmentation)")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(file, f"is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise InputError(file, "must hold a JSON object")
    return meta


def _is_msd(meta: Mapping[str, Any]) -> bool:
    training = meta.get("training")
    return isinstance(training, list) and bool(training) and isinstance(training[0], Mapping)


def _existing(path: Path, listed_in: Path, what: str) -> Path:
    if not path.is_file():
        raise InputError(path, f"{what} listed in {listed_in} is missing")
    return path


def _msd_label_table(labels: Any) -> dict[int, str] | None:
    """MSD ``labels``: value -> name ({"0": "background", "1": "spleen"})."""
    if not isinstance(labels, Mapping):
        return None
    table = {int(v): str(n) for v, n in labels.items() if str(v).strip().isdigit() and int(v) != 0}
    return table or None


def _msd_cases(folder: Path, meta: Mapping[str, Any]) -> list[Case]:
    json_file = folder / "dataset.json"
    table = _msd_label_table(meta.get("labels"))
    cases = []
    for i, entry in enumerate(meta["training"]):
        if "image" not in entry or "label" not in entry:
            raise InputError(json_file, f"training entry {i} needs 'image' and 'label'")
        image = _existing(folder / entry["image"], json_file, "image")
        label = _existing(folder / entry["label"], json_file, "segmentation")
        cases.append(Case(_strip_suffix(image.name), image, label, label_table=table))
    return cases


def _nnunet_label_table(labels: Any) -> dict[int, str] | None:
    """nnU-Net v2 ``labels``: name -> value ({"background": 0, "liver": 1}); region lists are skipped."""
    if not isinstance(labels, Mapping):
        return None
    table = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
            continue  # region-based training lists several values: not one structure
        if int(value) != 0:
            table[int(value)] = str(name)
    return table or None


def _nnunet_cases(folder: Path, meta: Mapping[str, Any]) -> list[Case]:
    json_file = folder / "dataset.json"
    if "channel_names" not in meta and "file_ending" not in meta:
        raise InputError(json_file, "is neither MSD (no 'training' list) nor nnU-Net v2 "
                                    "(no 'channel_names' / 'file_ending')")
    ending = str(meta.get("file_ending", ".nii.gz"))
    table = _nnunet_label_table(meta.get("labels"))
    if isinstance(meta.get("dataset"), Mapping):  # explicit case list (nnU-Net v2 "dataset" key)
        cases = []
        for case_id, entry in meta["dataset"].items():
            images = entry.get("images") or []
            if not images or "label" not in entry:
                raise InputError(json_file, f"dataset entry {case_id!r} needs 'images' and 'label'")
            image = _existing(_resolve(folder, images[0]), json_file, "image")
            label = _existing(_resolve(folder, entry["label"]), json_file, "segmentation")
            cases.append(Case(str(case_id), image, label, label_table=table))
        return cases
    images_dir, labels_dir = folder / "imagesTr", folder / "labelsTr"
    for sub in (images_dir, labels_dir):
        if not sub.is_dir():
            raise InputError(sub, "folder is missing (nnU-Net v2 layout: imagesTr/ and labelsTr/)")
    ids = sorted({p.name[: -len("_0000" + ending)] for p in images_dir.glob(f"*_0000{ending}")}
                 | {p.name[: -len(ending)] for p in labels_dir.glob(f"*{ending}")})
    cases = []
    for case_id in ids:
        image = images_dir / f"{case_id}_0000{ending}"
        label = labels_dir / f"{case_id}{ending}"
        if not image.is_file():
            raise InputError(image, f"image of case {case_id!r} is missing (its segmentation {label.name} exists)")
        if not label.is_file():
            raise InputError(label, f"segmentation of case {case_id!r} is missing (its image {image.name} exists)")
        cases.append(Case(case_id, image, label, label_table=table))
    return cases


def _resolve(base: Path, name: str | Path) -> Path:
    path = Path(name)
    return path if path.is_absolute() else base / path


def _strip_suffix(filename: str) -> str:
    for suffix in IMAGE_SUFFIXES:
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return Path(filename).stem


# --------------------------------------------------------------------------- CSV of pairs
def _read_csv_rows(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise InputError(path, "CSV is empty: it needs a header with columns image,segmentation")
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
            columns = {(c or "").strip().lower() for c in reader.fieldnames}
    except UnicodeDecodeError:
        raise InputError(path, "is not a text CSV file") from None
    missing = [c for c in ("image", "segmentation") if c not in columns]
    if missing:
        raise InputError(path, f"CSV lacks column(s) {', '.join(missing)}: it needs image,segmentation "
                               f"(optional reference, case_id, label); found {', '.join(sorted(columns)) or 'none'}")
    return rows


def _csv_cases(path: Path) -> list[Case]:
    base = path.parent
    cases, seen = [], set()
    for row_number, row in enumerate(_read_csv_rows(path), start=2):  # line 1 is the header
        if not row.get("image") and not row.get("segmentation"):
            continue  # blank line
        for column in ("image", "segmentation"):
            if not row.get(column):
                raise InputError(path, f"line {row_number}: empty '{column}'")
        where = f"{path.name} line {row_number}"
        image = _existing(_resolve(base, row["image"]), where, "image")
        seg = _existing(_resolve(base, row["segmentation"]), where, "segmentation")
        reference = _existing(_resolve(base, row["reference"]), where, "reference") if row.get("reference") else None
        table = read_label_table(_resolve(base, row["label_table"])) if row.get("label_table") else None
        case_id = row.get("case_id") or _strip_suffix(seg.name)
        method = row.get("method") or None
        if (case_id, method) in seen:  # the same case segmented by several methods is not a duplicate
            case_id = f"{case_id}_{row_number}"
        seen.add((case_id, method))
        cases.append(Case(case_id, image, seg, reference, table, row.get("subject") or None, row.get("label") or None,
                          method))
    return cases
