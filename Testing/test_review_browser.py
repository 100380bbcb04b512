"""SegQC Review in a real browser: `segqc review --demo` served on 127.0.0.1, Debian's chromium driven
by Playwright, headless. Colin27 with a degraded brain mask; the pGT model ``atlas-brain-mr``
(MNI152's brain registered onto it).

What the browser shows is checked against the project's own computations, never against itself:
the table against :class:`SegQCLogic.SegQCLogic` run here on the same files, the slice offset
against the Logic's slice position, the saved segmentation's voxels against the demo's masks, the
pGT outline's pixels against where the pGT projects in the axial view. Every wait is on page
content or state, bounded; none is a fixed sleep. The tests share one server and one page (the app
serves one browser per process) and run in file order.

Screenshots go to the test's temporary folder; with ``SEGQC_UPDATE_SCREENSHOTS=1`` they are also
copied into ``Resources/Screenshots/`` (the README's pictures).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
SCREENSHOTS = ROOT / "Resources" / "Screenshots"
MODEL = "atlas-brain-mr"
STRUCTURE = "Brain"  # the demo's first segment; atlas-brain-mr scores it from MNI152's brain
PGT_RGB = (0.1, 0.9, 0.2)  # the Logic's pGT colour (SegQCLogic.pseudoGroundTruthToSegmentation)

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None or importlib.util.find_spec("trame_slicer") is None,
                       reason="needs the review extra (pip install 'segqc[review]')"),
]

WAIT_MS = 60_000  # bound of every wait on the page (QC with a pGT model takes ~8 s on 2 cores)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def demo_available():
    from SegQCLib.data.sources import DataSourceMissing, colin27
    from SegQCLib.qc import available_models

    try:
        colin27("aal")
    except DataSourceMissing as err:
        pytest.skip(str(err))
    if MODEL not in {m.name for m in available_models()}:
        pytest.skip(f"{MODEL} is not installed")


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("review-out")


def start_review(args: list[str], out_dir: Path):
    """``segqc review ARGS --port 0 --out OUT_DIR`` on 127.0.0.1: (url, process); fails with its log."""
    env = {**os.environ, "VTK_DEFAULT_OPENGL_WINDOW": "vtkEGLRenderWindow", "PYTHONUNBUFFERED": "1"}
    log = (out_dir / "server.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "SegQCLib.cli", "review", *args, "--port", "0", "--out", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=log, text=True, encoding="utf-8", errors="replace", env=env,
                            cwd=out_dir)
    url, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        match = re.search(r"SegQC Review: (http://127\.0\.0\.1:\d+/)", line)
        if match:
            url = match.group(1)
            break
    log.close()
    if url is None:
        proc.kill()
        pytest.fail(f"the review server did not start:\n{(out_dir / 'server.log').read_text(errors='replace')[-3000:]}")
    return url, proc


def stop_review(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(demo_available, out_dir):
    """``segqc review --demo`` on a free port of 127.0.0.1: (url, process)."""
    url, proc = start_review(["--demo", "--model", MODEL], out_dir)
    try:
        yield url, proc
    finally:
        stop_review(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield instance
        instance.close()


def open_page(browser, url: str):
    """A new browser context and page on ``url``, once the panel and the three views are there."""
    context = browser.new_context(viewport={"width": 1600, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(url)
    page.wait_for_selector("#qc-run", state="attached")
    page.wait_for_function("document.querySelectorAll('.layout-grid-item img, .layout-grid-item canvas').length >= 3")
    return context, page


@pytest.fixture(scope="module")
def page(server, browser):
    context, page = open_page(browser, server[0])
    yield page
    context.close()


@pytest.fixture(scope="module")
def expected(demo_available, slicer_env, tmp_path_factory):
    """The Logic's own result on the demo's files, here in the test process (headless Slicer)."""
    from test_slicer_logic import add_segment, load_volume

    import SegQCLogic
    from SegQCReview.inputs import demo_case

    scene = slicer_env.mrmlScene
    scene.Clear(0)
    image, checked = demo_case()
    volumeNode = load_volume(slicer_env, Path(image), "ch2")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "demo")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    segmentId = add_segment(slicer_env, node, STRUCTURE, checked.masks[STRUCTURE], volumeNode)
    logic = SegQCLogic.SegQCLogic()
    logic.assessSegment(volumeNode, node, segmentId, MODEL, "cpu", 0.8)
    result = logic.lastResult
    slices = {int(row["index"]): row for row in result.slices}
    positions = {k: logic.sliceRAS(volumeNode, k) for k in slices}
    yield {"result": result, "slices": slices, "positions": positions, "masks": checked.masks,
           "ijk_to_ras": logic.ijkToWorldMatrix(volumeNode)}
    scene.Clear(0)


def shot(page, name: str, tmp: Path, element=None) -> Path:
    """Screenshot of the page (or ``element``) into ``tmp``; copied to Resources/Screenshots on request."""
    path = tmp / f"{name}.png"
    (element or page).screenshot(path=str(path))
    if os.environ.get("SEGQC_UPDATE_SCREENSHOTS") == "1" and element is None:
        from PIL import Image

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        picture = Image.open(path).convert("RGB")
        picture = picture.resize((1200, round(1200 * picture.height / picture.width)), Image.LANCZOS)
        picture.quantize(colors=128).save(SCREENSHOTS / path.name, optimize=True)  # small enough to commit
    return path


def wait_text(page, selector: str, pattern: str):
    """Wait until ``selector``'s text matches the regular expression ``pattern``; return the text."""
    page.wait_for_function("([s, p]) => { const e = document.querySelector(s); return e && new RegExp(p).test(e.innerText); }",
                           arg=[selector, pattern])
    return page.inner_text(selector)


def table_rows(page) -> list[dict]:
    return page.evaluate("""() => [...document.querySelectorAll('#qc-table .qc-row')].map(tr => {
        const row = {};
        tr.querySelectorAll('td').forEach(td => { row[td.dataset.column] = td.innerText; });
        row.slice = Number(tr.dataset.slice);
        return row; })""")


def axial_state(page) -> dict:
    return page.evaluate("""() => { const e = document.querySelector('#qc-axial');
        return e ? {slice: Number(e.dataset.slice), offset: Number(e.dataset.offset)} : null; }""")


def save(page, what: str) -> Path:
    """Click Save <what> in the Files tab; the path the app wrote."""
    page.click("#qc-tab-files")
    before = page.locator(".qc-saved").count()
    page.click(f"#qc-save-{what}")
    page.wait_for_function(f"document.querySelectorAll('.qc-saved').length > {before}")
    return Path(page.locator(".qc-saved").nth(before).inner_text().strip())


def read_segment(path: Path, name: str) -> np.ndarray:
    from SegQCLib.io import align_to_grid, read_segmentation, read_volume
    from SegQCReview.inputs import demo_case

    grid = read_volume(demo_case()[0]).grid
    return align_to_grid(read_segmentation(path), grid).mask(name)


# --------------------------------------------------------------------------- tests
def test_run_qc_table_is_the_logic_result_one_row_per_slice(page, expected, tmp_path):
    page.click("#qc-tab-qc")
    page.click("#qc-run")
    page.wait_for_selector("#qc-table .qc-row")
    wait_text(page, "#qc-summary", STRUCTURE)
    rows = table_rows(page)
    mask_slices = {int(k) for k in np.flatnonzero(expected["masks"][STRUCTURE].any(axis=(1, 2)))}
    assert sorted(r["slice"] for r in rows) == sorted(expected["slices"]), "one row per scored slice"
    assert mask_slices <= {r["slice"] for r in rows}, "every slice holding the structure has a row"
    for row in rows:
        assert float(row["dsc"]) == pytest.approx(expected["slices"][row["slice"]]["dsc"], abs=1e-4), row
    dscs = [float(r["dsc"]) for r in rows]
    assert dscs == sorted(dscs), "worst first"
    assert page.locator("#qc-plot .qc-plot-point").count() == len(rows)
    assert page.locator("#qc-overlay").is_visible()


def test_a_row_click_and_a_plot_click_jump_the_axial_view_to_the_slice(page, expected):
    rows = table_rows(page)
    target = rows[len(rows) // 2]["slice"]
    page.click(f"#qc-table .qc-row[data-slice='{target}']")
    page.wait_for_function(f"document.querySelector('#qc-axial').dataset.slice == '{target}'")
    s = expected["positions"][target][2]
    assert axial_state(page)["offset"] == pytest.approx(s, abs=1e-3)
    other = rows[-1]["slice"]
    page.click(f"#qc-plot .qc-plot-point[data-slice='{other}']")
    page.wait_for_function(f"document.querySelector('#qc-axial').dataset.slice == '{other}'")
    assert axial_state(page)["offset"] == pytest.approx(expected["positions"][other][2], abs=1e-3)


def _green_pixels(image: np.ndarray) -> np.ndarray:
    """Bool (h, w): pixels close to the pGT colour (JPEG-streamed, so a tolerance)."""
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return (g > 110) & (g - r > 40) & (g - b > 30)


def _axial_image(page, tmp_path, name):
    from PIL import Image

    view = page.locator(".layout-grid-item img, .layout-grid-item canvas").first
    path = shot(page, name, tmp_path, element=view)
    return np.asarray(Image.open(path).convert("RGB")), view.bounding_box()


def _outline_distance(pgt_slice: np.ndarray, ijkToRas, k: int, axial: dict, image_shape) -> np.ndarray:
    """Distance (screen px) of every pixel of the axial view's image to the outline of the pGT of
    slice ``k`` as the slice node projects it: voxel centres IJK -> RAS (the Logic's matrix) -> XY
    (inverse XYToRAS, origin bottom-left) -> image pixels, filled, its boundary."""
    from scipy import ndimage as ndi

    yx = np.argwhere(pgt_slice)
    ijk = np.c_[yx[:, 1], yx[:, 0], np.full(len(yx), k), np.ones(len(yx))]
    xy = (ijk @ np.asarray(ijkToRas).T) @ np.linalg.inv(np.asarray(axial["xy_to_ras"])).T
    width, height = axial["dims"]
    sx, sy = image_shape[1] / width, image_shape[0] / height
    cols = np.clip(np.round(xy[:, 0] * sx).astype(int), 0, image_shape[1] - 1)
    rows = np.clip(np.round((height - xy[:, 1]) * sy).astype(int), 0, image_shape[0] - 1)
    region = np.zeros(image_shape[:2], bool)
    region[rows, cols] = True
    px = int(np.ceil(max(sx, sy) * np.linalg.norm(np.asarray(ijkToRas)[:3, 0])))  # screen px per voxel, about
    region = ndi.binary_closing(ndi.binary_dilation(region, iterations=max(px // 2, 1)), iterations=2)
    outline = region & ~ndi.binary_erosion(region)
    return ndi.distance_transform_edt(~outline)


def test_pgt_outline_colour_is_in_the_axial_view_where_the_pgt_is(page, expected, tmp_path):
    pgt = np.asarray(expected["result"].pgt, bool)
    k = int(np.argmax(pgt.sum(axis=(1, 2))))
    page.uncheck("#qc-show-fp")
    page.uncheck("#qc-show-fn")
    page.click("#qc-tab-qc")
    page.evaluate(f"window.trame.trigger('qc_jump', [{k}])")
    page.wait_for_function(f"document.querySelector('#qc-axial').dataset.slice == '{k}'")
    axial = page.evaluate("window.trame.state.get('qc_axial')")
    deadline, near, far = time.monotonic() + WAIT_MS / 1000, 0, 0
    while time.monotonic() < deadline:  # the view streams its image: wait until the outline shows
        image, _box = _axial_image(page, tmp_path, "review-pgt-axial")
        distance = _outline_distance(pgt[k], expected["ijk_to_ras"], k, axial, image.shape)
        green = _green_pixels(image)
        near, far = int((green & (distance <= 6)).sum()), int((green & (distance > 6)).sum())
        if near >= 50 and far <= near / 4:
            break
    assert near >= 50, f"no pGT outline pixels along the pGT's outline (near {near}, elsewhere {far})"
    assert far <= near / 4, f"pGT-coloured pixels away from the pGT's outline: {far} vs {near} along it"
    page.uncheck("#qc-show-pgt")  # the toggle hides it
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        image, _box = _axial_image(page, tmp_path, "review-pgt-hidden")
        if _green_pixels(image).sum() < near / 10:
            break
    assert _green_pixels(image).sum() < near / 10
    for toggle in ("#qc-show-pgt", "#qc-show-fp", "#qc-show-fn"):
        page.check(toggle)
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:  # FP (orange) back in view: the README's picture of the QC panel
        image, _box = _axial_image(page, tmp_path, "review-overlay-axial")
        r, g, b = (image[..., i].astype(int) for i in range(3))
        if ((r > 180) & (g > 90) & (g < 190) & (b < 80)).sum() > 50 and _green_pixels(image).sum() >= near / 2:
            break
    shot(page, "review-qc", tmp_path)


def test_refine_adds_a_segment_shows_prompts_keeps_the_original(page, expected, tmp_path):
    rows = table_rows(page)
    worst = rows[0]["slice"]
    page.click(f"#qc-table .qc-row[data-slice='{worst}']")
    page.wait_for_function(f"document.querySelector('#qc-axial').dataset.slice == '{worst}'")
    page.click("#qc-tab-refine")
    page.check("#qc-refine-in-view")
    page.click("#qc-refine")
    wait_text(page, "#qc-prompt", rf"slice {worst}: box")
    page.wait_for_selector("#qc-refine-table .qc-refine-row")
    shot(page, "review-hermes", tmp_path)
    refined = page.evaluate("[...document.querySelectorAll('.qc-refine-row')].map(r => Number(r.dataset.slice))")
    assert refined == [worst]
    segments = page.evaluate("window.trame.state.get('qc_segments').map(s => s.title)")
    assert f"{STRUCTURE} refined" in segments and STRUCTURE in segments
    saved = save(page, "segmentation")
    original = read_segment(saved, STRUCTURE)
    assert np.array_equal(original, expected["masks"][STRUCTURE]), "the original segment's voxels changed"
    result = read_segment(saved, f"{STRUCTURE} refined")
    assert not np.array_equal(result[worst], original[worst]), "the refinement changed nothing on its slice"
    others = [k for k in range(original.shape[0]) if k != worst]
    assert np.array_equal(result[others], original[others]), "slices not refined must be the original's"


def test_cancel_adds_nothing(page):
    page.click("#qc-tab-refine")
    page.uncheck("#qc-refine-in-view")  # every flagged slice: long enough to cancel
    count = len(page.evaluate("window.trame.state.get('qc_segments')"))
    page.click("#qc-refine")
    page.wait_for_selector("#qc-cancel")
    page.click("#qc-cancel")
    wait_text(page, "#qc-info", "cancelled, nothing was added")
    assert len(page.evaluate("window.trame.state.get('qc_segments')")) == count
    page.check("#qc-refine-in-view")


def test_reject_accept_and_the_editor_undo(page, expected):
    k = page.evaluate("Number(document.querySelector('.qc-refine-row').dataset.slice)")
    original = expected["masks"][STRUCTURE]
    refined_name = f"{STRUCTURE} refined"
    refined_before = read_segment(save(page, "segmentation"), refined_name)
    page.click("#qc-tab-refine")
    page.click(f".qc-refine-row[data-slice='{k}'] .qc-reject")
    page.wait_for_selector(f".qc-refine-row[data-slice='{k}'][data-decision='rejected']")
    rejected = read_segment(save(page, "segmentation"), refined_name)
    assert np.array_equal(rejected[k], original[k]), "Reject puts the original's voxels back on the slice"
    page.click("#qc-tab-refine")
    page.click(f".qc-refine-row[data-slice='{k}'] .qc-accept")
    page.wait_for_selector(f".qc-refine-row[data-slice='{k}'][data-decision='accepted']")
    accepted = read_segment(save(page, "segmentation"), refined_name)
    assert np.array_equal(accepted[k], refined_before[k]), "Accept puts the refinement back"
    undo = page.locator("button:has(.mdi-undo)").first
    undo.click()  # the Segment Editor's undo: back to the rejected state
    deadline = time.monotonic() + WAIT_MS / 1000
    while time.monotonic() < deadline:
        undone = read_segment(save(page, "segmentation"), refined_name)
        if np.array_equal(undone[k], original[k]):
            break
    assert np.array_equal(undone[k], original[k]), "Undo in the Segment Editor undoes the Accept"
    assert np.array_equal(read_segment(save(page, "segmentation"), STRUCTURE), original)


def test_batch_table_lists_every_segment_worst_first(page, tmp_path):
    from SegQCLib.qc import available_models

    if "sentinel-brain-mr" in {m.name for m in available_models()}:  # it scores every named structure
        page.evaluate("window.trame.state.set('qc_model', 'sentinel-brain-mr')")
        page.wait_for_function("window.trame.state.get('qc_model') === 'sentinel-brain-mr'")
    page.click("#qc-tab-batch")
    page.click("#qc-batch")
    page.wait_for_selector("#qc-batch-table .qc-batch-row")
    rows = page.evaluate("window.trame.state.get('qc_batch_rows')")
    segments = page.evaluate("window.trame.state.get('qc_segments').map(s => s.title)")
    assert sorted(r["segment"] for r in rows) == sorted(segments)
    scores = [r["score"] for r in rows if r["score"] is not None]
    assert scores == sorted(scores)
    shot(page, "review-batch", tmp_path)
    page.evaluate(f"window.trame.state.set('qc_model', '{MODEL}')")


def test_a_corrupt_or_mismatched_upload_gives_a_message_and_changes_nothing(page, tmp_path):
    from SegQCLib.io import write_mask
    from SegQCLib.volume import Grid

    page.click("#qc-tab-files")
    scene = page.inner_text("#qc-scene")
    corrupt = tmp_path / "broken.nii.gz"
    corrupt.write_bytes(b"this is not a NIfTI file")
    page.set_input_files("#qc-upload-segmentation", str(corrupt))
    assert "broken.nii.gz" in wait_text(page, "#qc-error", "broken")
    assert page.inner_text("#qc-scene") == scene
    small = tmp_path / "small.nii.gz"
    write_mask(np.ones((4, 5, 6), bool), Grid((4, 5, 6), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                                            (1, 0, 0, 0, 1, 0, 0, 0, 1)), small)
    page.set_input_files("#qc-upload-segmentation", str(small))
    assert "small" in wait_text(page, "#qc-error", "small")
    assert page.inner_text("#qc-scene") == scene


def test_a_model_that_does_not_fit_gives_a_message_and_changes_nothing(page):
    """atlas-brain-mr has no atlas but Colin27's own for Colin27's hippocampus: an error, not a pGT."""
    page.click("#qc-tab-qc")
    scene = page.evaluate("window.trame.state.get('qc_scene')")
    rows = len(table_rows(page))
    page.evaluate("""() => { const s = window.trame.state;
        s.set('qc_segment', s.get('qc_segments').find(x => x.title === 'Hippocampus_L').value); }""")
    page.wait_for_function("window.trame.state.get('qc_segments').find(x => x.value === "
                           "window.trame.state.get('qc_segment')).title === 'Hippocampus_L'")
    page.click("#qc-run")
    message = wait_text(page, "#qc-error", "no atlas other than the image itself")
    assert "Hippocampus_L" in message
    page.wait_for_function("!window.trame.state.get('qc_busy')")
    assert page.evaluate("window.trame.state.get('qc_scene')") == scene
    assert len(table_rows(page)) == rows and page.evaluate("window.trame.state.get('qc_has_pgt')")


def test_a_second_browser_is_told_the_review_is_in_use(page, server, browser):
    url, _proc = server
    other = browser.new_context()
    try:
        second = other.new_page()
        response = second.goto(url)
        assert response.status == 423
        assert "in use" in second.inner_text("body")
        assert second.locator("#qc-run").count() == 0
        # a websocket opened anyway gets closed before any state or image
        closed = second.evaluate("""(url) => new Promise(resolve => {
            const ws = new WebSocket(url.replace('http', 'ws') + 'ws');
            const got = [];
            ws.onmessage = m => got.push(m.data);
            ws.onclose = e => resolve({code: e.code, messages: got.length});
            setTimeout(() => resolve({code: -1, messages: got.length}), 20000);
        })""", url)
        assert closed["code"] == 4423 and closed["messages"] == 0, closed
    finally:
        other.close()
    page.click("#qc-tab-qc")  # the first browser keeps its review, still connected
    assert page.locator("#qc-run").is_visible()
    page.click("#qc-table .qc-row >> nth=1")
    page.wait_for_function("document.querySelector('#qc-axial').dataset.slice == "
                           "document.querySelectorAll('#qc-table .qc-row')[1].dataset.slice")


def test_the_saved_scene_opens_in_a_new_review(page, browser, tmp_path):
    """Save scene (.mrb) in the Files tab, then `segqc review saved.mrb` shows the same segmentation."""
    page.click("#qc-tab-qc")
    segments = sorted(page.evaluate("window.trame.state.get('qc_segments').map(s => s.title)"))
    mrb = save(page, "scene")
    assert mrb.suffix == ".mrb" and mrb.stat().st_size > 0
    url, proc = start_review([str(mrb), "--model", MODEL], tmp_path)
    try:
        context, other = open_page(browser, url)
        try:
            other.wait_for_function("window.trame.state.get('qc_segments').length > 0")
            assert sorted(other.evaluate("window.trame.state.get('qc_segments').map(s => s.title)")) == segments
            names = other.evaluate("window.trame.state.get('qc_segmentations').map(s => s.title)")
            assert names == ["Colin27 degraded"], "SegQC's pGT node is not offered for review"
        finally:
            context.close()
    finally:
        stop_review(proc)


def test_uploading_an_image_with_its_segmentation_opens_them(page, tmp_path):
    """Files tab, Open image (+ segmentations): a label map with a sidecar-free single structure
    and the image, in either order; the scene then holds them (this replaces the demo: keep last)."""
    from SegQCLib.io import write_mask
    from SegQCReview.inputs import demo_case

    image_path, checked = demo_case()
    from SegQCLib.io import read_volume

    grid = read_volume(image_path).grid
    label = write_mask(checked.masks["Hippocampus_L"], grid, tmp_path / "hippo.nii.gz")
    page.click("#qc-tab-files")
    page.set_input_files("#qc-upload-image", [str(label), image_path])
    wait_text(page, "#qc-info", "loaded")
    assert not page.evaluate("window.trame.state.get('qc_error')")
    scene = page.inner_text("#qc-scene")
    assert "ch2" in scene and "hippo (1 segments)" in scene, scene
    assert page.evaluate("window.trame.state.get('qc_segmentations').map(s => s.title)") == ["hippo"]
