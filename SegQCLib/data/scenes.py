"""Slicer scene bundles (``.mrb``) read without Slicer: every segmentation node with its volume.

An ``.mrb`` is a zip archive holding one ``.mrml`` file (XML: one element per MRML node) and the
node data files (``Data/<name>.nrrd``, ``Data/<name>.seg.nrrd``). A segmentation node's
``references`` attribute names its reference volume (``referenceImageGeometryRef:<volume id>``) and
its storage node (``storage:<id>``), whose ``fileName`` is relative to the ``.mrml`` file.

:func:`mrb_cases` unpacks the archive into a folder the caller owns (the ``.mrb`` itself is never
modified) and returns one :class:`~SegQCLib.data.cases.Case` per segmentation node, so batch QC
treats a scene like any other dataset. Saving results back into a scene needs real MRML and lives
in the Slicer module's Logic.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from ..errors import InputError
from .cases import Case

#: MRML element names of the node types read here.
_VOLUME_TAGS = {"Volume", "LabelMapVolume"}
_SEGMENTATION_TAG = "Segmentation"


def _references(element: ET.Element) -> dict[str, list[str]]:
    """``"role:id1 id2;role2:id3;"`` -> {role: [ids]}."""
    refs: dict[str, list[str]] = {}
    for item in element.get("references", "").split(";"):
        if ":" in item:
            role, ids = item.split(":", 1)
            refs[role.strip()] = ids.split()
    return refs


def _safe_extract(archive: zipfile.ZipFile, target: Path, source: Path) -> None:
    """Extract every member under ``target``; a member that would land outside it is an error."""
    root = target.resolve()
    for member in archive.infolist():
        destination = (root / member.filename).resolve()
        if root != destination and root not in destination.parents:
            raise InputError(source, f"archive member {member.filename!r} points outside the archive folder")
    archive.extractall(root)


def mrb_cases(path: str | Path, extract_to: str | Path) -> list[Case]:
    """One case per segmentation node of the scene bundle ``path``, unpacked under ``extract_to``.

    ``case_id`` is the segmentation node's name (made unique with its node id when names repeat);
    ``image`` is its reference volume's file. A segmentation without a reference volume uses the
    scene's only scalar volume; with several, it is an :class:`InputError` naming the node.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            target = Path(extract_to)
            target.mkdir(parents=True, exist_ok=True)
            _safe_extract(archive, target, path)
    except zipfile.BadZipFile:
        raise InputError(path, "is not a Slicer scene bundle (.mrb is a zip archive; this file is not one)") from None
    scenes = sorted(Path(extract_to).rglob("*.mrml"))
    if not scenes:
        raise InputError(path, "holds no .mrml scene file")
    mrml = scenes[0]
    try:
        root = ET.parse(mrml).getroot()
    except ET.ParseError as err:
        raise InputError(path, f"its scene file {mrml.name} is not valid MRML/XML ({err})") from None

    nodes = {e.get("id"): e for e in root if e.get("id")}

    def stored_file(element: ET.Element) -> Path | None:
        storage_ids = _references(element).get("storage") or [element.get("storageNodeRef", "")]
        storage = nodes.get(storage_ids[0]) if storage_ids and storage_ids[0] else None
        if storage is None or not storage.get("fileName"):
            return None
        file = Path(storage.get("fileName"))
        return file if file.is_absolute() else mrml.parent / file

    volumes = {e.get("id"): e for e in root if e.tag in _VOLUME_TAGS and e.tag != "LabelMapVolume"}
    cases: list[Case] = []
    names = [e.get("name", "") for e in root if e.tag == _SEGMENTATION_TAG]
    for element in (e for e in root if e.tag == _SEGMENTATION_TAG):
        node_name = element.get("name") or element.get("id", "segmentation")
        seg_file = stored_file(element)
        if seg_file is None or not seg_file.is_file():
            raise InputError(path, f"segmentation node {node_name!r} has no data file in the bundle")
        ref_ids = _references(element).get("referenceImageGeometryRef", [])
        volume = volumes.get(ref_ids[0]) if ref_ids else None
        if volume is None:
            if len(volumes) != 1:
                raise InputError(path, f"segmentation node {node_name!r} names no reference volume and the scene "
                                       f"holds {len(volumes)} volumes: cannot tell which image it segments")
            volume = next(iter(volumes.values()))
        image_file = stored_file(volume)
        if image_file is None or not image_file.is_file():
            raise InputError(path, f"volume node {volume.get('name')!r} has no data file in the bundle")
        case_id = node_name if names.count(node_name) == 1 else f"{node_name}-{element.get('id')}"
        cases.append(Case(case_id, image_file, seg_file, subject=volume.get("name")))
    if not cases:
        raise InputError(path, "scene holds no segmentation node")
    return cases
