"""Prompts of a prompt-based segmenter, the initial ones and those HERMES derives from a pGT.

All in pixel coordinates of one axial slice (y, x). A box is ``(x0, y0, x1, y1)`` with inclusive
corners (SAM's convention: x first). Points are ``(y, x, positive)``. Scribbles are an int8 map of
the slice: 1 foreground, 2 background, 0 unmarked.

Strategies (HERMES, Section "Prompt refinement"): ``box`` - the pGT's bounding box padded by 10 px;
``scribbles`` - the pGT's skeleton as foreground and a ring outside it as background; ``clicks`` -
16 clicks on the convex hull of the pGT boundary. Every strategy adds positive/negative clicks in
the error regions E = FP u FN of the current mask against the pGT.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

STRATEGIES = ("box", "scribbles", "clicks")
BOX_PAD_PX = 10
HULL_CLICKS = 16


@dataclass
class Prompts:
    """Prompts for one slice (see the module docstring for conventions)."""

    box: tuple[int, int, int, int] | None = None
    points: list[tuple[int, int, bool]] = field(default_factory=list)
    scribbles: np.ndarray | None = None

    def to_json_dict(self) -> dict:
        """Box and points as lists; scribbles as pixel counts (the map itself is kept in memory)."""
        out: dict = {"box": list(self.box) if self.box else None,
                     "points": [[int(y), int(x), bool(p)] for y, x, p in self.points]}
        if self.scribbles is not None:
            out["scribbles"] = {"foreground_px": int((self.scribbles == 1).sum()),
                                "background_px": int((self.scribbles == 2).sum())}
        return out


# --------------------------------------------------------------------------- initial prompts (paper)
def whole_image_box(shape: tuple[int, int]) -> Prompts:
    """A box covering the whole slice."""
    return Prompts(box=(0, 0, shape[1] - 1, shape[0] - 1))


def random_clicks(shape: tuple[int, int], rng: np.random.Generator, n: int = 5) -> Prompts:
    """``n`` positive clicks at random pixels (no knowledge of the structure, as the paper's start)."""
    return Prompts(points=[(int(rng.integers(shape[0])), int(rng.integers(shape[1])), True) for _ in range(n)])


def random_scribbles(shape: tuple[int, int], rng: np.random.Generator, n: int = 3, length: int = 20) -> Prompts:
    """``n`` random straight foreground strokes of ``length`` px and a background frame on the border."""
    scribbles = np.zeros(shape, np.int8)
    scribbles[[0, -1], :] = 2
    scribbles[:, [0, -1]] = 2
    for _ in range(n):
        y, x = rng.integers(shape[0]), rng.integers(shape[1])
        angle = rng.uniform(0, np.pi)
        t = np.arange(length)
        ys = np.clip((y + t * np.sin(angle)).astype(int), 0, shape[0] - 1)
        xs = np.clip((x + t * np.cos(angle)).astype(int), 0, shape[1] - 1)
        scribbles[ys, xs] = 1
    return Prompts(scribbles=scribbles)


def initial_prompts(strategy: str, shape: tuple[int, int], rng: np.random.Generator) -> Prompts:
    """The paper's starting prompts: whole-image box, random scribbles or random clicks."""
    _check_strategy(strategy)
    if strategy == "box":
        return whole_image_box(shape)
    if strategy == "scribbles":
        return random_scribbles(shape, rng)
    return random_clicks(shape, rng)


# --------------------------------------------------------------------------- prompts from a pGT
def box_from_pgt(pgt: np.ndarray, pad: int = BOX_PAD_PX) -> tuple[int, int, int, int] | None:
    """Bounding box of the pGT (bool (y, x)) padded by ``pad`` px and clipped to the slice; None if empty."""
    ys, xs = np.nonzero(pgt)
    if ys.size == 0:
        return None
    h, w = pgt.shape
    return (max(int(xs.min()) - pad, 0), max(int(ys.min()) - pad, 0),
            min(int(xs.max()) + pad, w - 1), min(int(ys.max()) + pad, h - 1))


def scribbles_from_pgt(pgt: np.ndarray, inner_px: int = 5, outer_px: int = 10) -> np.ndarray:
    """Foreground: the skeleton of the pGT; background: a ring ``inner_px``..``outer_px`` outside it."""
    from skimage.morphology import skeletonize

    scribbles = np.zeros(pgt.shape, np.int8)
    if not pgt.any():
        return scribbles
    near = ndi.binary_dilation(pgt, iterations=inner_px)
    far = ndi.binary_dilation(pgt, iterations=outer_px)
    scribbles[far & ~near] = 2
    scribbles[skeletonize(pgt)] = 1
    return scribbles


def hull_clicks(pgt: np.ndarray, n: int = HULL_CLICKS) -> list[tuple[int, int, bool]]:
    """``n`` positive clicks evenly spaced (by arc length) along the convex hull of the pGT boundary,
    each moved to the nearest pGT pixel so it lies on the structure."""
    from scipy.spatial import ConvexHull, QhullError

    points = np.argwhere(pgt & ~ndi.binary_erosion(pgt))
    if len(points) < 3:
        return [(int(y), int(x), True) for y, x in points]
    try:
        hull = points[ConvexHull(points).vertices].astype(float)
    except QhullError:  # collinear boundary (a one-pixel-wide line)
        return [(int(y), int(x), True) for y, x in points[np.linspace(0, len(points) - 1, min(n, len(points))).astype(int)]]
    closed = np.vstack([hull, hull[:1]])
    seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    targets = np.linspace(0.0, arc[-1], n, endpoint=False)
    clicks = []
    for t in targets:
        i = min(int(np.searchsorted(arc, t, side="right")) - 1, len(seg) - 1)
        frac = (t - arc[i]) / seg[i] if seg[i] > 0 else 0.0
        y, x = closed[i] + frac * (closed[i + 1] - closed[i])
        nearest = points[np.argmin((points[:, 0] - y) ** 2 + (points[:, 1] - x) ** 2)]
        clicks.append((int(nearest[0]), int(nearest[1]), True))
    return clicks


def error_clicks(mask: np.ndarray, pgt: np.ndarray, max_clicks: int = 8) -> list[tuple[int, int, bool]]:
    """Clicks in the error regions of ``mask`` against ``pgt`` (bool (y, x)): positive in false-negative
    components, negative in false-positive ones, each at the component's innermost pixel (largest
    distance to its border), largest components first."""
    clicks: list[tuple[int, int, float, bool]] = []
    for region, positive in ((pgt & ~mask, True), (mask & ~pgt, False)):
        labels, n = ndi.label(region)
        if n == 0:
            continue
        depth = ndi.distance_transform_edt(region)
        for component in range(1, n + 1):
            inside = labels == component
            flat = np.argmax(np.where(inside, depth, -1.0))
            y, x = np.unravel_index(flat, region.shape)
            clicks.append((int(y), int(x), float(inside.sum()), positive))
    clicks.sort(key=lambda c: -c[2])
    return [(y, x, positive) for y, x, _, positive in clicks[:max_clicks]]


def prompts_from_pgt(strategy: str, pgt: np.ndarray, mask: np.ndarray | None = None) -> Prompts:
    """Refined prompts for ``strategy`` from the pGT and the current mask (both bool (y, x))."""
    _check_strategy(strategy)
    errors = error_clicks(mask, pgt) if mask is not None else []
    if strategy == "box":
        return Prompts(box=box_from_pgt(pgt), points=errors)
    if strategy == "scribbles":
        return Prompts(scribbles=scribbles_from_pgt(pgt), points=errors)
    return Prompts(points=hull_clicks(pgt) + errors)


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown prompt strategy {strategy!r} (choose {', '.join(STRATEGIES)})")
