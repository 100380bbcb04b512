"""nnQC: a pseudo ground truth (pGT) from a latent diffusion model guided by a Team of Experts.

Method (Marciano et al., "Diffusion-Based Quality Control of Medical Image Segmentations across
Organs", 2025), written here from the paper; one model per structure, 2D axial slices:

- **Stage 1, VAE-GAN** (:class:`~monai.networks.nets.AutoencoderKL`): one-hot ground-truth masks
  (``1 + len(structures)`` channels, background first) -> a small spatial latent
  (``latent_channels`` = 2, side ``size / 2**(len(vae_channels) - 1)``) -> mask logits. Trained
  with generalized Dice + KL + a patch-GAN adversarial loss (:class:`~monai.networks.nets.PatchDiscriminator`)
  and an optional cross-entropy term. The paper's perceptual loss is left out: it needs a
  pretrained network (LPIPS), which is not available offline.
- **Stage 2, LDM** (:class:`~monai.networks.nets.DiffusionModelUNet` with cross-attention): the
  denoiser input is the noisy latent concatenated with the mask to check, downsampled to the latent
  size (area interpolation: the fraction of each latent cell the mask covers). DDPM training with
  T = 1000; DDIM sampling, 5 steps by default (20 as the paper's setting). The UNet predicts the
  velocity v by default (``prediction_type="v_prediction"``); the paper's noise prediction
  (``"epsilon"``) is available, but measured here it sampled poorly with 5 DDIM steps after a
  CPU-sized training (validation DSC(pGT, truth) 0.47 after 1000 steps, while its one-step
  estimate of z0 from t = 500 reached 0.84): with epsilon, the z0 estimate at large t divides the
  UNet's error by sqrt(alpha_bar_t) ~ 0.006, v-prediction does not.
- **Team of Experts** (:class:`TeamOfExperts`): E1, an MLP of the slice position ratio in [0, 1]
  (1 -> 32 -> ``cross_attention_dim``), trained with the LDM; E2, a frozen image encoder giving
  tokens: by default the encoder of :class:`ImageDAE`, a small denoising autoencoder pretrained
  here on image slices, or an open_clip vision tower read from a local checkpoint
  (``image_encoder="openclip:<model>:<checkpoint>"``, e.g. UniMedCLIP/BiomedCLIP ViT-B/16).
  Fusion: ``c = LayerNorm(o1 + Attention(Q=F_q o1, K=F_k o2, V=F_v o2))``
  (:class:`torch.nn.MultiheadAttention`). The UNet's context tokens are ``[c]`` followed, when
  ``image_tokens_in_context`` (default), by the projected image tokens with a learned positional
  embedding, so that the UNet's spatial cross-attention can read *where* the image shows what
  (the paper's single fused vector is ``image_tokens_in_context=False``). Ablations
  (``experts``): ``"position"`` (E1 only: ``[o1]``), ``"image"`` (E2 only: the projected tokens),
  ``"full"``.

QC (:class:`NNQCModel`): fingerprint preprocessing (RAS, in-plane resample/crop to ``size``,
intensity normalisation; :func:`SegQCLib.fingerprint.preprocess`), slices batched on the device,
pGT slices mapped back to the input grid (:func:`SegQCLib.fingerprint.postprocess`), then the DSC
and HD95 (mm) of the mask against the pGT per axial slice and per volume.
"""
from __future__ import annotations

import json
import time
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
from ..volume import Volume, check_finite

ARCHITECTURE = "nnqc"
EXPERTS = ("position", "image", "full")


@dataclass
class NNQCConfig:
    """Everything needed to rebuild an nnQC model (saved in the model card).

    structures: names of the structures, one channel each (the paper trains one model per organ).
    size: side of the model's square axial slices, pixels.
    vae_channels / vae_res_blocks / latent_channels: AutoencoderKL widths per level (the latent is
        ``size / 2**(len(vae_channels) - 1)`` pixels wide), residual blocks per level, latent channels.
    unet_channels / unet_attention / unet_res_blocks / num_head_channels: DiffusionModelUNet widths,
        which levels carry (cross-)attention, residual blocks, channels per attention head.
    norm_groups: GroupNorm groups of both networks (must divide every width).
    cross_attention_dim: width of the conditioning tokens; position_hidden: hidden width of E1.
    experts: "position", "image" or "full" (ablation switch, see the module docstring).
    image_encoder: "dae" (our :class:`ImageDAE`) or "openclip:<model>:<checkpoint>".
    dae_channels: ImageDAE widths (tokens are ``(size / 2**len(dae_channels))**2`` x ``dae_channels[-1]``).
    image_tokens / image_token_dim: number and width of E2's tokens (set by :func:`build_net`).
    fusion_heads: heads of the E1/E2 cross-attention. image_tokens_in_context: see module docstring.
    num_train_timesteps, schedule, beta_start, beta_end, prediction_type: the diffusion process
        (prediction_type "v_prediction", "epsilon" as the paper, or "sample").
    ddim_steps: DDIM sampling steps at inference. seed: seed of the sampling noise (reproducible pGT).
    batch_size: slices per forward pass at inference (a whole 100-slice volume fits in one pass of
        the 64 px network: ~7x faster than slice by slice on CPU, see benchmarks/bench_nnqc.py).
    modality: "MR" or "CT" (image scaling for E2).
    """

    structures: tuple[str, ...] = ("Brain",)
    size: int = 64
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_res_blocks: int = 1
    latent_channels: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_attention: tuple[bool, ...] = (False, True, True)
    unet_res_blocks: int = 1
    num_head_channels: int = 16
    norm_groups: int = 8
    cross_attention_dim: int = 64
    position_hidden: int = 32
    experts: str = "full"
    image_encoder: str = "dae"
    dae_channels: tuple[int, ...] = (16, 32, 64)
    image_tokens: int = 0
    image_token_dim: int = 0
    fusion_heads: int = 4
    image_tokens_in_context: bool = True
    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "v_prediction"
    ddim_steps: int = 5
    seed: int = 0
    batch_size: int = 128
    modality: str = "MR"

    def __post_init__(self) -> None:
        self.structures = tuple(str(s) for s in self.structures)
        for key in ("vae_channels", "unet_channels", "dae_channels"):
            setattr(self, key, tuple(int(c) for c in getattr(self, key)))
        self.unet_attention = tuple(bool(a) for a in self.unet_attention)
        if self.experts not in EXPERTS:
            raise InputError("experts", f"unknown experts {self.experts!r} (choose {', '.join(EXPERTS)})")
        if not self.structures:
            raise InputError("structures", "an nnQC model needs at least one structure")
        if len(self.unet_attention) != len(self.unet_channels):
            raise InputError("unet_attention", "needs one flag per UNet level")
        if self.size % self.vae_factor or self.latent_size % 2 ** (len(self.unet_channels) - 1):
            raise InputError("size", f"{self.size} must be divisible by the VAE and UNet downsampling")

    @property
    def n_classes(self) -> int:
        """Channels of the one-hot masks: background + one per structure."""
        return 1 + len(self.structures)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Side of the latent, pixels."""
        return self.size // self.vae_factor

    @property
    def uses_image(self) -> bool:
        return self.experts in ("image", "full")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("structures", "vae_channels", "unet_channels", "unet_attention", "dae_channels"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NNQCConfig":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- networks
def _block(c_in: int, c_out: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(min(groups, c_out), c_out),
                         nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(min(groups, c_out), c_out),
                         nn.SiLU())


class ImageDAE(nn.Module):
    """A small convolutional denoising autoencoder of image slices; its encoder is nnQC's default E2.

    (n, 1, S, S) images in [0, 1] -> encoder features (n, C, S / 2**L, S / 2**L) with
    C = ``channels[-1]``, L = ``len(channels)`` -> reconstruction (n, 1, S, S) in [0, 1].
    Pretrained with :meth:`corrupt` (Gaussian noise and dropped patches) -> clean, MSE.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64), groups: int = 8):
        super().__init__()
        chans = [1, *channels]
        self.encoder = nn.Sequential(*[_block(chans[i], chans[i + 1], 2, groups) for i in range(len(channels))])
        ups = []
        for i in range(len(channels), 0, -1):
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), _block(chans[i], max(chans[i - 1], channels[0]), 1, groups)]
        self.decoder = nn.Sequential(*ups, nn.Conv2d(channels[0], 1, 3, padding=1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1, S, S) -> (n, C, S / 2**L, S / 2**L)."""
        return self.encoder(x)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 1, S, S) -> (n, t, C) tokens, t = (S / 2**L)**2, row-major over the feature grid."""
        return self.encoder(x).flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.encoder(x)))

    @staticmethod
    def corrupt(x: torch.Tensor, generator: torch.Generator | None = None, max_sigma: float = 0.2,
                drop: float = 0.1, patch: int = 8) -> torch.Tensor:
        """Noisy copy of (n, 1, S, S) images: Gaussian noise (sigma ~ U(0, max_sigma) per image) and a
        random share ``drop`` of ``patch`` x ``patch`` squares set to 0. Randomness drawn on the CPU."""
        n, _, h, w = x.shape
        sigma = torch.rand(n, 1, 1, 1, generator=generator) * max_sigma
        noise = torch.randn(x.shape, generator=generator) * sigma
        keep = (torch.rand(n, 1, -(-h // patch), -(-w // patch), generator=generator) >= drop).float()
        keep = F.interpolate(keep, scale_factor=patch, mode="nearest")[..., :h, :w]
        return (x * keep.to(x.device) + noise.to(x.device)).clamp(0.0, 1.0)


class TeamOfExperts(nn.Module):
    """Conditioning tokens from the slice position (E1) and image tokens (E2, computed outside).

    forward(ratio (b,), tokens (b, t, w) or None) -> context (b, k, cross_attention_dim) with
    k = 1 ("position"), t ("image"), 1 + t ("full" with image tokens in context) or 1 ("full" without).
    """

    def __init__(self, config: NNQCConfig):
        super().__init__()
        dim = config.cross_attention_dim
        self.experts = config.experts
        self.with_tokens = config.image_tokens_in_context
        self.position = nn.Sequential(nn.Linear(1, config.position_hidden), nn.SiLU(),
                                      nn.Linear(config.position_hidden, dim))
        if config.uses_image:
            self.image_proj = nn.Linear(config.image_token_dim, dim)
            self.image_pos = nn.Parameter(torch.zeros(1, config.image_tokens, dim))
            nn.init.normal_(self.image_pos, std=0.02)
        if config.experts == "full":
            self.attention = nn.MultiheadAttention(dim, config.fusion_heads, batch_first=True)
            self.norm = nn.LayerNorm(dim)

    def opinions(self, ratio: torch.Tensor, tokens: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """o1 (b, 1, dim) from E1 and the projected E2 tokens (b, t, dim) (None where unused)."""
        o1 = self.position(ratio.reshape(-1, 1).float())[:, None] if self.experts != "image" else None
        o2 = None
        if self.experts != "position":
            if tokens is None:
                raise InputError("experts", f"experts={self.experts!r} needs image tokens")
            o2 = self.image_proj(tokens.float()) + self.image_pos
        return o1, o2

    def forward(self, ratio: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        o1, o2 = self.opinions(ratio, tokens)
        if self.experts == "position":
            return o1
        if self.experts == "image":
            return o2
        fused, _ = self.attention(o1, o2, o2, need_weights=False)
        c = self.norm(o1 + fused)
        return torch.cat([c, o2], dim=1) if self.with_tokens else c


class NNQCNet(nn.Module):
    """The trainable parts of nnQC: VAE (stage 1), denoising UNet + Team of Experts (stage 2) and,
    for ``image_encoder="dae"``, the frozen ImageDAE encoder. ``latent_scale`` (buffer) scales the VAE
    latent means to unit standard deviation for the diffusion (set after stage 1)."""

    def __init__(self, config: NNQCConfig):
        super().__init__()
        from monai.networks.nets import AutoencoderKL, DiffusionModelUNet

        self.config = config
        self.vae = AutoencoderKL(spatial_dims=2, in_channels=config.n_classes, out_channels=config.n_classes,
                                 channels=config.vae_channels, num_res_blocks=config.vae_res_blocks,
                                 attention_levels=(False,) * len(config.vae_channels),
                                 latent_channels=config.latent_channels, norm_num_groups=config.norm_groups,
                                 with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
        self.unet = DiffusionModelUNet(spatial_dims=2, in_channels=config.latent_channels + len(config.structures),
                                       out_channels=config.latent_channels, channels=config.unet_channels,
                                       attention_levels=config.unet_attention, num_res_blocks=config.unet_res_blocks,
                                       num_head_channels=config.num_head_channels, norm_num_groups=config.norm_groups,
                                       with_conditioning=True, cross_attention_dim=config.cross_attention_dim)
        self.experts = TeamOfExperts(config)
        self.image_encoder = (ImageDAE(config.dae_channels, config.norm_groups).encoder
                              if config.uses_image and config.image_encoder == "dae" else None)
        if self.image_encoder is not None:
            self.image_encoder.requires_grad_(False)
        self.external_encoder = None  # an OpenCLIPImageEncoder (not part of the state dict)
        self.register_buffer("latent_scale", torch.tensor(1.0))

    # ---- masks and latents
    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """(b, S, S) integer labels (0 = background, k = structures[k-1]) -> (b, n_classes, S, S) float."""
        return F.one_hot(labels.long(), self.config.n_classes).permute(0, 3, 1, 2).float()

    def mask_condition(self, labels: torch.Tensor) -> torch.Tensor:
        """The mask to check as the UNet's extra input: (b, S, S) labels -> (b, n_structures, s, s)
        foreground fractions in [0, 1] at the latent size s (area interpolation)."""
        fg = self.one_hot(labels)[:, 1:]
        return F.interpolate(fg, size=(self.config.latent_size,) * 2, mode="area")

    def encode(self, onehot: torch.Tensor) -> torch.Tensor:
        """(b, n_classes, S, S) -> scaled latent means (b, latent_channels, s, s)."""
        z_mu, _ = self.vae.encode(onehot)
        return z_mu * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents (b, latent_channels, s, s) -> mask logits (b, n_classes, S, S)."""
        return self.vae.decode(z / self.latent_scale)

    # ---- experts
    @torch.no_grad()
    def image_tokens(self, image: torch.Tensor) -> torch.Tensor | None:
        """E2 tokens (b, t, w) of (b, 1, S, S) images in [0, 1] (None when the image is not used)."""
        if not self.config.uses_image:
            return None
        if self.image_encoder is not None:
            self.image_encoder.eval()
            return self.image_encoder(image).flatten(2).transpose(1, 2)
        if self.external_encoder is None:
            raise InputError(self.config.image_encoder, "no image encoder loaded (see attach_image_encoder)")
        return self.external_encoder.tokens(image).to(image.device)

    def context(self, ratio: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Conditioning tokens (b, k, cross_attention_dim) of slice positions (b,) and images (b, 1, S, S)."""
        return self.experts(ratio, self.image_tokens(image))

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, mask_cond: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction for noisy latents (b, c, s, s) at timesteps t (b,), with the mask
        condition (b, n_structures, s, s) concatenated on the channels."""
        return self.unet(torch.cat([z_t, mask_cond], dim=1), timesteps=t, context=context)

    @torch.no_grad()
    def sample(self, image: torch.Tensor, labels: torch.Tensor, ratio: torch.Tensor, steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """pGT logits (b, n_classes, S, S) by DDIM sampling.

        image: (b, 1, S, S) in [0, 1]; labels: (b, S, S) mask to check; ratio: (b,) slice positions.
        The initial noise is drawn on the CPU from ``generator`` (same result on any device).
        """
        scheduler = make_scheduler(self.config, "ddim")
        scheduler.set_timesteps(int(steps or self.config.ddim_steps), device=image.device)
        b = image.shape[0]
        s = self.config.latent_size
        z = torch.randn((b, self.config.latent_channels, s, s), generator=generator).to(image.device)
        cond, ctx = self.mask_condition(labels), self.context(ratio, image)
        for t in scheduler.timesteps:
            out = self.denoise(z, torch.full((b,), int(t), device=image.device, dtype=torch.long), cond, ctx)
            z, _ = scheduler.step(out, int(t), z)
        return self.decode(z)


def make_scheduler(config: NNQCConfig, kind: str = "ddpm"):
    """MONAI's DDPM (training) or DDIM (sampling) scheduler for ``config``'s diffusion process."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=config.num_train_timesteps, schedule=config.schedule,
                  beta_start=config.beta_start, beta_end=config.beta_end, prediction_type=config.prediction_type,
                  clip_sample=False)
    return DDPMScheduler(**common) if kind == "ddpm" else DDIMScheduler(**common)


def image_encoder_from_spec(spec: str, device: str | torch.device | None = None):
    """An :class:`~SegQCLib.models.encoders.OpenCLIPImageEncoder` from ``openclip:<model>:<checkpoint>``."""
    from .encoders import OpenCLIPImageEncoder, split_openclip_spec

    try:
        model, checkpoint = split_openclip_spec(spec)
    except InputError:
        raise InputError(spec, "image encoder spec is 'dae' or 'openclip:<model>:<checkpoint>'") from None
    return OpenCLIPImageEncoder(model, checkpoint, device=device)


def build_net(config: NNQCConfig, external_encoder=None) -> NNQCNet:
    """An NNQCNet for ``config``, filling ``config.image_tokens``/``image_token_dim`` from its E2.

    For ``image_encoder="openclip:..."`` pass the loaded encoder (or it is read from the spec)."""
    if config.uses_image:
        if config.image_encoder == "dae":
            grid = config.size // 2 ** len(config.dae_channels)
            config.image_tokens, config.image_token_dim = grid * grid, config.dae_channels[-1]
        else:
            external_encoder = external_encoder or image_encoder_from_spec(config.image_encoder)
            probe = external_encoder.tokens(torch.zeros(1, 1, config.size, config.size))
            config.image_tokens, config.image_token_dim = int(probe.shape[1]), int(probe.shape[2])
    net = NNQCNet(config)
    net.external_encoder = external_encoder if config.uses_image and config.image_encoder != "dae" else None
    return net


# --------------------------------------------------------------------------- the QC model
def image_to_unit(slices: np.ndarray, config: NNQCConfig) -> np.ndarray:
    """Preprocessed image slices -> [0, 1] for E2: MR slices already are; CT z-scores map
    [-3, 3] -> [0, 1] (clipped). float32, same shape."""
    if config.modality.upper() == "CT":
        return np.clip((slices + 3.0) / 6.0, 0.0, 1.0).astype(np.float32)
    return np.clip(slices, 0.0, 1.0).astype(np.float32)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"fp32" or "bf16" for ``precision`` on ``device`` ("auto": bf16 on CPUs that compute it natively,
    fp32 elsewhere).

    bf16 sampling agrees with fp32 on 99.9% of pGT pixels (benchmarks/bench_nnqc.py prints the share).
    On CUDA, "auto" is fp32: on an H100 the shipped model sampled a volume as fast or faster in fp32
    in two runs (5 DDIM steps 0.10-0.11 s against bf16's 0.11-0.13 s; 20 steps 0.29-0.43 s against
    0.46-0.51 s), and fp32 is exact."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "fp32"
    if device.type == "cpu":
        # torch.cpu's feature probes are private; a torch without them gets fp32
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
        return "bf16" if native and torch.backends.mkldnn.is_available() else "fp32"
    return "fp32"


class NNQCModel:
    """A trained nnQC network with its fingerprint: implements the QC protocol (reconstruction kind)."""

    kind = "reconstruction"
    domain: dict[str, Any] | None = None  # the card's domain (SegQCLib.domain.card_domain), set by load_model

    def __init__(self, name: str, net: NNQCNet, fingerprint, device: str = "cpu", batch_size: int | None = None,
                 ddim_steps: int | None = None, precision: str = "auto", calibration=None):
        """``precision``: "fp32", "bf16" (autocast) or "auto" (:func:`resolve_precision`: bf16 on CPUs with
        AMX/AVX512-BF16, fp32 otherwise, CUDA included). ``calibration``: the card's
        :class:`~SegQCLib.calibration.Calibration` (intervals on the pseudo-scores), or None."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.name = name
        self.net = net
        self.calibration = calibration
        self.config: NNQCConfig = net.config
        self.fingerprint = fingerprint
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        if net.external_encoder is not None and hasattr(net.external_encoder, "tower"):
            net.external_encoder.tower.to(self.device)
            net.external_encoder.device = self.device
            net.external_encoder._mean = net.external_encoder._mean.to(self.device)
            net.external_encoder._std = net.external_encoder._std.to(self.device)
        self.batch_size = int(batch_size or self.config.batch_size)
        self.ddim_steps = int(ddim_steps or self.config.ddim_steps)
        self.precision = resolve_precision(precision, self.device)

    @torch.no_grad()
    def pgt_slices(self, image: np.ndarray, labels: np.ndarray, positions: np.ndarray, seed: int | None = None,
                   batch_size: int | None = None) -> np.ndarray:
        """pGT label slices (k, S, S) uint8 for preprocessed slices.

        image: (k, S, S) normalised intensities; labels: (k, S, S) mask to check (0 = background,
        j = ``structures[j-1]``); positions: (k,) slice ratios in [0, 1]. Batched ``batch_size`` on the
        device; the noise of slice i comes from one CPU generator seeded ``seed`` (config.seed), so
        results do not depend on the device or on ``batch_size``... up to floating point.
        """
        k = len(labels)
        out = np.zeros((k, self.config.size, self.config.size), np.uint8)
        generator = torch.Generator().manual_seed(int(self.config.seed if seed is None else seed))
        image01 = image_to_unit(np.asarray(image, np.float32), self.config)
        step = int(batch_size or self.batch_size)
        for start in range(0, k, step):
            sl = slice(start, start + step)
            x = torch.from_numpy(image01[sl])[:, None].to(self.device)
            m = torch.from_numpy(np.asarray(labels[sl], np.int64)).to(self.device)
            r = torch.from_numpy(np.asarray(positions[sl], np.float32)).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                logits = self.net.sample(x, m, r, self.ddim_steps, generator)
            out[sl] = logits.argmax(1).to(torch.uint8).cpu().numpy()
        return out

    def pseudo_ground_truth(self, image: Volume, mask: np.ndarray, all_slices: bool = True,
                            margin: int = 2) -> tuple[np.ndarray, Any, np.ndarray]:
        """The pGT (bool (z, y, x) on ``image``'s grid), the SliceTransform and the RAS slice indices run.

        ``all_slices``: reconstruct every axial slice (a structure the mask missed is found too);
        otherwise only the mask's slices +/- ``margin`` (every slice when the mask is empty).
        """
        from ..fingerprint import postprocess, preprocess

        mask = self._check(image, mask)
        pre = preprocess(image, mask, self.fingerprint, self.config.size)
        n = pre.transform.n_slices
        if all_slices or not pre.mask.any():
            indices = np.arange(n)
        else:
            has = np.flatnonzero(pre.mask.reshape(n, -1).any(axis=1))
            indices = np.unique(np.clip((has[:, None] + np.arange(-margin, margin + 1)).ravel(), 0, n - 1))
        positions = pre.transform.slice_positions()[indices]
        labels = self.pgt_slices(pre.image[indices], pre.mask[indices].astype(np.uint8), positions)
        pgt = postprocess(labels > 0, pre.transform, indices)
        return pgt, pre.transform, indices

    def _check(self, image: Volume, mask: np.ndarray) -> np.ndarray:
        mask = np.asarray(mask)
        if mask.shape != image.shape:
            raise InputError(image.name or "image", f"mask shape {mask.shape} differs from image shape {image.shape}")
        check_finite(image)
        return mask.astype(bool, copy=False)

    def assess(self, image: Volume, mask: np.ndarray, label: str, *, threshold: float = DEFAULT_FLAG_THRESHOLD,
               all_slices: bool = True) -> QCResult:
        """Per-slice and volume DSC and HD95 (mm) of ``mask`` (bool (z, y, x)) against the nnQC pGT.

        Rows: every axial slice where the mask or the pGT has foreground; ``index`` is the slice index
        along the input array axis that is axial (``extra["slice_axis"]``; 0 for RAS/LPS-stored volumes).
        """
        from ..fingerprint import to_ras
        from ..metrics import slice_metrics, volume_metrics

        start = time.perf_counter()
        mask = self._check(image, mask)
        domain = assess_domain(self.domain, image, label)
        pgt, transform, _ = self.pseudo_ground_truth(image, mask, all_slices)
        volume = {k: v for k, v in volume_metrics(mask, pgt, image.spacing).items() if k in ("dsc", "hd95")}
        axes, flips = transform.axes, transform.flips
        rows = slice_metrics(np.ascontiguousarray(to_ras(mask, axes, flips)),
                             np.ascontiguousarray(to_ras(pgt, axes, flips)), transform.ras_spacing)
        n = transform.n_slices
        to_input = (lambda k: n - 1 - k) if flips[0] else (lambda k: k)
        rows = [{"index": int(to_input(r["index"])), "dsc": r["dsc"], "hd95": r["hd95"]} for r in rows]
        result = QCResult.from_slice_scores(self.name, label, volume, rows, threshold, pgt=pgt,
                                            extra={"slice_axis": int(axes[0]), "ddim_steps": self.ddim_steps,
                                                   "experts": self.config.experts,
                                                   "structures": list(self.config.structures), "domain": domain})
        annotate_result(result, self.calibration, "in" if domain["in"] else "out")
        result.runtime_s = time.perf_counter() - start
        return result


# --------------------------------------------------------------------------- weights
def save_model(net: NNQCNet, fingerprint, path: str | Path, card: dict[str, Any] | None = None) -> Path:
    """Write ``<path>.safetensors`` (float32) and the model card ``<path>.json`` (architecture "nnqc",
    name, config, fingerprint, weights, plus ``card``: metrics, description, ...). Returns the card path."""
    from safetensors.torch import save_file

    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    stem.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(stem.with_suffix(".safetensors")))
    card = dict(card or {})
    card.setdefault("name", f"nnqc-{net.config.structures[0]}" if len(net.config.structures) == 1 else stem.name)
    card.setdefault("description", f"nnQC latent-diffusion pGT ({net.config.experts} experts) for "
                                   f"{', '.join(net.config.structures)}: DSC/HD95 vs pGT")
    card.setdefault("priority", 0)
    card.update({"architecture": ARCHITECTURE, "config": net.config.to_dict(),
                 "fingerprint": fingerprint.to_dict() if hasattr(fingerprint, "to_dict") else dict(fingerprint),
                 "weights": stem.with_suffix(".safetensors").name})
    stem.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return stem.with_suffix(".json")


def load_model(card_path: str | Path, device: str = "cpu", image_encoder=None, precision: str = "auto") -> NNQCModel:
    """Load an nnQC model from its card (``.json``) and the safetensors file it names.

    ``precision``: see :class:`NNQCModel`.
    ``image_encoder``: an already loaded open_clip encoder for cards whose ``image_encoder`` is an
    open_clip spec (otherwise it is read from the spec's local checkpoint)."""
    from safetensors.torch import load_file

    from ..fingerprint import Fingerprint

    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text())
        config = NNQCConfig.from_dict(card["config"])
        fingerprint = Fingerprint.from_dict(card["fingerprint"])
        weights = card_path.parent / card["weights"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InputError(card_path, f"not an nnQC model card ({err})") from None
    net = NNQCNet(config)
    if config.uses_image and config.image_encoder != "dae":
        net.external_encoder = image_encoder or image_encoder_from_spec(config.image_encoder, device)
    try:
        state = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise InputError(weights, f"cannot read weights ({err})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # may ship as float16
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(weights, f"weights do not fit the card's architecture (missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]})")
    model = NNQCModel(card.get("name", card_path.stem), net, fingerprint, device=device, precision=precision,
                      calibration=Calibration.from_dict(card.get("calibration")))
    model.domain = card_domain(card)
    return model


__all__ = ["NNQCConfig", "NNQCNet", "NNQCModel", "ImageDAE", "TeamOfExperts", "build_net", "make_scheduler",
           "save_model", "load_model", "ARCHITECTURE", "EXPERTS"]
