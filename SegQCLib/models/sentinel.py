"""Quality Sentinel / SegAE: a text-conditioned regressor of the DSC of a mask against its unknown truth.

Input: a 2-channel axial slice (image, mask) cropped around the mask with a margin and resized to
``size`` x ``size``; condition: an embedding of the structure's name. Output: the predicted DSC of
that slice. The volume score averages the slice predictions over 10 evenly spaced slices, as the
papers do, weighted by the mask's area on each slice (see :meth:`SentinelQC.assess`).

Network (Quality Sentinel, eq. 1-2): ``f = E(x)`` from a 2D ResNet with a 2-channel stem, text
embedding ``t``; gates ``w1 = W1 [f, t]`` and ``w2 = W2 [f, t]``; ``h = g2(w2 * g1(w1 * f))``. The
layer shapes follow the public Quality Sentinel release (linear gates, hidden width 50, biased
7x7 stem), so its checkpoints load by key mapping (:func:`load_published_checkpoint`). In SegAE's
mode ``E`` is instead the vision tower of a local open_clip model (BiomedCLIP's layout), fed the
image with its mask blended in (:class:`OpenCLIPBackbone`).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..calibration import Calibration, annotate_result
from ..domain import assess_domain, card_domain
from ..errors import InputError
from ..qc import DEFAULT_FLAG_THRESHOLD, QCResult
from ..volume import Volume

ARCHITECTURE = "sentinel"


@dataclass
class SentinelConfig:
    """Everything needed to rebuild a Sentinel model and its input pipeline (saved in the model card).

    backbone: MONAI ResNet depth (resnet10/18/34/50), ``widen`` scales its channel widths; or
        ``"openclip:<model>:<checkpoint>"``, SegAE's mode: the vision tower of a local open_clip
        model (e.g. BiomedCLIP) sees each view as the image with its mask blended in
        (:func:`mask_overlay`); its architecture is kept in ``openclip`` (:func:`resolve_backbone`),
        so a trained model loads from its card alone; ``freeze_backbone`` keeps the tower's
        pretrained weights fixed (only the gates and the head train).
    size: side of the model input in pixels; margin_px: context kept around the mask's box, in
        input-grid pixels, before resizing. modality: "MR" (per-volume percentile scaling) or "CT"
        (HU clipped to ``ct_window``).
    text_encoder: spec of the name encoder (see ``encoders.text_encoder_from_spec``), text_dim its size.
    context_mm: side in mm of a second, fixed-size view centred on the mask (image + mask, two more
        channels) that keeps absolute scale and surroundings, which the mask-sized crop loses (an
        eroded mask, resized to fill the crop, looks like a smaller correct one). 0 = the papers'
        two channels only.
    """

    backbone: str = "resnet18"
    widen: float = 0.5
    size: int = 96
    margin_px: int = 20
    hidden: int = 50
    text_encoder: str = "minilm"
    text_dim: int = 384
    modality: str = "MR"
    ct_window: tuple[float, float] = (-200.0, 200.0)
    volume_slices: int = 10
    context_mm: float = 0.0
    freeze_backbone: bool = False
    openclip: dict[str, Any] | None = None

    @property
    def in_channels(self) -> int:
        return 4 if self.context_mm > 0 else 2

    @property
    def is_openclip(self) -> bool:
        return self.backbone.startswith("openclip:")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SentinelConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "ct_window" in known:
            known["ct_window"] = tuple(known["ct_window"])
        return cls(**known)


# --------------------------------------------------------------------------- network
_DEPTHS = {"resnet10": ("basic", [1, 1, 1, 1]), "resnet18": ("basic", [2, 2, 2, 2]),
           "resnet34": ("basic", [3, 4, 6, 3]), "resnet50": ("bottleneck", [3, 4, 6, 3])}


def _resnet(backbone: str, widen: float, in_channels: int = 2) -> tuple[nn.Module, int]:
    """A 2D MONAI ResNet with a biased 7x7/2 stem (torchvision layout); returns it and its feature size."""
    from monai.networks.nets import ResNet

    if backbone not in _DEPTHS:
        raise InputError(backbone, f"unknown backbone (choose {', '.join(_DEPTHS)} or openclip:<model>:<checkpoint>)")
    block, layers = _DEPTHS[backbone]
    net = ResNet(block, layers, [64, 128, 256, 512], spatial_dims=2, n_input_channels=in_channels, conv1_t_size=7,
                 conv1_t_stride=2, feed_forward=False, bias_downsample=False, widen_factor=widen)
    net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, kernel_size=7, stride=2, padding=3, bias=True)
    expansion = 4 if block == "bottleneck" else 1
    return net, int(512 * widen) * expansion


def mask_overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SegAE's "image with its visualised segmentation mask": (n, 1, h, w) image and mask in [0, 1]
    -> (n, 3, h, w) RGB in [0, 1], the grey image with the mask blended in red at ``alpha``."""
    red = torch.tensor([1.0, 0.0, 0.0], dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    weight = alpha * mask
    return image.expand(-1, 3, -1, -1) * (1.0 - weight) + red * weight


class OpenCLIPBackbone(nn.Module):
    """An open_clip vision tower as the Sentinel encoder (SegAE): (n, 2 * views, s, s) -> (n, dim * views).

    Each view's (image, mask) channel pair becomes one :func:`mask_overlay` RGB picture, resized and
    normalised as the tower was pretrained (:func:`~SegQCLib.models.encoders.openclip_preprocess`);
    the views go through the tower as one batch and their embeddings are concatenated. A frozen
    tower stays in eval mode and runs without gradients.
    """

    def __init__(self, spec: dict[str, Any], views: int, frozen: bool = False):
        super().__init__()
        from .encoders import build_openclip_vision_tower

        self.tower = build_openclip_vision_tower(spec)
        self.views, self.frozen = int(views), bool(frozen)
        self.image_size = tuple(spec["image_size"])
        self.interpolation = spec["interpolation"]
        self.register_buffer("mean", torch.tensor(spec["mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec["std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if self.frozen:
            self.tower.requires_grad_(False)
        with torch.no_grad():  # the embedding size (embed_dim with a projection, else the trunk's width)
            self.tower.eval()
            self.dim = int(self._embed(torch.zeros((1, 3, *self.image_size))).shape[1])

    def train(self, mode: bool = True) -> "OpenCLIPBackbone":
        super().train(mode)
        if self.frozen:
            self.tower.eval()
        return self

    def _embed(self, rgb: torch.Tensor) -> torch.Tensor:
        from .encoders import openclip_preprocess

        out = self.tower(openclip_preprocess(rgb, self.image_size, self.interpolation, self.mean, self.std))
        return (out[0] if isinstance(out, tuple) else out).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rgb = torch.cat([mask_overlay(x[:, 2 * v:2 * v + 1], x[:, 2 * v + 1:2 * v + 2]) for v in range(self.views)])
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self._embed(rgb)  # (views * n, dim), view-major
        return feats.view(self.views, n, -1).transpose(0, 1).reshape(n, -1)


def resolve_backbone(config: SentinelConfig) -> SentinelConfig:
    """Fill ``config.openclip`` from the model part of an ``openclip:<model>:<checkpoint>`` backbone
    (reads the open_clip config, not the weights, and checks that the checkpoint is there, so a
    wrong path fails before any data is built); a no-op for ResNets and resolved configs."""
    if config.is_openclip and config.openclip is None:
        from .encoders import _checkpoint_file, openclip_vision_spec, split_openclip_spec

        model, checkpoint = split_openclip_spec(config.backbone)
        config.openclip = openclip_vision_spec(model)
        _checkpoint_file(checkpoint)
    return config


def load_backbone_checkpoint(net: "SentinelNet", config: SentinelConfig) -> Path:
    """Load the pretrained tower weights of an ``openclip:<model>:<checkpoint>`` backbone into ``net``
    (the start of SegAE training); returns the checkpoint's path."""
    from .encoders import load_openclip_vision_weights, split_openclip_spec

    if not isinstance(net.encoder, OpenCLIPBackbone):
        raise InputError(config.backbone, "only an openclip backbone loads a pretrained checkpoint")
    model, checkpoint = split_openclip_spec(config.backbone)
    return load_openclip_vision_weights(net.encoder.tower, checkpoint, model)


def _encoder(config: SentinelConfig) -> tuple[nn.Module, int]:
    """The image encoder of ``config`` and its feature size."""
    if not config.is_openclip:
        return _resnet(config.backbone, config.widen, config.in_channels)
    if config.openclip is None:
        raise InputError(config.backbone, "open_clip backbone not resolved (call resolve_backbone first)")
    try:
        backbone = OpenCLIPBackbone(config.openclip, views=config.in_channels // 2, frozen=config.freeze_backbone)
    except ImportError as err:
        raise InputError(config.backbone, f"open_clip is not installed ({err}): pip install 'segqc[clip]'") from None
    return backbone, backbone.dim * backbone.views


class SentinelNet(nn.Module):
    """(n, C, size, size) slices + (n, text_dim) name embeddings -> (n,) predicted DSC (unclamped)."""

    def __init__(self, config: SentinelConfig):
        super().__init__()
        self.encoder, feat = _encoder(config)
        self.w1 = nn.Linear(feat + config.text_dim, feat)
        self.w2 = nn.Linear(feat + config.text_dim, config.hidden)
        self.g1 = nn.Linear(feat, config.hidden)
        self.g2 = nn.Linear(config.hidden, 1)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        f = self.encoder(x)
        ft = torch.cat([f, text], dim=1)
        h = self.g1(self.w1(ft) * f)
        return self.g2(self.w2(ft) * h).squeeze(1)


# --------------------------------------------------------------------------- inputs
def normalise_image(array: np.ndarray, config: SentinelConfig) -> np.ndarray:
    """Intensities to [0, 1]: CT clipped to ``config.ct_window`` (HU); MR and others scaled by the
    volume's own [p0.5, p99.5] of the voxels above its background (any scale and offset of the raw
    units give the same result, :func:`~SegQCLib.fingerprint.foreground_percentiles`). float32, same shape."""
    from ..fingerprint import ct_window, foreground_percentiles

    array = np.asarray(array, dtype=np.float32)
    if config.modality.upper() == "CT":
        lo, hi = config.ct_window
        return ct_window(array, (lo + hi) / 2.0, hi - lo)
    lo, hi = foreground_percentiles(array, (0.5, 99.5), max_samples=200_000)
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def slice_boxes(mask: np.ndarray, indices: np.ndarray, margin_px: int) -> np.ndarray:
    """Square crop boxes (k, 4) as (x1, y1, x2, y2) pixel edges around the mask on each slice.

    mask: (z, y, x) bool. The box is the mask's in-plane bounding box grown by ``margin_px`` and made
    square about its centre; a slice without mask gets the whole (square) slice.
    """
    _, h, w = mask.shape
    boxes = np.empty((len(indices), 4), dtype=np.float32)
    for row, k in enumerate(indices):
        ys = np.flatnonzero(mask[k].any(axis=1))
        if ys.size:
            xs = np.flatnonzero(mask[k].any(axis=0))
            cy, cx = (ys[0] + ys[-1] + 1) / 2.0, (xs[0] + xs[-1] + 1) / 2.0
            side = max(ys[-1] - ys[0] + 1, xs[-1] - xs[0] + 1) + 2 * margin_px
        else:
            cy, cx, side = h / 2.0, w / 2.0, max(h, w)
        boxes[row] = (cx - side / 2.0, cy - side / 2.0, cx + side / 2.0, cy + side / 2.0)
    return boxes


def context_boxes(mask: np.ndarray, indices: np.ndarray, side_mm: float, spacing_yx: tuple[float, float]) -> np.ndarray:
    """Fixed-size boxes (k, 4) as (x1, y1, x2, y2) pixels, ``side_mm`` wide in both directions,
    centred on the mask's in-plane box (the slice centre for a slice without mask)."""
    tight = slice_boxes(mask, indices, margin_px=0)
    centre_x, centre_y = (tight[:, 0] + tight[:, 2]) / 2.0, (tight[:, 1] + tight[:, 3]) / 2.0
    half_x, half_y = side_mm / spacing_yx[1] / 2.0, side_mm / spacing_yx[0] / 2.0
    return np.stack([centre_x - half_x, centre_y - half_y, centre_x + half_x, centre_y + half_y], 1).astype(np.float32)


def slice_inputs(image01: np.ndarray, mask: np.ndarray, indices, config: SentinelConfig,
                 spacing_yx: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """Model inputs (k, C, size, size) float32 for axial slices ``indices``.

    image01: (z, y, x) intensities already in [0, 1] (:func:`normalise_image`); mask (z, y, x) bool,
    both in RAS array order; spacing_yx: in-plane spacing in mm. Channels: image and mask cropped
    around the mask (:func:`slice_boxes`), then, with ``config.context_mm``, image and mask in the
    fixed-size context view (:func:`context_boxes`). Crop + resize is torchvision's ``roi_align``
    (bilinear, averaging ``ceil(box/size)`` samples per output pixel, so large boxes are
    anti-aliased); outside the image reads as 0.
    """
    from torchvision.ops import roi_align

    indices = np.asarray(indices, dtype=int)
    if indices.size == 0:
        return torch.zeros((0, config.in_channels, config.size, config.size))
    planes = torch.from_numpy(np.stack([image01[indices], mask[indices].astype(np.float32)], axis=1))
    batch = torch.arange(len(indices), dtype=torch.float32)[:, None]
    views = [slice_boxes(mask, indices, config.margin_px)]
    if config.context_mm > 0:
        views.append(context_boxes(mask, indices, config.context_mm, spacing_yx))
    return torch.cat([roi_align(planes, torch.cat([batch, torch.from_numpy(boxes)], dim=1), output_size=config.size,
                                spatial_scale=1.0, sampling_ratio=-1, aligned=True) for boxes in views], dim=1)


def area_weighted_mean(scores: np.ndarray, areas: np.ndarray) -> float:
    """Volume DSC from slice DSCs. With truth areas ~ mask areas, DSC = sum_k a_k dsc_k / sum_k a_k
    exactly, so slices weigh by the mask's area; a mask without area falls back to the plain mean."""
    scores, areas = np.asarray(scores, float), np.asarray(areas, float)
    if scores.size == 0:
        return math.nan
    return float(np.average(scores, weights=areas)) if areas.sum() > 0 else float(scores.mean())


# --------------------------------------------------------------------------- the QC model
class SentinelQC:
    """A trained Sentinel network with its text encoder: implements the QC protocol."""

    kind = "regressor"
    domain: dict[str, Any] | None = None  # the card's domain (SegQCLib.domain.card_domain), set by load_model

    def __init__(self, name: str, net: SentinelNet, config: SentinelConfig, text_encoder=None,
                 device: str = "cpu", batch_size: int = 64, trained_structures: Sequence[str] | None = None,
                 calibration=None):
        """``trained_structures``: the structure names the network was trained on (the card's
        ``trained_structures``); None when unknown (older cards), and then no name is called unseen.
        ``calibration``: the card's :class:`~SegQCLib.calibration.Calibration` (intervals), or None."""
        self.name = name
        self.config = config
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self._text_encoder = text_encoder
        self.batch_size = batch_size
        self.trained_structures = tuple(trained_structures) if trained_structures else None
        self.calibration = calibration
        self._trained_text: torch.Tensor | None = None

    def nearest_trained_structure(self, label: str) -> str | None:
        """The trained structure whose name embeds closest to ``label`` (cosine of the text encoder's
        embeddings); None when the trained structures are unknown."""
        if not self.trained_structures:
            return None
        if self._trained_text is None:
            table = torch.from_numpy(np.asarray(self.text_encoder.encode(list(self.trained_structures)), np.float32))
            self._trained_text = F.normalize(table, dim=1)
        query = F.normalize(torch.from_numpy(np.asarray(self.text_encoder.encode([label]), np.float32)), dim=1)
        return self.trained_structures[int((self._trained_text @ query[0]).argmax())]

    def structure_notes(self, label: str) -> dict[str, Any]:
        """``{"structure_seen_in_training": bool, "nearest_trained_structure": name}`` (the latter only for
        an unseen name); empty when the card does not list its trained structures.

        Why: the text condition is how the network knows what the mask should look like. A structure it
        never saw is read as a poor mask of a known one whose name is close: on held-out brain structures,
        nearly perfect hippocampus masks scored 0.37-0.40 (true 0.83-0.92), read against ParaHippocampal
        (``benchmarks/sentinel_warped_brain.md``, session 19). Callers should say so beside the score."""
        if not self.trained_structures:
            return {}
        if label in self.trained_structures:
            return {"structure_seen_in_training": True}
        return {"structure_seen_in_training": False, "nearest_trained_structure": self.nearest_trained_structure(label)}

    @property
    def text_encoder(self):
        if self._text_encoder is None:
            from .encoders import text_encoder_from_spec

            self._text_encoder = text_encoder_from_spec(self.config.text_encoder)
        return self._text_encoder

    @torch.no_grad()
    def predict(self, inputs: torch.Tensor, names: list[str]) -> np.ndarray:
        """Predicted DSC in [0, 1] for (k, 2, size, size) inputs and k structure names, batched."""
        unique = sorted(set(names))
        table = dict(zip(unique, torch.from_numpy(self.text_encoder.encode(unique)).float()))
        text = torch.stack([table[n] for n in names]) if names else torch.zeros((0, self.config.text_dim))
        out = []
        for start in range(0, len(inputs), self.batch_size):
            x = inputs[start:start + self.batch_size].to(self.device)
            t = text[start:start + self.batch_size].to(self.device)
            out.append(self.net(x, t).float().clamp(0.0, 1.0).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def assess(self, image: Volume, mask: np.ndarray, label: str, *, threshold: float = DEFAULT_FLAG_THRESHOLD,
               all_slices: bool = True) -> QCResult:
        """Per-slice predicted DSC (every slice holding mask, or the 10 volume slices when
        ``all_slices`` is False) and the volume DSC from 10 evenly spaced slices."""
        from ..data.slices import evenly_spaced_slices, foreground_slices
        from ..fingerprint import ras_axes, to_ras

        start = time.perf_counter()
        if mask.shape != image.shape:
            raise InputError(image.name, f"mask shape {mask.shape} differs from image shape {image.shape}")
        domain = assess_domain(self.domain, image, label)
        axes, flips = ras_axes(image.grid.direction)
        image_ras = normalise_image(np.ascontiguousarray(to_ras(image.array, axes, flips)), self.config)
        mask_ras = np.ascontiguousarray(to_ras(np.asarray(mask, bool), axes, flips))
        spacing_yx = (image.grid.spacing[axes[1]], image.grid.spacing[axes[2]])
        volume_idx = evenly_spaced_slices(mask_ras, self.config.volume_slices)
        table_idx = foreground_slices(mask_ras) if all_slices else volume_idx
        table_idx = table_idx or volume_idx
        wanted = sorted(set(volume_idx) | set(table_idx))
        scores = dict(zip(wanted, self.predict(slice_inputs(image_ras, mask_ras, wanted, self.config, spacing_yx),
                                               [label] * len(wanted))))
        areas = mask_ras.sum(axis=(1, 2))
        volume_dsc = area_weighted_mean([scores[k] for k in volume_idx], areas[volume_idx])
        # RAS slice k is input index k along the input axis that became RAS z (reversed when flipped).
        n = mask_ras.shape[0]
        to_input = (lambda k: n - 1 - k) if flips[0] else (lambda k: k)
        rows = [{"index": int(to_input(k)), "dsc": float(scores[k]), "area_px": int(areas[k])} for k in table_idx]
        notes = self.structure_notes(label)
        result = QCResult.from_slice_scores(self.name, label, {"dsc": volume_dsc}, rows, threshold,
                                            extra={"slice_axis": int(axes[0]),
                                                   "volume_slices": [int(to_input(k)) for k in volume_idx], **notes,
                                                   "domain": domain})
        # an input outside the domain (e.g. a structure name the model was not trained on) errs far more:
        # its interval is calibrated apart
        annotate_result(result, self.calibration, "in" if domain["in"] else "out")
        result.runtime_s = time.perf_counter() - start
        return result


# --------------------------------------------------------------------------- weights
def save_model(net: SentinelNet, config: SentinelConfig, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` and the model card ``<path>.json`` (config + measured numbers)."""
    from safetensors.torch import save_file

    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(stem.with_suffix(".safetensors")))
    card = dict(card or {})
    card.update({"architecture": ARCHITECTURE, "name": card.get("name", stem.name), "config": config.to_dict(),
                 "weights": stem.with_suffix(".safetensors").name})
    stem.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return stem.with_suffix(".json")


def load_model(card_path: str | Path, device: str = "cpu") -> SentinelQC:
    """Load a Sentinel model from its model card (``.json``) and the safetensors file it names."""
    from safetensors.torch import load_file

    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text())
        config = SentinelConfig.from_dict(card["config"])
        weights = card_path.parent / card["weights"]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(card_path, f"not a Sentinel model card ({err})") from None
    net = SentinelNet(config)
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise InputError(weights, f"cannot read weights ({err})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # shipped as float16
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(weights, f"weights do not fit the card's architecture (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
    model = SentinelQC(card.get("name", card_path.stem), net, config, device=device,
                       trained_structures=card.get("trained_structures"),
                       calibration=Calibration.from_dict(card.get("calibration")))
    model.domain = card_domain(card)
    return model


# The public Quality Sentinel release names its layers after torchvision's ResNet inside a wrapper.
_PUBLISHED_PREFIXES = (("conv1.", "encoder.conv1."), ("bn1.", "encoder.bn1."), ("net.layer", "encoder.layer"),
                       ("attention1.", "w1."), ("attention2.", "w2."), ("fc1.", "g1."), ("fc2.", "g2."))
_PUBLISHED_UNUSED = ("net.conv1.", "net.bn1.", "net.fc.")


def map_published_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a public Quality Sentinel state dict to :class:`SentinelNet`'s keys.

    Drops torchvision's unused stem/classifier (``net.conv1``, ``net.bn1``, ``net.fc``) and a
    ``module.`` prefix from DataParallel; raises :class:`InputError` for keys it does not know.
    """
    out, unknown = {}, []
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.startswith(_PUBLISHED_UNUSED):
            continue
        for old, new in _PUBLISHED_PREFIXES:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise InputError(None, f"not a Quality Sentinel checkpoint: unknown keys {unknown[:5]}")
    return out


def load_published_checkpoint(path: str | Path, text_encoder=None, device: str = "cpu",
                              size: int = 256) -> SentinelQC:
    """Load the public Quality Sentinel checkpoint layout (ResNet50, 2-channel stem, 512-d CLIP
    text gating, hidden 50, CT [-200, 200], 256 x 256) from a local file (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such checkpoint file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of a corrupt or unsafe file
        raise InputError(path, f"cannot read checkpoint safely ({str(err).splitlines()[0][:200]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        mapped = map_published_state(state)
    except InputError as err:
        raise InputError(path, err.problem) from None
    text_dim = int(mapped["w1.weight"].shape[1] - mapped["g1.weight"].shape[1])
    config = SentinelConfig(backbone="resnet50", widen=1.0, size=size, hidden=int(mapped["g1.weight"].shape[0]),
                            text_dim=text_dim, modality="CT",
                            text_encoder=getattr(text_encoder, "name", "") or "openclip")
    net = SentinelNet(config)
    try:
        net.load_state_dict(mapped, strict=True)
    except RuntimeError as err:
        raise InputError(path, f"checkpoint does not match the published layout ({str(err)[:200]})") from None
    return SentinelQC(path.stem, net, config, text_encoder=text_encoder, device=device)
