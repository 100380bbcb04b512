"""What ``segqc review`` opens: an image with segmentations, a Slicer scene, a batch QC folder, the demo.

Everything here is read and checked with :mod:`SegQCLib` *before* the scene is touched, so a bad file
gives one :class:`SegQCLib.errors.InputError` naming it and leaves the scene as it was.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: Colin27 structures of the demo: (name, DSC band of its degradation (one of SegQCLib.degrade.DSC_BANDS),
#: seed). The first is the one selected at start: "Brain" (Colin27's ch2bet mask), the structure the pGT
#: models can score on Colin27 without using Colin27's own labels (atlas-brain-mr takes MNI152's brain,
#: nnqc-Brain is trained for it). The AAL structures are for sentinel-brain-mr (any named structure)
#: and give the batch table a spread of good and bad segmentations.
DEMO_STRUCTURES = (("Brain", (0.5, 0.75), 4), ("Hippocampus_L", (0.5, 0.75), 0), ("Hippocampus_R", (0.75, 0.95), 1),
                   ("Amygdala_L", (0.25, 0.5), 2), ("Thalamus_L", (0.75, 0.95), 3))


@dataclass
class CheckedSegmentation:
    """A segmentation file read and put on the image grid: ``masks`` name -> bool (z, y, x)."""

    path: str
    name: str
    masks: dict[str, np.ndarray]
    colors: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def check_image(path: str | Path):
    """The image at ``path`` as a :class:`SegQCLib.volume.Volume` (raises InputError naming the file)."""
    from SegQCLib.io import read_volume

    return read_volume(path)


def check_segmentation(path: str | Path, grid, name: str | None = None) -> CheckedSegmentation:
    """Read a label map / mask / ``.seg.nrrd`` at ``path`` and put it on ``grid`` (a
    :class:`SegQCLib.volume.Grid`); a grid that does not match is an InputError naming the file."""
    from SegQCLib.io import align_to_grid, read_segmentation

    seg = align_to_grid(read_segmentation(path), grid)
    masks, colors = {}, {}
    for segment in seg.segments:
        masks[segment.name] = seg.layers[segment.layer] == segment.value
        if segment.color is not None:
            colors[segment.name] = tuple(segment.color)
    stem = Path(path).name.split(".")[0] or Path(path).name
    return CheckedSegmentation(str(path), name or stem, masks, colors)


def demo_case():
    """(image path, CheckedSegmentation) of the demo: Colin27 with degraded AAL structures
    (:data:`DEMO_STRUCTURES`), seeded, so every run shows the same case."""
    from SegQCLib.data.sources import colin27
    from SegQCLib.degrade import degrade_to_band

    subject = colin27("aal")
    brain = colin27("brain").segmentation  # for the one-structure models (nnqc-Brain)
    masks = {}
    for structure, band, seed in DEMO_STRUCTURES:
        source = brain if structure == "Brain" else subject.segmentation
        truth = source.mask(structure)
        masks[structure] = degrade_to_band(truth.astype(np.uint8), band, seed=seed)[0] > 0
    # fixed colours, none green: green is the pGT outline's
    colors = {"Brain": (0.95, 0.85, 0.3), "Hippocampus_L": (0.8, 0.3, 0.8), "Hippocampus_R": (0.3, 0.5, 0.9),
              "Amygdala_L": (0.9, 0.4, 0.3), "Thalamus_L": (0.6, 0.4, 0.9)}
    return subject.image.name, CheckedSegmentation("demo", "Colin27 degraded", masks, colors)


@dataclass
class QCCase:
    """One row of a ``segqc batch`` output folder's ``results.csv`` (paths made absolute)."""

    case_id: str
    structure: str
    score: float
    flagged: int
    worst_slice: int | None
    image: str
    segmentation: str
    pgt: str
    status: str

    def row(self, index: int) -> dict:
        return {"index": index, "case": self.case_id, "structure": self.structure,
                "score": None if math.isnan(self.score) else round(self.score, 4), "flagged": self.flagged,
                "worst": self.worst_slice, "status": self.status}


def read_qc_dir(folder: str | Path) -> list[QCCase]:
    """The cases of a ``segqc batch`` output folder, worst first (errors last)."""
    from SegQCLib.batch import RESULTS_FILE
    from SegQCLib.errors import InputError

    folder = Path(folder)
    results = folder / RESULTS_FILE
    if not results.is_file():
        raise InputError(folder, f"has no {RESULTS_FILE}: not an output folder of `segqc batch`")
    with results.open(newline="") as handle:  # plain csv: the journal's columns are a stable contract
        rows = list(csv.DictReader(handle))

    def absolute(value) -> str:
        if not value:
            return ""
        path = Path(str(value))
        return str(path if path.is_absolute() else folder / path)

    def number(value, kind=float):
        try:
            return kind(float(value))
        except (TypeError, ValueError):
            return None

    cases = []
    for row in rows:
        score = number(row.get("pred_dsc"))
        cases.append(QCCase(str(row.get("case_id", "")), str(row.get("structure", "")),
                            math.nan if score is None else score, number(row.get("n_flagged"), int) or 0,
                            number(row.get("worst_slice"), int), absolute(row.get("image")),
                            absolute(row.get("segmentation")), absolute(row.get("pgt")),
                            str(row.get("status", "ok"))))
    cases.sort(key=lambda c: (math.isnan(c.score), c.score))
    return cases
