"""nnQC: stage shapes, mask concatenation, Team of Experts modes, DDIM, training, weights, QC protocol.

Tiny configurations (32 x 32 slices, widths 8/16) so that the whole file runs in well under a minute
on two busy CPU cores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from SegQCLib.errors import InputError
from SegQCLib.fingerprint import compute_fingerprint, reorient_grid, to_ras
from SegQCLib.data.sources import LabelledSubject
from SegQCLib.io import Segmentation
from SegQCLib.models.nnqc import (EXPERTS, ImageDAE, NNQCConfig, NNQCModel, build_net, load_model, make_scheduler,
                                  save_model)
from SegQCLib.volume import Volume

TEMPLATES = Path("/usr/share/mricron/templates")
needs_mricron = pytest.mark.skipif(not (TEMPLATES / "ch2bet.nii.gz").exists(), reason="apt-get install mricron-data")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks run faster on one thread than fighting for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> NNQCConfig:
    base = dict(structures=("Blob",), size=32, vae_channels=(8, 16), unet_channels=(8, 16),
                unet_attention=(False, True), num_head_channels=8, norm_groups=4, cross_attention_dim=16,
                position_hidden=8, dae_channels=(8, 16), fusion_heads=2, batch_size=8)
    base.update(kw)
    return NNQCConfig(**base)


def randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """MONAI zero-initialises the UNet's output (and residual) convolutions: give every all-zero
    weight small random values so that inputs visibly reach the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def inputs(b: int = 4, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 1, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = torch.linspace(4, 10, b).view(b, 1, 1)
    mask = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius ** 2).long()
    return image, mask, torch.linspace(0.1, 0.9, b)


def test_config_round_trip_and_validation():
    config = tiny(experts="position")
    again = NNQCConfig.from_dict(config.to_dict())
    assert again == config and again.n_classes == 2 and again.latent_size == 16
    with pytest.raises(InputError, match="experts"):
        tiny(experts="both")
    with pytest.raises(InputError, match="size"):
        tiny(size=30)


def test_stage_shapes():
    config = tiny()
    net = build_net(config)
    image, mask, ratio = inputs()
    onehot = net.one_hot(mask)
    assert onehot.shape == (4, 2, 32, 32) and torch.equal(onehot.sum(1), torch.ones(4, 32, 32))
    z = net.encode(onehot)
    assert z.shape == (4, config.latent_channels, 16, 16)
    assert net.decode(z).shape == (4, 2, 32, 32)
    cond = net.mask_condition(mask)
    assert cond.shape == (4, 1, 16, 16) and 0 <= float(cond.min()) and float(cond.max()) <= 1
    assert net.unet.conv_in.conv.in_channels == config.latent_channels + 1  # noisy latent + mask
    ctx = net.context(ratio, image)
    assert ctx.shape == (4, 1 + config.image_tokens, 16) and config.image_tokens == 64
    out = net.denoise(z, torch.full((4,), 500), cond, ctx)
    assert out.shape == z.shape
    dae = ImageDAE((8, 16), 4)
    assert dae(image).shape == image.shape and dae.tokens(image).shape == (4, 64, 16)
    assert ImageDAE.corrupt(image, torch.Generator().manual_seed(0)).shape == image.shape


def test_denoiser_input_concatenates_the_mask():
    net = randomise(build_net(tiny())).eval()
    image, mask, ratio = inputs()
    z = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 300)
    ctx = net.context(ratio, image)
    with torch.no_grad():
        a = net.denoise(z, t, net.mask_condition(mask), ctx)
        b = net.denoise(z, t, net.mask_condition(torch.zeros_like(mask)), ctx)
        c = net.denoise(z, t, net.mask_condition(mask), ctx)
    assert torch.equal(a, c)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("with_tokens", [True, False])
def test_team_of_experts_modes(with_tokens):
    image, _, ratio = inputs()
    other_image = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    for experts in EXPERTS:
        config = tiny(experts=experts, image_tokens_in_context=with_tokens)
        net = randomise(build_net(config)).eval()
        with torch.no_grad():
            ctx = net.context(ratio, image)
            moved = net.context(ratio.flip(0), image)
            other = net.context(ratio, other_image)
        tokens = config.image_tokens
        expected = {"position": 1, "image": tokens, "full": 1 + tokens if with_tokens else 1}[experts]
        assert ctx.shape == (4, expected, 16), experts
        assert (ctx - moved).abs().max() > 1e-6 if experts != "image" else torch.equal(ctx, moved)
        assert (ctx - other).abs().max() > 1e-6 if experts != "position" else torch.equal(ctx, other)
        assert (net.image_encoder is None) == (experts == "position")
        if net.image_encoder is not None:
            assert not any(p.requires_grad for p in net.image_encoder.parameters())  # E2 is frozen


def test_fusion_is_cross_attention_of_position_on_image():
    net = build_net(tiny(experts="full", image_tokens_in_context=False)).eval()
    image, _, ratio = inputs()
    seen = {}
    net.experts.attention.register_forward_hook(lambda m, args, kwargs_out: seen.update(q=args[0], k=args[1]))
    with torch.no_grad():
        net.context(ratio, image)
    assert seen["q"].shape == (4, 1, 16) and seen["k"].shape == (4, net.config.image_tokens, 16)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_ddim_5_and_20_steps_differ(prediction):
    net = randomise(build_net(tiny(prediction_type=prediction))).eval()
    image, mask, ratio = inputs(b=2)
    five = net.sample(image, mask, ratio, 5, torch.Generator().manual_seed(0))
    five_again = net.sample(image, mask, ratio, 5, torch.Generator().manual_seed(0))
    twenty = net.sample(image, mask, ratio, 20, torch.Generator().manual_seed(0))
    assert five.shape == twenty.shape == (2, 2, 32, 32)
    assert torch.isfinite(five).all() and torch.isfinite(twenty).all()
    assert torch.equal(five, five_again)
    assert (five - twenty).abs().max() > 1e-4
    scheduler = make_scheduler(net.config, "ddim")
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) == 5


# --------------------------------------------------------------------------- training on real slices
@needs_mricron
def test_tiny_training_on_colin27_lowers_the_losses(tmp_path):
    from SegQCLib.data.sources import colin27
    from SegQCLib.train.nnqc_data import build_slices
    from SegQCLib.train.nnqc_train import TrainOptions, batch, diffusion_loss, train, vae_dice

    config = tiny(structures=("Brain",))
    subject = colin27("brain")
    fp = compute_fingerprint([subject], label="Brain")
    data = build_slices(subject, "Brain", config, fp, seed=0, per_band=1, progress=False,
                        slice_indices=[60, 75, 90, 105])
    assert len(data) == 4 * 8 and set(np.unique(data.kind)) == set(range(8))
    ok = ~np.isnan(data.dsc)
    assert data.image.shape == (32, 32, 32) and np.all((data.dsc[ok] >= 0) & (data.dsc[ok] <= 1))

    torch.manual_seed(0)
    fixed = batch(data, np.arange(len(data)), torch.device("cpu"), config)
    g = torch.Generator().manual_seed(3)
    noise, t = torch.randn(len(data), 2, 16, 16, generator=g), torch.randint(100, 900, (len(data),), generator=g)
    scheduler = make_scheduler(config)

    def measured(net):
        with torch.no_grad():
            return float(diffusion_loss(net, scheduler, *fixed, noise, t)), vae_dice(net, fixed[1])

    options = TrainOptions(dae_steps=2, vae_steps=20, ldm_steps=30, batch_size=8, lr_vae=3e-3, lr_ldm=3e-3,
                           adv_start=10, val_every=30, val_samples=8, checkpoint_every=20, augment=False)
    best = train(tmp_path, data, data, config, fp, options, device="cpu", progress=False, log=lambda *a: None)
    assert best.exists() and (tmp_path / "ldm.pt").exists() and (tmp_path / "vae.pt").exists()
    trained = load_model(best).net
    before = build_net(tiny(structures=("Brain",)))
    before.vae.load_state_dict(trained.vae.state_dict())  # stage-2 loss measured in the same latent space
    before.latent_scale.copy_(trained.latent_scale)
    loss_before, _ = measured(before)
    loss_after, dice_after = measured(trained)
    _, dice_before = measured(build_net(tiny(structures=("Brain",))))
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)
    assert dice_after > dice_before + 0.1, (dice_before, dice_after)

    # resuming a finished run does nothing more and keeps the weights
    state = torch.load(tmp_path / "ldm.pt", weights_only=True)
    assert state["step"] == 30
    train(tmp_path, data, data, config, fp, options, device="cpu", progress=False, log=lambda *a: None)
    assert torch.load(tmp_path / "ldm.pt", weights_only=True)["step"] == 30


# --------------------------------------------------------------------------- the QC protocol
def blob_subject(shape=(12, 40, 36)) -> LabelledSubject:
    """A synthetic MR-like head (bright ellipsoid) holding a darker 'Blob' structure, RAS stored."""
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    head = ((z - 6) / 7) ** 2 + ((y - 20) / 16) ** 2 + ((x - 18) / 14) ** 2 < 1
    blob = ((z - 6) / 4) ** 2 + ((y - 22) / 7) ** 2 + ((x - 17) / 6) ** 2 < 1
    image = np.where(head, 100.0, 0.0) + np.where(blob, 60.0, 0.0)
    image += np.random.default_rng(0).normal(0, 3, shape)
    lps_ras = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)  # RAS-stored, as Colin27/MNI152 NIfTI files
    volume = Volume.from_array(image.astype(np.float32), spacing=(2.0, 1.0, 1.0), direction=lps_ras, name="blob")
    seg = Segmentation.from_labelmap(blob.astype(np.uint8), volume.grid, {1: "Blob"})
    return LabelledSubject("blob", volume, seg, "synthetic")


@pytest.fixture(scope="module")
def blob_model() -> tuple[NNQCModel, LabelledSubject]:
    torch.manual_seed(0)
    subject = blob_subject()
    fp = compute_fingerprint([subject], label="Blob")
    return NNQCModel("nnqc-Blob", randomise(build_net(tiny())), fp, device="cpu"), subject


def reoriented(volume: Volume, mask: np.ndarray, axes, flips, rotate_deg: float = 0.0):
    """The same physical image stored with another axis order / flips (and a slightly oblique direction)."""
    grid = reorient_grid(volume.grid, axes, flips)
    direction = grid.direction_matrix
    if rotate_deg:
        a = np.radians(rotate_deg)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        direction = rot @ direction
    array = np.ascontiguousarray(to_ras(volume.array, axes, flips))
    moved = Volume.from_array(array, grid.spacing, grid.origin, direction.ravel(), name="moved")
    return moved, np.ascontiguousarray(to_ras(mask, axes, flips))


def test_assess_gives_pgt_on_the_input_grid_and_slice_rows(blob_model):
    model, subject = blob_model
    mask = subject.segmentation.mask("Blob")
    result = model.assess(subject.image, mask, "Blob")
    assert result.pgt is not None and result.pgt.shape == mask.shape and result.pgt.dtype == bool
    assert set(result.volume) == {"dsc", "hd95"}
    assert result.slices, "no per-slice rows"
    for row in result.slices:
        assert set(row) == {"index", "dsc", "hd95", "flagged"} and 0 <= row["index"] < mask.shape[0]
        assert mask[row["index"]].any() or result.pgt[row["index"]].any()
    assert result.extra["slice_axis"] == 0 and result.model == "nnqc-Blob"

    # a sagittal-first, LPS-flipped and slightly oblique copy gives the same pGT, stored like its input
    for axes, flips, deg in (((2, 1, 0), (False, False, False), 0.0), ((0, 1, 2), (False, True, True), 0.0),
                             ((1, 0, 2), (True, False, False), 4.0)):
        moved, moved_mask = reoriented(subject.image, mask, axes, flips, deg)
        again = model.assess(moved, moved_mask, "Blob")
        assert again.pgt.shape == moved.shape
        np.testing.assert_array_equal(again.pgt, to_ras(result.pgt, axes, flips))
        assert again.volume["dsc"] == pytest.approx(result.volume["dsc"])
        assert len(again.slices) == len(result.slices)


def test_blank_mask_and_batch_size_independence(blob_model):
    model, subject = blob_model
    blank = np.zeros(subject.image.shape, bool)
    result = model.assess(subject.image, blank, "Blob", all_slices=False)
    assert result.pgt.shape == blank.shape
    assert all(row["dsc"] == 0.0 for row in result.slices)  # wherever the pGT has something, the mask misses it
    image, labels, positions = np.random.default_rng(1).random((7, 32, 32)), np.zeros((7, 32, 32), np.uint8), np.linspace(0, 1, 7)
    exact = NNQCModel(model.name, model.net, model.fingerprint, precision="fp32")
    small = NNQCModel(model.name, model.net, model.fingerprint, batch_size=3, precision="fp32")
    reference = exact.pgt_slices(image, labels, positions)
    np.testing.assert_array_equal(small.pgt_slices(image, labels, positions), reference)
    # bf16 autocast (what "auto" picks on CPUs with AMX/AVX512-BF16) gives nearly the same pGT
    half = NNQCModel(model.name, model.net, model.fingerprint, batch_size=3, precision="bf16")
    assert np.mean(half.pgt_slices(image, labels, positions) == reference) > 0.97


def test_precision_choice():
    from SegQCLib.models.nnqc import resolve_precision

    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    # on CUDA fp32 sampled as fast or faster than bf16 (H100, benchmarks/bench_nnqc.py), so "auto" is fp32
    assert resolve_precision("auto", torch.device("cuda")) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        NNQCModel("x", build_net(tiny()), None, precision="fp16")


def test_bad_input_raises_input_error(blob_model):
    model, subject = blob_model
    mask = subject.segmentation.mask("Blob")
    with pytest.raises(InputError, match="mask shape"):
        model.assess(subject.image, mask[:, :-1], "Blob")
    nan = subject.image.array.copy()
    nan[3, 4, 5] = np.nan
    with pytest.raises(InputError, match="NaN"):
        model.assess(subject.image.with_array(nan), mask, "Blob")


def test_save_load_round_trip_and_registry(tmp_path, blob_model, monkeypatch):
    from SegQCLib import qc
    from SegQCLib.models import LOADERS, register_installed_models

    model, subject = blob_model
    card = save_model(model.net, model.fingerprint, tmp_path / "nnqc-Blob", {"metrics": {"note": "untrained"}})
    data = __import__("json").loads(card.read_text())
    assert data["architecture"] == "nnqc" and data["name"] == "nnqc-Blob" and data["priority"] == 0
    assert data["fingerprint"]["labels"] == {"1": "Blob"} and data["config"]["size"] == 32
    loaded = load_model(card)
    mask = subject.segmentation.mask("Blob")
    image, labels, positions = np.random.default_rng(0).random((5, 32, 32)), np.zeros((5, 32, 32), np.uint8), np.linspace(0, 1, 5)
    np.testing.assert_array_equal(loaded.pgt_slices(image, labels, positions), model.pgt_slices(image, labels, positions))
    np.testing.assert_array_equal(loaded.assess(subject.image, mask, "Blob").pgt, model.assess(subject.image, mask, "Blob").pgt)

    assert LOADERS["nnqc"] == ("SegQCLib.models.nnqc", "load_model", "reconstruction")
    monkeypatch.setenv("SEGQC_MODELS_DIR", str(tmp_path))
    try:
        register_installed_models()
        entry = next(m for m in qc.available_models() if m.name == "nnqc-Blob")
        assert entry.kind == "reconstruction"
        assert isinstance(qc.load_model("nnqc-Blob", "cpu"), NNQCModel)
    finally:
        qc._REGISTRY.pop("nnqc-Blob", None)

    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    bad = dict(data, weights="broken.safetensors")
    (tmp_path / "broken.json").write_text(__import__("json").dumps(bad))
    with pytest.raises(InputError, match="cannot read weights"):
        load_model(tmp_path / "broken.json")


def test_openclip_image_expert_from_a_local_checkpoint(tmp_path, blob_model):
    """E2 can be an open_clip vision tower read from a local checkpoint (a tiny CLIP written here)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    name = "SegQCTestTinyCLIPnnQC"
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(config_path)
    torch.manual_seed(0)
    clip = open_clip.create_model(name).eval()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    config = tiny(image_encoder=f"openclip:{name}:{tmp_path / 'clip.safetensors'}")
    net = build_net(config)
    assert (config.image_tokens, config.image_token_dim) == (16, 32) and net.image_encoder is None
    image, mask, ratio = inputs(b=2)
    assert net.context(ratio, image).shape == (2, 17, 16)
    model, subject = blob_model
    card = save_model(net, model.fingerprint, tmp_path / "clip-nnqc")
    assert not any(k.startswith("external_encoder") for k in net.state_dict())  # the tower is not copied
    loaded = load_model(card)
    with torch.no_grad():
        torch.testing.assert_close(loaded.net.context(ratio, image), net.context(ratio, image))


def test_ctrl_c_finishes_the_step_in_progress_and_saves_the_steps_done() -> None:
    import os
    import signal

    from SegQCLib.train.nnqc_train import _run_steps

    done, saved = [], []

    def step(i: int) -> float:
        if i == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while step 3 runs
        done.append(i)
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        _run_steps("stage", total=10, start=0, step_fn=step, save=saved.append, every=100, progress=False,
                   log=lambda *a: None)
    assert done == [0, 1, 2, 3]  # step 3 ran to its end, no step after it
    assert saved == [4]  # resumes at step 4
