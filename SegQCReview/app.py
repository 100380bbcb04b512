"""The SegQC Review web app: trame-slicer slice views + Segment Editor + the SegQC panel.

Layout: the axial view large with coronal and sagittal beside it (no 3D view: volume rendering on
a CPU is slow), trame-slicer's Segment Editor in the left drawer, the SegQC panel in the right one.
Every action goes through :class:`SegQCLogic.SegQCLogic`, the Logic the desktop module uses; its
long work runs as :class:`SegQCLogic.SegQCJob` in a worker thread polled from the server's event
loop, so the server never blocks. Any error becomes one message in the panel and the scene stays as
it was (inputs are checked before they touch the scene; jobs change it only in ``finish``).

State names of the panel start with ``qc_`` (trame shares one state between all clients, hence
:mod:`SegQCReview.gate`: one review per server process).
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from SegQCLogic import ATTRIBUTE_PREFIX, SegQCLogic

from . import env, gate
from .inputs import CheckedSegmentation, check_image, check_segmentation, demo_case, read_qc_dir

log = logging.getLogger("segqc.review")

#: Colours of the pGT overlay (RGB 0-1), as the Logic writes them; the browser tests look for them.
PGT_SEGMENTS = ("pGT", "FP", "FN")
SEGMENTERS = ("grabcut", "randomwalker", "medsam")
PLOT_W, PLOT_H, PLOT_PAD = 400, 150, 24  # plot size in SVG px


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class ReviewApp:
    """One review: a trame server, a SlicerApp scene and the SegQC panel on it.

    Args:
        server: a trame server (``trame.app.get_server()``); a new one when None.
        model: QC model preselected (default: a pGT model if installed, else the best installed).
        device: ``auto``, ``cpu`` or ``cuda``.
        out_dir: folder where Save writes (default: the working directory); nothing there is overwritten.
    """

    def __init__(self, server=None, *, model: str | None = None, device: str = "auto", out_dir: str | None = None):
        from trame.app import get_server
        from trame_slicer.app.logic import SegmentEditorLogic
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

        self.server = server or get_server(None, client_type="vue3")
        self.state, self.ctrl = self.server.state, self.server.controller
        env.block_triton()  # before the first render loads Mesa's LLVM
        self.slicer_app = SlicerApp()
        self._logics = env.attach(self.slicer_app)  # slicer.util and the Logic on this app's scene
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout("SegQC", Layout(
            LayoutDirection.Horizontal,
            [ViewLayoutDefinition.axial_view(),
             Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.coronal_view(),
                                               ViewLayoutDefinition.sagittal_view()])],
            flex_sizes=["2", "1"]))
        self.layout_manager.set_layout("SegQC")
        self.editor_logic = SegmentEditorLogic(self.server, self.slicer_app)
        self.logic = SegQCLogic()
        self.out_dir = Path(out_dir or os.getcwd())
        self.volumeNode = None
        self.tableNode = None
        self.pgtNode = None
        self.refinedId = None
        self.refinedOf = None
        self.cases = []
        self._job = None
        self._init_state(model, device)
        self._build_ui()
        self.editor_logic.set_ui(self.editor_ui)
        gate.install(self.server)

    # ------------------------------------------------------------------ state
    def _init_state(self, model, device):
        from SegQCLib import qc

        models = [m.name for m in qc.available_models() if not m.name.startswith("qanet")]
        preferred = [m for m in ("atlas-brain-mr", "nnqc-Brain", "sentinel-brain-mr") if m in models]
        s = self.state
        s.trame__title = "SegQC Review"
        s.qc_models = models
        s.qc_model = model or (preferred[0] if preferred else (models[0] if models else None))
        s.qc_devices = ["cpu", "cuda"] if self.logic.device() == "cuda" else ["cpu"]
        s.qc_device = self.logic.device(device == "cpu") if device in ("auto", "cpu", "cuda") else "cpu"
        s.qc_threshold = 0.8
        s.qc_error, s.qc_info = "", ""
        s.qc_busy, s.qc_progress, s.qc_progress_text = False, 0, ""
        s.qc_segmentations, s.qc_segmentation = [], None
        s.qc_segments, s.qc_segment = [], None
        s.qc_rows, s.qc_columns, s.qc_summary = [], [], ""
        s.qc_plot = {"points": [], "line": "", "threshold_y": 0, "xticks": [], "r": 3.5}
        s.qc_axial = {"slice": None, "offset": None}
        s.qc_has_pgt = False
        s.qc_show_pgt, s.qc_show_fp, s.qc_show_fn = True, True, True
        s.qc_segmenters, s.qc_segmenter = list(SEGMENTERS), "grabcut"
        s.qc_refine_threshold, s.qc_refine_iterations, s.qc_refine_in_view = 0.9, 20, True
        s.qc_prompt, s.qc_refine_rows, s.qc_refined_name = "", [], ""
        s.qc_batch_rows, s.qc_cases, s.qc_saved = [], [], []
        s.qc_scene = ""
        s.qc_tab = "qc"
        s.qc_runs = 0  # finished Run QC count: tests wait on it
        s.qc_timing = {}  # last Run QC: seconds from the click's arrival to the result shown, and in the model

    def _set(self, **values):
        """Set state values and push them to the browser now (also from asyncio tasks)."""
        with self.state:
            for key, value in values.items():
                self.state[key] = value

    def _error(self, err: BaseException, what: str = ""):
        message = str(err) if str(err) else type(err).__name__
        log.warning("SegQC Review: %s%s", f"{what}: " if what else "", message)
        self._set(qc_error=f"{what}: {message}" if what else message, qc_info="")

    # ------------------------------------------------------------------ scene
    @property
    def scene(self):
        return self.slicer_app.scene

    def _user_segmentations(self):
        """Segmentation nodes of the scene but SegQC's own pGT nodes."""
        return [n for n in self.scene.GetNodesByClass("vtkMRMLSegmentationNode")
                if n.GetAttribute(ATTRIBUTE_PREFIX + "segmentId") is None]

    def _refresh_scene_lists(self):
        nodes = self._user_segmentations()
        items = [{"title": n.GetName(), "value": n.GetID()} for n in nodes]
        current = self.state.qc_segmentation if any(i["value"] == self.state.qc_segmentation for i in items) else (
            items[0]["value"] if items else None)
        self._set(qc_segmentations=items, qc_segmentation=current)
        self._refresh_segments()
        volumes = [n.GetName() for n in self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
                   if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        summary = "; ".join([f"volume {', '.join(volumes) or '-'}"]
                            + [f"{n.GetName()} ({n.GetSegmentation().GetNumberOfSegments()} segments)" for n in nodes])
        self._set(qc_scene=summary)

    def _refresh_segments(self):
        node = self.scene.GetNodeByID(self.state.qc_segmentation) if self.state.qc_segmentation else None
        items = []
        if node is not None:
            seg = node.GetSegmentation()
            items = [{"title": seg.GetNthSegment(i).GetName(), "value": seg.GetNthSegmentID(i)}
                     for i in range(seg.GetNumberOfSegments())]
        current = self.state.qc_segment if any(i["value"] == self.state.qc_segment for i in items) else (
            items[0]["value"] if items else None)
        self._set(qc_segments=items, qc_segment=current)

    def _show(self, volumeNode, segmentationNode=None):
        """Show ``volumeNode`` in the slice views (no 3D) and hand the segmentation to the Segment Editor."""
        self.volumeNode = volumeNode
        display = self.slicer_app.display_manager
        display.show_volume_in_slice_background(volumeNode)
        display.show_volume_in_slice_foreground(None)
        display.reset_views()
        segmentationNode = segmentationNode or (self._user_segmentations() or [None])[0]
        if segmentationNode is not None:
            self.editor_logic.on_volume_changed(volumeNode)
            self.slicer_app.segmentation_editor.set_active_segmentation(segmentationNode, volumeNode)
            self._set(qc_segmentation=segmentationNode.GetID())
        self.ui.typed_state.data.is_drawer_visible = True
        self._refresh_scene_lists()

    def _clear_results(self):
        self.tableNode, self.pgtNode, self.refinedId, self.refinedOf = None, None, None, None
        self._set(qc_rows=[], qc_columns=[], qc_summary="", qc_has_pgt=False, qc_refine_rows=[], qc_prompt="",
                  qc_plot={"points": [], "line": "", "threshold_y": 0, "xticks": [], "r": 3.5}, qc_refined_name="")

    def _add_segmentation(self, checked: CheckedSegmentation, volumeNode):
        """A new segmentation node from checked masks (on ``volumeNode``'s grid)."""
        import slicer

        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(checked.name))
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        for name, mask in checked.masks.items():
            color = checked.colors.get(name)
            segmentId = (node.GetSegmentation().AddEmptySegment(name, name, list(color)) if color
                         else node.GetSegmentation().AddEmptySegment(name, name))
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, segmentId, volumeNode)
        return node

    def _load_volume_node(self, path: str):
        nodes = self.slicer_app.io_manager.load_volumes(str(path))
        if not nodes:
            from SegQCLib.errors import InputError

            raise InputError(path, "Slicer could not read this image")
        return nodes[0]

    def open_image(self, image: str, segmentations: list[str] = (), clear: bool = True):
        """Open ``image`` and its ``segmentations`` (files); every file is checked first."""
        volume = check_image(image)
        checked = [check_segmentation(p, volume.grid) for p in segmentations]
        if clear:
            self._clear_scene()
        volumeNode = self._load_volume_node(image)
        nodes = [self._add_segmentation(c, volumeNode) for c in checked]
        self._show(volumeNode, nodes[0] if nodes else None)
        return volumeNode, nodes

    def open_demo(self):
        image, checked = demo_case()
        self._clear_scene()
        volumeNode = self._load_volume_node(image)
        node = self._add_segmentation(checked, volumeNode)
        self._show(volumeNode, node)
        return volumeNode, node

    def open_scene(self, path: str):
        from SegQCLib.errors import InputError

        if not Path(path).is_file():
            raise InputError(path, "no such scene file")
        self._clear_scene()
        if not self.slicer_app.io_manager.load_scene(str(path)):
            raise InputError(path, "Slicer could not read this scene")
        volumes = [n for n in self.scene.GetNodesByClass("vtkMRMLScalarVolumeNode") if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        if not volumes:
            raise InputError(path, "the scene holds no image volume")
        nodes = self._user_segmentations()
        self._show(self.logic.referenceVolumeOf(nodes[0]) if nodes else volumes[0], nodes[0] if nodes else None)

    def open_qc_dir(self, folder: str):
        self.cases = read_qc_dir(folder)
        self._set(qc_cases=[c.row(i) for i, c in enumerate(self.cases)], qc_tab="cases")
        if self.cases:
            self.open_case(0)

    def open_case(self, index: int):
        """Open case ``index`` of the QC folder: image, its segmentation (the structure selected) and pGT."""
        case = self.cases[int(index)]
        volume = check_image(case.image)
        seg = check_segmentation(case.segmentation, volume.grid)
        if case.structure in seg.masks:  # only the structure the row is about
            seg.masks = {case.structure: seg.masks[case.structure]}
        pgt = check_segmentation(case.pgt, volume.grid, name=f"{case.structure} pGT") if case.pgt else None
        self._clear_scene()
        volumeNode = self._load_volume_node(case.image)
        node = self._add_segmentation(seg, volumeNode)
        if pgt is not None:
            mask = next(iter(pgt.masks.values())) if pgt.masks else np.zeros(volume.shape, bool)
            self._pgt_display(node, node.GetSegmentation().GetNthSegmentID(0), mask, volumeNode)
        self._show(volumeNode, node)
        self._set(qc_info=f"case {case.case_id} / {case.structure}: pseudo-DSC {case.score:.3f}")
        if case.worst_slice is not None and case.worst_slice >= 0:
            self.jump(case.worst_slice)

    def _pgt_display(self, node, segmentId, pgt, volumeNode):
        """pGT, FP and FN segments for a pGT read from a file (the Logic's node, from arrays)."""
        from types import SimpleNamespace

        mask = self.logic.segmentMask(node, segmentId, volumeNode)
        result = SimpleNamespace(pgt=pgt, model="batch")
        self.pgtNode = self.logic.pseudoGroundTruthToSegmentation(result, mask, volumeNode, node, segmentId)
        self._set(qc_has_pgt=True)
        self._apply_overlay_visibility()

    def _clear_scene(self):
        self._clear_results()
        self.slicer_app.segmentation_editor.deactivate_effect()
        self.scene.Clear(0)
        self.volumeNode = None

    def add_segmentation_files(self, paths: list[str]):
        """Add segmentation files to the open image; all are checked first, so one bad file adds none.
        Node names are the file names without their suffixes."""
        from SegQCLib.errors import InputError

        if self.volumeNode is None:
            raise InputError(paths[0] if paths else "segmentation", "open an image first")
        grid = self.logic.gridFromNode(self.volumeNode)
        checked = [check_segmentation(p, grid, name=Path(p).name.split(".")[0]) for p in paths]
        nodes = [self._add_segmentation(c, self.volumeNode) for c in checked]
        if nodes:
            self._show(self.volumeNode, nodes[-1])
        return nodes

    # ------------------------------------------------------------------ selection
    def _selected(self):
        from SegQCLib.errors import InputError

        node = self.scene.GetNodeByID(self.state.qc_segmentation) if self.state.qc_segmentation else None
        if node is None or not self.state.qc_segment:
            raise InputError("segmentation", "no segmentation or segment selected")
        volumeNode = self.volumeNode or self.logic.referenceVolumeOf(node)
        return volumeNode, node, self.state.qc_segment

    # ------------------------------------------------------------------ jobs
    def _start(self, job, onFinished, undoable=False):
        """Run ``job`` in a worker thread, poll it from the event loop, then ``onFinished(result)``."""
        if self._job is not None:
            self._set(qc_error="another computation is running: wait for it or press Cancel")
            return
        self._job = job
        job.handlers["progress"] = lambda fraction, message="": self._set(
            qc_progress=round(100 * fraction), qc_progress_text=message)
        self._set(qc_busy=True, qc_progress=0, qc_progress_text=job.name, qc_error="", qc_info="")
        job.start()
        asyncio.get_event_loop().create_task(self._poll(job, onFinished, undoable))

    async def _poll(self, job, onFinished, undoable):
        try:
            while not job.poll():
                await asyncio.sleep(0.05)
            if undoable:
                with self._undoable():
                    result = job.finish()
            else:
                result = job.finish()
            if result is None:
                self._set(qc_info=f"{job.name}: cancelled, nothing was added")
            else:
                onFinished(result)
        except Exception as err:  # shown, never raised into the server loop
            self._error(err, job.name)
        finally:
            self._job = None
            self._set(qc_busy=False, qc_progress=0, qc_progress_text="")

    def _undoable(self):
        """The Segment Editor's undo: a snapshot of the active segmentation around a change."""
        from contextlib import nullcontext

        from trame_slicer.segmentation.segmentation_undo_command import SegmentationLabelMapUndoCommand

        segmentation = self.slicer_app.segmentation_editor.active_segmentation
        return SegmentationLabelMapUndoCommand.push_state_change(segmentation) if segmentation else nullcontext()

    def cancel(self):
        if self._job is not None:
            self._job.cancel()
            self._set(qc_progress_text="Cancelling...")

    def preload(self):
        """Load the selected model in the background, so that Run QC does not wait for its weights."""
        if self.state.qc_model:
            self.logic.preloadModel(self.state.qc_model, self.state.qc_device)

    # ------------------------------------------------------------------ Run QC
    def run_qc(self):
        volumeNode, node, segmentId = self._selected()
        self._t_run = time.perf_counter()
        job = self.logic.assessSegmentJob(volumeNode, node, segmentId, self.state.qc_model, self.state.qc_device,
                                          float(self.state.qc_threshold))
        previous = self.pgtNode  # replaced only once the new result is there: an error keeps the scene as it was
        self._start(job, lambda tableNode: self._show_qc(tableNode, previous))

    def _show_qc(self, tableNode, previousPgt=None):
        result = self.logic.lastResult
        if previousPgt is not None and self.scene.IsNodePresent(previousPgt):
            self.scene.RemoveNode(previousPgt)
        self._clear_results()
        self.tableNode = tableNode
        self.pgtNode = self.logic.lastPseudoGroundTruthNode
        columns = self.logic.resultColumns(result)
        rows = []
        for row in result.slices:
            item = {"slice": int(row["index"]), "flagged": bool(row.get("flagged", False))}
            for column in columns:
                if column not in ("slice", "flagged"):
                    value = _finite(row.get(column))
                    item[column] = None if value is None else round(value, 4)
            rows.append(item)
        rows.sort(key=lambda r: (r.get("dsc") is None, r.get("dsc") if r.get("dsc") is not None else 0.0, r["slice"]))
        self._set(qc_rows=rows, qc_columns=[c for c in columns if c != "flagged"], qc_summary=self.logic.summary(result),
                  qc_plot=self._plot(rows, float(result.threshold)), qc_has_pgt=self.pgtNode is not None)
        self._apply_overlay_visibility()
        if rows:
            self.jump(rows[0]["slice"])  # the worst slice
        shown = time.perf_counter() - self._t_run
        model = float(result.runtime_s or 0.0)
        self._set(qc_runs=self.state.qc_runs + 1, qc_timing={"shown_s": round(shown, 3), "model_s": round(model, 3)},
                  qc_info=f"QC shown in {shown:.2f} s (model {model:.2f} s)")

    @staticmethod
    def _plot(rows, threshold: float) -> dict:
        """SVG coordinates of the pseudo-DSC per slice (x: slice, y: 0..1) and the threshold line."""
        scored = sorted((r["slice"], r["dsc"], r["flagged"]) for r in rows if r.get("dsc") is not None)
        if not scored:
            return {"points": [], "line": "", "threshold_y": 0, "xticks": [], "r": 3.5}
        k0, k1 = scored[0][0], max(scored[-1][0], scored[0][0] + 1)
        x = lambda k: PLOT_PAD + (PLOT_W - 2 * PLOT_PAD) * (k - k0) / (k1 - k0)  # noqa: E731
        y = lambda v: PLOT_H - PLOT_PAD - (PLOT_H - 2 * PLOT_PAD) * max(0.0, min(1.0, v))  # noqa: E731
        points = [{"slice": k, "x": round(x(k), 2), "y": round(y(v), 2), "flagged": f, "dsc": v} for k, v, f in scored]
        step = (PLOT_W - 2 * PLOT_PAD) / max(k1 - k0, 1)  # px between neighbouring slices
        return {"points": points, "line": " ".join(f"{p['x']},{p['y']}" for p in points),
                "r": round(max(0.8, min(3.5, 0.45 * step)), 2),  # dots never overlap: each stays clickable
                "threshold_y": round(y(threshold), 1), "xticks": [{"x": round(x(k), 1), "k": k} for k in (k0, k1)]}

    def _apply_overlay_visibility(self):
        node = self.pgtNode
        if node is None or not self.scene.IsNodePresent(node):
            return
        display, segmentation = node.GetDisplayNode(), node.GetSegmentation()
        display.SetSliceIntersectionThickness(3)  # px: a 1 px outline drowns in the streamed JPEG
        display.SetOpacity2DOutline(1.0)
        shown = {"pGT": self.state.qc_show_pgt, "FP": self.state.qc_show_fp, "FN": self.state.qc_show_fn}
        for name in PGT_SEGMENTS:
            segmentId = segmentation.GetSegmentIdBySegmentName(name)
            if segmentId:
                display.SetSegmentVisibility(segmentId, bool(shown[name]))
        self._render()

    def _render(self):
        for view in self.slicer_app.view_manager.get_slice_views():
            view.schedule_render()

    # ------------------------------------------------------------------ jump
    def jump(self, sliceIndex: int):
        """Centre every slice view on slice ``sliceIndex`` (along the result's slice axis) of the volume."""
        if self.volumeNode is None:
            return
        r, a, s = self.logic.sliceRAS(self.volumeNode, int(sliceIndex), self.logic.sliceAxisOf(self.tableNode))
        axial = {"slice": int(sliceIndex), "offset": None, "target": round(s, 3)}
        for view in self.slicer_app.view_manager.get_slice_views():
            sliceNode = view.get_view_node()
            sliceNode.JumpSliceByCentering(r, a, s)
            if sliceNode.GetOrientation() == "Axial":
                axial["offset"] = round(float(sliceNode.GetSliceOffset()), 3)
                # where a RAS point lands in the view: XY (px, origin bottom-left) = inverse(XYToRAS) @ RAS
                matrix = sliceNode.GetXYToRAS()
                axial["xy_to_ras"] = [[matrix.GetElement(i, j) for j in range(4)] for i in range(4)]
                axial["dims"] = list(sliceNode.GetDimensions())[:2]
        self._render()
        self._set(qc_axial=axial)

    # ------------------------------------------------------------------ refine
    def refine(self):
        volumeNode, node, segmentId = self._selected()
        slices = None
        if self.state.qc_refine_in_view and self.state.qc_axial.get("slice") is not None:
            slices = [int(self.state.qc_axial["slice"])]
        self.slicer_app.segmentation_editor.set_active_segmentation(node, volumeNode)
        job = self.logic.refineSegmentJob(volumeNode, node, segmentId, self.state.qc_model, self.state.qc_segmenter,
                                          threshold=float(self.state.qc_refine_threshold),
                                          maxIterations=int(self.state.qc_refine_iterations), onlyFlagged=slices is None,
                                          slices=slices, device=self.state.qc_device)
        showPrompts = job.handlers["prompts"]

        def prompts(index, value):  # markups from the Logic, a line of text in the panel
            showPrompts(index, value)
            n_pos = sum(1 for p in (value.points if value else []) if p[2])
            n_neg = sum(1 for p in (value.points if value else []) if not p[2])
            box = [int(v) for v in value.box] if value is not None and value.box is not None else None
            self._set(qc_prompt=f"slice {index}: box {box}, {n_pos} positive / {n_neg} negative clicks")
            self._render()

        job.handlers["prompts"] = prompts

        def done(newId):
            self.refinedId, self.refinedOf = newId, (node.GetID(), segmentId)
            rows = [{**r, "decision": "accepted"} for r in self.logic.refinementSlices(self.logic.lastRefineResult)]
            for r in rows:
                r["before"], r["after"] = round(r["before"], 4), round(r["after"], 4)
            name = node.GetSegmentation().GetSegment(newId).GetName()
            self._refresh_segments()
            self._set(qc_refine_rows=rows, qc_refined_name=name,
                      qc_info=f"{name}: {len(rows)} slices refined (the original segment is unchanged)")
            self._render()

        self._start(job, done, undoable=True)

    def decide(self, sliceIndex, accept: bool):
        """Accept or reject one refined slice (``sliceIndex``) or all (None); undoable in the editor."""
        from SegQCLib.errors import InputError

        if self.refinedId is None:
            raise InputError("refine", "nothing refined yet")
        nodeId, originalId = self.refinedOf
        node = self.scene.GetNodeByID(nodeId)
        if node is None or node.GetSegmentation().GetSegment(self.refinedId) is None:
            raise InputError("refine", "the refined segment is no longer in the scene")
        rows = [dict(r) for r in self.state.qc_refine_rows]
        chosen = [r["slice"] for r in rows] if sliceIndex is None else [int(sliceIndex)]
        with self._undoable():
            self.logic.setRefinedSlices(self.volumeNode, node, originalId, self.refinedId, chosen, accept)
        for r in rows:
            if r["slice"] in chosen:
                r["decision"] = "accepted" if accept else "rejected"
        self._set(qc_refine_rows=rows)
        self._render()

    # ------------------------------------------------------------------ batch
    def batch(self):
        job = self.logic.batchSceneJob(self.state.qc_model, self.state.qc_device, float(self.state.qc_threshold))

        def done(tableNode):
            table = tableNode.GetTable()
            rows = []
            for i in range(tableNode.GetNumberOfRows()):
                value = lambda c: table.GetValueByName(i, c)  # noqa: E731
                score = _finite(value("score").ToDouble())
                rows.append({"index": i, "node": value("node").ToString(), "segment": value("segment").ToString(),
                             "score": None if score is None else round(score, 4), "flagged": value("flagged").ToInt(),
                             "status": value("status").ToString(), "nodeID": value("nodeID").ToString(),
                             "segmentID": value("segmentID").ToString()})
            self._set(qc_batch_rows=rows, qc_tab="batch")

        self._start(job, done)

    def select_batch_row(self, index: int):
        row = self.state.qc_batch_rows[int(index)]
        self._set(qc_segmentation=row["nodeID"])
        self._refresh_segments()
        self._set(qc_segment=row["segmentID"], qc_tab="qc")

    # ------------------------------------------------------------------ save
    def save(self, what: str):
        """Write the scene (.mrb), the selected segmentation (.seg.nrrd) or the QC table (.csv) into
        ``out_dir`` under a new name (never over an existing file)."""
        from SegQCLib.errors import InputError

        self.out_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")

        def fresh(stem: str, suffix: str) -> Path:
            path, i = self.out_dir / f"{stem}-{stamp}{suffix}", 1
            while path.exists():
                path, i = self.out_dir / f"{stem}-{stamp}-{i}{suffix}", i + 1
            return path

        if what == "scene":
            path = fresh("segqc-review", ".mrb")
            if not self.slicer_app.io_manager.save_scene(str(path)):
                raise InputError(path, "the scene could not be written")
        elif what == "segmentation":
            _volumeNode, node, _segmentId = self._selected()
            path = fresh(node.GetName().replace(" ", "_"), ".seg.nrrd")
            self._write_seg_nrrd(node, path)
        elif what == "table":
            if not self.state.qc_rows:
                raise InputError("QC table", "run QC first")
            path = fresh("segqc-table", ".csv")
            columns = ["slice", *[c for c in self.state.qc_columns if c != "slice"], "flagged"]
            lines = [",".join(columns)] + [",".join("" if r.get(c) is None else str(r.get(c)) for c in columns)
                                           for r in sorted(self.state.qc_rows, key=lambda r: r["slice"])]
            from SegQCLib.io import write_bytes_atomic

            write_bytes_atomic(path, "\n".join(lines) + "\n")
        else:
            raise InputError(what, "unknown thing to save")
        self._set(qc_saved=[*self.state.qc_saved, str(path)], qc_info=f"saved {path}")

    @staticmethod
    def _write_seg_nrrd(node, path: Path) -> None:
        """A Slicer ``.seg.nrrd`` (segment names, colours and overlapping layers kept), written to a
        temporary name and renamed into place."""
        import slicer

        from SegQCLib.errors import InputError

        partial = path.with_name(f".{path.name}.partial.seg.nrrd")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(partial))
        if not storage.WriteData(node):
            partial.unlink(missing_ok=True)
            raise InputError(path, "the segmentation could not be written")
        os.replace(partial, path)

    # ------------------------------------------------------------------ uploads
    def upload(self, files, kind: str):
        """Files sent by the browser (trame file dicts): an image (``kind="image"``) or segmentations."""
        import tempfile

        from trame_slicer.utils import write_client_files_to_dir

        if not files:
            return
        with tempfile.TemporaryDirectory(prefix="segqc-upload-") as folder:
            paths = sorted(write_client_files_to_dir(files if isinstance(files, list) else [files], folder))
            if kind == "image":
                # the image is the largest file that is not a .seg.nrrd (label maps compress far better
                # than images); the other files are its segmentations
                candidates = [p for p in paths if not p.lower().endswith(".seg.nrrd")] or paths
                image = max(candidates, key=lambda p: Path(p).stat().st_size)
                self.open_image(image, [p for p in paths if p != image])
            else:
                self.add_segmentation_files(paths)
        self._set(qc_info=f"loaded {', '.join(Path(p).name for p in paths)}")

    # ------------------------------------------------------------------ UI
    def _guarded(self, what: str, function):
        """``function`` as a trame callback whose errors become the panel's message."""

        def call(*args):
            try:
                self._set(qc_error="")
                function(*args)
            except Exception as err:
                self._error(err, what)

        return call

    def _build_ui(self):
        from . import ui

        self.ui, self.editor_ui = ui.build(self)
        self.server.trigger("qc_jump")(self._guarded("Jump", lambda k: self.jump(int(k))))
        self.server.trigger("qc_decide")(self._guarded("Accept/Reject", lambda k, accept: self.decide(k, bool(accept))))
        self.server.trigger("qc_case")(self._guarded("Open case", lambda i: self.open_case(int(i))))
        self.server.trigger("qc_batch_row")(self._guarded("Batch", lambda i: self.select_batch_row(int(i))))
        self.server.trigger("qc_upload")(self._guarded("Upload", lambda files, kind: self.upload(files, kind)))
        self.state.change("qc_segmentation")(lambda **_: self._refresh_segments())
        self.state.change("qc_model", "qc_device")(lambda **_: self.preload())
        self.server.trigger("qc_run")(self._guarded("Run QC", self.run_qc))
        self.server.trigger("qc_refine")(self._guarded("Refine", self.refine))
        self.server.trigger("qc_batch")(self._guarded("Batch", self.batch))
        self.server.trigger("qc_cancel")(self._guarded("Cancel", self.cancel))
        self.server.trigger("qc_save")(self._guarded("Save", self.save))
        self.state.change("qc_show_pgt", "qc_show_fp", "qc_show_fn")(lambda **_: self._apply_overlay_visibility())
