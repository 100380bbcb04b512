"""HERMES (QC-then-refine): prompts from a pGT, the segmenter adapters, the loop, volume mode, CLI.

Real MRI slices come from Colin27 (mricron-data) and MNI152 (nilearn). The pGTs of the unit tests
are built directly from real labels (the brain mask, slightly dilated so that they are imperfect);
one end-to-end test uses the registered ``atlas-brain-mr`` model (Colin27 atlas) on MNI152. The
MedSAM adapter runs on a SAM ViT-B with random weights that this test writes: only what holds for
random weights is asserted (shapes, the 1024 pipeline, the box handed to the prompt encoder).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull

from SegQCLib.errors import InputError
from SegQCLib.metrics import dice
from SegQCLib.qc import QCResult, register_model
from SegQCLib.refine.loop import refine_slice, refine_volume
from SegQCLib.refine.prompts import (
    Prompts,
    box_from_pgt,
    error_clicks,
    hull_clicks,
    initial_prompts,
    prompts_from_pgt,
    scribbles_from_pgt,
)
from SegQCLib.refine.segmenters import (
    CallableSegmenter,
    GrabCutSegmenter,
    RandomWalkerSegmenter,
    segmenter_from_name,
)
from SegQCLib.volume import Volume

TEMPLATES = Path("/usr/share/mricron/templates")
needs_mricron = pytest.mark.skipif(not (TEMPLATES / "ch2bet.nii.gz").exists(), reason="apt-get install mricron-data")


# --------------------------------------------------------------------------- helpers
def disk(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


@pytest.fixture(scope="module")
def colin():
    """Colin27 T1 (with skull) and its brain mask, (z, y, x) 181 x 217 x 181."""
    from SegQCLib.data.sources import colin27

    if not (TEMPLATES / "ch2bet.nii.gz").exists():
        pytest.skip("apt-get install mricron-data")
    subject = colin27("brain")
    return subject.image, subject.segmentation.mask("Brain")


class FixedPGTModel:
    """A QC model whose pGT is given (does not depend on the mask): DSC per slice vs that pGT."""

    name = "test-fixed-pgt"

    def __init__(self, pgt: np.ndarray):
        self.pgt = np.asarray(pgt, bool)
        self.calls = 0

    def assess(self, image: Volume, mask: np.ndarray, label: str, *, threshold: float = 0.8,
               all_slices: bool = True) -> QCResult:
        self.calls += 1
        rows = [{"index": k, "dsc": dice(mask[k], self.pgt[k])} for k in range(mask.shape[0])
                if mask[k].any() or self.pgt[k].any()]
        return QCResult.from_slice_scores(self.name, label, {"dsc": dice(mask, self.pgt)}, rows, threshold,
                                          pgt=self.pgt.copy())


# --------------------------------------------------------------------------- prompts
def test_box_from_pgt_is_the_bounding_box_padded_by_10_px_and_clipped():
    pgt = np.zeros((100, 120), bool)
    pgt[30:51, 40:71] = True  # rows 30..50, columns 40..70
    assert box_from_pgt(pgt) == (30, 20, 80, 60)  # (x0, y0, x1, y1)
    corner = np.zeros((100, 120), bool)
    corner[3:21, 100:116] = True
    assert box_from_pgt(corner) == (90, 0, 119, 30)
    assert box_from_pgt(np.zeros((5, 5), bool)) is None
    assert prompts_from_pgt("box", pgt).box == (30, 20, 80, 60)


def _distance_to_hull_boundary(points: np.ndarray, hull_points: np.ndarray) -> np.ndarray:
    """Distance (px) of each (y, x) point to the closest edge of the convex hull polygon of ``hull_points``."""
    hull = ConvexHull(hull_points)
    vertices = hull_points[hull.vertices].astype(float)
    a, b = vertices, np.roll(vertices, -1, axis=0)
    ab = b - a
    t = np.clip(np.einsum("pij,ij->pi", points[:, None, :] - a[None], ab) / np.einsum("ij,ij->i", ab, ab), 0, 1)
    closest = a[None] + t[..., None] * ab[None]
    return np.linalg.norm(points[:, None, :] - closest, axis=2).min(axis=1)


def test_16_hull_clicks_lie_on_the_convex_hull_of_the_pgt_boundary():
    ellipse = np.zeros((120, 140), bool)
    yy, xx = np.ogrid[:120, :140]
    ellipse[((yy - 60) / 40.0) ** 2 + ((xx - 70) / 55.0) ** 2 <= 1] = True
    clicks = hull_clicks(ellipse)
    assert len(clicks) == 16 and all(positive for _, _, positive in clicks)
    points = np.array([(y, x) for y, x, _ in clicks], float)
    assert ellipse[tuple(points.astype(int).T)].all()
    boundary = np.argwhere(ellipse & ~ndi.binary_erosion(ellipse))
    assert _distance_to_hull_boundary(points, boundary).max() <= 1.5
    assert len({(y, x) for y, x, _ in clicks}) == 16  # spread along the hull, not piled up
    angles = np.sort(np.arctan2(points[:, 0] - 60, points[:, 1] - 70))
    assert np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi])).max() < 2 * np.pi / 16 * 2.5


@needs_mricron
def test_hull_clicks_on_a_real_brain_slice(colin):
    _, truth = colin
    pgt = truth[90]
    clicks = hull_clicks(pgt)
    points = np.array([(y, x) for y, x, _ in clicks], float)
    assert len(clicks) == 16
    boundary = np.argwhere(pgt & ~ndi.binary_erosion(pgt))
    assert pgt[tuple(points.astype(int).T)].all()
    assert _distance_to_hull_boundary(points, boundary).max() <= 3.0  # the brain is nearly convex


def test_error_clicks_land_in_false_negatives_and_false_positives_at_their_deepest_pixel():
    shape = (100, 100)
    pgt = disk(shape, (50, 40), 15)
    mask = disk(shape, (50, 60), 15)
    clicks = error_clicks(mask, pgt)
    fn, fp = pgt & ~mask, mask & ~pgt
    assert any(p for *_, p in clicks) and any(not p for *_, p in clicks)
    for y, x, positive in clicks:
        assert (fn if positive else fp)[y, x]
    # one error component shaped as a disk: the click is at its centre (largest distance to its border)
    only_fn = error_clicks(np.zeros(shape, bool), disk(shape, (30, 70), 9))
    assert only_fn == [(30, 70, True)]
    only_fp = error_clicks(disk(shape, (70, 20), 6), np.zeros(shape, bool))
    assert only_fp == [(70, 20, False)]
    assert error_clicks(pgt, pgt) == []


def test_scribbles_from_pgt_cover_the_structure_and_a_ring_outside_it():
    pgt = disk((100, 100), (50, 50), 25)
    scribbles = scribbles_from_pgt(pgt)
    foreground, background = scribbles == 1, scribbles == 2
    assert foreground.any() and background.any()
    assert not (foreground & ~pgt).any()
    assert not (background & ndi.binary_dilation(pgt, iterations=3)).any()
    refined = prompts_from_pgt("scribbles", pgt, mask=np.zeros_like(pgt))
    assert refined.scribbles is not None and any(p for *_, p in refined.points)


def test_initial_prompts_as_the_paper():
    rng = np.random.default_rng(3)
    assert initial_prompts("box", (50, 60), rng).box == (0, 0, 59, 49)
    clicks = initial_prompts("clicks", (50, 60), rng).points
    assert clicks and all(0 <= y < 50 and 0 <= x < 60 for y, x, _ in clicks)
    scribbles = initial_prompts("scribbles", (50, 60), rng).scribbles
    assert scribbles.shape == (50, 60) and (scribbles == 1).any()
    again = initial_prompts("clicks", (50, 60), np.random.default_rng(3))
    assert initial_prompts("clicks", (50, 60), np.random.default_rng(3)).points == again.points
    with pytest.raises(ValueError):
        initial_prompts("lasso", (5, 5), rng)


def test_prompts_to_json_leave_out_arrays():
    prompts = Prompts(box=(1, 2, 3, 4), points=[(5, 6, True)], scribbles=scribbles_from_pgt(disk((64, 64), (32, 32), 10)))
    text = json.dumps(prompts.to_json_dict())
    assert len(text) < 500 and '"box": [1, 2, 3, 4]' in text


# --------------------------------------------------------------------------- built-in segmenters on real MRI
@needs_mricron
def test_grabcut_from_pgt_prompts_on_a_real_t1_slice(colin):
    image, truth = colin
    slice_, true_mask = image.array[90], truth[90]
    pgt = ndi.binary_dilation(true_mask, iterations=2)  # an imperfect pGT (pseudo-DSC of the truth ~0.97)
    segmenter = GrabCutSegmenter()
    whole = segmenter.segment(slice_, initial_prompts("box", slice_.shape, np.random.default_rng(0)))
    refined = segmenter.segment(slice_, prompts_from_pgt("box", pgt))
    assert refined.shape == slice_.shape and refined.dtype == bool
    # measured: whole-image box 0.78, pGT box 0.85 (the skull is inside both boxes)
    assert dice(refined, true_mask) > 0.80
    assert dice(refined, true_mask) > dice(whole, true_mask) + 0.03
    box = prompts_from_pgt("box", pgt).box
    outside = np.ones_like(refined)
    outside[box[1]: box[3] + 1, box[0]: box[2] + 1] = False
    assert not (refined & outside).any()  # GrabCut keeps outside the box as background


@needs_mricron
def test_random_walker_from_pgt_scribbles_on_a_real_t1_slice(colin):
    image, truth = colin
    slice_, true_mask = image.array[90, ::2, ::2], truth[90, ::2, ::2]  # 2 mm in-plane keeps it fast
    pgt = ndi.binary_dilation(true_mask, iterations=1)
    segmenter = RandomWalkerSegmenter()
    assert segmenter.strategy in ("scribbles", "clicks")
    refined = segmenter.segment(slice_, prompts_from_pgt(segmenter.strategy, pgt))
    assert dice(refined, true_mask) > 0.85  # measured 0.95
    box_only = segmenter.segment(slice_, Prompts(box=box_from_pgt(pgt)))  # border background, centre foreground
    assert box_only.dtype == bool and box_only.shape == slice_.shape and box_only.any()


def test_segmenter_from_name():
    assert isinstance(segmenter_from_name("grabcut"), GrabCutSegmenter)
    assert isinstance(segmenter_from_name("randomwalker"), RandomWalkerSegmenter)
    with pytest.raises(InputError, match="segmenter"):
        segmenter_from_name("snake")
    with pytest.raises(InputError, match="checkpoint"):
        segmenter_from_name("medsam")


# --------------------------------------------------------------------------- the loop
def _scripted(scores: list[float], shape: tuple[int, int] = (40, 40)):
    """A segmenter whose n-th mask has n pixels and a score function reading the score off the area."""
    pgt = disk(shape, (20, 20), 8)
    seen: list[Prompts] = []

    def segment(image, prompts, previous):
        seen.append(prompts)
        mask = np.zeros(shape, bool)
        mask.flat[: len(seen)] = True
        return mask

    def score_fn(mask):
        return scores[int(mask.sum())], pgt

    return CallableSegmenter(segment, strategy="box"), score_fn, seen


def test_loop_stops_at_the_threshold():
    segmenter, score_fn, seen = _scripted([0.2, 0.5, 0.85, 0.99, 0.99])
    trace = refine_slice(np.zeros((40, 40), np.float32), score_fn, segmenter, threshold=0.8,
                         initial_mask=np.zeros((40, 40), bool))
    assert len(trace.iterations) == 3 and trace.best == 2 and "threshold" in trace.stop_reason
    assert all(p.box is not None for p in seen)  # refined boxes from the pGT


def test_loop_stops_after_patience_without_improvement_and_keeps_the_best():
    segmenter, score_fn, _ = _scripted([0.2, 0.6] + [0.5, 0.55, 0.6, 0.3] * 10)
    trace = refine_slice(np.zeros((40, 40), np.float32), score_fn, segmenter, threshold=0.9, patience=4,
                         initial_mask=np.zeros((40, 40), bool))
    assert len(trace.iterations) == 6  # start, 1 improvement, 4 without
    assert trace.best == 1 and trace.best_pseudo_dsc == 0.6 and int(trace.best_mask.sum()) == 1
    assert "without improvement" in trace.stop_reason


def test_loop_stops_at_max_iterations():
    segmenter, score_fn, _ = _scripted([0.01 * i for i in range(40)])
    trace = refine_slice(np.zeros((40, 40), np.float32), score_fn, segmenter, threshold=0.9, max_iterations=20,
                         initial_mask=np.zeros((40, 40), bool))
    assert len(trace.iterations) == 21 and trace.best == 20 and "20" in trace.stop_reason
    data = json.loads(json.dumps(trace.to_json_dict()))
    assert [it["pseudo_dsc"] for it in data["iterations"]][:3] == [0.0, 0.01, 0.02]
    assert len(json.dumps(data)) < 20_000  # no arrays in the JSON trace
    assert trace.iterations[5].mask.shape == (40, 40)  # masks stay available in memory


def test_loop_without_mask_starts_from_the_initial_prompts():
    segmenter, score_fn, seen = _scripted([0.0, 0.9, 0.9])
    trace = refine_slice(np.zeros((40, 40), np.float32), score_fn, segmenter, threshold=0.8)
    assert seen[0].box == (0, 0, 39, 39)  # whole-image box
    assert trace.iterations[0].prompts is seen[0] and trace.stop_reason.startswith("threshold")
    segmenter, score_fn, seen = _scripted([0.0, 0.5, 0.9])
    trace = refine_slice(np.zeros((40, 40), np.float32), score_fn, segmenter, threshold=0.8, strategy="clicks",
                         rng=np.random.default_rng(1))
    assert seen[0].box is None and seen[0].points  # random clicks instead of the segmenter's box
    assert len(seen[1].points) >= 16  # then clicks on the pGT's hull


def test_loop_leaves_the_initial_mask_alone():
    segmenter, _, _ = _scripted([0.1] * 40)
    initial = np.zeros((40, 40), bool)
    initial[5, 5] = True
    initial.flags.writeable = False
    before = initial.copy()
    trace = refine_slice(np.zeros((40, 40), np.float32), lambda m: (0.1, disk((40, 40), (20, 20), 8)), segmenter,
                         initial_mask=initial, patience=2)
    assert np.array_equal(initial, before) and trace.best == 0


# --------------------------------------------------------------------------- volume mode
@pytest.fixture(scope="module")
def small_case(colin):
    """Eight axial slices of Colin27 (2 mm in-plane), the truth as pGT, a mask with two bad slices."""
    image, truth = colin
    array = np.ascontiguousarray(image.array[80:120:5, ::2, ::2])
    truth_small = np.ascontiguousarray(truth[80:120:5, ::2, ::2])
    volume = Volume.from_array(array, spacing=(5.0, 2.0, 2.0), name="colin-small")
    mask = truth_small.copy()
    mask[2] = ndi.binary_erosion(truth_small[2], iterations=12)  # DSC ~0.6
    mask[5] = np.roll(truth_small[5], 25, axis=1)  # shifted
    return volume, truth_small, mask


@needs_mricron
def test_refine_volume_touches_only_flagged_slices_and_copies_the_mask(small_case):
    volume, truth, mask = small_case
    model = FixedPGTModel(truth)
    mask = mask.copy()
    mask.flags.writeable = False
    before = mask.copy()
    done = []
    result = refine_volume(volume, mask, "Brain", model, GrabCutSegmenter(), threshold=0.8,
                           progress=lambda i, n: done.append((i, n)))
    assert np.array_equal(mask, before)
    assert result.slices == [2, 5] and done == [(1, 2), (2, 2)]
    untouched = [k for k in range(mask.shape[0]) if k not in (2, 5)]
    assert np.array_equal(result.mask[untouched], mask[untouched])
    for k in (2, 5):  # the pGT is the truth here, so the loop stops once the true DSC reaches 0.8
        assert dice(result.mask[k], truth[k]) >= 0.8 > dice(mask[k], truth[k])
    data = json.loads(json.dumps(result.to_json_dict()))
    assert data["slices_refined"] == [2, 5]
    assert result.mask.dtype == bool and result.mask.shape == mask.shape


@needs_mricron
def test_refine_volume_without_mask_segments_where_the_pgt_is(small_case):
    volume, truth, _ = small_case
    pgt = truth.copy()
    pgt[0] = False
    result = refine_volume(volume, None, "Brain", FixedPGTModel(pgt), GrabCutSegmenter(), threshold=0.8,
                           slices=None)
    assert [t.index for t in result.traces] == list(range(1, truth.shape[0]))
    assert not result.mask[0].any()
    assert np.mean([dice(result.mask[k], truth[k]) for k in range(1, truth.shape[0])]) > 0.85


@needs_mricron
def test_rescoring_hook_runs_the_model_on_every_candidate(small_case):
    """For pGT models whose pGT depends on the mask (nnQC), ``rescore="model"`` asks the model again."""
    volume, truth, mask = small_case
    model = FixedPGTModel(truth)
    result = refine_volume(volume, mask, "Brain", model, GrabCutSegmenter(), threshold=0.8, rescore="model")
    assert model.calls == 1 + sum(len(t.iterations) for t in result.traces)
    with pytest.raises(ValueError):
        refine_volume(volume, mask, "Brain", model, GrabCutSegmenter(), rescore="sometimes")


def test_a_model_without_pgt_is_refused():
    class Scores:
        name = "scores-only"

        def assess(self, image, mask, label, *, threshold=0.8, all_slices=True):
            return QCResult.from_slice_scores(self.name, label, {"dsc": 0.5}, [{"index": 0, "dsc": 0.5}], threshold)

    volume = Volume.from_array(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(InputError, match="pseudo ground truth"):
        refine_volume(volume, np.ones((2, 8, 8), bool), "x", Scores(), GrabCutSegmenter())


# --------------------------------------------------------------------------- refine_command (files)
@needs_mricron
def test_refine_command_writes_the_mask_and_the_trace(small_case, tmp_path, monkeypatch):
    from SegQCLib import qc
    from SegQCLib.io import read_segmentation, write_mask, write_volume
    from SegQCLib.refine.cli import refine_command

    volume, truth, mask = small_case
    model = FixedPGTModel(truth)
    qc.available_models()  # discover the installed models first, then register ours in a copy
    monkeypatch.setattr(qc, "_REGISTRY", dict(qc._REGISTRY))  # undone after the test
    register_model("test-refine-pgt", lambda device: model, "test pGT", "reconstruction")
    image_path, seg_path = tmp_path / "image.nii.gz", tmp_path / "seg.nii.gz"
    write_volume(volume, image_path)
    write_mask(mask, volume.grid, seg_path)
    kwargs = {"segmenter": "grabcut", "checkpoint": None, "threshold": 0.8, "model": "test-refine-pgt",
              "label": None, "name": "Brain", "device": "cpu", "max_iterations": 20, "only_flagged": True}

    # bad outputs fail before any work
    with pytest.raises(InputError, match="overwrite an input"):
        refine_command(image_path, seg_path, seg_path, json_out=None, **kwargs)
    with pytest.raises(InputError, match="does not exist"):
        refine_command(image_path, seg_path, tmp_path / "nowhere" / "out.nii.gz", json_out=None, **kwargs)
    with pytest.raises(InputError, match="segmenter"):
        refine_command(image_path, seg_path, tmp_path / "o.nii.gz", json_out=None, **{**kwargs, "segmenter": "x"})
    assert model.calls == 0

    out, trace = tmp_path / "refined.nii.gz", tmp_path / "trace.json"
    result = refine_command(image_path, seg_path, out, json_out=trace, **kwargs)
    written = read_segmentation(out).layers[0] > 0
    assert np.array_equal(written, result.mask)
    assert read_segmentation(seg_path).layers[0].astype(bool).tolist() == mask.tolist()  # input untouched
    data = json.loads(trace.read_text())
    assert data["slices_refined"] == [2, 5] and data["segmenter"] == "grabcut" and data["strategy"] == "box"
    with pytest.raises(InputError, match="strategy"):
        refine_command(image_path, seg_path, tmp_path / "o.nii.gz", json_out=None, **kwargs, strategy="lasso")
    assert all(t["iterations"] for t in data["traces"])

    # without a segmentation: the structure must be named; then every pGT slice is segmented
    with pytest.raises(InputError, match="name"):
        refine_command(image_path, None, tmp_path / "new.nii.gz", json_out=None, **{**kwargs, "name": None})
    scratch = refine_command(image_path, None, tmp_path / "new.nii.gz", json_out=None, **kwargs)
    assert scratch.slices == list(range(truth.shape[0])) and (tmp_path / "new.nii.gz").is_file()
    assert np.mean([dice(scratch.mask[k], truth[k]) for k in scratch.slices]) > 0.85

    # a model that gives scores only cannot drive HERMES
    register_model("test-scores-only", lambda device: model, "scores", "regressor")
    with pytest.raises(InputError, match="pseudo ground truth"):
        refine_command(image_path, seg_path, tmp_path / "o.nii.gz", json_out=None,
                       **{**kwargs, "model": "test-scores-only"})


# --------------------------------------------------------------------------- end to end with atlas-brain-mr
@needs_mricron
def test_end_to_end_with_the_atlas_model_on_held_out_mni152():
    """MNI152 T1 (held out) with the atlas model (Colin27 registered onto it): bad slices get fixed."""
    from SegQCLib.data.sources import mni152
    from SegQCLib.qc import load_model

    subject = mni152("brain")
    truth = subject.segmentation.mask("Brain")
    mask = truth.copy()
    bad = (70, 100)
    for k in bad:
        mask[k] = np.roll(truth[k], 40, axis=1)  # shifted 40 mm sideways: DSC ~0.6
    model = load_model("atlas-brain-mr", "cpu")
    result = refine_volume(subject.image, mask, "Brain", model, GrabCutSegmenter(), threshold=0.8)
    assert result.qc.extra["atlas"] == "mricron-data:ch2bet"  # never MNI152's own mask
    refined = {t.index for t in result.traces}
    assert set(bad) <= refined
    for k in bad:
        assert dice(mask[k], truth[k]) < 0.75
        assert dice(result.mask[k], truth[k]) > 0.85
    assert not np.array_equal(mask, result.mask)
    unflagged = [k for k in range(truth.shape[0]) if k not in refined]
    assert np.array_equal(result.mask[unflagged], mask[unflagged])


# --------------------------------------------------------------------------- MedSAM adapter
@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory) -> Path:
    """A SAM ViT-B built by segment_anything with random weights, saved as a plain state dict (as
    MedSAM's medsam_vit_b.pth is)."""
    torch = pytest.importorskip("torch")
    registry = pytest.importorskip("segment_anything").sam_model_registry
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("medsam") / "medsam_vit_b.pth"
    torch.save(registry["vit_b"](checkpoint=None).state_dict(), path)
    return path


def test_medsam_adapter_runs_the_1024_pipeline_on_a_checkpoint_we_wrote(sam_checkpoint):
    """One 1024 x 1024 forward of SAM ViT-B on the CPU (the slow test of this file)."""
    from SegQCLib.refine.segmenters import MedSAMSegmenter

    segmenter = MedSAMSegmenter(sam_checkpoint, device="cpu")
    assert segmenter.strategy == "box"
    seen: dict = {}

    def record(key: str, value) -> None:  # forward pre-hooks must return None
        seen.setdefault(key, []).append(value)

    segmenter.sam.image_encoder.register_forward_pre_hook(lambda module, args: record("image", args[0]))
    segmenter.sam.prompt_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: record("boxes", kwargs.get("boxes")), with_kwargs=True)
    segmenter.sam.mask_decoder.register_forward_pre_hook(
        lambda module, args, kwargs: record("multimask", kwargs.get("multimask_output")), with_kwargs=True)
    image = (np.random.default_rng(0).normal(100.0, 20.0, size=(96, 80))).astype(np.float32)
    mask = segmenter.segment(image, Prompts(box=(10, 20, 49, 69)))
    assert mask.shape == (96, 80) and mask.dtype == bool
    (encoded,) = seen["image"]
    assert tuple(encoded.shape) == (1, 3, 1024, 1024)
    assert float(encoded.min()) >= 0.0 and float(encoded.max()) <= 1.0 and float(encoded.max()) > 0.9
    assert np.allclose(seen["boxes"][0].cpu().numpy().ravel(),
                       [10 * 1024 / 80, 20 * 1024 / 96, 49 * 1024 / 80, 69 * 1024 / 96])
    assert seen["multimask"] == [False]
    again = segmenter.segment(image, Prompts(box=(10, 20, 49, 69)))  # same slice: decoder only
    assert np.array_equal(mask, again) and len(seen["image"]) == 1 and len(seen["boxes"]) == 2


def test_medsam_refuses_a_corrupt_or_mismatched_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("segment_anything")
    from SegQCLib.refine.segmenters import MedSAMSegmenter

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(InputError, match="corrupt.pth"):
        MedSAMSegmenter(corrupt, device="cpu")
    with pytest.raises(InputError, match="missing.pth"):
        MedSAMSegmenter(tmp_path / "missing.pth", device="cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(InputError, match="wrong.pth"):
        MedSAMSegmenter(wrong, device="cpu")
