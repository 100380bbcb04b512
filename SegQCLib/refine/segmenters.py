"""Prompt-based segmenters of one slice: MedSAM/SAM, OpenCV GrabCut, scikit-image random walker.

Every segmenter has ``strategy`` (the prompt kind HERMES refines for it: ``box``, ``scribbles`` or
``clicks``) and ``segment(image, prompts, previous=None) -> bool (y, x)`` where ``image`` is one
slice (float, any intensity range) and ``prompts`` a :class:`~SegQCLib.refine.prompts.Prompts`.
The built-in segmenters need no weights; MedSAM needs a local checkpoint (nothing is downloaded).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import InputError
from .prompts import Prompts

SEGMENTERS = ("grabcut", "randomwalker", "medsam")
CLICK_RADIUS_PX = 3


class Segmenter(Protocol):
    """A prompt-based segmenter of one slice (see the module docstring)."""

    strategy: str

    def segment(self, image: np.ndarray, prompts: Prompts, previous: np.ndarray | None = None) -> np.ndarray: ...


def _window_uint8(image: np.ndarray) -> np.ndarray:
    """The slice scaled to 0..255 between its 1st and 99th intensity percentiles."""
    lo, hi = np.percentile(image, (1, 99))
    scaled = (np.asarray(image, np.float32) - lo) / max(float(hi - lo), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _seed_map(shape: tuple[int, int], prompts: Prompts) -> np.ndarray:
    """int8 (y, x): 1 foreground seed, 2 background seed, 0 none (scribbles, then click disks)."""
    seeds = np.zeros(shape, np.int8) if prompts.scribbles is None else prompts.scribbles.astype(np.int8).copy()
    if prompts.points:
        yy, xx = np.ogrid[: shape[0], : shape[1]]
        for y, x, positive in prompts.points:
            seeds[(yy - y) ** 2 + (xx - x) ** 2 <= CLICK_RADIUS_PX ** 2] = 1 if positive else 2
    return seeds


def _box_mask(shape: tuple[int, int], box: tuple[int, int, int, int] | None) -> np.ndarray:
    inside = np.zeros(shape, bool)
    if box is None:
        inside[:] = True
    else:
        x0, y0, x1, y1 = box
        inside[y0: y1 + 1, x0: x1 + 1] = True
    return inside


class GrabCutSegmenter:
    """OpenCV GrabCut: a box (outside = background) refined by scribbles and clicks (hard seeds).

    ``memory=True`` uses ``previous`` (the mask of the last iteration): its pixels inside the box
    start as probable foreground and the rest of the box as probable background. It is off by
    default: on the held-out HERMES evaluation it changed nothing (Colin27, threshold 0.9: final
    true DSC 0.884 with memory, 0.885 without), and from a small or shifted previous mask the
    colour models start wrong and GrabCut can collapse to a few pixels (a degraded Colin27 brain
    slice at DSC 0.56 went to 0.01 with memory, 0.85 without). The loop's clicks, which
    accumulate, carry what was learnt from one iteration to the next.

    A box covering the whole slice leaves no background sample for GrabCut's colour model, so the
    one-pixel slice border is always taken as background.
    """

    strategy = "box"

    def __init__(self, iterations: int = 5, memory: bool = False):
        self.iterations = iterations
        self.memory = memory

    def segment(self, image: np.ndarray, prompts: Prompts, previous: np.ndarray | None = None) -> np.ndarray:
        import cv2

        shape = image.shape
        inside = _box_mask(shape, prompts.box)
        init = np.where(inside, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
        if self.memory and previous is not None and previous.any():  # the previous mask is the probable split
            init = np.where(inside & previous, cv2.GC_PR_FGD,
                            np.where(inside, cv2.GC_PR_BGD, cv2.GC_BGD)).astype(np.uint8)
        seeds = _seed_map(shape, prompts)
        init[seeds == 1] = cv2.GC_FGD
        init[seeds == 2] = cv2.GC_BGD
        init[[0, -1], :] = np.where(init[[0, -1], :] == cv2.GC_FGD, cv2.GC_FGD, cv2.GC_BGD)
        init[:, [0, -1]] = np.where(init[:, [0, -1]] == cv2.GC_FGD, cv2.GC_FGD, cv2.GC_BGD)
        if not np.isin(init, (cv2.GC_FGD, cv2.GC_PR_FGD)).any():
            return np.zeros(shape, bool)
        colour = cv2.cvtColor(_window_uint8(image), cv2.COLOR_GRAY2BGR)
        background, foreground = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        # OpenCV's RNG (GrabCut's k-means init) is per thread: seed it so a refine in a worker thread
        # gives the same mask as in the main thread
        cv2.setRNGSeed(0)
        try:
            cv2.grabCut(colour, init, None, background, foreground, self.iterations, cv2.GC_INIT_WITH_MASK)
        except cv2.error:  # a degenerate colour model (e.g. a constant slice): keep the seeds' verdict
            pass
        return np.isin(init, (cv2.GC_FGD, cv2.GC_PR_FGD))


class RandomWalkerSegmenter:
    """scikit-image random walker from scribbles and clicks (Grady 2006).

    Seeds: foreground/background scribbles and click disks; with a box, everything outside it is
    background and, when no foreground seed is given, a disk at the box centre (radius 1/8 of the
    box's shorter side) is foreground. The walk runs on the box plus a 10 px margin.
    """

    strategy = "scribbles"

    def __init__(self, beta: float = 130.0):
        self.beta = beta

    def segment(self, image: np.ndarray, prompts: Prompts, previous: np.ndarray | None = None) -> np.ndarray:
        from skimage.segmentation import random_walker

        shape = image.shape
        seeds = _seed_map(shape, prompts)
        box = prompts.box
        if box is not None:
            seeds[~_box_mask(shape, box) & (seeds == 0)] = 2
            if not (seeds == 1).any():
                x0, y0, x1, y1 = box
                yy, xx = np.ogrid[: shape[0], : shape[1]]
                radius = max(min(x1 - x0, y1 - y0) / 8.0, 1.0)
                seeds[((yy - (y0 + y1) / 2) ** 2 + (xx - (x0 + x1) / 2) ** 2 <= radius ** 2) & (seeds == 0)] = 1
        if not (seeds == 1).any():
            return np.zeros(shape, bool)
        if not (seeds == 2).any():
            seeds[[0, -1], :] = np.where(seeds[[0, -1], :] == 1, 1, 2)
            seeds[:, [0, -1]] = np.where(seeds[:, [0, -1]] == 1, 1, 2)
        marked = np.argwhere(seeds > 0)
        if box is not None:
            marked = np.vstack([marked, [[box[1], box[0]], [box[3], box[2]]]])
        lo = np.maximum(marked.min(0) - 10, 0)
        hi = np.minimum(marked.max(0) + 11, shape)
        crop = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        grey = _window_uint8(image[crop]).astype(np.float32) / 255.0
        out = np.zeros(shape, bool)
        if (seeds[crop] == 0).any():
            out[crop] = random_walker(grey, seeds[crop], beta=self.beta, mode="cg_j", tol=1e-3) == 1
        else:
            out[crop] = seeds[crop] == 1
        return out


class MedSAMSegmenter:
    """MedSAM (or SAM ViT-B) from a local checkpoint, box prompts, MedSAM's 1024 px pipeline.

    The slice is min-max scaled to [0, 1], repeated to 3 channels and resized to 1024 x 1024; the
    box is scaled alike; image encoder -> prompt encoder (box) -> mask decoder (one mask) ->
    sigmoid > 0.5 at the slice size. MedSAM takes boxes only: points and scribbles are ignored. The
    image embedding of the last slice is cached, so refining one slice encodes it once. CUDA when
    present. The checkpoint is a plain state dict (MedSAM's ``medsam_vit_b.pth``) or one under
    ``"model"``, read with ``torch.load(weights_only=True)``.
    """

    strategy = "box"

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        import torch
        from segment_anything import sam_model_registry

        from ..qc import resolve_device

        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise InputError(checkpoint, "MedSAM checkpoint not found (give the path of medsam_vit_b.pth)")
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 (torch raises several types for corrupt or unsafe files)
            raise InputError(checkpoint, f"cannot read the checkpoint ({type(err).__name__}: {err})") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict):
            raise InputError(checkpoint, "is not a state dict of a SAM ViT-B model")
        sam = sam_model_registry["vit_b"](checkpoint=None)
        try:
            missing, _unexpected = sam.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise InputError(checkpoint, f"does not fit SAM ViT-B ({str(err).splitlines()[0]})") from None
        if missing:
            raise InputError(checkpoint, f"is not a SAM ViT-B checkpoint: {len(missing)} weights missing, "
                                         f"e.g. {missing[:3]}")
        self.device = resolve_device(device)
        self.sam = sam.eval().to(self.device)
        self._cache: tuple[bytes, object] | None = None

    def _embedding(self, image: np.ndarray):
        import torch
        import torch.nn.functional as F

        key = np.ascontiguousarray(image).tobytes()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        lo, hi = float(image.min()), float(image.max())
        scaled = (np.asarray(image, np.float32) - lo) / max(hi - lo, 1e-8)
        tensor = torch.from_numpy(scaled)[None, None].to(self.device)
        tensor = F.interpolate(tensor, size=(1024, 1024), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
        with torch.no_grad():
            embedding = self.sam.image_encoder(tensor)
        self._cache = (key, embedding)
        return embedding

    def segment(self, image: np.ndarray, prompts: Prompts, previous: np.ndarray | None = None) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        h, w = image.shape
        box = prompts.box or (0, 0, w - 1, h - 1)
        scale = np.array([1024 / w, 1024 / h, 1024 / w, 1024 / h])
        box_1024 = torch.as_tensor(np.asarray(box, float) * scale, dtype=torch.float32, device=self.device)[None, None]
        embedding = self._embedding(image)
        with torch.no_grad():
            sparse, dense = self.sam.prompt_encoder(points=None, boxes=box_1024, masks=None)
            logits, _ = self.sam.mask_decoder(image_embeddings=embedding, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                              multimask_output=False)
            probability = torch.sigmoid(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False))
        return probability[0, 0].cpu().numpy() > 0.5


class CallableSegmenter:
    """Any function ``fn(image, prompts, previous) -> mask`` as a segmenter."""

    def __init__(self, fn: Callable[[np.ndarray, Prompts, np.ndarray | None], np.ndarray], strategy: str = "box"):
        self.fn = fn
        self.strategy = strategy

    def segment(self, image: np.ndarray, prompts: Prompts, previous: np.ndarray | None = None) -> np.ndarray:
        return np.asarray(self.fn(image, prompts, previous), bool)


def segmenter_from_name(name: str, checkpoint: str | Path | None = None, device: str = "auto") -> Segmenter:
    """``grabcut``, ``randomwalker`` or ``medsam`` (which needs ``checkpoint``)."""
    if name == "grabcut":
        return GrabCutSegmenter()
    if name == "randomwalker":
        return RandomWalkerSegmenter()
    if name == "medsam":
        if checkpoint is None:
            raise InputError("--checkpoint", "the medsam segmenter needs a local checkpoint (medsam_vit_b.pth)")
        return MedSAMSegmenter(checkpoint, device)
    raise InputError("--segmenter", f"unknown segmenter {name!r} (choose {', '.join(SEGMENTERS)})")

