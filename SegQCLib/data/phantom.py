"""A procedural abdominal CT phantom: many labelled "subjects" for the CT path, demos and tests.

No package ships real abdominal CT with organ masks (DATA.md), so this draws one: an elliptical
body (fat rim, muscle wall) with a spine, liver, spleen and two kidneys, each organ a smooth blob
whose size, place and shape vary from subject to subject. HU values are typical of portal-venous
CT; the image is made at twice the resolution and averaged down (partial volume), blurred slightly
and given Gaussian noise. The labels are exact. It is synthetic: a model trained or measured on it
must say so in its card, and real CT will look different.

:func:`ct_phantom` returns one subject; :func:`write_phantom_dataset` writes an MSD folder
(``dataset.json``, ``imagesTr``, ``labelsTr``) that ``segqc train sentinel --dataset`` reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..io import Segmentation, write_segmentation, write_volume
from ..volume import Volume

#: Label values and names of the phantom's organs.
ORGANS = {1: "liver", 2: "spleen", 3: "left kidney", 4: "right kidney"}
#: Mean HU of each tissue (portal-venous phase).
HU = {"air": -1000.0, "fat": -100.0, "muscle": 45.0, "bone": 500.0, "liver": 100.0, "spleen": 110.0,
      "kidney": 160.0}


def _blob(shape: tuple[int, int, int], spacing: tuple[float, float, float], centre_mm: np.ndarray,
          radii_mm: np.ndarray, rng: np.random.Generator, roughness: float) -> np.ndarray:
    """A smooth random blob: an ellipsoid (centre, radii in mm, (z, y, x)) whose surface is pushed
    in and out by a smooth random field of relative amplitude ``roughness``."""
    from scipy import ndimage

    zz, yy, xx = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    r = np.sqrt(((zz - centre_mm[0]) / radii_mm[0]) ** 2 + ((yy - centre_mm[1]) / radii_mm[1]) ** 2
                + ((xx - centre_mm[2]) / radii_mm[2]) ** 2)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=[max(1.0, 12.0 / s) for s in spacing])
    field /= field.std() + 1e-9
    return r < 1.0 + roughness * field


def ct_phantom(seed: int, shape: tuple[int, int, int] = (40, 96, 96),
               spacing: tuple[float, float, float] = (5.0, 4.0, 4.0)) -> tuple[Volume, Segmentation]:
    """One phantom subject: a CT Volume (HU, float32, (z, y, x)) and its organ labels (:data:`ORGANS`).

    ``seed`` draws the subject (body size, organ sizes, places and shapes, noise); ``shape`` and
    ``spacing`` ((z, y, x) voxels and mm) set the grid. The patient's left is the image's +x side.
    """
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    fine = tuple(2 * n for n in shape)
    fine_spacing = tuple(s / 2 for s in spacing)
    extent = np.asarray(shape) * np.asarray(spacing)
    centre = extent / 2
    body_radii = np.array([10 * extent[0], rng.uniform(0.32, 0.40) * extent[1], rng.uniform(0.40, 0.46) * extent[2]])

    def jitter(mm: float) -> np.ndarray:
        return rng.uniform(-mm, mm, 3)

    body = _blob(fine, fine_spacing, centre, body_radii, rng, 0.01)
    inner = _blob(fine, fine_spacing, centre, body_radii - [0, 14, 14], rng, 0.02)  # inside the fat rim and wall
    cavity = _blob(fine, fine_spacing, centre, body_radii - [0, 22, 22], rng, 0.02)
    spine_c = centre + [0, 0.55 * body_radii[1], 0] + jitter(3) * [0, 1, 1]
    spine = _blob(fine, fine_spacing, spine_c, np.array([10 * extent[0], 14, 14]), rng, 0.03)
    scale = rng.uniform(0.85, 1.15)
    organs = {
        "liver": (centre + [0, -0.12 * body_radii[1], -0.42 * body_radii[2]] + jitter(8),
                  scale * np.array([0.30 * extent[0], 0.50 * body_radii[1], 0.38 * body_radii[2]]), 0.10),
        "spleen": (centre + [0, 0.25 * body_radii[1], 0.55 * body_radii[2]] + jitter(8),
                   rng.uniform(0.8, 1.2) * np.array([0.18 * extent[0], 0.28 * body_radii[1], 0.16 * body_radii[2]]), 0.12),
        "left kidney": (centre + [0, 0.40 * body_radii[1], 0.36 * body_radii[2]] + jitter(5),
                        rng.uniform(0.85, 1.15) * np.array([0.18 * extent[0], 0.20 * body_radii[1], 0.12 * body_radii[2]]), 0.08),
        "right kidney": (centre + [0, 0.40 * body_radii[1], -0.36 * body_radii[2]] + jitter(5),
                        rng.uniform(0.85, 1.15) * np.array([0.18 * extent[0], 0.20 * body_radii[1], 0.12 * body_radii[2]]), 0.08),
    }
    hu = np.full(fine, HU["air"], np.float32)
    hu[body] = HU["fat"]
    hu[inner] = HU["muscle"]
    hu[cavity] = HU["fat"] + 40.0 * ndimage.gaussian_filter(rng.standard_normal(fine), 2.0)[cavity]  # bowel/fat mix
    hu[spine] = HU["bone"]
    labels_fine = np.zeros(fine, np.uint8)
    taken = spine.copy()
    # kidneys and spleen first: the liver, drawn last, fills around them instead of swallowing them
    for value, name in sorted(ORGANS.items(), key=lambda item: item[1] == "liver"):
        centre_mm, radii, roughness = organs[name]
        mask = _blob(fine, fine_spacing, centre_mm, radii, rng, roughness) & cavity & ~taken
        taken |= mask
        labels_fine[mask] = value
        tissue = "kidney" if "kidney" in name else name
        hu[mask] = HU[tissue] + rng.normal(0, 8)
    # partial volume: average 2x2x2 blocks; labels by majority of the block
    image = hu.reshape(shape[0], 2, shape[1], 2, shape[2], 2).mean(axis=(1, 3, 5))
    image = ndimage.gaussian_filter(image, 0.6) + rng.normal(0, rng.uniform(8, 20), shape)
    blocks = labels_fine.reshape(shape[0], 2, shape[1], 2, shape[2], 2).transpose(0, 2, 4, 1, 3, 5).reshape(*shape, 8)
    counts = np.stack([(blocks == v).sum(-1) for v in range(len(ORGANS) + 1)], axis=-1)
    labels = counts.argmax(-1).astype(np.uint8)
    volume = Volume.from_array(image.astype(np.float32), spacing=spacing, name=f"phantom{seed}")
    return volume, Segmentation.from_labelmap(labels, volume.grid, ORGANS, name=f"phantom{seed}")


def write_phantom_dataset(folder: str | Path, n_subjects: int, seed: int = 0,
                          shape: tuple[int, int, int] = (40, 96, 96),
                          spacing: tuple[float, float, float] = (5.0, 4.0, 4.0)) -> Path:
    """Write ``n_subjects`` phantom subjects as an MSD folder (CT, labels :data:`ORGANS`); returns it.

    Subject ``i`` is ``ct_phantom(seed * 10_000 + i)``; files ``imagesTr/phantom<seed>_<i>.nii.gz``
    and ``labelsTr/phantom<seed>_<i>.nii.gz`` (case ids differ between seeds, as subjects do). An
    existing folder is refused (nothing is overwritten).
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        from ..errors import InputError

        raise InputError(folder, "exists and is not empty: give a new folder for the phantom dataset")
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(exist_ok=True)
    training = []
    for i in range(n_subjects):
        image, labels = ct_phantom(seed * 10_000 + i, shape, spacing)
        case = f"phantom{seed}_{i:03d}"
        write_volume(image, folder / "imagesTr" / f"{case}.nii.gz")
        write_segmentation(labels, folder / "labelsTr" / f"{case}.nii.gz")
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    meta = {"name": "SegQC CT phantom", "description": "procedural abdominal CT phantom (SegQCLib.data.phantom)",
            "modality": {"0": "CT"}, "labels": {"0": "background", **{str(v): n for v, n in ORGANS.items()}},
            "numTraining": n_subjects, "training": training}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder
