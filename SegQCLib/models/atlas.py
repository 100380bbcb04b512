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

from ..calibration import annotate_result
from ..domain import assess_domain, card_domain
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


#: Rotated registration starts tried after the centre-of-mass start fails its check.
EXTRA_STARTS = 3
#: A registered brain outline must lie on the head for at least this share of its voxels.
MIN_SHARE_ON_HEAD = 0.9
#: Plausible volume ratio (image brain / atlas brain) of an affine registration between adult heads.
VOLUME_SCALE_RANGE = (0.5, 2.0)
#: Least rank correlation of image and registered atlas inside the brain (see anatomy_correlation):
#: Colin27 onto MNI152 gives 0.63 (also with MNI152's origin moved 55 mm), gamma noise -0.01.
MIN_ANATOMY_CORRELATION = 0.3


def head_mask(image: Volume) -> np.ndarray:
    """The head (or body) in a T1 image: voxels above the Otsu threshold of the image, holes filled
    slice by slice along each axis' union (enclosed dark CSF and air cavities count as head):
    bool (z, y, x)."""
    from skimage.filters import threshold_otsu

    array = np.asarray(image.array, np.float32)
    sample = array.ravel()[:: max(1, array.size // 2_000_000)]
    if np.ptp(sample) == 0:
        return np.zeros(array.shape, bool)
    fg = array > threshold_otsu(sample)
    return ndimage.binary_fill_holes(ndimage.binary_closing(fg, iterations=2))


def anatomy_correlation(image: Volume, atlas_image: Volume, outline: np.ndarray, transform,
                        samples: int = 20_000) -> float:
    """Spearman correlation of the image with the registered atlas image over (a random sample of) the
    registered brain ``outline``: T1 onto T1, registered right, grey and white matter line up; a
    misregistration or an image that is no brain T1 gives near 0. Rank-based, so any scanner's
    intensity scale and offset give the same value."""
    import SimpleITK as sitk
    from scipy import stats

    from ..data.algorithmic import _as_sitk

    idx = np.argwhere(outline)
    if len(idx) < 100:
        return 0.0
    if len(idx) > samples:
        idx = idx[np.random.default_rng(0).choice(len(idx), samples, replace=False)]
    warped = sitk.GetArrayFromImage(sitk.Resample(_as_sitk(atlas_image, atlas_image.array.astype(np.float32)),
                                                  _as_sitk(image, np.zeros(image.shape, np.float32)), transform,
                                                  sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    own, atlas_values = image.array[tuple(idx.T)], warped[tuple(idx.T)]
    if np.ptp(own) == 0 or np.ptp(atlas_values) == 0:
        return 0.0
    return float(stats.spearmanr(own, atlas_values)[0])


def registration_check(image: Volume, outline: np.ndarray, transform, atlas_image: Volume) -> str | None:
    """Why a registered atlas brain ``outline`` (bool (z, y, x) on ``image``'s grid) cannot be trusted,
    or None when it can: it must be non-empty, lie on the image's head (:func:`head_mask`) for at least
    :data:`MIN_SHARE_ON_HEAD` of its voxels, the registration must scale volumes plausibly
    (:data:`VOLUME_SCALE_RANGE`, measured at the outline's centre), and the anatomy inside it must
    match the atlas's (:func:`anatomy_correlation` at least :data:`MIN_ANATOMY_CORRELATION`)."""
    from ..data.algorithmic import volume_scale

    if not outline.any():
        return "the registered brain falls outside the image"
    share = float((outline & head_mask(image)).sum() / outline.sum())
    if share < MIN_SHARE_ON_HEAD:
        return f"only {100 * share:.0f} % of the registered brain lies on the head"
    centre = image.grid.index_to_lps(np.argwhere(outline).mean(axis=0))
    scale = 1.0 / max(volume_scale(transform, centre), 1e-9)  # the transform maps image -> atlas points
    if not VOLUME_SCALE_RANGE[0] <= scale <= VOLUME_SCALE_RANGE[1]:
        return f"the registration scales the brain by {scale:.2f} in volume"
    r = anatomy_correlation(image, atlas_image, outline, transform)
    if r < MIN_ANATOMY_CORRELATION:
        return f"the image inside the registered brain does not look like the atlas's (rank correlation {r:.2f})"
    return None


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
        self._accepted: dict[tuple[str, str], int] = {}  # (atlas, image fingerprint) -> registration start
        self.calibration = None  # the card's Calibration (intervals), set by load_model
        self.domain = None  # the card's domain (SegQCLib.domain.card_domain), set by load_model

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
        from ..data.algorithmic import propagate_label

        atlas = self.atlas_for(image, label)
        name = next(s.name for s in atlas.segmentation.segments if s.name.lower() == label.strip().lower())
        return propagate_label(atlas, image, name, self._checked_transform(atlas, image, key))

    def _checked_transform(self, atlas, image: Volume, key: str):
        """The registration of ``atlas`` onto ``image`` that passes :func:`registration_check`: from
        the aligned centres of mass first, then from up to :data:`EXTRA_STARTS` rotated starts; the
        accepted start is kept per (atlas, image). Raises :class:`InputError` naming the image when
        none passes: a pGT from a failed registration would score a perfect mask near 0."""
        from ..data.algorithmic import propagate_label, register_onto

        cache_key = (atlas.source, key)
        if cache_key in self._accepted:
            return register_onto(atlas, image, key, self.kind, start=self._accepted[cache_key])
        brain = next((s.name for s in atlas.segmentation.segments if s.name.lower() == BRAIN_LABEL.lower()), None)
        problems = []
        for start in range(1 + EXTRA_STARTS):
            transform = register_onto(atlas, image, key, self.kind, start=start)
            if brain is None:  # an atlas without a brain outline cannot be checked this way
                self._accepted[cache_key] = start
                return transform
            problem = registration_check(image, propagate_label(atlas, image, brain, transform), transform,
                                         atlas.image)
            if problem is None:
                self._accepted[cache_key] = start
                return transform
            problems.append(problem)
        raise InputError(image.name or "image", f"the atlas ({atlas.source}) could not be registered onto it "
                                                f"({problems[0]}; {1 + EXTRA_STARTS} starts tried): no pGT can be "
                                                "trusted, so it is not scored (is it a brain T1?)")

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
        from ..fingerprint import slice_axis
        from ..metrics import slice_metrics, volume_metrics

        start = time.perf_counter()
        mask = np.asarray(mask, bool)
        if mask.shape != image.shape:
            raise InputError(image.name, f"mask shape {mask.shape} differs from image shape {image.shape}")
        domain = assess_domain(self.domain, image, label)
        pgt = self.pseudo_ground_truth(image, label)
        volume = {k: v for k, v in volume_metrics(mask, pgt, image.spacing).items() if k in ("dsc", "hd95", "asd")}
        axis = slice_axis(image.grid)
        rows = [{k: row[k] for k in ("index", "dsc", "hd95")}
                for row in slice_metrics(mask, pgt, image.spacing, axis=axis)]
        result = QCResult.from_slice_scores(self.name, label, volume, rows, threshold, pgt=pgt,
                                            extra={"slice_axis": axis, "atlas": self.atlas_for(image, label).source,
                                                   "registration": self.kind, "tissue_refined": self.tissue,
                                                   "domain": domain})
        # the calibration was measured on whole-brain masks: other structures are outside it
        calibrated = domain["in"] and label.strip().lower() == BRAIN_LABEL.lower()
        annotate_result(result, self.calibration, "in" if calibrated else "out")
        result.runtime_s = time.perf_counter() - start
        return result


def load_model(device: str = "cpu") -> AtlasQC:
    """The registered ``atlas-brain-mr`` model (registration runs on the CPU whatever ``device`` is), with the
    interval calibration of its card ``atlas-brain-mr.json`` when one is installed."""
    from ..calibration import Calibration
    from . import builtin_card

    del device
    model = AtlasQC()
    card = builtin_card(MODEL_NAME, strict=True)
    if card:
        try:
            model.calibration = Calibration.from_dict(card.get("calibration"))
        except (KeyError, ValueError, TypeError) as err:
            raise InputError(f"{MODEL_NAME}.json", f"not a readable atlas model card ({err})") from None
        model.domain = card_domain(card)
    return model
