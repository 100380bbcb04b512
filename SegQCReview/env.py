"""Make ``slicer.util`` and :mod:`SegQCLogic` work on the scene of a trame-slicer ``SlicerApp``.

``SlicerApp`` builds its own scene, application logic and module logics, but never sets
``slicer.mrmlScene``, ``slicer.modules`` or ``slicer.app``, which ``slicer.util`` (and so the Logic)
reach for. :func:`attach` points them at the app's objects. It adds the module logics the app lacks
(Tables, Plots, Units...) but never a second Segmentations logic: creating one registers the
labelmap <-> closed-surface converter rules again (4 -> 8 rules), so the app's own is shared.
"""
from __future__ import annotations

import tempfile
import types

from SegQCLogic.headless import HeadlessApp, HeadlessModule

#: Module logics SlicerApp does not register (exact Slicer module names), created here.
_EXTRA_LOGICS = (("Units", "vtkSlicerUnitsLogic"), ("Tables", "vtkSlicerTablesLogic"),
                 ("Plots", "vtkSlicerPlotsLogic"), ("Transforms", "vtkSlicerTransformLogic"))


def block_triton() -> None:
    """Make ``import triton`` fail (ImportError) in this process, unless it is loaded already.

    Offscreen rendering runs on Mesa's llvmpipe, which loads its LLVM into the process; Triton's
    native module carries another LLVM, and loading it afterwards crashes the process
    (segmentation fault, seen when a QC model imports torchvision -> torch._dynamo -> triton).
    The review never compiles kernels, and torch treats a failed import as "no Triton".
    """
    import sys

    sys.modules.setdefault("triton", None)


def attach(slicer_app) -> types.SimpleNamespace:
    """Point ``slicer.mrmlScene``, ``slicer.modules.<name>.logic()`` and ``slicer.app`` at
    ``slicer_app`` (a ``trame_slicer.core.SlicerApp``). Returns the logics (kept alive here)."""
    import slicer

    logics = {"Segmentations": slicer_app.segmentations_logic, "Volumes": slicer_app.volumes_logic,
              "SubjectHierarchy": slicer_app.subject_hierarchy_logic, "Data": slicer_app.data_logic,
              "Colors": slicer_app.color_logic, "Markups": slicer_app.app_logic.GetModuleLogic("Markups")}
    for name, className in _EXTRA_LOGICS:
        existing = slicer_app.app_logic.GetModuleLogic(name)
        if existing is not None:
            logics[name] = existing
            continue
        cls = getattr(slicer, className, None)
        if cls is not None:
            logics[name] = slicer_app.register_module_logic(cls(), logic_name=name)
    slicer.mrmlScene = slicer_app.scene
    slicer.app = HeadlessApp(slicer_app.scene, slicer_app.app_logic, tempfile.mkdtemp(prefix="segqc-review-"))
    slicer.modules = types.SimpleNamespace(**{name.lower(): HeadlessModule(name, logic)
                                              for name, logic in logics.items() if logic is not None})
    return types.SimpleNamespace(**logics)
