"""QANet: nuclei simulator, trinary encoding, RibCage wiring, training, save/load, tiling, input checks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from SegQCLib.data.cells import simulate_cells
from SegQCLib.errors import InputError
from SegQCLib.models.qanet import (COUNT_FRACTION, QANetConfig, QANetQC, build_network, count_parameters,
                                   encode_segmentation, load_model, save_model, tile_starts, trinary, typical_size)

TINY = dict(width=0.125, rib_convs=1, fc=(32, 32))


# ------------------------------------------------------------------------------------ simulator
@pytest.mark.parametrize("shape", [(96, 128), (24, 64, 64)])
def test_simulator_gives_exact_instance_ground_truth(shape) -> None:
    radius = 9.0 if len(shape) == 2 else 7.0
    image, labels = simulate_cells(shape, 6, seed=3, radius=radius, max_overlap=0.1)
    assert image.shape == labels.shape == shape
    assert image.dtype == np.float32 and labels.dtype == np.uint16
    ids = np.unique(labels)
    n = int(labels.max())
    assert n == 6  # sparse enough that every nucleus is placed
    assert np.array_equal(ids, np.arange(n + 1))  # consecutive, background 0
    for value in range(1, n + 1):  # each instance one face-connected piece
        assert ndi.label(labels == value)[1] == 1
    inside, outside = image[labels > 0].mean(), image[ndi.binary_dilation(labels > 0, iterations=3) == 0].mean()
    assert inside > 1.5 * outside
    again_image, again_labels = simulate_cells(shape, 6, seed=3, radius=radius, max_overlap=0.1)
    assert np.array_equal(again_labels, labels) and np.array_equal(again_image, image)
    assert not np.array_equal(simulate_cells(shape, 6, seed=4, radius=radius)[1], labels)


def test_simulator_makes_touching_nuclei_when_crowded() -> None:
    _, labels = simulate_cells((96, 96), 40, seed=0, radius=8.0, max_overlap=0.2)
    grown = ndi.grey_dilation(labels, size=3)
    touching = (grown != labels) & (labels > 0) & (grown > 0)
    assert touching.any()


def _touching_pairs(labels: np.ndarray) -> int:
    pairs = set()
    for axis in range(labels.ndim):
        a, b = np.moveaxis(labels, axis, 0)[:-1], np.moveaxis(labels, axis, 0)[1:]
        contact = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[contact].tolist(), b[contact].tolist())}
    return len(pairs)


@pytest.mark.parametrize("shape", [(160, 160), (24, 96, 96)])
def test_clustering_places_nuclei_in_touching_clumps(shape) -> None:
    """Sparse scenes: uniform placement leaves nuclei apart; clustering makes them touch in clumps."""
    spread = sum(_touching_pairs(simulate_cells(shape, 12, seed=s, radius=9.0)[1].astype(int)) for s in range(4))
    clumped = sum(_touching_pairs(simulate_cells(shape, 12, seed=s, radius=9.0, clustering=0.8)[1].astype(int))
                  for s in range(4))
    assert clumped >= max(8, 3 * spread), (spread, clumped)


def test_negative_overlap_keeps_clumped_neighbours_apart() -> None:
    """max_overlap < 0: clumped neighbours keep a gap and kiss at most at a point (cells3d), instead of
    sharing a contact line."""
    def contact_px(max_overlap: float) -> int:
        total = 0
        for seed in range(3):
            labels = simulate_cells((160, 160), 12, seed=seed, radius=9.0, clustering=0.8, irregularity=0.02,
                                    max_overlap=max_overlap)[1].astype(int)
            a, b = labels[:, :-1], labels[:, 1:]
            total += int(np.count_nonzero((a > 0) & (b > 0) & (a != b)))
        return total

    overlapping, apart = contact_px(0.15), contact_px(-0.1)
    assert overlapping > 50 and apart < 0.1 * overlapping, (overlapping, apart)


# ------------------------------------------------------------------------------------ encodings
def test_trinary_on_hand_made_labels() -> None:
    labels = np.zeros((6, 8), np.int32)
    labels[1:5, 1:4] = 1
    labels[1:5, 4:7] = 2  # touches instance 1 along x = 3|4
    tri = trinary(labels)
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 2, 2, 2, 2, 2, 2, 0],
        [0, 2, 1, 2, 2, 1, 2, 0],
        [0, 2, 1, 2, 2, 1, 2, 0],
        [0, 2, 2, 2, 2, 2, 2, 0],
        [0, 0, 0, 0, 0, 0, 0, 0]], np.uint8)
    assert np.array_equal(tri, expected)
    # the array border is not a boundary; binary encoding loses the separation of touching instances
    full = trinary(np.ones((3, 3), np.int32))
    assert np.all(full == 1)
    assert encode_segmentation(tri, "trinary").shape == (2, 6, 8)
    binary = encode_segmentation(tri, "binary")
    assert binary.shape == (1, 6, 8) and binary[0, 2, 3] == binary[0, 2, 4] == 1
    tri3 = trinary(np.pad(np.ones((3, 3, 3), np.int32), 1))
    assert tri3[2, 2, 2] == 1 and tri3[1, 1, 1] == 2 and tri3[0, 0, 0] == 0


# ------------------------------------------------------------------------------------ network
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("fusion", ["ribcage", "naive", "siamese"])
@pytest.mark.parametrize("encoding", ["trinary", "binary"])
def test_forward_shapes(dims, fusion, encoding) -> None:
    config = QANetConfig(dims=dims, fusion=fusion, encoding=encoding, patch=16, targets=("seg", "nemhd"), **TINY)
    net = build_network(config).eval()
    x = torch.rand((3, 1) + (16,) * dims)
    s = torch.rand((3, config.seg_channels) + (16,) * dims)
    out = net(x, s)
    assert out.shape == (3, 2)
    assert torch.all((out >= 0) & (out <= 1))


def test_ablation_networks_have_matched_parameter_counts() -> None:
    counts = {f: count_parameters(build_network(QANetConfig(fusion=f, width=0.25))) for f in ("ribcage", "naive", "siamese")}
    for fusion in ("naive", "siamese"):
        assert abs(counts[fusion] - counts["ribcage"]) / counts["ribcage"] < 0.05, counts


def test_ribcage_spine_is_fed_by_the_segmentation_rib_and_siamese_is_not() -> None:
    torch.manual_seed(0)
    rib = build_network(QANetConfig(fusion="ribcage", **TINY)).eval()
    siam = build_network(QANetConfig(fusion="siamese", **TINY)).eval()
    x = torch.rand(2, 1, 32, 32)
    s1 = torch.zeros(2, 2, 32, 32)
    s2 = s1.clone()
    s2[:, 0, 8:24, 8:24] = 1.0
    # ribcage: every spine block has a segmentation branch, and the first spine block's output moves with the mask
    assert all(block.from_seg is not None for block in rib.spine)
    seen = []
    hook = rib.spine[0].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    rib(x, s1), rib(x, s2)
    hook.remove()
    assert not torch.allclose(seen[0], seen[1])
    # the gradient of the output reaches the spine's segmentation weights of every block
    rib.zero_grad()
    rib(x, s2).sum().backward()
    assert all(block.from_seg.weight.grad.abs().sum() > 0 for block in rib.spine)
    # siamese: no spine; the image rib never sees the mask, the ribs meet only at the FC head
    assert not hasattr(siam, "spine")
    feats = []
    hook = siam.rib_image[-1].register_forward_hook(lambda m, i, o: feats.append(o.detach()))
    out1, out2 = siam(x, s1), siam(x, s2)
    hook.remove()
    assert torch.allclose(feats[0], feats[1])
    assert not torch.allclose(out1, out2)
    assert siam.head[0].in_features == 2 * siam.widths[-1]


# ------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> tuple[Path, object]:
    from SegQCLib.train.qanet_data import generate_samples
    from SegQCLib.train.qanet_train import QANetTrainOptions, train

    kw = dict(patch=32, image_shape=(96, 96), radius_range=(4.0, 8.0), targets=("seg",), progress=False)
    train_set = generate_samples(2, 48, seed=10, **kw)
    val_set = generate_samples(2, 5, seed=11, **kw)
    test_set = generate_samples(2, 8, seed=12, **kw)
    out = tmp_path_factory.mktemp("qanet")
    config = QANetConfig(dims=2, patch=32, diameter_range=(8.0, 16.0), **TINY)
    options = QANetTrainOptions(epochs=8, batch_size=32, lr=3e-3, seed=0, threads=1, device="cpu")
    threads = torch.get_num_threads()
    try:
        best = train(out, train_set, val_set, config, options, progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)  # training uses 1 thread; leave the process as it was
    return best, test_set


def test_tiny_model_learns_seg_on_held_out_simulations(tiny_model) -> None:
    from SegQCLib.train.qanet_train import predict_samples

    best, test_set = tiny_model
    model = load_model(best, "cpu")
    r_trained = np.corrcoef(predict_samples(model.net, test_set, "trinary")[:, 0], test_set.seg)[0, 1]
    torch.manual_seed(0)
    fresh = build_network(model.config)
    r_random = np.corrcoef(predict_samples(fresh, test_set, "trinary")[:, 0], test_set.seg)[0, 1]
    assert r_trained > 0.6, r_trained
    assert r_random < 0.4, r_random
    assert (best.parent / "checkpoint.pt").exists()
    state = torch.load(best.parent / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["epoch"] == 8 and state["batch"] == 0


def test_training_stopped_at_a_batch_resumes_to_the_same_weights(tmp_path, monkeypatch) -> None:
    """Ctrl-C in the middle of a batch of epoch 2: the run stops after that batch, and the resumed
    run ends with the weights and validation numbers of a run that never stopped."""
    import os
    import signal

    from SegQCLib.train import qanet_train
    from SegQCLib.train.qanet_data import generate_samples
    from SegQCLib.train.qanet_train import QANetTrainOptions, train

    kw = {"patch": 32, "image_shape": (96, 96), "radius_range": (4.0, 8.0), "targets": ("seg",), "progress": False}
    train_set = generate_samples(2, 6, seed=10, **kw)
    val_set = generate_samples(2, 2, seed=11, **kw)
    config = QANetConfig(dims=2, patch=32, diameter_range=(8.0, 16.0), **TINY)
    options = QANetTrainOptions(epochs=2, batch_size=8, lr=3e-3, seed=0, threads=1, device="cpu")
    n_batches = len(train_set) // options.batch_size
    assert n_batches >= 3
    quiet = {"progress": False, "log": lambda *a: None}
    threads = torch.get_num_threads()
    augment, calls = qanet_train.augment, {"n": 0}

    def stopping_augment(*args):  # one call per batch, before its forward pass
        calls["n"] += 1
        if calls["n"] == n_batches + 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in epoch 2's second batch
        return augment(*args)

    try:
        train(tmp_path / "straight", train_set, val_set, config, options, **quiet)
        monkeypatch.setattr(qanet_train, "augment", stopping_augment)
        with pytest.raises(KeyboardInterrupt):
            train(tmp_path / "stopped", train_set, val_set, config, options, **quiet)
        state = torch.load(tmp_path / "stopped" / "checkpoint.pt", map_location="cpu", weights_only=True)
        assert (state["epoch"], state["batch"]) == (1, 2)  # after the batch it was in
        train(tmp_path / "stopped", train_set, val_set, config, options, **quiet)
    finally:
        torch.set_num_threads(threads)
    straight, resumed = (torch.load(tmp_path / run / "checkpoint.pt", map_location="cpu", weights_only=True)
                         for run in ("straight", "stopped"))
    for key, value in straight["net"].items():
        assert torch.equal(value, resumed["net"][key]), key
    def without_times(history: str) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads(history)]

    assert without_times(resumed["history"]) == without_times(straight["history"])


def test_distance_targets_come_last_and_get_their_own_head() -> None:
    with pytest.raises(InputError, match="distances"):
        QANetConfig(targets=("seg", "mhd95", "nemhd"))
    config = QANetConfig(patch=16, targets=("seg", "nemhd", "mhd95", "asd"), **TINY)
    assert config.n_bounded == 2
    net = build_network(config).eval()
    with torch.no_grad():
        net.distance_head[-1].bias.fill_(30.0)  # softplus(30) = 30 px: distances are not squashed into [0, 1]
        out = net(torch.randn(3, 1, 16, 16), torch.rand(3, 2, 16, 16))
    assert out.shape == (3, 4)
    assert torch.all((out[:, :2] >= 0) & (out[:, :2] <= 1)) and torch.all(out[:, 2:] > 20)


def test_extending_a_model_with_distance_heads_keeps_its_other_outputs(tiny_model, tmp_path) -> None:
    from SegQCLib.train.qanet_cli import evaluate_qanet, sample_set, train_qanet
    from SegQCLib.train.qanet_train import predict_samples

    best, test_set = tiny_model
    base = load_model(best, "cpu")
    threads = torch.get_num_threads()
    try:
        card, report = train_qanet(tmp_path / "run", extend=best, targets=("seg", "mhd95", "asd"), train_images=48,
                                   val_images=6, test_images=10, stack_images=(0, 0, 0), epochs=6, lr=3e-3,
                                   data_dir=tmp_path / "data", device="cpu", progress=False, log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    extended = load_model(card, "cpu")
    assert extended.config.targets == ("seg", "mhd95", "asd") and extended.name == base.name
    # the base network was frozen: its predictions are the same, bit for bit
    assert np.array_equal(predict_samples(extended.net, test_set, "trinary")[:, 0],
                          predict_samples(base.net, test_set, "trinary")[:, 0])
    data = json.loads(card.read_text())
    assert set(data["distance_heads"]["targets"]) == {"mhd95", "asd"}
    for target in ("mhd95", "asd"):
        row = data["metrics"]["test_simulated"][target]
        assert report[target]["mae"] == pytest.approx(row["mae"])
    held_out = sample_set(tmp_path / "data", 2, "test", 10, 32, ("seg", "mhd95", "asd"), progress=False)
    for k, target in enumerate(("mhd95", "asd"), start=1):
        row = data["metrics"]["test_simulated"][target]
        truth = held_out.target[:, k]
        constant_mae = float(np.abs(truth - np.median(truth)).mean())  # the best constant guess
        assert row["n"] == len(held_out) > 50
        assert row["lcc"] > 0.25 and row["mae"] < constant_mae, (target, row, constant_mae)
    again = evaluate_qanet(card, tmp_path / "data", device="cpu", progress=False, log=lambda *a: None)
    assert again["test_simulated"]["mhd95"]["mae"] == pytest.approx(report["mhd95"]["mae"])
    with pytest.raises(InputError, match="distance heads"):
        train_qanet(tmp_path / "again", extend=card, targets=("seg", "mhd95"), progress=False, log=lambda *a: None)


def test_distances_of_pieces_apart_include_the_other_pieces_outlines() -> None:
    from SegQCLib.models.qanet import combine_distances, distances_to_other_pieces, scored_pieces

    labels = np.zeros((20, 40), np.int32)
    labels[5:15, 5:15] = 1      # one id on two 10 x 10 squares, 10 px apart
    labels[5:15, 25:35] = 1
    labels[5:15, 17:19] = 2     # another instance in between, in one piece: absent from the result
    scored = scored_pieces(labels)
    others = distances_to_other_pieces(scored.pieces, scored.owner)
    assert sorted(scored.owner[list(others)]) == [1, 1]
    for n_outline, distance in others.values():
        assert n_outline == 36                                  # the outline of a 10 x 10 square
        assert distance.size == 36 and distance.min() == pytest.approx(11.0)
        assert distance.max() == pytest.approx(20.0)                # the far side, level with the piece
    # pooled with the network's own distances: ASD is the mean of all, MHD95 read from the far ones
    mhd95, asd = combine_distances(2.0, 1.0, 100, np.full(50, 10.0))
    assert asd == pytest.approx((200 * 1.0 + 50 * 10.0) / 250) and mhd95 == pytest.approx(10.0)
    mhd95, asd = combine_distances(2.0, 1.0, 100, np.full(5, 10.0))  # 5 of 205 distances: below the 95th percentile
    assert mhd95 == 2.0 and asd == pytest.approx((200 + 50) / 205)
    assert combine_distances(2.0, 1.0, 100, np.zeros(0)) == (2.0, 1.0)


def test_distances_are_reported_in_px_of_the_input_image(tiny_model, tmp_path, monkeypatch) -> None:
    """The distance head predicts on the working grid; at scale 0.5 one working px is two input px.
    Distances are instance averages like the SEG, but not multiplied by a piece's cover: the pieces of
    one id add the distances between them instead (:func:`combine_distances`)."""
    best, _ = tiny_model
    base = load_model(best, "cpu")
    config = QANetConfig.from_dict({**base.config.to_dict(), "targets": ("seg", "mhd95", "asd")})
    model = QANetQC("with-distances", build_network(config), config)
    monkeypatch.setattr(model, "predict_patches", lambda images, tri: np.tile([0.8, 3.0, 1.5], (len(images), 1)))
    labels = np.zeros((64, 128), np.int32)
    labels[10:40, 10:40] = 1
    labels[10:40, 70:110] = 2
    image = np.where(labels > 0, 3.0, 1.0) + np.random.default_rng(0).normal(0, 0.1, labels.shape)
    result = model.assess_instances(image, labels, patch=32, overlap=0.0, scale=0.5)
    assert all(row["mhd95"] == pytest.approx(6.0) and row["asd"] == pytest.approx(3.0) for row in result.patches)
    scores = result.to_json_dict()["image_score"]
    assert scores["mhd95"] == pytest.approx(6.0) and scores["asd"] == pytest.approx(3.0)
    assert scores["seg"] == pytest.approx(0.8)
    # one id on two pieces 10 px apart: SEG charges each piece its share; the distances of each piece's
    # nucleus include the other piece's outline, 5 to 27 px away on the input grid
    apart = labels.copy()
    apart[10:40, 85:95] = 0
    pieces = model.assess_instances(image, apart, patch=32, overlap=0.0, scale=0.5).to_json_dict()["image_score"]
    assert pieces["seg"] < 0.8 - 0.05
    assert 10.0 < pieces["mhd95"] < 30.0 and 3.0 + 1.0 < pieces["asd"] < 15.0
    auto = model.assess_instances(image, labels).extra["image_scores"]
    volume = model.assess(image, labels).volume  # the QCResult protocol (batch QC, reports)
    assert volume == pytest.approx({"seg": auto["seg_objects"] if "seg_objects" in auto else auto["seg"],
                                    "mhd95": auto["mhd95"], "asd": auto["asd"]})


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tmp_path) -> None:
    best, test_set = tiny_model
    model = load_model(best, "cpu")
    card = save_model(model.net, model.config, tmp_path / "copy", {"name": "qanet-copy", "metrics": {"r": 0.9}})
    data = json.loads(card.read_text())
    assert data["architecture"] == "qanet" and data["name"] == "qanet-copy" and data["dims"] == 2
    assert data["fusion"] == "ribcage" and data["encoding"] == "trinary" and data["patch"] == 32
    assert data["priority"] == 0 and (tmp_path / "copy.safetensors").exists()
    again = load_model(card, "cpu")
    image = np.random.default_rng(0).normal(size=(80, 96)).astype(np.float32)
    labels = np.zeros((80, 96), np.int32)
    labels[10:30, 10:30], labels[40:60, 50:75] = 1, 2
    a = model.assess_instances(image, labels, scale=1.0)
    b = again.assess_instances(image, labels, scale=1.0)
    assert np.array_equal(a.patch_scores, b.patch_scores)
    # float16 shipping changes outputs only slightly
    half = load_model(save_model(model.net, model.config, tmp_path / "half", half=True), "cpu")
    assert np.allclose(half.assess_instances(image, labels, scale=1.0).patch_scores, a.patch_scores, atol=0.02)


@pytest.mark.parametrize("fusion", ["naive", "siamese"])
def test_widened_ablation_networks_survive_save_and_load(fusion, tmp_path) -> None:
    config = QANetConfig(fusion=fusion, patch=16, **TINY)
    net = build_network(config).eval()
    assert net.stream_mult != 1.0
    again = load_model(save_model(net, config, tmp_path / fusion), "cpu")
    # saved again from the loaded copy (as training does): the widening must survive a second round
    again = load_model(save_model(again.net, config, tmp_path / f"{fusion}-2"), "cpu")
    x, s = torch.rand(2, 1, 16, 16), torch.rand(2, 2, 16, 16)
    # the loaded copy runs channels-last on CPU: same weights, last-bit differences in the convolutions
    assert torch.allclose(net(x, s), again.net.float().eval()(x, s), atol=1e-6, rtol=0)


def test_registry_lists_qanet_cards_as_instance_models(tiny_model, tmp_path, monkeypatch) -> None:
    from SegQCLib import qc
    from SegQCLib.models import register_installed_models

    best, _ = tiny_model
    shutil.copy(best, tmp_path / "qanet-test.json")
    shutil.copy(best.with_suffix(".safetensors"), tmp_path / "best.safetensors")
    data = json.loads((tmp_path / "qanet-test.json").read_text())
    data["name"] = "qanet-test"
    (tmp_path / "qanet-test.json").write_text(json.dumps(data))
    monkeypatch.setenv("SEGQC_MODELS_DIR", str(tmp_path))
    register_installed_models()
    entry = {m.name: m for m in qc.available_models()}["qanet-test"]
    assert entry.kind == "instance"
    assert isinstance(qc.load_model("qanet-test", "cpu"), QANetQC)


# ------------------------------------------------------------------------------------ tiling
def test_tile_starts_cover_the_axis() -> None:
    for n, p, overlap in [(100, 32, 0.5), (64, 32, 0.0), (33, 32, 0.25), (20, 32, 0.5)]:
        starts = tile_starts(n, p, overlap)
        covered = np.zeros(max(n, p), bool)
        for s in starts:
            covered[s:s + p] = True
        assert covered[:n].all() and starts[0] == 0 and starts[-1] == max(0, n - p)


def test_tiling_heat_map_matches_patch_scores(tiny_model) -> None:
    best, _ = tiny_model
    model = load_model(best, "cpu")
    image, labels = simulate_cells((96, 64), 8, seed=5, radius=6.0)
    result = model.assess_instances(image, labels, patch=32, overlap=0.0, scale=1.0)
    assert len(result.patches) == 6 and result.heatmap.shape == image.shape
    for row in result.patches:
        box = (slice(row["y0"], row["y0"] + row["size"]), slice(row["x0"], row["x0"] + row["size"]))
        assert np.allclose(result.heatmap[box], row["seg"], atol=1e-6)
    weights = np.array([row["n_instances"] for row in result.patches], float)
    assert result.extra["image_scores_patch_weighted"]["seg"] == pytest.approx(
        np.average(result.patch_scores, weights=weights))
    # without overlap each pixel lies in one patch: an instance scores the pixel-weighted mean of its
    # patches, and the image score weighs instances by max(1, size / typical size)
    sizes = np.bincount(labels.ravel())
    typical = typical_size(labels)
    scores, inst_w = [], []
    for value in np.flatnonzero(sizes[1:] >= COUNT_FRACTION * typical) + 1:
        px = [np.count_nonzero(labels[row["y0"]:row["y0"] + 32, row["x0"]:row["x0"] + 32] == value)
              for row in result.patches]
        scores.append(np.average(result.patch_scores, weights=px))
        inst_w.append(max(1.0, sizes[value] / typical))
    assert result.image_score == pytest.approx(np.average(scores, weights=inst_w))
    # overlapping patches: every pixel covered, each the mean of its covering patches
    result = model.assess_instances(image, labels, patch=32, overlap=0.5, scale=1.0)
    total, count = np.zeros(image.shape), np.zeros(image.shape)
    for row in result.patches:
        box = (slice(row["y0"], row["y0"] + 32), slice(row["x0"], row["x0"] + 32))
        total[box] += row["seg"]
        count[box] += 1
    assert count.min() >= 1
    assert np.allclose(result.heatmap, total / count, atol=1e-5)
    payload = result.to_json_dict()
    assert set(payload) >= {"model", "image_score", "patches"} and "seg" in payload["image_score"]
    assert set(payload["patches"][0]) == {"y0", "x0", "size", "seg", "n_instances"}
    json.dumps(payload)


def test_image_score_is_the_instance_average_of_the_seg_objects_head() -> None:
    """A model with a ``seg_objects`` head reports that head's instance average as the image score and
    keeps the paper's patch SEG in the heat map and the patch rows."""
    from SegQCLib.models.qanet import QANetQC

    torch.manual_seed(3)
    config = QANetConfig(dims=2, patch=32, targets=("seg", "nemhd", "seg_objects"), **TINY)
    net = build_network(config).eval()
    with torch.no_grad():  # make the two SEG heads answer differently
        net.head[-1].bias[2] += 2.0
    model = QANetQC("three-heads", net, config)
    image, labels = simulate_cells((64, 64), 5, seed=8, radius=6.0)
    result = model.assess_instances(image, labels, patch=32, overlap=0.0, scale=1.0)
    scores = result.extra["image_scores"]
    assert set(scores) == {"seg", "nemhd", "seg_objects"}
    assert abs(scores["seg"] - scores["seg_objects"]) > 1e-3
    assert result.image_score == pytest.approx(scores["seg_objects"])
    row = result.patches[0]
    assert set(row) >= {"seg", "nemhd", "seg_objects"}
    assert np.allclose(result.heatmap[:32, :32], row["seg"], atol=1e-6)
    payload = result.to_json_dict()
    assert payload["image_score"]["seg"] == pytest.approx(scores["seg_objects"], abs=1e-5)


def test_split_components_gives_each_piece_its_share_of_its_instance() -> None:
    from SegQCLib.models.qanet import split_components

    labels = np.zeros((12, 12), np.int32)
    labels[1:4, 1:4] = 1        # instance 1: two pieces apart, 9 + 3 px
    labels[8:9, 8:11] = 1
    labels[1:4, 4:7] = 2        # instance 2 touches instance 1 and stays its own piece
    labels[5, 5] = 3            # instance 3: two pixels touching diagonally, one piece
    labels[6, 6] = 3
    pieces, share, owner = split_components(labels)
    assert pieces.max() == 4
    assert np.array_equal(pieces > 0, labels > 0)
    for piece in range(1, 5):  # every piece lies in one instance
        assert len(np.unique(labels[pieces == piece])) == 1
    by_piece = {int(labels[pieces == k][0]): [] for k in range(1, 5)}
    for k in range(1, 5):
        by_piece[int(labels[pieces == k][0])].append(share[k])
    assert sorted(by_piece[1]) == pytest.approx([0.25, 0.75])
    assert by_piece[2] == pytest.approx([1.0]) and by_piece[3] == pytest.approx([1.0])
    assert share[0] == 0.0 and owner[0] == 0
    assert all(owner[k] == labels[pieces == k][0] for k in range(1, 5))


def test_one_id_on_nuclei_apart_is_scored_as_a_merge(tiny_model) -> None:
    """Two nuclei apart under one id draw the same trinary map as two ids; the image score still
    falls to each piece's share, as SEG does (here two equal pieces: half)."""
    best, _ = tiny_model
    model = load_model(best, "cpu")
    labels = np.zeros((64, 128), np.int32)
    yy, xx = np.mgrid[:64, :128]
    labels[(yy - 32) ** 2 + (xx - 32) ** 2 < 81] = 1
    labels[(yy - 32) ** 2 + (xx - 96) ** 2 < 81] = 2
    rng = np.random.default_rng(4)
    image = ndi.gaussian_filter(np.where(labels > 0, 3000.0, 1000.0), 1.0) + rng.normal(0, 50, labels.shape)
    merged = np.where(labels > 0, 1, 0).astype(np.int32)
    apart = model.assess_instances(image, labels, patch=32, overlap=0.0, scale=1.0)
    joined = model.assess_instances(image, merged, patch=32, overlap=0.0, scale=1.0)
    assert apart.image_score > 0.05
    assert np.allclose(apart.heatmap, joined.heatmap)  # the network sees the same input
    assert joined.image_score == pytest.approx(0.5 * apart.image_score, rel=1e-6)
    assert apart.to_json_dict()["instances_in_pieces"] == 0
    assert joined.to_json_dict()["instances_in_pieces"] == 1


def _kissing_pair(shape: tuple[int, ...], centres: list[tuple[float, ...]], radius: float, neck: float) -> np.ndarray:
    """One id on two balls (discs in 2D) joined by a straight neck of half-width ``neck`` px."""
    grid = np.indices(shape).astype(np.float64)
    inside = np.zeros(shape, bool)
    for c in centres:
        inside |= sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= radius ** 2
    a, b = np.asarray(centres[0], float), np.asarray(centres[1], float)
    axis = (b - a) / np.linalg.norm(b - a)
    along = sum((g - ai) * ui for g, ai, ui in zip(grid, a, axis))
    across2 = sum((g - ai - along * ui) ** 2 for g, ai, ui in zip(grid, a, axis))
    inside |= (along >= 0) & (along <= np.linalg.norm(b - a)) & (across2 <= neck ** 2)
    return inside.astype(np.int32)


def test_split_necks_cuts_bodies_joined_by_a_neck_and_nothing_convex() -> None:
    from SegQCLib.models.qanet import split_components, split_necks

    def cut(labels):
        pieces, _, _ = split_components(labels)
        parts, parent = split_necks(pieces)
        return parts, parent

    pair = _kissing_pair((40, 80), [(20, 20), (20, 58)], radius=12, neck=2)       # neck 1/6 of the radius
    parts, parent = cut(pair)
    assert parts.max() == 2 and list(parent) == [0, 1, 1]
    assert np.array_equal(parts > 0, pair > 0)                                       # every pixel kept
    assert all(abs(parts[20, x] - (1 if x < 39 else 2)) == 0 for x in (10, 30, 48, 68))
    broad = _kissing_pair((40, 80), [(20, 20), (20, 58)], radius=12, neck=9)        # a waist, not a neck
    assert cut(broad)[0].max() == 1
    yy, xx = np.mgrid[:40, :80]
    ellipse = (((yy - 20) / 8.0) ** 2 + ((xx - 40) / 30.0) ** 2 <= 1).astype(np.int32)  # 4:1, convex
    assert cut(ellipse)[0].max() == 1
    bump = ((yy - 20) ** 2 + (xx - 30) ** 2 <= 12 ** 2).astype(np.int32)
    bump[(yy - 20) ** 2 + (xx - 44) ** 2 <= 4 ** 2] = 1                             # a small knob on a disc
    assert cut(bump)[0].max() == 1
    chain = ((yy - 10) ** 2 + (xx - 10) ** 2 <= 64) | ((yy - 30) ** 2 + (xx - 30) ** 2 <= 64)
    chain[np.arange(15, 26), np.arange(15, 26)] = True                              # a one-pixel diagonal neck
    parts, _ = cut(chain.astype(np.int32))
    assert parts.max() == 2 and np.array_equal(parts > 0, chain)                     # the diagonal pixels too
    balls = _kissing_pair((24, 24, 56), [(12, 12, 12), (12, 12, 42)], radius=9, neck=1.5)
    parts3, parent3 = cut(balls)
    assert parts3.max() == 2 and parts3[12, 12, 12] != parts3[12, 12, 42]


def test_bodies_joined_by_a_neck_are_scored_as_a_merge(tiny_model) -> None:
    """Two nuclei that kiss, segmented as one id through a neck: with ``necks`` the image score falls
    to each body's share (here about half), the network input being the same; without, it does not."""
    best, _ = tiny_model
    model = load_model(best, "cpu")
    merged = _kissing_pair((64, 128), [(32, 44), (32, 84)], radius=18, neck=2)
    truth = merged.copy()
    truth[:, 64:] *= 2
    rng = np.random.default_rng(5)
    image = ndi.gaussian_filter(np.where(truth > 0, 3000.0, 1000.0), 1.0) + rng.normal(0, 50, truth.shape)
    plain = model.assess_instances(image, merged, patch=32, overlap=0.0, scale=0.5)
    cut = model.assess_instances(image, merged, patch=32, overlap=0.0, scale=0.5, necks=True)
    assert plain.image_score > 0.05
    assert np.allclose(plain.heatmap, cut.heatmap)
    assert cut.image_score == pytest.approx(0.5 * plain.image_score, rel=0.15)
    assert plain.to_json_dict()["instances_cut_at_necks"] == 0
    assert cut.to_json_dict()["instances_cut_at_necks"] == 1
    assert cut.to_json_dict()["instances_in_pieces"] == 0
    separate = model.assess_instances(image, truth, patch=32, overlap=0.0, scale=0.5, necks=True)
    assert separate.to_json_dict()["instances_cut_at_necks"] == 0


def test_distances_of_a_merge_cut_at_a_neck_include_the_other_bodys_outline() -> None:
    """Two nuclei segmented as one id through a neck: each nucleus's true MHD95 and ASD against the
    merge include the other body's outline. Each body gets the instance's outline beyond it (the cut
    face is inside the instance, no outline), and pooled with zero own distances (each body is its
    nucleus) they come near the truth; without the cut there is nothing to pool."""
    from SegQCLib.metrics import instance_metrics
    from SegQCLib.models.qanet import combine_distances, distances_to_other_pieces, scored_pieces

    merged = _kissing_pair((40, 80), [(20, 20), (20, 58)], radius=12, neck=2)
    truth = merged.copy()
    truth[:, 39:] *= 2
    true = instance_metrics(merged, truth)
    assert true["mhd95"] > 25 and true["asd"] > 4
    plain = scored_pieces(merged)
    assert distances_to_other_pieces(plain.pieces, plain.owner) == {}
    scored = scored_pieces(merged, necks=True)
    others = distances_to_other_pieces(scored.pieces, scored.owner)
    assert sorted(others) == [1, 2]
    outline = (merged > 0) & ~ndi.binary_erosion(merged > 0)
    assert sum(n for n, _ in others.values()) == np.count_nonzero(outline)   # no cut face counted
    pooled = [combine_distances(0.0, 0.0, n_outline, distance) for n_outline, distance in others.values()]
    mhd95, asd = np.mean(pooled, axis=0)
    assert mhd95 == pytest.approx(true["mhd95"], rel=0.1) and asd == pytest.approx(true["asd"], rel=0.1)


def test_fill_holes_fills_what_one_instance_encloses_and_nothing_else() -> None:
    from SegQCLib.models.qanet import fill_holes

    labels = np.zeros((14, 20), np.int32)
    labels[1:8, 1:8] = 1
    labels[3:5, 3:5] = 0        # a hole of instance 1: filled
    labels[1:8, 10:13] = 2      # instances 2 and 3 enclose a gap together: stays background
    labels[1:8, 14:17] = 3
    labels[1, 13] = 2
    labels[7, 13] = 3
    labels[9:14, 1:6] = 4       # a notch of instance 4 open to the border: stays background
    labels[11:14, 3] = 0
    filled = fill_holes(labels)
    assert filled.dtype == labels.dtype
    assert np.all(filled[3:5, 3:5] == 1)
    assert np.all(filled[2:7, 13] == 0)
    assert np.all(filled[11:14, 3] == 0)
    assert np.array_equal(filled[labels > 0], labels[labels > 0])  # no instance pixel changes
    assert np.count_nonzero(filled != labels) == 4
    cube = np.zeros((7, 7, 7), np.uint16)
    cube[1:6, 1:6, 1:6] = 5
    cube[3, 3, 3] = 0           # a cavity in 3D; a hole in its z slice only
    assert fill_holes(cube)[3, 3, 3] == 5
    assert np.array_equal(fill_holes(labels[:, :0]), labels[:, :0])


def test_scored_pieces_weigh_holes_and_pieces_by_what_they_cover() -> None:
    from SegQCLib.models.qanet import scored_pieces

    labels = np.zeros((12, 24), np.int32)
    labels[1:11, 1:11] = 1      # 100 px outline with a 4 px hole: covers 96 %
    labels[4:6, 4:6] = 0
    labels[1:4, 14:17] = 2      # two pieces of 9 px under one id: half each
    labels[8:11, 14:17] = 2
    filled, pieces, cover, owner, _ = scored_pieces(labels)
    assert np.all(filled[4:6, 4:6] == 1)
    weights = {(int(owner[k]), int(np.count_nonzero(pieces == k))): cover[k] for k in range(1, pieces.max() + 1)}
    assert weights == pytest.approx({(1, 100): 0.96, (2, 9): 0.5})


def test_holes_are_filled_for_the_network_and_cost_their_share(tiny_model) -> None:
    """A nucleus whose mask has a hole is scored as the filled mask times the share it covers, and the
    result counts it in ``instances_with_holes``."""
    best, _ = tiny_model
    model = load_model(best, "cpu")
    yy, xx = np.mgrid[:64, :64]
    labels = ((yy - 32) ** 2 + (xx - 32) ** 2 < 196).astype(np.int32)
    rng = np.random.default_rng(5)
    image = ndi.gaussian_filter(np.where(labels > 0, 3000.0, 1000.0), 1.0) + rng.normal(0, 50, labels.shape)
    holed = labels.copy()
    holed[(yy - 30) ** 2 + (xx - 34) ** 2 < 16] = 0
    cover = np.count_nonzero(holed) / np.count_nonzero(labels)
    whole = model.assess_instances(image, labels, patch=32, overlap=0.0, scale=1.0)
    with_hole = model.assess_instances(image, holed, patch=32, overlap=0.0, scale=1.0)
    assert whole.image_score > 0.05
    assert np.allclose(whole.heatmap, with_hole.heatmap)  # the network sees the filled mask
    assert with_hole.image_score == pytest.approx(cover * whole.image_score, rel=1e-6)
    assert whole.to_json_dict()["instances_with_holes"] == 0
    assert with_hole.to_json_dict()["instances_with_holes"] == 1


def test_rescaling_and_3d_inputs(tiny_model) -> None:
    best, _ = tiny_model
    model = load_model(best, "cpu")
    image, labels = simulate_cells((120, 120), 6, seed=6, radius=20.0)  # larger nuclei than trained on
    result = model.assess_instances(image, labels)
    assert result.scale < 1.0 and result.heatmap.shape == image.shape
    assert not np.isnan(result.heatmap).any()
    # a 2D model scores the z slices of a volume that hold instances
    volume, vlabels = simulate_cells((6, 64, 64), 3, seed=7, radius=8.0)
    result = model.assess_instances(volume, vlabels, scale=1.0)
    zs = {row["z0"] for row in result.patches}
    assert zs == set(np.flatnonzero(vlabels.reshape(6, -1).any(axis=1)).tolist())


def test_bad_inputs_raise_input_error_naming_the_problem(tiny_model) -> None:
    best, _ = tiny_model
    model = load_model(best, "cpu")
    image = np.zeros((64, 64), np.float32)
    labels = np.zeros((64, 64), np.int32)
    with pytest.raises(InputError, match="shape"):
        model.assess_instances(image, labels[:32])
    with pytest.raises(InputError, match="integer"):
        model.assess_instances(image, labels + 0.5)
    bad = image.copy()
    bad[3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        model.assess_instances(bad, labels)
    with pytest.raises(InputError, match="non-negative"):
        model.assess_instances(image, labels - 1)
    with pytest.raises(InputError, match="not a QANet"):
        load_model(Path(__file__), "cpu")
    with pytest.raises(InputError):
        QANetConfig(fusion="late")


# ------------------------------------------------------------------------------------ shipped models
SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "Models"


@pytest.mark.parametrize("key, shape, radius", [("2d", (128, 128), 10.0), ("3d", (24, 48, 48), 6.0)])
def test_shipped_model_prefers_the_truth_to_a_damaged_segmentation(key, shape, radius) -> None:
    card = SHIPPED / f"qanet-nuclei-{key}.json"
    if not card.exists():
        pytest.skip(f"{card.name} not shipped")
    from SegQCLib.degrade import morphology_perturbation

    model = load_model(card, "cpu")
    data = json.loads(card.read_text())
    assert data["metrics"]["test_simulated"]["seg"]["lcc"] > 0.6
    image, labels = simulate_cells(shape, 12 if key == "2d" else 6, seed=21, radius=radius)
    eroded = morphology_perturbation(labels, np.random.default_rng(0), "erosion", 3)
    good = model.assess_instances(image, labels, overlap=0.0).image_score
    bad = model.assess_instances(image, eroded, overlap=0.0).image_score
    assert good > 0.7 and bad < good - 0.2, (good, bad)


def test_seg_objects_target_does_not_forgive_a_merge_cut_by_the_patch_edge() -> None:
    from SegQCLib.train.qanet_data import object_score_lookup, patch_targets

    gt = np.zeros((20, 40), np.int32)
    gt[5:15, 5:18], gt[5:15, 19:32] = 1, 2          # two touching-close nuclei, 130 px each
    pred = np.where(gt > 0, 7, 0).astype(np.int32)   # merged into one
    pred[5:15, 18] = 7
    box = (slice(0, 20), slice(0, 20))               # nucleus 1 and a 10-px sliver of nucleus 2
    cropped, whole = patch_targets(pred[box], gt[box], 12, ("seg", "seg_objects"), object_score_lookup(pred, gt))
    assert cropped == pytest.approx(130 / 150)        # in the crop (the paper's patch SEG) the merge is almost invisible
    assert whole == pytest.approx(130 / 270)          # nucleus 1's IoU with the whole merged object
    with pytest.raises(ValueError, match="object_scores"):
        patch_targets(pred[box], gt[box], 12, ("seg", "seg_objects"))


def test_sample_targets_are_columns_of_the_same_patches() -> None:
    """Asking for more targets adds columns; it changes neither the patches nor the other columns."""
    from SegQCLib.train.qanet_data import generate_samples

    kw = dict(patch=32, image_shape=(64, 64), radius_range=(5.0, 7.0), progress=False)
    one = generate_samples(2, 4, seed=6, targets=("seg",), **kw)
    three = generate_samples(2, 4, seed=6, targets=("seg", "nemhd", "seg_objects"), **kw)
    assert np.array_equal(one.image, three.image) and np.array_equal(one.tri, three.tri)
    assert np.array_equal(one.seg, three.seg)
    crop, whole = three.target[:, 0], three.target[:, 2]
    assert np.all((whole >= 0) & (whole <= 1))
    # the crop forgives merges cut by the patch edge: whole-image object scores are lower on average
    assert (whole < crop - 0.05).any() and np.mean(whole) < np.mean(crop)


def test_stack_slice_samples_are_2d_patches_of_simulated_stacks() -> None:
    """The 2D model's extra training data: patches of z slices of simulated 3D stacks."""
    from SegQCLib.train.qanet_data import generate_samples

    kw = dict(patch=32, image_shape=(64, 64), radius_range=(5.0, 7.0), targets=("seg",), progress=False)
    stacks = generate_samples(2, 3, seed=4, stack_slices=True, **kw)
    again = generate_samples(2, 3, seed=4, stack_slices=True, **kw)
    planar = generate_samples(2, 3, seed=4, **kw)
    assert len(stacks) > 10 and stacks.image.shape[1:] == (32, 32) and stacks.tri.shape[1:] == (32, 32)
    assert np.array_equal(stacks.image, again.image) and np.array_equal(stacks.seg, again.seg)
    assert len(stacks) != len(planar) or not np.array_equal(stacks.image, planar.image)
    assert np.all((stacks.seg >= 0) & (stacks.seg <= 1))
    assert set(np.unique(stacks.tri)) <= {0, 1, 2} and (stacks.tri == 2).any()
    with pytest.raises(ValueError, match="stack_slices"):
        generate_samples(3, 1, seed=4, stack_slices=True, patch=16, progress=False)


def test_train_qanet_cli_seed_changes_the_start_is_recorded_and_repeats(tmp_path, monkeypatch) -> None:
    """`segqc train qanet --seed N`: another seed trains other weights on the same simulated data, the
    card records it, and the same seed gives the same weights again."""
    from safetensors.torch import load_file

    from SegQCLib.cli import main
    from SegQCLib.train import qanet_cli

    tiny = dict(qanet_cli.DEFAULTS[2], train=10, val=2, test=2, train_patches=96, epochs=1, patch=32, width=0.125,
                batch_size=32, stack_train=0, stack_val=0, stack_test=0)
    monkeypatch.setitem(qanet_cli.DEFAULTS, 2, tiny)
    threads = torch.get_num_threads()
    weights = {}
    try:
        for run, seed in (("a", 1), ("b", 2), ("c", 1)):
            assert main(["train", "qanet", "--dims", "2", "--out", str(tmp_path / run), "--seed", str(seed),
                         "--device", "cpu"]) == 0
            card = json.loads((tmp_path / run / "qanet-nuclei-2d.json").read_text())
            assert card["training"]["seed"] == seed
            weights[run] = load_file(str(tmp_path / run / card["weights"]))
    finally:
        torch.set_num_threads(threads)
    assert len(list((tmp_path / "qanet-data").glob("train-*.npz"))) == 1  # one simulated train set for all runs
    assert any(not torch.equal(weights["a"][k], weights["b"][k]) for k in weights["a"])
    assert all(torch.equal(weights["a"][k], weights["c"][k]) for k in weights["a"])
