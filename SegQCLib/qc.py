"""The QC protocol: what every QC model returns and how models are found by name.

A QC model scores a segmentation of one structure without its ground truth. Every model implements
:class:`QCModel` (``assess(image, mask, label) -> QCResult``) and registers a factory under a name
with :func:`register_model`; consumers (CLI, batch, HERMES, the Slicer Logic) only ever call
:func:`load_model` and ``assess``, never a model class directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np

from .errors import InputError
from .volume import Volume

#: Slices whose pseudo-DSC is below this are flagged unless the caller chooses another threshold.
DEFAULT_FLAG_THRESHOLD = 0.8


@dataclass
class QCResult:
    """What a QC model (or a true-metric comparison) says about one structure of one case.

    Attributes:
        model: name of the model that produced the scores (``"reference"`` for true metrics).
        label: name of the structure scored.
        volume: volume-level scores, metric name -> value; the (pseudo-)DSC is under ``"dsc"``.
        slices: one dict per scored axial slice, in increasing ``index`` order, each with ``index``
            (z index in the input array), the metric keys (``dsc``, ...) and ``flagged``.
        threshold: slices with ``dsc`` below it are flagged.
        pgt: pseudo ground truth on the input grid, bool array (z, y, x), for reconstruction models.
        runtime_s: wall-clock seconds the assessment took.
        extra: model-specific details (JSON-serialisable).
    """

    model: str
    label: str
    volume: dict[str, float]
    slices: list[dict[str, Any]]
    threshold: float = DEFAULT_FLAG_THRESHOLD
    pgt: np.ndarray | None = None
    runtime_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_slice_scores(
        cls,
        model: str,
        label: str,
        volume: dict[str, float],
        slice_rows: list[dict[str, Any]],
        threshold: float = DEFAULT_FLAG_THRESHOLD,
        **kwargs: Any,
    ) -> "QCResult":
        """Build a result from per-slice rows (``index`` + metrics), adding the ``flagged`` column."""
        rows = []
        for row in sorted(slice_rows, key=lambda r: r["index"]):
            row = dict(row)
            dsc = row.get("dsc", math.nan)
            row["flagged"] = bool(dsc < threshold) if not math.isnan(dsc) else False
            rows.append(row)
        return cls(model=model, label=label, volume=dict(volume), slices=rows, threshold=threshold, **kwargs)

    @property
    def flagged(self) -> list[int]:
        """Indices of the slices flagged below the threshold, in increasing order."""
        return [row["index"] for row in self.slices if row["flagged"]]

    def worst_slices(self, n: int | None = None) -> list[dict[str, Any]]:
        """Slice rows sorted worst (lowest dsc) first."""
        rows = sorted(self.slices, key=lambda r: (r.get("dsc", math.inf), r["index"]))
        return rows if n is None else rows[:n]

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON shape the CLI writes (keys are a public contract: keep them stable).

        Non-finite numbers (an infinite distance to an empty mask) become ``null``.
        """
        return {
            "model": self.model,
            "label": self.label,
            "volume": {k: json_value(v) for k, v in self.volume.items()},
            "slices": [{k: json_value(v) for k, v in row.items()} for row in self.slices],
            "threshold": self.threshold,
            "flagged": self.flagged,
            "runtime_s": round(float(self.runtime_s), 4),
            **({"extra": self.extra} if self.extra else {}),
        }


def json_value(value: Any) -> Any:
    """Plain Python for JSON: NumPy scalars unwrapped, non-finite floats and missing values -> None,
    dicts and lists converted recursively."""
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if value is None or type(value).__name__ == "NAType":  # pandas.NA, without importing pandas
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


@runtime_checkable
class QCModel(Protocol):
    """A QC model: scores ``mask`` (bool (z, y, x) on ``image``'s grid) of the structure ``label``."""

    name: str

    def assess(self, image: Volume, mask: np.ndarray, label: str, *, threshold: float = DEFAULT_FLAG_THRESHOLD,
               all_slices: bool = True) -> QCResult: ...


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: ``factory(device)`` builds it; ``description`` is shown by ``segqc models``."""

    name: str
    factory: Callable[[str], QCModel]
    description: str
    kind: str  # "regressor" (scores only), "reconstruction" (scores + pGT) or "instance" (QANet: image + instance labels)
    priority: int = 0  # the highest-priority model is the default of `segqc qc` and `segqc demo`
    domain: dict[str, Any] | None = None  # what it was trained on (SegQCLib.domain.card_domain); None: unknown


_REGISTRY: dict[str, ModelEntry] = {}
_discovered = False


def register_model(name: str, factory: Callable[[str], QCModel], description: str, kind: str = "regressor",
                   priority: int = 0, domain: dict[str, Any] | None = None) -> None:
    """Register a model factory under ``name`` (a later registration of the same name replaces it);
    ``domain``: what the model was trained on (:func:`SegQCLib.domain.card_domain`), for :func:`choose_model`."""
    _REGISTRY[name] = ModelEntry(name, factory, description, kind, priority, domain)


def _discover() -> None:
    """Import the model modules once so that they register their installed weights."""
    global _discovered
    if not _discovered:
        _discovered = True
        from . import models  # noqa: F401  (models/__init__.py registers what is installed)


def available_models() -> list[ModelEntry]:
    """Installed models, sorted by name."""
    _discover()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def load_model(name: str, device: str = "auto") -> QCModel:
    """Build the model registered as ``name`` on ``device`` (``auto``, ``cpu`` or ``cuda``)."""
    _discover()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none installed"
        raise InputError(name, f"unknown QC model (installed: {known})")
    return _REGISTRY[name].factory(resolve_device(device))


def default_model_name() -> str | None:
    """The model `segqc qc` and `segqc demo` use when none is named: the first registered as default."""
    models = available_models()
    return max(models, key=lambda m: (m.priority, m.name)).name if models else None


def choose_model(image: Volume, label: str | None) -> tuple[str, dict[str, list[str]]]:
    """The model `segqc qc` uses when none is named: the highest-priority installed slice model
    (not an instance model) whose domain fits ``image`` and the structure ``label`` (None: any
    structure), with the reasons each higher-priority model was passed over (name -> reasons).

    Raises :class:`InputError` naming the image when none is installed or none fits (the reasons of
    each): scoring outside every model's domain gives numbers that mean nothing, so it is refused
    rather than guessed; ``--model`` scores it anyway, with the warning."""
    from .domain import check_domain

    entries = sorted((e for e in available_models() if e.kind != "instance"), key=lambda e: (-e.priority, e.name))
    if not entries:
        raise InputError("--model", "no QC model is installed yet (`segqc models` lists them)")
    passed: dict[str, list[str]] = {}
    for entry in entries:
        verdict = check_domain(entry.domain, image, label)
        if verdict["in"]:
            return entry.name, passed
        passed[entry.name] = verdict["reasons"]
    why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in passed.items())
    raise InputError(image.name or "image", f"no installed QC model's domain fits it ({why}); "
                                            "choose one with --model to score it anyway")


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a CUDA GPU is usable, else ``cpu``; ``cuda`` without a GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError("--device", f"unknown device {device!r} (choose auto, cpu or cuda)")
    if device == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise InputError("--device", "cuda was asked for but no CUDA GPU is available")
    return "cpu"


def compare_to_reference(mask: np.ndarray, reference: np.ndarray, spacing: tuple[float, float, float], label: str,
                         threshold: float = DEFAULT_FLAG_THRESHOLD, slice_axis: int = 0) -> QCResult:
    """True metrics of ``mask`` against ``reference`` (bool (z, y, x), spacing (z, y, x) mm) as a QCResult,
    slices along the array axis ``slice_axis`` (pass :func:`~SegQCLib.fingerprint.slice_axis` of the
    image's grid, so the rows line up with the models').

    Used by `segqc metrics`, the demo (truth beside the prediction) and the Slicer Logic.
    """
    import time

    from .metrics import slice_metrics, volume_metrics

    start = time.perf_counter()
    volume = volume_metrics(mask, reference, spacing)
    rows = slice_metrics(mask, reference, spacing, axis=slice_axis)
    return QCResult.from_slice_scores("reference", label, volume, rows, threshold,
                                      runtime_s=time.perf_counter() - start, extra={"slice_axis": int(slice_axis)})
