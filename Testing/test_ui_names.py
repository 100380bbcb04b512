"""Every ``self.ui.<name>`` (or ``ui.<name>``) used in SegQC.py is a widget of SegQC.ui.

``slicer.util.childWidgetVariables`` turns the .ui file's objectNames into ``self.ui`` attributes;
a renamed widget would otherwise only fail when a user opens the module in Slicer.
"""
from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SegQC" / "SegQC.py"
UI = ROOT / "SegQC" / "Resources" / "UI" / "SegQC.ui"


def ui_object_names(path: Path = UI) -> set[str]:
    """objectNames of the widgets (and layouts) of a Qt Designer file."""
    root = ET.parse(path).getroot()
    return {el.get("name") for el in root.iter() if el.tag in ("widget", "layout") and el.get("name")}


def ui_names_used(path: Path = MODULE) -> dict[str, int]:
    """``{name: first line}`` of the attributes read from ``self.ui`` / ``ui`` in a Python file."""
    used: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Attribute):
            continue
        owner = node.value
        is_ui = (isinstance(owner, ast.Name) and owner.id == "ui") or (
            isinstance(owner, ast.Attribute) and owner.attr == "ui")
        if is_ui:
            used.setdefault(node.attr, node.lineno)
    return used


def test_ui_file_is_a_designer_file():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == "SegQC"
    declared = {cw.findtext("class") for cw in root.iter("customwidget")}
    used_classes = {el.get("class") for el in root.iter("widget")}
    custom = {c for c in used_classes if c.startswith(("qMRML", "ctk", "qSlicer"))}
    assert custom <= declared, f"custom widgets used but not declared: {custom - declared}"


def test_every_ui_name_used_exists():
    names = ui_object_names()
    used = ui_names_used()
    assert used, "SegQC.py uses no self.ui names: the parser is broken"
    missing = {name: line for name, line in used.items() if name not in names}
    assert not missing, f"SegQC.py uses self.ui names absent from SegQC.ui (name: line): {missing}"


def test_mrml_widgets_get_the_scene():
    """Every MRML widget of the .ui gets the scene through a mrmlSceneChanged connection."""
    root = ET.parse(UI).getroot()
    mrml = {el.get("name") for el in root.iter("widget")
            if el.get("class", "").startswith("qMRML") and el.get("class") != "qMRMLWidget"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml <= connected, f"MRML widgets without the scene: {mrml - connected}"
