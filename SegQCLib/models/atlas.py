"""Atlas-registration QC: a pseudo ground truth from a labelled atlas registered onto the image.

A reconstruction-type QC model without trained weights, in the spirit of atlas-based QC (reverse
classification accuracy): an atlas subject of :mod:`SegQCLib.data.sources` (Colin27 with AAL or
its brain mask, MNI152 with grey/white matter or its brain mask) is registered onto the image
(SimpleITK, Mattes mutual information, affine, see :func:`SegQCLib.data.algorithmic.registration_transform`)
and the atlas label of the structure is resampled onto the image grid: that is the pGT. The
pseudo-scores are the metrics of the checked mask against the pGT, per axial slice and per volume.

It serves where a pGT is needed and no trained reconstruction model (nnQC) is installed: HERMES
refinement, pGT overlays in Slicer, batch reports. Its accuracy is that of an affine atlas
registration: good for the whole brain (MNI152 brain onto Colin27: DSC 0.93), coarse for small
deep structures. It never uses the image's own labels: an atlas whose image equals the input
image (same grid and voxels) is skipped.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import DataSourceMissing, InputError
from ..qc import DEFAULT_FLAG_THRESHOLD, QCResult
from ..volume import Volume

MODEL_NAME = "atlas-brain-mr"

#: Atlas subjects searched in order for the structure's name: (label, loader of the LabelledSubject).
def _atlas_loaders() -> list[tuple[str, Callable]]:
    from ..data.sources import colin27, mni152

    return [("colin27-aal", lambda: colin27("aal")), ("colin27-brain", lambda: colin27("brain")),
            ("mni152-tissue", lambda: mni152("tissue")), ("mni152-brain", lambda: mni152("brain"))]


def _fingerprint(volume: Volume) -> str:
    """A content hash of a volume (grid + voxels): equal images are recognised, different ones never confused."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(volume.grid).encode())
    digest.update(np.ascontiguousarray(volume.array).tobytes())
    return digest.hexdigest()


class AtlasQC:
    """QC by atlas registration (see the module docstring). ``kind``: ``"affine"`` or ``"rigid"``."""

    kind_of_model = "reconstruction"

    def __init__(self, name: str = MODEL_NAME, kind: str = "affine", atlases: Sequence[str] | None = None):
        self.name = name
        self.kind = kind
        self.atlases = tuple(atlases) if atlases else tuple(label for label, _ in _atlas_loaders())
        self._subjects: dict[str, object] = {}

    def _subject(self, atlas: str):
        if atlas not in self._subjects:
            self._subjects[atlas] = dict(_atlas_loaders())[atlas]()
        return self._subjects[atlas]

    def structures(self) -> list[str]:
        """Every structure name some atlas holds."""
        names: list[str] = []
        for atlas in self.atlases:
            names += [s.name for s in self._subject(atlas).segmentation.segments if s.name not in names]
        return names

    def atlas_for(self, image: Volume, label: str):
        """The first atlas subject holding ``label`` whose image is not ``image`` itself."""
        wanted = label.strip().lower()
        own = _fingerprint(image)
        for atlas in self.atlases:
            try:
                subject = self._subject(atlas)
            except DataSourceMissing:
                continue  # that atlas's package is not installed
            if any(s.name.lower() == wanted for s in subject.segmentation.segments):
                if _fingerprint(subject.image) != own:
                    return subject
        raise InputError(label, f"no atlas other than the image itself holds this structure "
                                f"(atlases: {', '.join(self.atlases)}; e.g. Brain, Hippocampus_L, GreyMatter)")

    def pseudo_ground_truth(self, image: Volume, label: str) -> np.ndarray:
        """The pGT of ``label`` on ``image``'s grid: bool (z, y, x). The registration is cached per
        (atlas, image content) for the process, so later calls on the same image are fast."""
        from ..data.algorithmic import propagate_label, register_onto

        atlas = self.atlas_for(image, label)
        transform = register_onto(atlas, image, _fingerprint(image), self.kind)
        name = next(s.name for s in atlas.segmentation.segments if s.name.lower() == label.strip().lower())
        return propagate_label(atlas, image, name, transform)

    def assess(self, image: Volume, mask: np.ndarray, label: str, *, threshold: float = DEFAULT_FLAG_THRESHOLD,
               all_slices: bool = True) -> QCResult:
        """Per-slice and volume DSC, HD95 (mm) of ``mask`` (bool (z, y, x)) against the atlas pGT."""
        from ..metrics import slice_metrics, volume_metrics

        start = time.perf_counter()
        mask = np.asarray(mask, bool)
        if mask.shape != image.shape:
            raise InputError(image.name, f"mask shape {mask.shape} differs from image shape {image.shape}")
        pgt = self.pseudo_ground_truth(image, label)
        volume = {k: v for k, v in volume_metrics(mask, pgt, image.spacing).items() if k in ("dsc", "hd95", "asd")}
        rows = [{k: row[k] for k in ("index", "dsc", "hd95")} for row in slice_metrics(mask, pgt, image.spacing)]
        return QCResult.from_slice_scores(self.name, label, volume, rows, threshold, pgt=pgt,
                                          runtime_s=time.perf_counter() - start,
                                          extra={"atlas": self.atlas_for(image, label).source, "registration": self.kind})


def load_model(device: str = "cpu") -> AtlasQC:
    """The registered ``atlas-brain-mr`` model (registration runs on the CPU whatever ``device`` is)."""
    del device
    return AtlasQC()
