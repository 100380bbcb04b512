"""SegAE mode of Quality Sentinel: an open_clip vision tower (BiomedCLIP's layout) as the encoder.

The towers are tiny models with seeded random weights that the tests build and save themselves
(``tiny_clip.py``); the real BiomedCLIP loads the same way from a local copy. Checked: the network
starts from the checkpoint's tower exactly, the trained model loads from its card alone, training
learns (and a frozen tower stays as it was), and bad specs or checkpoints fail with clear errors.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub

import numpy as np
import pytest
import torch

from SegQCLib.errors import InputError
from SegQCLib.models.sentinel import (OpenCLIPBackbone, SentinelConfig, SentinelNet, load_backbone_checkpoint,
                                      load_model, mask_overlay, resolve_backbone, save_model)

open_clip = pytest.importorskip("open_clip")
from tiny_clip import BIO_PRE, TINY, make_biomedclip_repo, make_tiny_clip  # noqa: E402 (needs open_clip)

TEMPLATES = Path("/usr/share/mricron/templates")
needs_mricron = pytest.mark.skipif(not (TEMPLATES / "aal.nii.gz").exists(), reason="apt-get install mricron-data")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tinyclip"))


@pytest.fixture(scope="module")
def biomed(tmp_path_factory):
    return make_biomedclip_repo(tmp_path_factory.mktemp("biomedclip"))


def _inputs(n: int, size: int, views: int, seed: int = 0) -> torch.Tensor:
    """(n, 2 * views, size, size): random images, box masks of random size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2 * views, size, size, generator=g)
    for i in range(n):
        for v in range(views):
            r = int(torch.randint(3, size // 2, (1,), generator=g))
            m = torch.zeros(size, size)
            m[size // 2 - r:size // 2 + r, size // 2 - r:size // 2 + r] = 1.0
            x[i, 2 * v + 1] = m
    return x


def test_mask_overlay_blends_red_inside_the_mask_only() -> None:
    image = torch.full((1, 1, 4, 4), 0.4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1.0
    rgb = mask_overlay(image, mask, alpha=0.5)
    assert rgb.shape == (1, 3, 4, 4)
    assert torch.allclose(rgb[0, :, 2:, :], torch.full((3, 2, 4), 0.4))  # outside: the grey image
    assert torch.allclose(rgb[0, :, :2, :], torch.tensor([0.7, 0.2, 0.2]).view(3, 1, 1).expand(3, 2, 4))


def test_backbone_starts_from_the_checkpoint_tower(biomed) -> None:
    """BiomedCLIP layout (a folder with open_clip_config.json, a timm ViT): the Sentinel encoder's
    features of each view are the tower's embedding of that view's overlay, preprocessed as the
    tower was pretrained (224 px, the folder's own mean/std)."""
    from SegQCLib.models.encoders import OpenCLIPImageEncoder

    repo = biomed["repo"]
    config = resolve_backbone(SentinelConfig(backbone=f"openclip:{repo}:{repo}", size=48, margin_px=4,
                                             context_mm=64.0, text_dim=2))
    assert config.openclip["image_size"] == [224, 224] and config.openclip["mean"] == BIO_PRE["mean"]
    net = SentinelNet(config).eval()
    assert isinstance(net.encoder, OpenCLIPBackbone) and net.encoder.views == 2
    x = _inputs(3, 48, views=2)
    with torch.no_grad():
        fresh = net.encoder(x)
    assert load_backbone_checkpoint(net, config) == (repo / "open_clip_pytorch_model.bin").resolve()
    with torch.no_grad():
        got = net.encoder(x)
    reference = OpenCLIPImageEncoder(str(repo), repo, device="cpu")
    want = torch.cat([reference.encode(mask_overlay(x[:, 2 * v:2 * v + 1], x[:, 2 * v + 1:2 * v + 2]))
                      for v in range(2)], dim=1)
    assert got.shape == (3, 32)  # two views of embed_dim 16
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(fresh, want, atol=1e-2)  # the checkpoint, not the random init, is what matches


def test_segae_model_loads_from_its_card_alone(tiny, tmp_path) -> None:
    """The card keeps the tower's architecture: a saved model loads after its checkpoint and its
    open_clip config are gone, with identical predictions (float32 and the float16 shipping form)."""
    from SegQCLib.train.sentinel_cli import write_card

    root = tmp_path / "clip"
    shutil.copytree(tiny["root"], root)
    spec_cfg = root / f"{TINY}.json"  # the model named by its config file, not by the registry
    config = resolve_backbone(SentinelConfig(backbone=f"openclip:{spec_cfg}:{root / 'tiny.safetensors'}",
                                             size=32, margin_px=4, text_dim=2))
    torch.manual_seed(0)
    net = SentinelNet(config)
    load_backbone_checkpoint(net, config)
    card = save_model(net, config, tmp_path / "segae", {"name": "segae-test"})
    shipped = write_card(card, tmp_path / "shipped" / "segae16", "segae16", {}, {})
    shutil.rmtree(root)
    saved = json.loads(card.read_text())["config"]
    assert saved["backbone"].startswith("openclip:") and saved["openclip"]["vision_cfg"]["width"] == 64
    x, text = _inputs(4, 32, views=1, seed=1), torch.eye(2)[[0, 1, 0, 1]]
    with torch.no_grad():
        want = net.eval()(x, text)
        assert torch.allclose(load_model(card).net(x, text), want, atol=1e-6)
        assert torch.allclose(load_model(shipped).net(x, text), want, atol=2e-2)


class _TwoNames:
    def __init__(self, names):
        self.names, self.name, self.dim = list(names), "fixed", 2

    def encode(self, names):
        return np.eye(2, dtype=np.float32)[[self.names.index(n) for n in names]]


@needs_mricron
def test_segae_training_learns_and_a_frozen_tower_stays_fixed(tiny, tmp_path) -> None:
    from safetensors.torch import load_file

    from SegQCLib.train.sentinel_data import build_samples
    from SegQCLib.train.sentinel_train import TrainOptions, evaluate_predictions, predict_set, train

    spec = f"openclip:{TINY}:{tiny['safetensors']}"
    config = SentinelConfig(backbone=spec, size=32, margin_px=4, text_dim=2)
    samples = build_samples("val", config, seed=0, per_band=1, extra_slices=2, algorithmic=0, progress=False,
                            structures=["Pallidum_L", "Fusiform_L"])
    encoder = _TwoNames(samples.names)
    options = TrainOptions(epochs=6, batch_size=16, lr=1e-3, seed=0)
    train(tmp_path / "tuned", samples, samples, config, options, encoder, progress=False, log=lambda *_: None)
    model = load_model(tmp_path / "tuned" / "best.json")
    report = evaluate_predictions(samples, predict_set(model.net, samples, torch.from_numpy(encoder.encode(samples.names))))
    ok = ~np.isnan(samples.dsc)
    constant = float(np.mean(np.abs(samples.dsc[ok] - np.mean(samples.dsc[ok]))))
    print("SegAE slice", report["slice"], "constant-predictor MAE", constant)
    assert report["slice"]["mae"] < constant and report["slice"]["lcc"] > 0.3
    pretrained = {k[len("visual."):]: v for k, v in load_file(str(tiny["safetensors"])).items() if k.startswith("visual.")}
    tuned = model.net.encoder.tower.state_dict()
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in pretrained)  # fine-tuned by default

    frozen = SentinelConfig(backbone=spec, size=32, margin_px=4, text_dim=2, freeze_backbone=True)
    train(tmp_path / "frozen", samples, samples, frozen, TrainOptions(epochs=1, batch_size=16, seed=0), encoder,
          progress=False, log=lambda *_: None)
    kept = load_model(tmp_path / "frozen" / "best.json").net
    assert all(torch.equal(kept.encoder.tower.state_dict()[k], v) for k, v in pretrained.items())
    kept.train()
    assert kept.training and not kept.encoder.tower.training  # a frozen tower stays in eval mode


def test_bad_backbones_and_checkpoints_fail_clearly(tiny, tmp_path) -> None:
    with pytest.raises(InputError, match="unknown backbone .*openclip:<model>:<checkpoint>"):
        SentinelNet(SentinelConfig(backbone="vgg16"))
    with pytest.raises(InputError, match="'openclip:<model>:<checkpoint>'"):
        resolve_backbone(SentinelConfig(backbone=f"openclip:{TINY}"))
    with pytest.raises(InputError, match="unknown open_clip model"):
        resolve_backbone(SentinelConfig(backbone="openclip:NoSuchModel-9:x.pt"))
    with pytest.raises(InputError, match="not resolved"):
        SentinelNet(SentinelConfig(backbone=f"openclip:{TINY}:{tiny['pt']}"))
    # a checkpoint of another architecture is refused, naming the file
    other = {k: v for k, v in tiny["model"].state_dict().items()}
    other["visual.proj"] = torch.zeros(64, 16)
    wrong = tmp_path / "wrong.pt"
    torch.save(other, wrong)
    config = resolve_backbone(SentinelConfig(backbone=f"openclip:{TINY}:{wrong}", size=32, text_dim=2))
    with pytest.raises(InputError, match=f"^{re.escape(str(wrong))}: checkpoint does not fit the vision tower"):
        load_backbone_checkpoint(SentinelNet(config), config)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(InputError, match=f"^{re.escape(str(missing))}: checkpoint file not found"):
        resolve_backbone(SentinelConfig(backbone=f"openclip:{TINY}:{missing}", size=32, text_dim=2))
    with pytest.raises(InputError, match="only an openclip backbone"):
        load_backbone_checkpoint(SentinelNet(SentinelConfig(text_dim=2)), SentinelConfig(text_dim=2))


def test_cli_refuses_to_freeze_a_resnet(tmp_path, capsys) -> None:
    from SegQCLib.cli import main

    code = main(["train", "sentinel", "--out", str(tmp_path / "run"), "--freeze-backbone"])
    assert code != 0
    assert "--freeze-backbone" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any sample was built
