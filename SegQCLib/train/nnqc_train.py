"""nnQC training: ImageDAE pretraining (E2), stage 1 VAE-GAN, stage 2 LDM with the Team of Experts.

Stages run in order, each for a number of optimiser steps, each resumable from its own checkpoint
in the run folder (``dae.pt``, ``vae.pt``, ``ldm.pt``; read with ``torch.load(weights_only=True)``),
written every ``checkpoint_every`` steps and on Ctrl-C; a finished stage is skipped when the command
is run again. Batches are drawn with replacement from a :class:`~SegQCLib.train.nnqc_data.SliceSet`
(blank and near-empty masks oversampled) and augmented on the fly (:func:`augment`).

- DAE: MSE between the clean slice and the DAE's output for a corrupted copy.
- VAE-GAN: generalized Dice (MONAI) + ``ce_weight`` x cross-entropy + ``kl_weight`` x KL +
  ``adv_weight`` x least-squares patch-GAN loss (from step ``adv_start``). No perceptual loss (the
  paper's LPIPS needs pretrained weights, not available offline). The best VAE by validation
  reconstruction Dice is kept; the latent scale (1 / std of the latent means) is then fixed.
- LDM: DDPM (T = 1000) noise-prediction MSE of the UNet fed ``[z_t, mask to check]`` and the
  experts' context; E1 and the fusion train with it, the VAE and E2 stay frozen. Every
  ``val_every`` steps the pGT of the validation slices is sampled (DDIM, ``config.ddim_steps``)
  and the model with the best mean DSC(pGT, truth) is saved as ``best.{json,safetensors}``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..models.nnqc import ImageDAE, NNQCConfig, NNQCNet, NNQCModel, build_net, image_to_unit, make_scheduler, save_model
from .evaluation import agreement
from .nnqc_data import BLANK, KINDS, NEAR_EMPTY, TRUTH, SliceSet
from .stopping import stop_between_steps


@dataclass
class TrainOptions:
    """Steps per stage, batch size, learning rates, loss weights, augmentation and bookkeeping.

    strip_prob: chance that a training image is skull-stripped with a randomly dilated truth mask
    (only sensible for "Brain": skull-stripped inputs are common, and MNI152 is one).
    """

    dae_steps: int = 400
    vae_steps: int = 1500
    ldm_steps: int = 4000
    batch_size: int = 32
    lr_dae: float = 1e-3
    lr_vae: float = 5e-4
    lr_disc: float = 5e-4
    lr_ldm: float = 3e-4
    kl_weight: float = 1e-6
    adv_weight: float = 0.01
    ce_weight: float = 0.5
    adv_start: int = 300
    val_every: int = 500
    val_samples: int = 160
    checkpoint_every: int = 100
    augment: bool = True
    strip_prob: float = 0.0
    blank_weight: float = 3.0
    seed: int = 0
    threads: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainOptions":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- batches
def augment(image: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, generator: torch.Generator,
            strip_prob: float = 0.0, rotate_deg: float = 10.0, scale: float = 0.1,
            shift: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random in-plane affine per sample applied to image (b, 1, S, S, bilinear) and to the
    truth and mask labels (b, S, S, nearest); then gamma and noise on the image; with
    ``strip_prob``, the image is multiplied by the truth dilated 1-3 px (skull stripping).
    shift: fraction of the half-width (0.1 = +/- 5% of the side). All randomness from ``generator``."""
    b = image.shape[0]
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    angle = (u(b) * 2 - 1) * math.radians(rotate_deg)
    zoom = 1 + (u(b) * 2 - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, (u(b) * 2 - 1) * shift], 1),
                         torch.stack([sin, cos, (u(b) * 2 - 1) * shift], 1)], 1)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False).to(image.device)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    labels = torch.stack([gt, mask], 1).float()
    labels = F.grid_sample(labels, grid, mode="nearest", padding_mode="zeros", align_corners=False).round().long()
    gt, mask = labels[:, 0], labels[:, 1]
    gamma = torch.exp(torch.randn(b, generator=generator) * 0.2).view(b, 1, 1, 1).to(image.device)
    image = image.clamp_min(0) ** gamma
    image = image + torch.randn(image.shape, generator=generator).to(image.device) * (u(b).view(b, 1, 1, 1) * 0.03).to(image.device)
    if strip_prob > 0:
        strip = (u(b) < strip_prob).to(image.device)
        k = 2 * int(torch.randint(1, 4, (1,), generator=generator)) + 1
        brain = F.max_pool2d((gt > 0).float()[:, None], k, stride=1, padding=k // 2)
        image = torch.where(strip.view(b, 1, 1, 1), image * brain, image)
    return image, gt, mask


def batch(data: SliceSet, index: np.ndarray, device: torch.device, config: NNQCConfig,
          generator: torch.Generator | None = None, options: TrainOptions | None = None):
    """(image (b, 1, S, S) in [0, 1], truth (b, S, S) long, mask (b, S, S) long, ratio (b,)) on ``device``,
    augmented when a generator is given and ``options.augment``."""
    image = torch.from_numpy(image_to_unit(data.image[index].astype(np.float32), config))[:, None]
    gt = torch.from_numpy(data.gt[index].astype(np.int64))
    mask = torch.from_numpy(data.mask[index].astype(np.int64))
    ratio = torch.from_numpy(data.position[index].astype(np.float32))
    if generator is not None and (options is None or options.augment):
        image, gt, mask = augment(image, gt, mask, generator, options.strip_prob if options else 0.0)
    return image.to(device), gt.to(device), mask.to(device), ratio.to(device)


def sampling_weights(data: SliceSet, blank_weight: float) -> torch.Tensor:
    """Per-sample draw weights: blank masks ``blank_weight``, near-empty ``blank_weight / 1.5``, others 1."""
    w = np.ones(len(data), np.float64)
    w[data.kind == BLANK] = blank_weight
    w[data.kind == NEAR_EMPTY] = blank_weight / 1.5
    return torch.from_numpy(w)


def validation_subset(val: SliceSet, n: int, config: NNQCConfig, seed: int = 1) -> tuple:
    """A fixed, augmented validation batch: ``n`` samples spread over the kinds (CPU tensors) and their kinds."""
    rng = np.random.default_rng(seed)
    per_kind = max(1, n // len(KINDS))
    index = np.concatenate([rng.choice(np.flatnonzero(val.kind == k), min(per_kind, int((val.kind == k).sum())),
                                       replace=False) for k in range(len(KINDS)) if (val.kind == k).any()])
    tensors = batch(val, np.sort(index), torch.device("cpu"), config, torch.Generator().manual_seed(seed))
    return tensors, val.kind[np.sort(index)]


def slice_dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-slice DSC of (k, S, S) label arrays (foreground > 0); 1 where both are empty."""
    a, b = a.reshape(len(a), -1) > 0, b.reshape(len(b), -1) > 0
    inter, total = (a & b).sum(1), a.sum(1) + b.sum(1)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


@torch.no_grad()
def validate(net: NNQCNet, tensors: tuple, kinds: np.ndarray, device: torch.device, batch_size: int = 32,
             steps: int | None = None) -> dict[str, Any]:
    """pGT quality on a fixed validation batch: mean DSC(pGT, truth) (1 where both are empty), on
    blank masks alone, and slice-level agreement of pseudo-DSC (mask vs pGT) with true DSC."""
    net.eval()
    image, gt, mask, ratio = tensors
    model = NNQCModel("val", net, None, device=str(device), batch_size=batch_size, ddim_steps=steps)
    pgt = model.pgt_slices(image[:, 0].numpy(), mask.numpy().astype(np.uint8), ratio.numpy(), seed=0)
    truth, checked = gt.numpy(), mask.numpy()
    pgt_dsc = slice_dice(pgt, truth)
    has = (truth.reshape(len(truth), -1) > 0).any(1)
    pseudo, true = slice_dice(checked, pgt), slice_dice(checked, truth)
    sel = has & (kinds < TRUTH)  # the five bands, slices holding the structure
    return {"pgt_dsc": float(pgt_dsc.mean()), "pgt_dsc_fg": float(pgt_dsc[has].mean()) if has.any() else math.nan,
            "pgt_dsc_blank": float(pgt_dsc[has & (kinds == BLANK)].mean()) if (has & (kinds == BLANK)).any() else math.nan,
            "slice_bands": agreement(pseudo[sel], true[sel])}


# --------------------------------------------------------------------------- checkpoints
def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _load(path: Path) -> dict[str, Any] | None:
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def _columns():
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())


def _run_steps(name: str, total: int, start: int, step_fn: Callable[[int], float], save: Callable[[int], None],
               every: int, progress: bool, log, on_val: Callable[[int], None] | None = None,
               val_every: int = 0) -> None:
    """Run ``step_fn(step)`` for steps start..total-1 with a progress bar; checkpoint every ``every``
    steps, at the end and on Ctrl-C or SIGTERM at the end of the current step (then raise
    KeyboardInterrupt); ``on_val(step + 1)`` every ``val_every`` steps. SIGTERM is handled so that a
    background run (where SIGINT is ignored) stops cleanly with ``kill <pid>``."""
    from ..progress import progress_bar

    step, running = start, math.nan
    try:
        with stop_between_steps() as stop, progress_bar(*_columns(), disable=not progress) as bar:
            task = bar.add_task(name, total=total, completed=start, loss=0.0)
            for step in range(start, total):
                loss = step_fn(step)
                running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss
                bar.update(task, advance=1, loss=running)
                if on_val is not None and val_every and (step + 1) % val_every == 0:
                    on_val(step + 1)
                if (step + 1) % every == 0 and step + 1 < total:
                    save(step + 1)
                if stop.requested:
                    step += 1  # the steps done
                    stop.check()
            step = total
        save(total)
    except KeyboardInterrupt:
        save(step)
        log(f"interrupted: {name} checkpoint saved at step {step}; run the same command to resume")
        raise


# --------------------------------------------------------------------------- stages
def train_dae(out_dir: Path, data: SliceSet, config: NNQCConfig, options: TrainOptions, device: torch.device,
              progress: bool = True, log=print) -> ImageDAE:
    """Pretrain the ImageDAE (resumable from ``out_dir/dae.pt``); returns it (eval mode)."""
    dae = ImageDAE(config.dae_channels, config.norm_groups).to(device)
    opt = torch.optim.Adam(dae.parameters(), lr=options.lr_dae)
    path = out_dir / "dae.pt"
    state = _load(path)
    start = 0
    if state is not None:
        dae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
    history: list[float] = []

    def step_fn(step: int) -> float:
        g = torch.Generator().manual_seed(options.seed * 1_000_003 + step)
        index = torch.randint(len(data), (options.batch_size,), generator=g).numpy()
        image, *_ = batch(data, index, device, config, g, options)
        loss = F.mse_loss(dae(ImageDAE.corrupt(image, g)), image)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        return history[-1]

    save = lambda step: _save(path, {"model": dae.state_dict(), "opt": opt.state_dict(), "step": step})  # noqa: E731
    if start < options.dae_steps:
        dae.train()
        _run_steps("DAE (E2)", options.dae_steps, start, step_fn, save, options.checkpoint_every, progress, log)
        log(f"DAE: {options.dae_steps} steps, last losses {np.mean(history[-20:]) if history else math.nan:.5f}")
    return dae.eval()


def kl_loss(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma) || N(0, 1)) summed over latent elements, mean over the batch."""
    kl = 0.5 * (z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-8) - 1)
    return kl.flatten(1).sum(1).mean()


def train_vae(out_dir: Path, net: NNQCNet, train_set: SliceSet, val_tensors: tuple, options: TrainOptions,
              device: torch.device, progress: bool = True, log=print) -> None:
    """Stage 1 (resumable from ``out_dir/vae.pt``): trains ``net.vae`` adversarially, keeps the best
    by validation reconstruction Dice, then sets ``net.latent_scale``."""
    from monai.losses import GeneralizedDiceLoss, PatchAdversarialLoss
    from monai.networks.nets import PatchDiscriminator

    config = net.config
    disc = PatchDiscriminator(spatial_dims=2, channels=32, in_channels=config.n_classes, num_layers_d=2).to(device)
    opt_g = torch.optim.Adam(net.vae.parameters(), lr=options.lr_vae)
    opt_d = torch.optim.Adam(disc.parameters(), lr=options.lr_disc)
    dice_loss = GeneralizedDiceLoss(softmax=True)
    adv = PatchAdversarialLoss(criterion="least_squares")
    path = out_dir / "vae.pt"
    state = _load(path)
    start, best, best_state = 0, -math.inf, None
    if state is not None:
        net.vae.load_state_dict(state["vae"])
        disc.load_state_dict(state["disc"])
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        start, best = int(state["step"]), float(state["best"])
        best_state = state.get("best_vae") or None
        if start >= options.vae_steps and best_state:
            net.vae.load_state_dict(best_state)
            net.latent_scale.fill_(float(state["latent_scale"]))
            return
    weights = sampling_weights(train_set, 1.0)
    val_gt = val_tensors[1].to(device)

    def step_fn(step: int) -> float:
        g = torch.Generator().manual_seed(options.seed * 1_000_003 + 7 + step)
        index = torch.multinomial(weights, options.batch_size, replacement=True, generator=g).numpy()
        _, gt, _, _ = batch(train_set, index, device, config, g, options)
        target = net.one_hot(gt)
        net.vae.train()
        logits, z_mu, z_sigma = net.vae(target)
        loss = dice_loss(logits, target) + options.kl_weight * kl_loss(z_mu, z_sigma)
        if options.ce_weight:
            loss = loss + options.ce_weight * F.cross_entropy(logits, gt)
        use_adv = options.adv_weight > 0 and step >= options.adv_start
        if use_adv:
            loss = loss + options.adv_weight * adv(disc(torch.softmax(logits, 1))[-1], target_is_real=True,
                                                   for_discriminator=False)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if use_adv:
            fake = disc(torch.softmax(logits, 1).detach())[-1]
            real = disc(target)[-1]
            d_loss = 0.5 * (adv(fake, target_is_real=False, for_discriminator=True)
                            + adv(real, target_is_real=True, for_discriminator=True))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
        return loss.item()

    def on_val(step: int) -> None:
        nonlocal best, best_state
        score = vae_dice(net, val_gt)
        log(f"VAE step {step}: val reconstruction DSC {score:.4f}")
        if score > best:
            best, best_state = score, {k: v.detach().cpu().clone() for k, v in net.vae.state_dict().items()}

    def save(step: int) -> None:
        _save(path, {"vae": net.vae.state_dict(), "disc": disc.state_dict(), "opt_g": opt_g.state_dict(),
                     "opt_d": opt_d.state_dict(), "step": step, "best": best, "best_vae": best_state or {},
                     "latent_scale": float(net.latent_scale)})

    def save_or_finish(step: int) -> None:
        if step >= options.vae_steps:
            if best_state is None:
                on_val(step)
            net.vae.load_state_dict(best_state)
            net.latent_scale.fill_(latent_scale(net, train_set, device))
            log(f"VAE: best val reconstruction DSC {best:.4f}; latent scale {float(net.latent_scale):.4f}")
        save(step)

    _run_steps("VAE-GAN (stage 1)", options.vae_steps, start, step_fn, save_or_finish, options.checkpoint_every,
               progress, log, on_val, min(options.val_every, options.vae_steps))


@torch.no_grad()
def vae_dice(net: NNQCNet, gt: torch.Tensor, batch_size: int = 64) -> float:
    """Mean foreground DSC of the VAE's reconstruction of truth labels (b, S, S) (1 where both empty)."""
    net.vae.eval()
    out = []
    for start in range(0, len(gt), batch_size):
        g = gt[start:start + batch_size]
        out.append(net.vae.decode(net.vae.encode(net.one_hot(g))[0]).argmax(1).cpu().numpy())
    return float(slice_dice(np.concatenate(out), gt.cpu().numpy()).mean())


@torch.no_grad()
def latent_scale(net: NNQCNet, data: SliceSet, device: torch.device, n: int = 512) -> float:
    """1 / std of the VAE latent means over ``n`` truth slices (so the diffusion sees unit variance)."""
    net.vae.eval()
    index = np.random.default_rng(0).choice(len(data), min(n, len(data)), replace=False)
    gt = torch.from_numpy(data.gt[np.sort(index)].astype(np.int64)).to(device)
    z = torch.cat([net.vae.encode(net.one_hot(gt[s:s + 64]))[0] for s in range(0, len(gt), 64)])
    return float(1.0 / max(float(z.std()), 1e-6))


def diffusion_loss(net: NNQCNet, scheduler, image: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor,
                   ratio: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Stage-2 loss of one batch: MSE between the UNet output for ``[z_t, mask]`` (context from the
    experts) and its target (the noise for epsilon prediction, z0 for "sample", the velocity for
    "v_prediction"). image (b, 1, S, S), gt/mask (b, S, S), ratio (b,), noise (b, c, s, s), t (b,)."""
    config = net.config
    with torch.no_grad():
        net.vae.eval()
        z0 = net.encode(net.one_hot(gt))
    z_t = scheduler.add_noise(original_samples=z0, noise=noise, timesteps=t)
    pred = net.denoise(z_t, t, net.mask_condition(mask), net.context(ratio, image))
    if config.prediction_type == "epsilon":
        target = noise
    elif config.prediction_type == "sample":
        target = z0
    else:
        target = scheduler.get_velocity(z0, noise, t)
    return F.mse_loss(pred.float(), target.float())


def train_ldm(out_dir: Path, net: NNQCNet, train_set: SliceSet, val: tuple, fingerprint, options: TrainOptions,
              device: torch.device, progress: bool = True, log=print) -> dict[str, Any]:
    """Stage 2 (resumable from ``out_dir/ldm.pt``): UNet + E1 + fusion; saves ``out_dir/best`` by
    validation mean DSC(pGT, truth). Returns the validation history."""
    config = net.config
    scheduler = make_scheduler(config, "ddpm")
    params = [p for p in list(net.unet.parameters()) + list(net.experts.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=options.lr_ldm, weight_decay=1e-4)
    path = out_dir / "ldm.pt"
    history_path = out_dir / "history.json"
    state = _load(path)
    start, best = 0, -math.inf
    history = json.loads(history_path.read_text()) if history_path.exists() else {"val": [], "loss": []}
    if state is not None:
        net.unet.load_state_dict(state["unet"])
        net.experts.load_state_dict(state["experts"])
        opt.load_state_dict(state["opt"])
        start, best = int(state["step"]), float(state["best"])
    weights = sampling_weights(train_set, options.blank_weight)
    val_tensors, val_kinds = val
    net.vae.requires_grad_(False)
    losses: list[float] = []

    def step_fn(step: int) -> float:
        g = torch.Generator().manual_seed(options.seed * 1_000_003 + 13 + step)
        index = torch.multinomial(weights, options.batch_size, replacement=True, generator=g).numpy()
        image, gt, mask, ratio = batch(train_set, index, device, config, g, options)
        net.unet.train()
        net.experts.train()
        noise = torch.randn((len(index), config.latent_channels, config.latent_size, config.latent_size), generator=g)
        t = torch.randint(0, config.num_train_timesteps, (len(index),), generator=g)
        loss = diffusion_loss(net, scheduler, image, gt, mask, ratio, noise.to(device), t.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        return losses[-1]

    def on_val(step: int) -> None:
        nonlocal best
        report = validate(net, val_tensors, val_kinds, device)
        report.update({"step": step, "loss": float(np.mean(losses[-100:])) if losses else math.nan})
        history["val"].append(report)
        log(f"LDM step {step}: loss {report['loss']:.4f}  val DSC(pGT, truth) {report['pgt_dsc']:.3f} "
            f"(structure slices {report['pgt_dsc_fg']:.3f}, blank masks {report['pgt_dsc_blank']:.3f})  "
            f"slice pseudo-DSC r {report['slice_bands']['lcc']:.3f} MAE {report['slice_bands']['mae']:.3f}")
        if report["pgt_dsc"] > best:
            best = report["pgt_dsc"]
            save_model(net, fingerprint, out_dir / "best", {"name": "best", "trained_steps": step, "validation": report})

    def save(step: int) -> None:
        _save(path, {"unet": net.unet.state_dict(), "experts": net.experts.state_dict(), "opt": opt.state_dict(),
                     "step": step, "best": best})
        history["loss"].extend(losses)
        losses.clear()
        history_path.write_text(json.dumps(history, indent=1))

    if start < options.ldm_steps:
        _run_steps("LDM + experts (stage 2)", options.ldm_steps, start, step_fn, save, options.checkpoint_every,
                   progress, log, on_val, options.val_every)
        if not (out_dir / "best.json").exists():
            on_val(options.ldm_steps)
    return history


def train(out_dir: str | Path, train_set: SliceSet, val_set: SliceSet, config: NNQCConfig, fingerprint,
          options: TrainOptions, device: str = "auto", progress: bool = True, log=print) -> Path:
    """All stages in order (each resumed or skipped when done); returns ``out_dir/best.json``.

    ``config`` and ``options`` are written to ``out_dir/run.json`` on the first call; a later call
    with another config raises (delete the folder to start over)."""
    from ..qc import resolve_device

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device(resolve_device(device))
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    run = out_dir / "run.json"
    if run.exists():
        # filled in by build_net, or inference-only settings (slices per pass, DDIM steps, noise seed)
        derived = ("image_tokens", "image_token_dim", "batch_size", "ddim_steps", "seed")
        saved = {k: v for k, v in json.loads(run.read_text())["config"].items() if k not in derived}
        if saved != {k: v for k, v in config.to_dict().items() if k not in derived}:
            from ..errors import InputError

            raise InputError(out_dir, "holds a run with another model configuration (use a new --out folder)")
    net = build_net(config).to(dev)
    run.write_text(json.dumps({"config": config.to_dict(), "options": asdict(options),
                               "fingerprint": fingerprint.to_dict()}, indent=2))
    started = time.perf_counter()
    if config.uses_image and config.image_encoder == "dae":
        dae = train_dae(out_dir, train_set, config, options, dev, progress, log)
        net.image_encoder.load_state_dict(dae.encoder.state_dict())
        net.image_encoder.requires_grad_(False)
    val = validation_subset(val_set, options.val_samples, config, seed=options.seed + 1)
    train_vae(out_dir, net, train_set, val[0], options, dev, progress, log)
    train_ldm(out_dir, net, train_set, val, fingerprint, options, dev, progress, log)
    log(f"training finished in {time.perf_counter() - started:.0f} s (this call)")
    return out_dir / "best.json"


__all__ = ["TrainOptions", "augment", "batch", "train", "train_dae", "train_vae", "train_ldm", "validate",
           "slice_dice", "kl_loss"]
