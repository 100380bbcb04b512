"""A model's domain (what it was trained on) and whether an input lies in it.

A QC model trained on brain T1 MRI scores a CT, a structure it never saw, or an image of another
contrast as confidently as its own data, and wrongly. Each model card says what it knows;
:func:`card_domain` reads that from the keys cards already hold (Sentinel ``config.modality`` and
``trained_structures``, nnQC ``fingerprint`` and ``config.structures``) plus the card's ``domain``
entry (the training image's intensity profile, :func:`domain_entry`), and :func:`check_domain` says
whether an image and structure fit it, with the reasons when not. Every model's ``assess`` puts the
answer in ``result.extra["domain"]`` (:func:`assess_domain`), the one source of truth: the
calibrated interval's ``domain`` follows it, the CLI and Slicer print its reasons, and ``segqc qc``
without ``--model`` picks a model whose domain fits (:func:`SegQCLib.qc.choose_model`).

Modality without metadata: a CT is in Hounsfield units, with air near -1000 HU; an MR has no
negative values of that size whatever its (arbitrary) scale. Intensity shape, invariant to MR's
arbitrary scale and offset: the spread of the image's foreground (voxels above its Otsu threshold),
``IQR / (p99 - p1)``: Colin27 T1 0.27 with its skull, MNI152 0.34, a brain crop 0.5, our CT phantom
0.06 (soft tissue is one narrow peak). Pure NumPy (+ scikit-image's Otsu).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputError
from .volume import Volume

#: Share of voxels below :data:`AIR_HU` that makes an image a CT (an MR never goes that negative).
CT_AIR_SHARE = 0.02
AIR_HU = -500.0
#: An image's foreground spread may be this factor below or above the training image's.
SPREAD_FACTOR = 2.5
#: Voxel spacing may be this factor finer or coarser than the training images'.
SPACING_FACTOR = 3.0
_SAMPLE = 400_000  # voxels used for the intensity statistics (a strided sample of big volumes)


def _sample(array: np.ndarray) -> np.ndarray:
    flat = np.asarray(array).ravel()
    step = max(1, flat.size // _SAMPLE)
    return flat[::step].astype(np.float64, copy=False)


def check_informative(image: Volume) -> None:
    """Raise :class:`InputError` naming the image when it holds no finite voxel or one value only
    (an empty or blank image: nothing a QC model could read)."""
    values = np.asarray(image.array)
    finite = np.isfinite(values) if np.issubdtype(values.dtype, np.floating) else np.ones(values.shape, bool)
    if not finite.any():
        raise InputError(image.name or "image", "image holds no finite voxel (all NaN or infinite)")
    lo, hi = values[finite].min(), values[finite].max()
    if lo == hi:
        raise InputError(image.name or "image", f"image is blank: every voxel is {float(lo):g}, nothing to score")


def guess_modality(array: np.ndarray) -> str | None:
    """``"CT"`` when at least :data:`CT_AIR_SHARE` of the voxels are below -500 (air in HU),
    ``"MR"`` when the image is non-negative (up to 1 % of the range), None otherwise (e.g. a
    z-scored MR: nothing can be said)."""
    values = _sample(array)
    if (values < AIR_HU).mean() >= CT_AIR_SHARE:
        return "CT"
    lo, hi = float(values.min()), float(values.max())
    return "MR" if lo >= -0.01 * max(abs(hi), 1e-12) else None


def foreground_spread(array: np.ndarray) -> float:
    """``IQR / (p99 - p1)`` of the voxels above the image's Otsu threshold: the shape of its
    intensity histogram, unchanged by any scale and offset (NaN for a flat image)."""
    from skimage.filters import threshold_otsu

    values = _sample(array)
    if values.min() == values.max():
        return float("nan")
    fg = values[values > threshold_otsu(values)]
    p1, q1, q3, p99 = np.percentile(fg, [1, 25, 75, 99]) if fg.size else (0.0, 0.0, 0.0, 0.0)
    return float((q3 - q1) / (p99 - p1)) if p99 > p1 else float("nan")


def domain_entry(image: Volume, source: str) -> dict[str, Any]:
    """The card's ``domain`` entry for a model trained on ``image``: its intensity profile
    (:func:`foreground_spread`, foreground percentiles as a record) and spacing. ``source`` says
    which image it was measured on."""
    from skimage.filters import threshold_otsu

    values = _sample(image.array)
    fg = values[values > threshold_otsu(values)]
    return {"source": source, "modality": guess_modality(image.array),
            "spacing_mm": [round(float(s), 4) for s in image.spacing],
            "intensity": {"foreground_spread": round(foreground_spread(image.array), 4),
                          "foreground_percentiles": {str(p): round(float(v), 3) for p, v in
                                                     zip((1, 25, 50, 75, 99), np.percentile(fg, [1, 25, 50, 75, 99]))}}}


def card_domain(card: dict[str, Any]) -> dict[str, Any]:
    """A model's domain from its card: ``modality``, ``structures`` (None: any), ``spacing_mm``
    (training spacing, (z, y, x) mm), ``intensity`` (see :func:`domain_entry`). The card's own
    ``domain`` entry comes first; the rest is read from the keys cards hold (``config.modality``,
    ``trained_structures``, ``config.structures``, ``fingerprint``)."""
    domain = dict(card.get("domain") or {})
    config = card.get("config") or {}
    fingerprint = card.get("fingerprint") or {}
    if not domain.get("modality"):
        domain["modality"] = config.get("modality") or fingerprint.get("modality")
    if not domain.get("structures"):
        domain["structures"] = (card.get("trained_structures") or config.get("structures")
                                or list((fingerprint.get("labels") or {}).values()) or None)
    if not domain.get("spacing_mm") and fingerprint.get("spacing"):
        domain["spacing_mm"] = list(fingerprint["spacing"])
    return domain


def check_domain(card_domain: dict[str, Any] | None, image: Volume, label: str | None) -> dict[str, Any]:
    """Whether ``image`` and the structure ``label`` (None: not checked) lie in a model's domain
    (:func:`card_domain`). Returns ``{"in": bool, "reasons": [text, ...]}`` (one reason per
    failed check: modality, intensity histogram, spacing, structure); a domain of None is "in"."""
    reasons: list[str] = []
    domain = card_domain or {}
    modality = (domain.get("modality") or "").upper() or None
    guessed = guess_modality(image.array)
    if modality and guessed and guessed != modality:
        why = ("looks like a CT (air near -1000 HU)" if guessed == "CT" else "looks like an MR (no negative intensities)")
        reasons.append(f"image {why}; the model was trained on {modality}")
    spread = (domain.get("intensity") or {}).get("foreground_spread")
    if spread and not (guessed == "CT" and modality != "CT"):  # a CT into an MR model is said already
        own = foreground_spread(image.array)
        if np.isfinite(own) and not spread / SPREAD_FACTOR <= own <= spread * SPREAD_FACTOR:
            reasons.append(f"intensity histogram far from training (foreground spread {own:.2f}, training "
                           f"{spread:.2f}; within x{SPREAD_FACTOR:g} is in domain)")
    trained = domain.get("spacing_mm")
    if trained:
        lo, hi = min(trained) / SPACING_FACTOR, max(trained) * SPACING_FACTOR
        if not all(lo <= s <= hi for s in image.spacing):
            reasons.append("voxel spacing " + " x ".join(f"{s:g}" for s in image.spacing)
                           + f" mm outside the trained range {lo:.2g}-{hi:.2g} mm")
    structures: Sequence[str] | None = domain.get("structures")
    if label is not None and structures and label.strip().lower() not in {s.lower() for s in structures}:
        reasons.append(f"structure '{label}' was never in its training ({len(structures)} known, e.g. "
                       + ", ".join(list(structures)[:3]) + ")")
    return {"in": not reasons, "reasons": reasons}


def assess_domain(card_domain: dict[str, Any] | None, image: Volume, label: str) -> dict[str, Any]:
    """What a model's ``assess`` calls first: :func:`check_informative` (a blank image is an error),
    then :func:`check_domain` for ``result.extra["domain"]``."""
    check_informative(image)
    return check_domain(card_domain, image, label)


def domain_warning(model: str, domain: dict[str, Any] | None) -> str | None:
    """One line for the CLI and Slicer when an input is outside ``model``'s domain, else None."""
    if not domain or domain.get("in", True):
        return None
    return f"warning: outside {model}'s domain: " + "; ".join(domain.get("reasons") or ["unknown reason"])
