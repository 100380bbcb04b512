"""QC models, one module per method. Importing this package registers the installed models.

A model is installed when its model card (``<name>.json``, with ``architecture``, ``name`` and the
weights file it names) lies in one of :func:`model_dirs`: the folders of ``$SEGQC_MODELS_DIR``
(``os.pathsep``-separated), then the shipped ``Resources/Models`` beside the package (the source
tree, an editable install, or a Slicer extension install, which puts both side by side).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from ..domain import card_domain
from ..qc import register_model

#: architecture -> (module, loader function taking (card_path, device), kind)
LOADERS = {
    "sentinel": ("SegQCLib.models.sentinel", "load_model", "regressor"),
    "qanet": ("SegQCLib.models.qanet", "load_model", "instance"),
    "nnqc": ("SegQCLib.models.nnqc", "load_model", "reconstruction"),
}


def model_dirs() -> list[Path]:
    """Folders searched for model cards, in order (a later card of the same name is ignored)."""
    dirs = [Path(p) for p in os.environ.get("SEGQC_MODELS_DIR", "").split(os.pathsep) if p]
    dirs.append(Path(__file__).resolve().parents[2] / "Resources" / "Models")
    return [d for d in dirs if d.is_dir()]


def find_card(model: str | Path) -> Path:
    """The model card of ``model``: a card path (``.json``) as given, else the card of that installed name
    in :func:`model_dirs`; raises :class:`~SegQCLib.errors.InputError` naming the installed models."""
    from ..errors import InputError
    from ..qc import available_models

    card = Path(model)
    if card.is_file():
        return card
    found = [d / f"{model}.json" for d in model_dirs() if (d / f"{model}.json").is_file()]
    if not found:
        names = ", ".join(e.name for e in available_models()) or "none installed"
        raise InputError(model, f"unknown model (installed: {names})")
    return found[0]


def _factory(card: Path, module: str, function: str):
    def build(device: str):
        return getattr(importlib.import_module(module), function)(card, device)
    return build


def register_installed_models() -> None:
    """Register every model card found in :func:`model_dirs` (unreadable cards are skipped)."""
    seen: set[str] = set()
    for folder in model_dirs():
        for card in sorted(folder.glob("*.json")):
            try:
                data = json.loads(card.read_text())
            except (OSError, ValueError):
                continue
            arch, name = data.get("architecture"), data.get("name")
            if arch not in LOADERS or not name or name in seen:
                continue
            seen.add(name)
            module, function, kind = LOADERS[arch]
            register_model(name, _factory(card, module, function), data.get("description", arch), kind,
                           int(data.get("priority", 0)), card_domain(data))


def register_builtin_models() -> None:
    """Models without weight files: ``atlas-brain-mr`` (atlas registration pGT), when its atlases are installed."""
    from ..data.sources import available_sources

    if available_sources().get("colin27"):
        from .atlas import MODEL_NAME, load_model

        register_model(MODEL_NAME, load_model, "pGT from an affinely registered brain atlas (Colin27 AAL/brain, "
                       "MNI152 tissue/brain) fitted to the T1 image's brain tissue: DSC/HD95 vs pGT", "reconstruction", priority=0,
                       domain=card_domain(builtin_card(MODEL_NAME)))


def builtin_card(name: str, strict: bool = False) -> dict:
    """The card of a built-in model (no weights) found in :func:`model_dirs` (calibration, domain), or {}
    when none is installed. An unreadable card gives {} too, or with ``strict`` an
    :class:`~SegQCLib.errors.InputError` naming it (loading the model says so; registering it does not)."""
    from ..errors import InputError

    for folder in model_dirs():
        card = folder / f"{name}.json"
        if card.is_file():
            try:
                return json.loads(card.read_text())
            except (OSError, ValueError) as err:
                if strict:
                    raise InputError(card, f"not a readable model card ({err})") from None
                return {}
    return {}


register_installed_models()
register_builtin_models()
