"""Atlas-registration QC: a pseudo ground truth from a labelled atlas registered onto the image.

A reconstruction-type QC model without trained weights, in the spirit of atlas-based QC (reverse
classification accuracy): an atlas subject of :mod:`SegQCLib.data.sources` (Colin27 with AAL or
its brain mask, MNI152 with grey/white matter or its brain mask) is registered onto the image
(SimpleITK, Mattes mutual information, affine, see :func:`SegQCLib.data.algorithmic.registration_transform`)
and the atlas label of the structure is resampled onto the image grid. The
pseudo-scores are the metrics of the checked mask against the pGT, per axial slice and per volume.

Tissue refinement (on by default): an affine registration carries the atlas's population-average
outline, which spills over sulcal CSF and, near the vertex, over the meninges (MNI152's brain onto
Colin27: 12 % too large in all, 20-40 % in the top slices), or falls short of the image's brain.
So the pGT follows the image's own brain tissue (:func:`brain_tissue_mask`: inside the atlas
brain outline dilated by 2 mm, voxels brighter than the CSF / grey-matter threshold of a 3-class
Otsu of that region, holes filled, largest component): that mask is the pGT of "Brain", and the
propagated label of any other structure is cut to it. That assumes T1 contrast (CSF dark), as the
model's name says. Brain pGT against the truth, 3D DSC / mean DSC of the slices with >= 1 cm^2 of
brain: MNI152 0.948 / 0.887 -> 0.985 / 0.964, Colin27 with skull 0.930 / 0.876 -> 0.952 / 0.928.

It serves where a pGT is needed and no trained reconstruction model (nnQC) is installed: HERMES
refinement, pGT overlays in Slicer, batch reports. Good for the whole brain; for small deep
structures it is as coarse as an affine atlas registration. It never uses the image's own labels: an atlas whose image equals the input
image (same grid and voxels) is skipped.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from ..errors import DataSourceMissing, InputError
from ..qc import DEFAULT_FLAG_THRESHOLD, QCResult
from ..volume import Volume

MODEL_NAME = "atlas-brain-mr"

#: Margin (mm) added around the atlas brain outline before the image's tissue is thresholded in it.
TISSUE_MARGIN_MM = 2.0
#: Name of the whole-brain segment every built-in atlas family has (it gives the tissue envelope).
BRAIN_LABEL = "Brain"

#: Atlas subjects searched in order for the structure's name: (label, loader of the LabelledSubject).
def _atlas_loaders() -> list[tuple[str, Callable]]:
    from ..data.sources import colin27, mni152

    return [("colin27-aal", lambda: colin27("aal")), ("colin27-brain", lambda: colin27("brain")),
            ("mni152-tissue", lambda: mni152("tissue")), ("mni152-brain", lambda: mni152("brain"))]


def _fingerprint(volume: Volume) -> str:
    """A content hash of a volume (grid + voxels): equal images are recognised, different ones never confused.

    The same image read another way must give the same hash: Slicer's reader keeps the file's
    voxel type (int16 for ch2) where ``read_volume`` gives float32, and a grid computed from an
    IJK-to-RAS matrix carries float noise. So voxels are hashed as float32 and the grid rounded
    (spacing and direction to 1e-5, origin to 1e-3 mm); otherwise a Colin27 opened in Slicer was not
    recognised and got its own labels as "pseudo" ground truth.
    """
    grid = volume.grid
    digest = hashlib.blake2b(digest_size=16)
    rounded = lambda values, decimals: (np.round(np.asarray(values, float), decimals) + 0.0).tolist()  # noqa: E731 - +0.0: no -0.0
    canonical = (tuple(int(n) for n in grid.shape), rounded(grid.spacing, 5), rounded(grid.origin, 3),
                 rounded(grid.direction, 5))
    digest.update(repr(canonical).encode())
    digest.update(np.ascontiguousarray(volume.array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def brain_tissue_mask(image: np.ndarray, outline: np.ndarray, spacing: Sequence[float],
                      margin_mm: float = TISSUE_MARGIN_MM) -> np.ndarray:
    """The brain tissue of a T1 image near an (atlas) brain outline: bool (z, y, x).

    Voxels within ``margin_mm`` of ``outline`` whose intensity exceeds the lower threshold of a
    3-class Otsu (CSF < grey < white matter) over that region; enclosed holes (ventricles) filled
    in 3D; the largest connected component kept.

    Args:
        image: (z, y, x) T1 intensities (CSF dark).
        outline: (z, y, x) bool, e.g. the affinely registered atlas brain mask.
        spacing: (z, y, x) voxel size in mm.
        margin_mm: how far outside ``outline`` tissue may reach.

    Returns:
        (z, y, x) bool; ``outline`` itself when the region is empty or flat (no contrast to split).
    """
    from skimage.filters import threshold_multiotsu

    from ..data.algorithmic import dilate_mm

    outline = np.asarray(outline, bool)
    region = dilate_mm(outline, spacing, margin_mm)
    values = np.asarray(image, np.float32)[region]
    if values.size == 0 or np.ptp(values) == 0:
        return outline
    csf_grey = threshold_multiotsu(values, classes=3)[0]
    tissue = ndimage.binary_fill_holes(region & (image > csf_grey))
    labels, count = ndimage.label(tissue)
    if count == 0:
        return outline
    sizes = ndimage.sum_labels(tissue, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


class AtlasQC:
    """QC by atlas registration (see the module docstring).

    ``kind``: ``"affine"`` or ``"rigid"``; ``tissue``: cut the pGT to the image's own brain tissue
    (the default, see the module docstring; False keeps the bare registered atlas label).
    """

    kind_of_model = "reconstruction"

    def __init__(self, name: str = MODEL_NAME, kind: str = "affine", atlases: Sequence[str] | None = None,
                 tissue: bool = True):
        self.name = name
        self.kind = kind
        self.tissue = tissue
        self.atlases = tuple(atlases) if atlases else tuple(label for label, _ in _atlas_loaders())
        self._subjects: dict[str, object] = {}
        self._tissue: dict[str, np.ndarray] = {}  # image fingerprint -> brain_tissue_mask (one image kept)

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

    def _propagated(self, image: Volume, label: str, key: str) -> np.ndarray:
        from ..data.algorithmic import propagate_label, register_onto

        atlas = self.atlas_for(image, label)
        transform = register_onto(atlas, image, key, self.kind)
        name = next(s.name for s in atlas.segmentation.segments if s.name.lower() == label.strip().lower())
        return propagate_label(atlas, image, name, transform)

    def tissue_mask(self, image: Volume, key: str | None = None) -> np.ndarray:
        """:func:`brain_tissue_mask` of ``image`` around the registered atlas brain: bool (z, y, x),
        kept for the last image seen. ``key``: the image's fingerprint, if already computed."""
        key = key or _fingerprint(image)
        if key not in self._tissue:
            outline = self._propagated(image, BRAIN_LABEL, key)
            self._tissue = {key: brain_tissue_mask(image.array, outline, image.spacing)}
        return self._tissue[key]

    def pseudo_ground_truth(self, image: Volume, label: str) -> np.ndarray:
        """The pGT of ``label`` on ``image``'s grid: bool (z, y, x). With ``tissue`` on, the brain's
        pGT is :meth:`tissue_mask` and any other structure's is its atlas label cut to it. The
        registration is cached per (atlas, image content) for the process, so later calls on the
        same image are fast."""
        key = _fingerprint(image)
        if not self.tissue:
            return self._propagated(image, label, key)
        if label.strip().lower() == BRAIN_LABEL.lower():
            return self.tissue_mask(image, key).copy()  # may reach past the atlas outline, by up to the margin
        return self._propagated(image, label, key) & self.tissue_mask(image, key)

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
                                          extra={"atlas": self.atlas_for(image, label).source, "registration": self.kind,
                                                 "tissue_refined": self.tissue})


def load_model(device: str = "cpu") -> AtlasQC:
    """The registered ``atlas-brain-mr`` model (registration runs on the CPU whatever ``device`` is)."""
    del device
    return AtlasQC()
