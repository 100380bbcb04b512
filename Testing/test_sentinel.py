"""Quality Sentinel: network, published-checkpoint loading, losses, training/resume, QC protocol."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from SegQCLib.models.sentinel import (SentinelConfig, SentinelNet, SentinelQC, load_model,
                                      load_published_checkpoint, save_model, slice_boxes, slice_inputs)
from SegQCLib.errors import InputError
from SegQCLib.train.evaluation import agreement, average_precision_at_k
from SegQCLib.train.sentinel_data import SampleSet, saved_slice_shape
from SegQCLib.train.sentinel_train import bin_weights, optimal_pairs, ranking_loss
from SegQCLib.volume import Volume

TEMPLATES = Path("/usr/share/mricron/templates")
needs_mricron = pytest.mark.skipif(not (TEMPLATES / "aal.nii.gz").exists(), reason="apt-get install mricron-data")
SHIPPED = Path(__file__).resolve().parents[1] / "Resources" / "Models" / "sentinel-brain-mr.json"


class PublishedLayout(nn.Module):
    """The public Quality Sentinel module layout, written here from its description (torchvision
    ResNet50 inside ``net``, a biased 2-channel stem beside it, linear gates, hidden 50)."""

    def __init__(self, hidden: int = 50, text_dim: int = 512):
        super().__init__()
        import torchvision

        self.net = torchvision.models.resnet50(weights=None)
        self.conv1 = nn.Conv2d(2, 64, kernel_size=7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(2048, hidden), nn.Linear(hidden, 1)
        self.attention1 = nn.Linear(2048 + text_dim, 2048)
        self.attention2 = nn.Linear(2048 + text_dim, hidden)

    def forward(self, x, text):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for layer in (self.net.layer1, self.net.layer2, self.net.layer3, self.net.layer4):
            x = layer(x)
        f = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        ft = torch.cat([f, text], 1)
        return self.fc2(self.attention2(ft) * self.fc1(self.attention1(ft) * f)).squeeze(1)


def test_published_checkpoint_loads_by_key_mapping(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = PublishedLayout().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so a wrong mapping shows
        for module in reference.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "best_resnet50_model.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    model = load_published_checkpoint(path)
    x, text = torch.rand(3, 2, 64, 64), torch.randn(3, 512)
    with torch.no_grad():
        np.testing.assert_allclose(model.net(x, text).numpy(), reference(x, text).numpy(), rtol=1e-4, atol=1e-5)
    assert model.config.backbone == "resnet50" and model.config.hidden == 50 and model.config.text_dim == 512


def test_published_loader_rejects_foreign_and_corrupt_files(tmp_path: Path) -> None:
    foreign = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, foreign)
    with pytest.raises(InputError, match="other.pth: not a Quality Sentinel checkpoint"):
        load_published_checkpoint(foreign)
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(InputError, match="corrupt.pth: cannot read checkpoint safely"):
        load_published_checkpoint(corrupt)


def test_optimal_pairs_pair_similar_names_and_never_self() -> None:
    base = torch.eye(4)
    text = torch.cat([base, base + 0.01 * torch.randn(4, 4, generator=torch.Generator().manual_seed(1))])
    partner = optimal_pairs(text)  # sample i and i + 4 embed the same structure
    assert all(partner[i] != i for i in range(8))
    assert all(partner[i] == (i + 4) % 8 for i in range(8))


def test_ranking_loss_penalises_wrong_order_only() -> None:
    true = torch.tensor([0.2, 0.8])
    partner = np.array([1, 0])
    assert float(ranking_loss(torch.tensor([0.1, 0.9]), true, partner, margin=0.0)) == 0.0
    wrong = float(ranking_loss(torch.tensor([0.9, 0.1]), true, partner, margin=0.0))
    assert wrong == pytest.approx(0.8 * 0.6)  # (p_i - p_j)(t_j - t_i) = 0.8 * 0.6 for both pairs


def test_augment_changes_images_not_masks() -> None:
    from SegQCLib.train.sentinel_train import _augment

    x = torch.rand(16, 4, 8, 8)
    x[:, 1::2] = (x[:, 1::2] > 0.5).float()
    y, _ = _augment(x, torch.Generator().manual_seed(0))
    for i in range(16):  # masks are only flipped; images flipped and gamma-changed
        assert torch.equal(y[i, 1::2], x[i, 1::2]) or torch.equal(y[i, 1::2], x[i, 1::2].flip(-1))
    assert not torch.allclose(y[:, 0::2], x[:, 0::2]) and float(y.min()) >= 0 and float(y.max()) <= 1


def test_intensity_augment_varies_images_smoothly_and_leaves_masks() -> None:
    from SegQCLib.train.sentinel_train import _augment

    x = torch.full((64, 4, 32, 32), 0.5)
    x[:, 1::2] = (torch.rand(64, 2, 32, 32) > 0.5).float()
    plain, _ = _augment(x, torch.Generator().manual_seed(1))
    varied, _ = _augment(x, torch.Generator().manual_seed(1), intensity_prob=1.0)
    assert torch.equal(plain[:, 1::2], varied[:, 1::2])  # same flips, masks untouched
    # a flat image stays flat without it; with it, a smooth field: the two image halves differ on average
    assert float(plain[:, 0::2].std(dim=(-1, -2)).max()) < 1e-6
    halves = (varied[:, 0::2, :, :16].mean(dim=(-1, -2)) - varied[:, 0::2, :, 16:].mean(dim=(-1, -2))).abs()
    assert float(halves.mean()) > 0.02
    some, _ = _augment(x, torch.Generator().manual_seed(1), intensity_prob=0.3)
    changed = (some[:, 0] - plain[:, 0]).abs().amax(dim=(-1, -2)) > 1e-6
    assert 5 <= int(changed.sum()) <= 35  # about 30 % of 64 samples


def test_text_jitter_has_the_asked_relative_norm() -> None:
    from SegQCLib.train.sentinel_train import jitter_text

    text = torch.nn.functional.normalize(torch.randn(256, 384), dim=1) * 3.0
    assert jitter_text(text, 0.0, torch.Generator().manual_seed(0)) is text
    moved = jitter_text(text, 0.5, torch.Generator().manual_seed(0))
    ratio = (moved - text).norm(dim=1) / text.norm(dim=1)
    assert abs(float(ratio.mean()) - 0.5) < 0.03 and float(ratio.std()) < 0.05
    again = jitter_text(text, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)  # drawn from the training generator only: a resumed run repeats it


def test_flips_swap_the_side_of_lateral_names_only() -> None:
    from SegQCLib.train.sentinel_train import _augment, mirror_index, mirrored_name

    assert mirrored_name("Putamen_L") == "Putamen_R" and mirrored_name("Left Hippocampus") == "Right Hippocampus"
    assert mirrored_name("Brain") is None and mirrored_name("Brodmann area 4") is None
    names = ["Putamen_L", "Brain", "Putamen_R", "Caudate_L"]  # Caudate_R missing
    assert mirror_index(names).tolist() == [2, 1, 0, -1]
    x = torch.rand(200, 2, 8, 8)
    flippable = torch.arange(200) % 2 == 0
    y, flipped = _augment(x, torch.Generator().manual_seed(0), flippable=flippable)
    assert not flipped[~flippable].any() and 30 < int(flipped.sum()) < 70
    assert torch.equal(y[flipped][:, 1], x[flipped][:, 1].flip(-1))  # masks flipped with their images
    assert torch.equal(y[~flipped][:, 1], x[~flipped][:, 1])


def test_bin_weights_favour_rare_bins() -> None:
    dsc = np.array([0.95] * 90 + [0.05] * 10)
    w = bin_weights(dsc, 10)
    assert w[0] == pytest.approx(9 * w[9])
    assert np.mean(w[np.clip((dsc * 10).astype(int), 0, 9)]) == pytest.approx(1.0)


def test_map_at_k_and_agreement() -> None:
    true = np.array([0.1, 0.2, 0.9, 0.8, 0.7])
    assert average_precision_at_k(np.array([0.1, 0.2, 0.9, 0.8, 0.7]), true, 2) == 1.0
    assert average_precision_at_k(np.array([0.9, 0.8, 0.1, 0.2, 0.7]), true, 2) == 0.0
    assert average_precision_at_k(np.array([0.1, 0.9, 0.2, 0.8, 0.7]), true, 2) == pytest.approx(0.5)
    tied = np.array([0.0, 0.0, 0.0, 0.5, 0.9])  # any of the three zeros is a hit, whatever their order
    assert average_precision_at_k(np.array([0.9, 0.5, 0.1, 0.0, 0.2]), tied, 2) == pytest.approx(0.5 * (0 + 1 / 2))
    assert average_precision_at_k(np.array([0.3, 0.9, 0.1, 0.8, 0.7]), tied, 2) == 1.0
    report = agreement(true * 0.5, true)
    assert report["lcc"] == pytest.approx(1.0) and report["srocc"] == pytest.approx(1.0)
    assert report["mae"] == pytest.approx(np.mean(true * 0.5))


def test_slice_boxes_are_square_around_the_mask_with_margin() -> None:
    mask = np.zeros((2, 100, 120), bool)
    mask[0, 10:30, 40:50] = True
    boxes = slice_boxes(mask, np.array([0, 1]), margin_px=5)
    x1, y1, x2, y2 = boxes[0]
    assert (x2 - x1) == (y2 - y1) == 30  # 20 rows + 2 * 5
    assert ((x1 + x2) / 2, (y1 + y2) / 2) == (45.0, 20.0)
    assert tuple(boxes[1]) == (0.0, -10.0, 120.0, 110.0)  # empty slice: whole slice, squared


def test_context_view_keeps_physical_scale() -> None:
    mask = np.zeros((1, 200, 200), bool)
    mask[0, 90:110, 95:105] = True
    image = np.zeros((1, 200, 200), np.float32)
    config = SentinelConfig(size=32, margin_px=0, context_mm=100.0)
    fine = slice_inputs(image, mask, [0], config, spacing_yx=(1.0, 1.0))
    coarse = slice_inputs(image, mask, [0], config, spacing_yx=(2.0, 2.0))
    assert fine.shape == (1, 4, 32, 32)
    # the same 20 x 10 pixel mask is 20 x 10 mm at 1 mm and 40 x 20 mm at 2 mm: 4x the area in view
    assert float(coarse[0, 3].sum()) == pytest.approx(4 * float(fine[0, 3].sum()), rel=0.15)
    # while the mask-sized crop does not see the difference
    np.testing.assert_allclose(coarse[0, :2].numpy(), fine[0, :2].numpy())


def test_slice_inputs_resize_crop_to_model_size() -> None:
    image = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    mask = np.zeros((3, 64, 64), bool)
    mask[1, 20:40, 20:40] = True
    x = slice_inputs(image, mask, [1], SentinelConfig(size=32, margin_px=0))
    assert x.shape == (1, 2, 32, 32)
    assert float(x[0, 1, 1:-1, 1:-1].min()) > 0.99  # crop == the mask's box: the mask fills it
    assert float(x[0, 1].mean()) > 0.9  # (the outermost ring interpolates with the background)


def _tiny_config(text_dim: int) -> SentinelConfig:
    return SentinelConfig(backbone="resnet10", widen=0.25, size=32, margin_px=4, text_encoder="onehot:[\"a\", \"b\"]",
                          text_dim=text_dim)


class _FixedText:
    """A two-name encoder for unit tests (the real ones are tested in test_encoders.py)."""

    name, dim = "fixed", 2

    def encode(self, names):
        return np.array([[1.0, 0.0] if n == "ball" else [0.0, 1.0] for n in names], np.float32)


def test_save_load_round_trip_and_registry(tmp_path: Path, monkeypatch) -> None:
    config = _tiny_config(2)
    torch.manual_seed(0)
    net = SentinelNet(config)
    card = save_model(net, config, tmp_path / "tiny", {"name": "tiny-test", "description": "unit test"})
    model = load_model(card)
    model._text_encoder = _FixedText()
    x = torch.rand(2, 2, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(model.net(x, torch.eye(2)).numpy(), net.eval()(x, torch.eye(2)).numpy(), atol=1e-6)
    data = json.loads(card.read_text())
    assert data["architecture"] == "sentinel" and data["weights"] == "tiny.safetensors"
    (tmp_path / "tiny.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="tiny.safetensors: cannot read weights"):
        load_model(card)


def test_assess_reports_input_slice_indices_and_flags() -> None:
    config = _tiny_config(2)
    torch.manual_seed(0)
    model = SentinelQC("tiny", SentinelNet(config), config, text_encoder=_FixedText())
    rng = np.random.default_rng(0)
    mask = np.zeros((12, 40, 40), bool)
    mask[3:9, 10:30, 12:28] = True
    image = Volume.from_array(rng.random((12, 40, 40)).astype(np.float32) * 100, spacing=(2, 1, 1))
    result = model.assess(image, mask, "ball", threshold=1.1)
    assert [row["index"] for row in result.slices] == list(range(3, 9))
    assert all(row["flagged"] for row in result.slices)  # threshold above any DSC
    assert 0.0 <= result.volume["dsc"] <= 1.0
    # the same volume stored head-first (z flipped): rows still name the input's own slice indices
    flipped = Volume.from_array(image.array[::-1].copy(), spacing=(2, 1, 1),
                                direction=np.diag([1.0, 1.0, -1.0]).ravel())
    again = model.assess(flipped, mask[::-1].copy(), "ball", threshold=1.1)
    assert [row["index"] for row in again.slices] == list(range(3, 9))
    by_index = {row["index"]: row["dsc"] for row in again.slices}
    for row in result.slices:  # same anatomy, same scores
        assert by_index[11 - row["index"]] == pytest.approx(row["dsc"], abs=1e-5)


def _two_structures(config: SentinelConfig) -> SampleSet:
    """Samples of two validation structures of Colin27 (needs mricron-data), for short training runs."""
    from SegQCLib.train.sentinel_data import build_samples

    return build_samples("val", config, seed=0, per_band=1, extra_slices=2, algorithmic=0, progress=False,
                         structures=["Pallidum_L", "Fusiform_L"])


@needs_mricron
def test_training_learns_and_resumes(tmp_path: Path) -> None:
    from SegQCLib.train.sentinel_train import TrainOptions, evaluate_predictions, predict_set, train

    config = _tiny_config(2)
    samples = _two_structures(config)
    encoder = _TwoNames(samples.names)
    options = TrainOptions(epochs=1, batch_size=16, lr=3e-3, seed=0)
    train(tmp_path, samples, samples, config, options, encoder, progress=False, log=lambda *_: None)
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history) == 1 and (tmp_path / "checkpoint.pt").exists() and (tmp_path / "best.json").exists()
    # as versions before mid-epoch checkpoints wrote it (a run in progress may resume with newer code)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save({k: state[k] for k in ("net", "optimiser", "scheduler", "epoch", "best")}, tmp_path / "checkpoint.pt")
    options.epochs = 6
    train(tmp_path, samples, samples, config, options, encoder, progress=False, log=lambda *_: None)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]  # resumed after epoch 1, not restarted
    model = load_model(tmp_path / "best.json")
    table = torch.from_numpy(encoder.encode(samples.names))
    report = evaluate_predictions(samples, predict_set(model.net, samples, table))
    ok = ~np.isnan(samples.dsc)
    constant = float(np.mean(np.abs(samples.dsc[ok] - np.mean(samples.dsc[ok]))))
    print("slice", report["slice"], "constant-predictor MAE", constant)
    assert report["slice"]["mae"] < constant  # it learnt more than the mean DSC
    assert report["slice"]["lcc"] > 0.3


@needs_mricron
def test_training_stopped_inside_epochs_resumes_to_the_same_weights(tmp_path: Path, monkeypatch) -> None:
    """Stopped at a batch (Ctrl-C) in epoch 1 and again in epoch 2, then run to the end: the
    weights, validation numbers and losses are those of the run that was never stopped."""
    from SegQCLib.train import sentinel_train
    from SegQCLib.train.sentinel_train import TrainOptions, train

    config = _tiny_config(2)
    samples = _two_structures(config)
    encoder = _TwoNames(samples.names)
    n_batches = int(np.count_nonzero(~np.isnan(samples.dsc))) // 16
    assert n_batches >= 4
    options = TrainOptions(epochs=2, batch_size=16, lr=3e-3, seed=0, intensity_prob=0.5, checkpoint_minutes=0.0)
    quiet = {"progress": False, "log": lambda *_: None}
    train(tmp_path / "straight", samples, samples, config, options, encoder, **quiet)

    ranking_loss = sentinel_train.ranking_loss
    calls = {"n": 0, "stop_at": 0}

    def stopping_ranking_loss(*args, **kwargs):  # one call per batch, between forward pass and step
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of a batch
        return ranking_loss(*args, **kwargs)

    monkeypatch.setattr(sentinel_train, "ranking_loss", stopping_ranking_loss)
    stopped = tmp_path / "stopped"
    # Ctrl-C in epoch 1's 3rd batch; after resuming at its 4th, in epoch 2's 3rd
    for stop_at, (epoch, batch) in ((3, (0, 3)), (n_batches, (1, 3))):
        calls.update(n=0, stop_at=stop_at)
        with pytest.raises(KeyboardInterrupt):
            train(stopped, samples, samples, config, options, encoder, **quiet)
        state = torch.load(stopped / "checkpoint.pt", weights_only=True)
        assert (state["epoch"], state["batch"]) == (epoch, batch)  # stopped after that batch, inside the epoch
    calls.update(n=0, stop_at=0)
    train(stopped, samples, samples, config, options, encoder, **quiet)

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(stopped / "checkpoint.pt", weights_only=True)
    assert straight["net"].keys() == resumed["net"].keys()
    for key, value in straight["net"].items():
        assert torch.equal(value, resumed["net"][key]), key
    def without_times(run: Path) -> list[dict]:
        return [{k: v for k, v in h.items() if k != "seconds"} for h in json.loads((run / "history.json").read_text())]

    assert without_times(stopped) == without_times(tmp_path / "straight")


@needs_mricron
def test_fine_tuning_starts_from_the_given_model_and_refuses_another_network(tmp_path: Path, capsys) -> None:
    from SegQCLib.cli import main
    from SegQCLib.train.sentinel_train import TrainOptions, train

    config = _tiny_config(2)
    samples = _two_structures(config)
    encoder = _TwoNames(samples.names)
    quiet = {"progress": False, "log": lambda *_: None}
    base_card = train(tmp_path / "base", samples, samples, config, TrainOptions(epochs=1, batch_size=16, lr=3e-3, seed=0),
                      encoder, **quiet)
    base = load_model(base_card).net.state_dict()
    # learning rate 0: Adam moves no parameter, so a fine-tuned run keeps the base model's, a fresh one its own draw
    frozen = TrainOptions(epochs=1, batch_size=16, lr=0.0, seed=1)
    tuned = load_model(train(tmp_path / "tuned", samples, samples, config, frozen, encoder, init=base_card, **quiet)).net
    fresh = load_model(train(tmp_path / "fresh", samples, samples, config, frozen, encoder, **quiet)).net
    for name, parameter in tuned.named_parameters():
        assert torch.equal(parameter, base[name]), name
    assert not all(torch.equal(p, base[n]) for n, p in fresh.named_parameters())
    # another network is refused, naming the card and the setting, before any step
    other = _tiny_config(2)
    other.size = 48
    with pytest.raises(InputError, match=r"best.json: cannot fine-tune from it: its size is 32, this run's is 48"):
        train(tmp_path / "other", samples, samples, other, frozen, encoder, init=base_card, **quiet)
    assert not (tmp_path / "other" / "checkpoint.pt").exists()
    # the CLI names an unknown model, or another network, before it builds any data
    assert main(["train", "sentinel", "--out", str(tmp_path / "cli"), "--init", "no-such-model", "--epochs", "1"]) == 2
    assert main(["train", "sentinel", "--out", str(tmp_path / "cli"), "--init", str(base_card), "--backbone", "resnet10",
                 "--widen", "0.25", "--size", "48", "--epochs", "1"]) == 2
    assert "cannot fine-tune from it: its size is 32, this run's is 48" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_sigterm_and_ctrl_c_ask_to_stop_between_steps_and_a_second_one_stops_at_once() -> None:
    from SegQCLib.train.stopping import stop_between_steps

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGINT):
        with stop_between_steps() as stop:
            stop.check()  # nothing asked yet
            os.kill(os.getpid(), sig)
            assert stop.requested  # the step in progress goes on ...
            with pytest.raises(KeyboardInterrupt):
                stop.check()  # ... and the run stops where the trainer checks
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), sig)  # asked twice: stop now
                time.sleep(5)  # reaching the end of the sleep fails the test
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


class _TwoNames:
    def __init__(self, names):
        self.names, self.name, self.dim = list(names), "fixed", 2

    def encode(self, names):
        return np.eye(2, dtype=np.float32)[[self.names.index(n) for n in names]]


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped Sentinel model")
@needs_mricron
def test_shipped_model_ranks_degradations_and_scores_empty_and_wrong_masks_low() -> None:
    """Behaviour of the shipped weights on Colin27. Caudate_L is a training structure (fresh
    degradation seeds): this checks the model works as trained, not its held-out accuracy, which
    its model card reports from `segqc eval`."""
    from SegQCLib.data.sources import colin27
    from SegQCLib.degrade import degrade_to_band
    from SegQCLib.qc import load_model as load_registered

    model = load_registered("sentinel-brain-mr", "cpu")
    subject = colin27("aal")
    truth = subject.segmentation.mask("Caudate_L")

    def score(mask, name="Caudate_L"):
        return model.assess(subject.image, mask, name, all_slices=False).volume["dsc"]

    by_band = [score(degrade_to_band(truth.astype(np.uint8), band, seed=7)[0] > 0) for band in range(5)]
    assert score(truth) > 0.7
    assert by_band[0] < 0.4 and by_band[4] > 0.6 and by_band[0] < by_band[2] < by_band[4]
    assert score(np.zeros_like(truth)) <= 0.2
    assert score(subject.segmentation.mask("Precentral_L")) <= 0.2  # another structure's mask
    held_out = subject.segmentation.mask("Hippocampus_L")  # never seen in training
    assert score(np.zeros_like(held_out), "Hippocampus_L") <= 0.2
    card = json.loads(SHIPPED.read_text())
    assert card["metrics"]["test-structures"]["volume_bands"]["n"] > 0  # numbers measured by segqc eval


@needs_mricron
def test_skull_stripped_samples_change_only_the_image() -> None:
    from SegQCLib.data.sources import colin27
    from SegQCLib.train.sentinel_data import _brain_of, _skull_stripped, build_samples

    subject = colin27("aal")
    brain = _brain_of(subject)
    assert brain is not None and brain.shape == subject.image.shape and brain.any()
    stripped = _skull_stripped(subject.image.array, brain, subject.image.spacing, 2.0)
    assert np.array_equal(stripped[brain], subject.image.array[brain])
    assert not stripped[~dilate(brain, 3)].any() and subject.image.array[~dilate(brain, 3)].any()

    config = _tiny_config(2)
    config.context_mm = 128.0  # a view wide enough to hold the skull
    kwargs = dict(seed=0, per_band=1, extra_slices=0, algorithmic=0, progress=False, structures=["Pallidum_L"],
                  kinds=("degraded", "good"))
    plain = build_samples("val", config, strip_prob=0.0, **kwargs)
    skull_free = build_samples("val", config, strip_prob=1.0, **kwargs)
    assert np.array_equal(plain.volume_dsc, skull_free.volume_dsc)
    assert np.array_equal(plain.x[:, [1, 3]], skull_free.x[:, [1, 3]])  # channels: crop image, mask, context image, mask
    zeros = [float((s.x[:, 2] == 0).mean()) for s in (plain, skull_free)]
    assert zeros[1] > zeros[0] + 0.05  # the skull around the brain is gone from the context views


def dilate(mask: np.ndarray, iterations: int) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, iterations=iterations)


@needs_mricron
def test_train_split_holds_grey_and_white_matter_and_no_held_out_structure() -> None:
    from SegQCLib.train.sentinel_data import HELD_OUT_AAL, VAL_AAL, split_structures

    pairs = split_structures("train")
    names = [name for _, name in pairs]
    assert {"GreyMatter", "WhiteMatter", "Brain"} <= set(names)
    assert not set(names) & (set(HELD_OUT_AAL) | set(VAL_AAL))
    assert {subject.subject for subject, _ in pairs} == {"colin27"}  # MNI152 stays the held-out subject
    assert names == [n for part in ("train-atlas", "train-tissue") for _, n in split_structures(part)]


@needs_mricron
def test_train_samples_are_their_parts_each_cached(tmp_path: Path, monkeypatch) -> None:
    from SegQCLib.train import sentinel_cli

    monkeypatch.setattr(sentinel_cli, "TRAIN_PARTS", ("train-tissue", "val"))
    config, built = _tiny_config(2), []
    train = sentinel_cli.sample_set(tmp_path, "train", config, per_band=1, algorithmic=0, progress=False,
                                    log=built.append)
    assert len(built) == 2 and len(list(tmp_path.glob("*.npz"))) == 2
    tissue = sentinel_cli.sample_set(tmp_path, "train-tissue", config, per_band=1, algorithmic=0, progress=False,
                                     log=built.append)
    assert len(built) == 2  # read from its cache, not rebuilt
    val = sentinel_cli.sample_set(tmp_path, "val", config, per_band=1, algorithmic=0, progress=False, log=built.append)
    assert len(built) == 2
    assert train.names[:2] == ["GreyMatter", "WhiteMatter"] and "Pallidum_L" in train.names
    assert len(train.volume_dsc) == len(tissue.volume_dsc) + len(val.volume_dsc)
    assert len(train.x) == len(tissue.x) + len(val.x)
    # grey matter's "wrong" mask is the white matter: no overlap, true DSC 0
    wrong = tissue.volume_kind == sentinel_cli.KINDS.index("wrong")
    assert wrong.sum() == 2 and np.all(tissue.volume_dsc[wrong] == 0)
    good = tissue.volume_kind == sentinel_cli.KINDS.index("good")
    assert np.all(tissue.volume_dsc[good] > 0.85)


def _random_set(rng: np.random.Generator, names: list[str], volumes: int, slices: int, size: int = 64) -> SampleSet:
    n = volumes * slices
    return SampleSet(names=names, x=rng.integers(0, 256, (n, 4, size, size), dtype=np.uint8),
                     name=rng.integers(0, len(names), n).astype(np.int32), dsc=rng.random(n).astype(np.float32),
                     area=rng.integers(0, 500, n).astype(np.int32), volume=np.repeat(np.arange(volumes), slices).astype(np.int32),
                     in_volume=np.ones(n, bool), volume_dsc=rng.random(volumes).astype(np.float32),
                     volume_name=rng.integers(0, len(names), volumes).astype(np.int32),
                     volume_kind=np.zeros(volumes, np.int8), volume_subject=["s"] * volumes)


def test_joining_saved_parts_renumbers_ids_and_holds_slices_once(tmp_path: Path) -> None:
    import tracemalloc

    rng = np.random.default_rng(0)
    parts = [_random_set(rng, ["A", "B"], 10, 50), _random_set(rng, ["C", "A"], 10, 50), _random_set(rng, ["B"], 10, 50)]
    files = [part.save(tmp_path / f"part{i}.npz") for i, part in enumerate(parts)]
    assert saved_slice_shape(files[1]) == parts[1].x.shape
    part_bytes = parts[0].x.nbytes  # 8 MB each
    tracemalloc.start()
    joined = SampleSet.concat(files)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # all slices once plus one part's in flight; joining loaded parts would hold every slice twice
    assert peak < 4.5 * part_bytes, peak / part_bytes
    assert joined.names == ["A", "B", "C"]
    np.testing.assert_array_equal(joined.x, np.concatenate([p.x for p in parts]))
    # a slice keeps its structure and its volume's true DSC through the renumbering
    for i, part in enumerate(parts):
        rows = slice(500 * i, 500 * (i + 1))
        assert [joined.names[k] for k in joined.name[rows]] == [part.names[k] for k in part.name]
        np.testing.assert_array_equal(joined.volume_dsc[joined.volume[rows]], part.volume_dsc[part.volume])
    # in-memory sets and saved ones join alike
    mixed = SampleSet.concat([parts[0], files[1], parts[2]])
    np.testing.assert_array_equal(mixed.name, joined.name)
    np.testing.assert_array_equal(mixed.volume, joined.volume)
    with pytest.raises(ValueError, match="slice shapes"):
        SampleSet.concat([parts[0], _random_set(rng, ["A"], 2, 5, size=32)])


@needs_mricron
def test_warped_copies_of_colin27_join_the_train_split_as_other_subjects(tmp_path: Path, monkeypatch) -> None:
    from SegQCLib.data.sources import colin27
    from SegQCLib.metrics import dice
    from SegQCLib.train import sentinel_cli
    from SegQCLib.train.sentinel_data import WARP_SEED, warped_pairs

    monkeypatch.setattr(sentinel_cli, "TRAIN_PARTS", ("train-tissue",))
    config, built = _tiny_config(2), []
    train = sentinel_cli.sample_set(tmp_path, "train", config, per_band=1, algorithmic=0, progress=False,
                                    log=built.append, synthetic=1)
    assert len(built) == 2 and len(list(tmp_path.glob("train-tissue-w1-*.npz"))) == 1
    original = sentinel_cli.sample_set(tmp_path, "train", config, per_band=1, algorithmic=0, progress=False,
                                       log=built.append)
    assert len(built) == 2  # the original part comes from the same cache
    subjects = np.asarray(train.volume_subject)
    copy = subjects == "colin27+warp1"
    assert copy.sum() == (subjects == "colin27").sum() == len(original.volume_dsc)
    assert train.names == original.names == ["GreyMatter", "WhiteMatter"]
    # the copy's labels stay exact: its other-structure masks miss, its near-perfect masks nearly match
    kind = train.volume_kind
    assert np.all(train.volume_dsc[copy & (kind == sentinel_cli.KINDS.index("wrong"))] == 0)
    assert np.all(train.volume_dsc[copy & (kind == sentinel_cli.KINDS.index("good"))] > 0.6)  # one voxel off a thin cortex
    # and it is another anatomy: its slices are not the original's
    first_copy_slice = int(np.flatnonzero(np.isin(train.volume, np.flatnonzero(copy)))[0])
    assert not any(np.array_equal(train.x[first_copy_slice], x) for x in original.x)

    # one warp per copy whatever the labelling: Colin27's tissue and brain labellings share the anatomy
    tissue, brain = colin27("tissue"), colin27("brain")
    (warped_tissue, _), (warped_brain, _) = warped_pairs([(tissue, "GreyMatter"), (brain, "Brain")], 1, WARP_SEED + 1)
    assert warped_tissue.subject == warped_brain.subject == "colin27+warp1"
    grey, whole = warped_tissue.segmentation.mask("GreyMatter"), warped_brain.segmentation.mask("Brain")
    assert (grey & whole).sum() / grey.sum() > 0.95
    assert dice(grey, tissue.segmentation.mask("GreyMatter")) < 0.6
    with pytest.raises(ValueError, match="numbered from 1"):
        warped_pairs([(tissue, "GreyMatter")], 0, WARP_SEED)


@needs_mricron
def test_averaged_copies_of_colin27_join_the_train_split_as_other_subjects(tmp_path: Path, monkeypatch) -> None:
    from SegQCLib.data import synthetic_subjects
    from SegQCLib.train import sentinel_cli

    monkeypatch.setattr(sentinel_cli, "TRAIN_PARTS", ("train-tissue",))
    monkeypatch.setattr(synthetic_subjects, "AVERAGE_MEMBERS", 2)  # the default 8 take a minute on Colin27
    config, built = _tiny_config(2), []
    train = sentinel_cli.sample_set(tmp_path, "train", config, per_band=1, algorithmic=0, progress=False,
                                    log=built.append, averaged=1)
    assert len(built) == 2 and len(list(tmp_path.glob("train-tissue-t1-*.npz"))) == 1
    assert not list(tmp_path.glob("train-tissue-w1-*.npz"))  # no warped copy was asked for
    subjects = np.asarray(train.volume_subject)
    copy = subjects == "colin27+avg1"
    assert copy.sum() == (subjects == "colin27").sum() > 0 and set(subjects) == {"colin27", "colin27+avg1"}
    kind = train.volume_kind
    assert np.all(train.volume_dsc[copy & (kind == sentinel_cli.KINDS.index("wrong"))] == 0)  # voted labels stay exact
    assert np.all(train.volume_dsc[copy & (kind == sentinel_cli.KINDS.index("good"))] > 0.6)
