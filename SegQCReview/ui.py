"""The page: trame-slicer's viewer layout, its Segment Editor (left), the SegQC panel (right).

Element ids (``qc-...``) are what the browser tests click and read; keep them stable.
"""
from __future__ import annotations

from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_client.widgets.core import HtmlElement


def _svg(tag: str, children=None, properties=(), **kwargs):
    """An SVG element (``tag``) with the given attribute names bound (``:name`` for tuple values)."""
    props = [(p.replace("-", "_"), p) if "-" in p else p for p in properties]
    return HtmlElement(tag, children, __properties=props, **kwargs)


def _busy():
    return ("qc_busy",)


def _message_area():
    v.VAlert(v_if=("qc_error",), text=("qc_error",), type="error", density="compact", closable=True,
             id="qc-error", classes="mb-2", click_close="qc_error = ''")
    html.Div("{{ qc_info }}", v_if=("qc_info",), id="qc-info", classes="text-caption mb-1")
    with html.Div(v_if=("qc_busy",), classes="d-flex align-center mb-2"):
        v.VProgressLinear(model_value=("qc_progress",), height=18, color="primary", id="qc-progress",
                          classes="flex-grow-1 mr-2", children=["{{ qc_progress_text }}"])
        v.VBtn("Cancel", id="qc-cancel", size="small", color="warning", click="trigger('qc_cancel')")


def _plot():
    """Pseudo-DSC per slice (blue, flagged slices red) with the dashed threshold line; click jumps."""
    with html.Div(id="qc-plot", v_if=("qc_plot.points.length",), classes="mb-1"):
        with _svg("svg", properties=("viewBox", "width", "height"), viewBox="0 0 400 150", width="100%",
                  height="150", style="background: #1e1e1e; border-radius: 4px;"):
            _svg("line", properties=("x1", "x2", "y1", "y2", "stroke", "stroke-dasharray", "stroke-width"),
                 x1="24", x2="376", y1=("qc_plot.threshold_y",), y2=("qc_plot.threshold_y",), stroke="#e53935",
                 stroke_dasharray="6 4", stroke_width="1.5", id="qc-plot-threshold")
            _svg("polyline", properties=("points", "fill", "stroke", "stroke-width"), points=("qc_plot.line",),
                 fill="none", stroke="#42a5f5", stroke_width="1.5")
            _svg("circle", properties=("cx", "cy", "r", "fill"), v_for="p in qc_plot.points", key="p.slice",
                 cx=("p.x",), cy=("p.y",), r=("qc_plot.r",), fill=("p.flagged ? '#e53935' : '#42a5f5'",),
                 click="trigger('qc_jump', [p.slice])", style="cursor: pointer;", classes="qc-plot-point",
                 raw_attrs=[':data-slice="p.slice"'])
            _svg("text", "{{ t.k }}", properties=("x", "y", "fill", "font-size"), v_for="t in qc_plot.xticks",
                 key="t.k", x=("t.x",), y="146", fill="#aaa", font_size="10")


def _qc_tab():
    v.VSelect(label="Segmentation", items=("qc_segmentations",), v_model=("qc_segmentation",), density="compact",
              hide_details=True, classes="mb-2", id="qc-segmentation")
    v.VSelect(label="Segment", items=("qc_segments",), v_model=("qc_segment",), density="compact",
              hide_details=True, classes="mb-2", id="qc-segment")
    with html.Div(classes="d-flex"):
        v.VSelect(label="Model", items=("qc_models",), v_model=("qc_model",), density="compact", hide_details=True,
                  classes="mr-2", id="qc-model")
        v.VSelect(label="Device", items=("qc_devices",), v_model=("qc_device",), density="compact",
                  hide_details=True, style="max-width: 110px;", id="qc-device")
    v.VSlider(label="Threshold", v_model=("qc_threshold",), min=0, max=1, step=0.05, thumb_label=True,
              hide_details=True, density="compact", classes="mt-2")
    v.VBtn("Run QC", id="qc-run", color="primary", block=True, disabled=_busy(), click="trigger('qc_run')",
           classes="my-2")
    html.Div("{{ qc_summary }}", id="qc-summary", classes="text-body-2 mb-1")
    _plot()
    with html.Div(v_if=("qc_has_pgt",), classes="d-flex", id="qc-overlay"):
        v.VCheckbox(label="pGT outline", v_model=("qc_show_pgt",), density="compact", hide_details=True,
                    color="green", id="qc-show-pgt")
        v.VCheckbox(label="FP", v_model=("qc_show_fp",), density="compact", hide_details=True, color="orange",
                    id="qc-show-fp")
        v.VCheckbox(label="FN", v_model=("qc_show_fn",), density="compact", hide_details=True, color="blue",
                    id="qc-show-fn")
    html.Div("Axial slice {{ qc_axial.slice }} (offset {{ qc_axial.offset }} mm)", v_if=("qc_axial.slice !== null",),
             id="qc-axial", classes="text-caption", raw_attrs=[':data-offset="qc_axial.offset"',
                                                               ':data-slice="qc_axial.slice"'])
    with v.VTable(density="compact", height="320", fixed_header=True, id="qc-table", v_if=("qc_rows.length",)):
        with html.Thead(), html.Tr():
            html.Th("{{ c }}", v_for="c in qc_columns", key="c")
        with html.Tbody():
            with html.Tr(v_for="row in qc_rows", key="row.slice", click="trigger('qc_jump', [row.slice])",
                         style="cursor: pointer;", classes=("row.flagged ? 'text-red qc-row' : 'qc-row'",),
                         raw_attrs=[':data-slice="row.slice"']):
                html.Td("{{ row[c] === null ? '-' : row[c] }}", v_for="c in qc_columns", key="c",
                        raw_attrs=[':data-column="c"'])


def _refine_tab():
    html.Div("HERMES moves a segmenter's prompts from the pGT; the result is a new segment "
             "'&lt;name&gt; refined', the original is never changed.", classes="text-caption mb-2")
    with html.Div(classes="d-flex"):
        v.VSelect(label="Segmenter", items=("qc_segmenters",), v_model=("qc_segmenter",), density="compact",
                  hide_details=True, classes="mr-2", id="qc-segmenter")
        v.VTextField(label="Iterations", v_model_number=("qc_refine_iterations",), type="number", density="compact",
                     hide_details=True, style="max-width: 100px;")
    v.VSlider(label="Threshold", v_model=("qc_refine_threshold",), min=0, max=1, step=0.05, thumb_label=True,
              hide_details=True, density="compact", classes="mt-2")
    v.VCheckbox(label="Only the axial slice in view", v_model=("qc_refine_in_view",), density="compact",
                hide_details=True, id="qc-refine-in-view")
    v.VBtn("Refine (HERMES)", id="qc-refine", color="primary", block=True, disabled=_busy(),
           click="trigger('qc_refine')", classes="my-2")
    html.Div("{{ qc_prompt }}", v_if=("qc_prompt",), id="qc-prompt", classes="text-caption mb-1")
    with html.Div(v_if=("qc_refine_rows.length",), id="qc-refine-results"):
        html.Div("{{ qc_refined_name }}", classes="text-body-2")
        with html.Div(classes="d-flex my-1"):
            v.VBtn("Accept all", size="small", color="success", classes="mr-2", id="qc-accept-all",
                   click="trigger('qc_decide', [null, true])")
            v.VBtn("Reject all", size="small", color="error", id="qc-reject-all",
                   click="trigger('qc_decide', [null, false])")
        with v.VTable(density="compact", height="260", fixed_header=True, id="qc-refine-table"):
            with html.Thead(), html.Tr():
                for title in ("slice", "before", "after", "", ""):
                    html.Th(title)
            with html.Tbody():
                with html.Tr(v_for="row in qc_refine_rows", key="row.slice", classes="qc-refine-row",
                             raw_attrs=[':data-slice="row.slice"', ':data-decision="row.decision"']):
                    html.Td("{{ row.slice }}")
                    html.Td("{{ row.before }}")
                    html.Td("{{ row.after }}")
                    html.Td("{{ row.decision }}")
                    with html.Td():
                        v.VBtn("Accept", size="x-small", variant="tonal", color="success", classes="qc-accept",
                               click="trigger('qc_decide', [row.slice, true])")
                        v.VBtn("Reject", size="x-small", variant="tonal", color="error", classes="qc-reject ml-1",
                               click="trigger('qc_decide', [row.slice, false])")


def _table(rows: str, columns, click: str, table_id: str, row_class: str):
    with v.VTable(density="compact", height="420", fixed_header=True, id=table_id):
        with html.Thead(), html.Tr():
            for key, title in columns:
                html.Th(title)
        with html.Tbody():
            with html.Tr(v_for=f"row in {rows}", key="row.index", click=click, style="cursor: pointer;",
                         classes=row_class):
                for key, _title in columns:
                    if key == "status":  # an error message in full would squeeze the table: its start, all on hover
                        html.Td("{{ row.status.length > 28 ? row.status.slice(0, 28) + '...' : row.status }}",
                                raw_attrs=[':title="row.status"'])
                    else:
                        html.Td(f"{{{{ row.{key} === null ? '-' : row.{key} }}}}")


def _batch_tab():
    html.Div("Every segment of every segmentation in the scene, worst first; a click selects it.",
             classes="text-caption mb-2")
    v.VBtn("Batch QC of the scene", id="qc-batch", color="primary", block=True, disabled=_busy(),
           click="trigger('qc_batch')", classes="mb-2")
    _table("qc_batch_rows", (("node", "segmentation"), ("segment", "segment"), ("score", "pseudo-DSC"),
                             ("flagged", "flagged slices"), ("status", "status")),
           "trigger('qc_batch_row', [row.index])", "qc-batch-table", "qc-batch-row")


def _cases_tab():
    html.Div("Cases of the QC folder, worst first; a click opens the case with its pGT.",
             classes="text-caption mb-2")
    _table("qc_cases", (("case", "case"), ("structure", "structure"), ("score", "pseudo-DSC"),
                        ("flagged", "flagged"), ("worst", "worst slice")),
           "trigger('qc_case', [row.index])", "qc-cases-table", "qc-case-row")


def _files_tab():
    v.VFileInput(label="Open image (+ segmentations)", multiple=True, density="compact", id="qc-upload-image",
                 change="trigger('qc_upload', [$event.target.files, 'image'])", hide_details=True, classes="mb-2")
    v.VFileInput(label="Add segmentation", multiple=True, density="compact", id="qc-upload-segmentation",
                 change="trigger('qc_upload', [$event.target.files, 'segmentation'])", hide_details=True,
                 classes="mb-2")
    html.Div("{{ qc_scene }}", id="qc-scene", classes="text-caption mb-2")
    with html.Div(classes="d-flex flex-wrap"):
        for what, label in (("scene", "Save scene (.mrb)"), ("segmentation", "Save segmentation (.seg.nrrd)"),
                            ("table", "Save QC table (.csv)")):
            v.VBtn(label, size="small", classes="mr-2 mb-2", id=f"qc-save-{what}", click=f"trigger('qc_save', ['{what}'])")
    html.Div("{{ p }}", v_for="p in qc_saved", key="p", classes="text-caption qc-saved")


def build(app):
    """Build the page for ``app`` (a :class:`SegQCReview.app.ReviewApp`); returns (layout, editor UI)."""
    from trame_slicer.app.ui import SegmentEditorUI, SegmentEditorUndoRedoUI, ViewerLayout

    with ViewerLayout(app.server, title="SegQC Review", is_drawer_visible=True) as layout:
        with layout.drawer:
            editor_ui = SegmentEditorUI()
        with layout.undo_redo:
            SegmentEditorUndoRedoUI(editor_ui=editor_ui)
        with layout.content:
            app.layout_manager.initialize_layout_grid(layout)
        with v.VNavigationDrawer(location="right", width=470, permanent=True, id="qc-panel"):
            with html.Div(classes="pa-3"):
                html.Div("SegQC", classes="text-h6 mb-2")
                _message_area()
                with v.VTabs(v_model=("qc_tab",), density="compact", classes="mb-2"):
                    v.VTab("QC", value="qc", id="qc-tab-qc")
                    v.VTab("Refine", value="refine", id="qc-tab-refine")
                    v.VTab("Batch", value="batch", id="qc-tab-batch")
                    v.VTab("Cases", value="cases", id="qc-tab-cases", v_if=("qc_cases.length",))
                    v.VTab("Files", value="files", id="qc-tab-files")
                for name, builder in (("qc", _qc_tab), ("refine", _refine_tab), ("batch", _batch_tab),
                                      ("cases", _cases_tab), ("files", _files_tab)):
                    with html.Div(v_show=(f"qc_tab === '{name}'",)):
                        builder()
    return layout, editor_ui
