"""Tiny open_clip models with seeded random weights, saved in the layouts real checkpoints come in.

Shared by the encoder tests and the SegAE (open_clip backbone) tests; nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

TINY = "SegQCTestTinyCLIP"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
HF_NAME = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"  # as in BiomedCLIP's config; never fetched
BIO_PRE = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}


def make_tiny_clip(root: Path) -> dict:
    """An OpenAI-style CLIP (ViT 64 px, embed 32) registered with open_clip as :data:`TINY`, in
    memory and saved in four layouts: safetensors, pt, a DataParallel-wrapped checkpoint, visual only."""
    from safetensors.torch import save_file

    config = root / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    files = {
        "safetensors": root / "tiny.safetensors",
        "pt": root / "tiny.pt",
        "wrapped": root / "wrapped.pth",
        "visual_only": root / "visual.bin",
    }
    save_file(state, str(files["safetensors"]))
    torch.save(state, files["pt"])
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, files["wrapped"])
    torch.save({k: v for k, v in state.items() if k.startswith("visual.")}, files["visual_only"])
    return {"model": model, "config": config, "root": root, **files}


def make_biomedclip_repo(root: Path) -> dict:
    """A folder like BiomedCLIP's hub repository (``open_clip_config.json`` with its own
    preprocessing, timm ViT vision tower, Hugging Face BERT text tower, ``open_clip_pytorch_model.bin``)
    and a local tiny BERT folder for its text tower."""
    from open_clip.model import CustomTextCLIP
    from transformers import BertConfig, BertTokenizer

    bert = root / "bert"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "left", "right", "kidney", "liver",
             "spleen", "hippocampus", "frontal", "superior", "orbital", "lung", "upper", "lobe"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(bert)
    BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=32).save_pretrained(bert)
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                       "timm_pool": "", "timm_proj": "linear", "image_size": 224},
        "text_cfg": {"hf_model_name": HF_NAME, "hf_tokenizer_name": HF_NAME, "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16},
    }
    repo = root / "repo"
    repo.mkdir()
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": BIO_PRE}))
    local_cfg = json.loads(json.dumps(model_cfg))
    local_cfg["text_cfg"].update(hf_model_name=str(bert), hf_model_pretrained=False)
    torch.manual_seed(2)
    model = CustomTextCLIP(**local_cfg).eval()
    torch.save(model.state_dict(), repo / "open_clip_pytorch_model.bin")
    return {"model": model, "repo": repo, "bert": bert}
