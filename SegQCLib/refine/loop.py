"""The HERMES loop: segment, score against the pGT, move the prompts, segment again.

Per slice (:func:`refine_slice`): start from the given mask, or segment with the paper's initial
prompts (whole-image box, random scribbles, random clicks); while the pseudo-DSC is under the
threshold, derive new prompts from the pGT and the current errors and segment again; stop after
``patience`` (10) iterations without improvement or ``max_iterations`` (20) in all; keep the best
mask by pseudo-DSC. Per volume (:func:`refine_volume`): run the QC model once, refine the slices it
flags (or, without a mask, every slice where the pGT has the structure), write the best masks into
a copy of the input mask.

The pseudo-DSC of a candidate is its DSC against the slice's pGT. That is exact for models whose
pGT does not depend on the mask checked (``atlas-brain-mr``); for models whose pGT does (nnQC
conditions its diffusion on the mask), ``rescore="model"`` runs the QC model again on every
candidate and uses its slice score and pGT.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError
from ..metrics import dice
from ..qc import DEFAULT_FLAG_THRESHOLD, QCResult
from ..volume import Volume
from .prompts import Prompts, initial_prompts, prompts_from_pgt
from .segmenters import Segmenter

DEFAULT_PATIENCE = 10
DEFAULT_MAX_ITERATIONS = 20

#: score_fn(mask (y, x) bool) -> (pseudo-DSC, pGT (y, x) bool)
ScoreFn = Callable[[np.ndarray], tuple[float, np.ndarray]]


@dataclass
class Iteration:
    """One segmentation of the loop: the prompts given, the mask obtained, its pseudo-DSC."""

    prompts: Prompts | None
    mask: np.ndarray
    pseudo_dsc: float

    def to_json_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.to_json_dict() if self.prompts else None,
                "pseudo_dsc": round(float(self.pseudo_dsc), 4), "area_px": int(self.mask.sum())}


@dataclass
class SliceTrace:
    """Everything the loop did on one slice; ``iterations[0]`` is the starting mask."""

    index: int
    iterations: list[Iteration] = field(default_factory=list)
    best: int = 0
    stop_reason: str = ""
    pgt: np.ndarray | None = None

    @property
    def best_mask(self) -> np.ndarray:
        return self.iterations[self.best].mask

    @property
    def initial_pseudo_dsc(self) -> float:
        return self.iterations[0].pseudo_dsc

    @property
    def best_pseudo_dsc(self) -> float:
        return self.iterations[self.best].pseudo_dsc

    def to_json_dict(self) -> dict[str, Any]:
        return {"index": self.index, "best_iteration": self.best, "stop_reason": self.stop_reason,
                "initial_pseudo_dsc": round(float(self.initial_pseudo_dsc), 4),
                "best_pseudo_dsc": round(float(self.best_pseudo_dsc), 4),
                "iterations": [it.to_json_dict() for it in self.iterations]}


def refine_slice(image: np.ndarray, score_fn: ScoreFn, segmenter: Segmenter, *,
                 threshold: float = DEFAULT_FLAG_THRESHOLD, patience: int = DEFAULT_PATIENCE,
                 max_iterations: int = DEFAULT_MAX_ITERATIONS, initial_mask: np.ndarray | None = None,
                 strategy: str | None = None, rng: np.random.Generator | None = None, index: int = 0,
                 on_iteration: Callable[[SliceTrace], None] | None = None) -> SliceTrace:
    """Refine one slice; see the module docstring.

    Args:
        image: the slice, float (y, x), any intensity range.
        score_fn: ``score_fn(mask (y, x) bool) -> (pseudo-DSC, pGT (y, x) bool)``.
        segmenter: a :class:`~SegQCLib.refine.segmenters.Segmenter`.
        threshold: stop once the best pseudo-DSC reaches it.
        patience: stop after this many iterations without a better pseudo-DSC (paper: 10).
        max_iterations: stop after this many refinements in all (paper: 20).
        initial_mask: bool (y, x) to start from (copied, never modified); None segments with the
            paper's initial prompts for ``strategy`` (box over the whole slice, random scribbles or
            random clicks, drawn from ``rng``).
        strategy: ``box``, ``scribbles`` or ``clicks``; None takes ``segmenter.strategy``.
        rng: random generator of the initial prompts (default: seeded with 0).
        index: the slice's index, recorded in the trace.
        on_iteration: called with the trace after every segmentation (live display of prompts).

    Returns:
        The :class:`SliceTrace`; ``trace.best_mask`` is the mask with the highest pseudo-DSC.
    """
    rng = rng or np.random.default_rng(0)
    strategy = strategy or segmenter.strategy
    trace = SliceTrace(index)
    if initial_mask is None:
        prompts = initial_prompts(strategy, image.shape, rng)
        mask = np.asarray(segmenter.segment(image, prompts), bool)
    else:
        prompts, mask = None, np.asarray(initial_mask, bool).copy()
    score, pgt = score_fn(mask)
    trace.pgt = pgt
    trace.iterations.append(Iteration(prompts, mask, score))
    if on_iteration:
        on_iteration(trace)
    stale = 0
    clicks: list[tuple[int, int, bool]] = []
    while True:
        if trace.best_pseudo_dsc >= threshold:
            trace.stop_reason = "threshold reached"
            break
        if len(trace.iterations) - 1 >= max_iterations:
            trace.stop_reason = f"{max_iterations} iterations"
            break
        if stale >= patience:
            trace.stop_reason = f"{patience} iterations without improvement"
            break
        if not pgt.any():
            trace.stop_reason = "the pGT is empty: no prompt can be derived"
            break
        prompts = prompts_from_pgt(strategy, pgt, mask)
        clicks = [p for p in prompts.points if p not in clicks] + clicks  # clicks accumulate, as a user's do
        prompts.points = clicks
        mask = np.asarray(segmenter.segment(image, prompts, previous=mask), bool)
        score, new_pgt = score_fn(mask)
        pgt = new_pgt if new_pgt is not None else pgt
        trace.iterations.append(Iteration(prompts, mask, score))
        if score > trace.best_pseudo_dsc:
            trace.best, stale = len(trace.iterations) - 1, 0
        else:
            stale += 1
        if on_iteration:
            on_iteration(trace)
    return trace


@dataclass
class RefineResult:
    """A refined mask (bool (z, y, x) on the input grid), the per-slice traces and the first QC result."""

    mask: np.ndarray
    traces: list[SliceTrace]
    qc: QCResult
    threshold: float

    @property
    def slices(self) -> list[int]:
        """Indices of the axial slices the loop touched, in the order refined."""
        return [t.index for t in self.traces]

    def to_json_dict(self) -> dict[str, Any]:
        traces = [t.to_json_dict() for t in self.traces]
        return {"model": self.qc.model, "label": self.qc.label, "threshold": self.threshold,
                "slices_refined": [t.index for t in self.traces],
                "mean_iterations": float(np.mean([len(t.iterations) - 1 for t in self.traces])) if traces else 0.0,
                "traces": traces}


def _pseudo_dsc(mask: np.ndarray, pgt: np.ndarray) -> float:
    return 1.0 if not mask.any() and not pgt.any() else float(dice(mask, pgt))


def refine_volume(image: Volume, mask: np.ndarray | None, label: str, qc_model, segmenter: Segmenter, *,
                  threshold: float = DEFAULT_FLAG_THRESHOLD, only_flagged: bool = True,
                  slices: list[int] | None = None, patience: int = DEFAULT_PATIENCE,
                  max_iterations: int = DEFAULT_MAX_ITERATIONS, rescore: str = "pgt", seed: int = 0,
                  strategy: str | None = None, progress: Callable[[int, int], None] | None = None,
                  on_iteration: Callable[[SliceTrace], None] | None = None) -> RefineResult:
    """HERMES on a volume: refine the slices the QC model flags, along its ``slice_axis`` (the array axis
    closest to superior-inferior: ``array[k]`` for an axial acquisition).

    Args:
        image: the volume (z, y, x).
        mask: bool (z, y, x) on ``image``'s grid to correct (copied, never modified), or None to
            segment from scratch with the segmenter's initial prompts.
        label: the structure's name (the QC model needs it).
        qc_model: a QC model whose result carries a pGT (bool (z, y, x), ``kind`` "reconstruction"),
            run once on ``mask`` (an empty mask when None) to flag slices and get the pGT.
        threshold: flag slices whose pseudo-DSC is below it; each slice's loop stops when reached.
        only_flagged: refine only the flagged slices (else every slice with mask or pGT). Without a
            mask, every slice where the pGT holds the structure is refined.
        slices: refine exactly these slice indices instead.
        patience, max_iterations: stopping rules of :func:`refine_slice` (paper: 10 and 20).
        rescore: ``"pgt"``: a candidate's pseudo-DSC is its DSC against the first pGT's slice, exact
            for models whose pGT does not depend on the mask checked (``atlas-brain-mr``);
            ``"model"``: the QC model is run again on the volume with the candidate in place, for
            models whose pGT does (nnQC), using its slice score and pGT.
        seed: seed of the initial prompts' random generator.
        strategy: prompt strategy (``box``, ``scribbles``, ``clicks``); None: the segmenter's.
        progress: ``progress(done, total)`` after each slice.
        on_iteration: passed to :func:`refine_slice`.

    Returns:
        :class:`RefineResult`: the refined mask (bool (z, y, x), the input's other slices unchanged),
        one :class:`SliceTrace` per refined slice, the first QC result.
    """
    if rescore not in ("pgt", "model"):
        raise ValueError(f"rescore must be 'pgt' or 'model', got {rescore!r}")
    start_mask = np.zeros(image.shape, bool) if mask is None else np.asarray(mask, bool)
    if start_mask.shape != image.shape:
        raise InputError(image.name, f"mask shape {start_mask.shape} differs from image shape {image.shape}")
    result = qc_model.assess(image, start_mask, label, threshold=threshold, all_slices=True)
    if result.pgt is None:
        raise InputError(getattr(qc_model, "name", "--model"), "gives no pseudo ground truth: HERMES needs a pGT "
                                                               "model (e.g. atlas-brain-mr or an nnQC model)")
    # slices along the QC result's slice axis (the one closest to superior-inferior): views with it first,
    # so that slice k of every array below is the model's row k, whatever the file's axis order
    axis = int(result.extra.get("slice_axis", 0))

    def along(array: np.ndarray) -> np.ndarray:
        return np.moveaxis(array, axis, 0)

    pgt = along(np.asarray(result.pgt, bool))
    start = along(start_mask)
    if slices is None:
        if mask is None:
            slices = [k for k in range(pgt.shape[0]) if pgt[k].any()]
        elif only_flagged:
            slices = list(result.flagged)
        else:
            slices = [k for k in range(pgt.shape[0]) if pgt[k].any() or start[k].any()]
    refined_volume = start_mask.copy()
    refined = along(refined_volume)  # a view: writing slice k writes the volume
    planes = along(image.array)
    traces = []
    rng = np.random.default_rng(seed)
    for done, k in enumerate(slices, start=1):
        if rescore == "model":
            def score_fn(candidate: np.ndarray, k: int = k) -> tuple[float, np.ndarray]:
                trial = refined_volume.copy()
                along(trial)[k] = candidate
                rescored = qc_model.assess(image, trial, label, threshold=threshold, all_slices=True)
                row = next((r for r in rescored.slices if r["index"] == k), None)
                plane = along(np.asarray(rescored.pgt, bool))[k]
                value = row["dsc"] if row is not None and not math.isnan(row["dsc"]) else _pseudo_dsc(candidate, plane)
                return float(value), plane
        else:
            def score_fn(candidate: np.ndarray, k: int = k) -> tuple[float, np.ndarray]:
                return _pseudo_dsc(candidate, pgt[k]), pgt[k]
        trace = refine_slice(np.ascontiguousarray(planes[k]), score_fn, segmenter, threshold=threshold,
                             patience=patience, max_iterations=max_iterations,
                             initial_mask=None if mask is None else np.ascontiguousarray(start[k]),
                             strategy=strategy, rng=rng, index=int(k), on_iteration=on_iteration)
        refined[k] = trace.best_mask
        traces.append(trace)
        if progress:
            progress(done, len(slices))
    return RefineResult(refined_volume, traces, result, threshold)
