"""Shared pytest set-up: import paths and a headless Slicer (``slicer-core`` wheel, no Qt).

The ``slicer`` package of the ``slicer-core`` wheel holds real MRML, the module logics and most of
``slicer.util``, but none of what the Slicer application normally builds at start-up. The
``slicer_env`` fixture builds that part the way the application does, in the same order:

- a ``vtkMRMLScene`` and a ``vtkSlicerApplicationLogic`` that owns it;
- one logic per module, each given the application logic and the scene, and registered with
  ``SetModuleLogic`` under the module's exact Slicer name (``Volumes``, ``Segmentations``, ...):
  other logics look each other up by that name, so a misspelt name silently breaks them;
- ``slicer.mrmlScene``, ``slicer.modules.<lowercase name>.logic()`` and a small ``slicer.app``,
  which is all that ``slicer.util`` reaches for in the functions we use.

Gotchas, found the hard way:

- The Segmentations logic registers the labelmap <-> closed surface converter rules in a
  process-wide factory when it is *created*; a second instance registers them twice. The whole
  environment is therefore built once per process (cached on the ``slicer`` module).
- The Colors logic looks for ``<home>/<share>/ColorFiles``; without a home directory it logs an
  error, and without ``GenericColors.txt`` every labelmap display node warns that its default color
  table is missing. We give it a temporary home with a tiny ``GenericColors.txt``.
- Removing a node from the scene leaves its display and storage nodes behind unless the Data
  module's logic is registered (it deletes them on NodeRemovedEvent). Without it, every
  ``slicer.util.arrayFromSegmentBinaryLabelmap`` call leaks the display node of its temporary
  labelmap.
- The wheel ships no terminology JSON files, so the Terminologies logic is not registered
  (it would only log load errors; nothing we use needs it).
- ``slicer.util.updateSegmentBinaryLabelmapFromArray`` rejects ``bool`` arrays (VTK has no bool
  type): hand it ``uint8``.
- ``scene.ReadFromMRB`` unpacks the bundle into the remote cache directory of the scene's data IO
  manager: without a ``vtkDataIOManager`` holding a ``vtkCacheManager`` it fails.
- ``slicer.util.load*`` / ``save*`` need the Qt application: read files through storage nodes
  (``vtkMRMLVolumeArchetypeStorageNode``, ``vtkMRMLSegmentationStorageNode``) instead.
"""
from __future__ import annotations

import sys
import tempfile
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "SegQC"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from SegQCLogic.headless import HeadlessApp, HeadlessModule  # noqa: E402 - after the path set-up

#: (exact Slicer module name, logic class name in the ``slicer`` package), in start-up order:
#: Sequences before Markups (scene views), Segmentations after SubjectHierarchy.
MODULE_LOGICS = (
    ("Data", "vtkSlicerDataModuleLogic"),
    ("Colors", "vtkSlicerColorLogic"),
    ("Units", "vtkSlicerUnitsLogic"),
    ("Volumes", "vtkSlicerVolumesLogic"),
    ("Sequences", "vtkSlicerSequencesLogic"),
    ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
    ("Transforms", "vtkSlicerTransformLogic"),
    ("Tables", "vtkSlicerTablesLogic"),
    ("Plots", "vtkSlicerPlotsLogic"),
    ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    ("Markups", "vtkSlicerMarkupsLogic"),
)

_GENERIC_COLORS = "0 Background 0 0 0 0\n1 tissue 128 174 128 255\n2 bone 241 214 145 255\n"


def build_headless_slicer():
    """Build (once per process) the headless Slicer environment and return the ``slicer`` module."""
    import slicer

    env = getattr(slicer, "_segqcHeadlessEnv", None)
    if env is not None:
        return slicer

    home = Path(tempfile.mkdtemp(prefix="segqc-slicer-home-"))
    (home / "share" / "ColorFiles").mkdir(parents=True)
    (home / "share" / "ColorFiles" / "GenericColors.txt").write_text(_GENERIC_COLORS)
    (home / "tmp").mkdir()

    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetHomeDirectory(str(home))
    appLogic.SetShareDirectory("share")
    appLogic.SetTemporaryPath(str(home / "tmp"))
    appLogic.SetMRMLScene(scene)

    # scene.ReadFromMRB unpacks into the remote cache directory of the scene's data IO manager
    (home / "cache").mkdir()
    cacheManager = slicer.vtkCacheManager()
    cacheManager.SetRemoteCacheDirectory(str(home / "cache"))
    dataIOManager = slicer.vtkDataIOManager()
    dataIOManager.SetCacheManager(cacheManager)
    scene.SetCacheManager(cacheManager)
    scene.SetDataIOManager(dataIOManager)

    logics = {}
    for name, className in MODULE_LOGICS:
        logic = getattr(slicer, className)()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(name, logic)
        logics[name] = logic

    slicer.mrmlScene = scene
    slicer.app = HeadlessApp(scene, appLogic, str(home / "tmp"))
    slicer.modules = types.SimpleNamespace(**{name.lower(): HeadlessModule(name, logic) for name, logic in logics.items()})
    # keep every object alive for the whole process (VTK objects die with their last Python reference)
    slicer._segqcHeadlessEnv = types.SimpleNamespace(scene=scene, appLogic=appLogic, logics=logics, home=home,
                                                     dataIOManager=dataIOManager, cacheManager=cacheManager)
    return slicer


@pytest.fixture(scope="session")
def slicer_env():
    """The ``slicer`` module with ``mrmlScene``, ``modules`` and ``app`` set (see module docstring)."""
    return build_headless_slicer()


@pytest.fixture
def scene(slicer_env):
    """``slicer.mrmlScene``, emptied before and after the test (singletons such as colors are kept)."""
    slicer_env.mrmlScene.Clear(0)
    yield slicer_env.mrmlScene
    slicer_env.mrmlScene.Clear(0)
