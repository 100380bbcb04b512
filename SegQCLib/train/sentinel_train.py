"""Training and evaluation of Quality Sentinel on :class:`~SegQCLib.train.sentinel_data.SampleSet` files.

Loss (Sentinel paper, eq. 3): MSE weighted by the inverse frequency of the true-DSC bin (so the
rare low-quality slices count) + lambda * optimal-pair ranking loss. Pairs are formed inside each
batch by SciPy's ``linear_sum_assignment`` on the cosine similarity of the structures' text
embeddings, self-pairs forbidden; each pair (i, j) costs max(0, (p_i - p_j)(t_j - t_i) + margin).

Checkpoints (``checkpoint.pt``: weights, optimiser, scheduler, epoch, batch within the epoch, the
training generator's state, best score) are written every ``checkpoint_minutes``, after every epoch,
and on Ctrl-C or SIGTERM (at the end of the current batch); ``segqc train sentinel`` then resumes
at the next batch and draws what the run would have drawn without the stop, so a resumed run ends
with the same weights.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..errors import InputError
from ..models.sentinel import (SentinelConfig, SentinelNet, area_weighted_mean, load_backbone_checkpoint, load_model,
                               resolve_backbone, save_model)
from .evaluation import agreement
from .sentinel_data import KINDS, SampleSet
from .stopping import stop_between_steps


@dataclass
class TrainOptions:
    """epochs, batch size, Adam learning rate, ranking-loss weight (lambda) and margin (xi), seed;
    ``checkpoint_minutes``: wall-clock minutes between checkpoints inside an epoch."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 1e-3
    rank_weight: float = 1.0
    margin: float = 0.01
    bins: int = 10
    seed: int = 0
    threads: int = 0
    intensity_prob: float = 0.0  # chance per sample of a random bias field + noise on its image channels
    text_noise: float = 0.0  # norm of random noise added to each text embedding, relative to its norm
    flip_names: bool = False  # a left-right flip of a lateral structure also swaps its name's side (see mirror_index)
    checkpoint_minutes: float = 5.0


def optimal_pairs(text: torch.Tensor) -> np.ndarray:
    """Partner index of each sample: the assignment maximising total cosine similarity, no self-pairs.

    text: (n, d) embeddings. Returns (n,) ints (a permutation without fixed points for n >= 2).
    """
    unit = torch.nn.functional.normalize(text.float(), dim=1)
    cost = -(unit @ unit.T).cpu().numpy()
    np.fill_diagonal(cost, 1e6)  # the paper's +inf on the diagonal; finite so the solver accepts it
    _, partner = linear_sum_assignment(cost)
    return partner


def ranking_loss(pred: torch.Tensor, true: torch.Tensor, partner: np.ndarray, margin: float) -> torch.Tensor:
    """Mean over pairs (i, partner[i]) of max(0, (p_i - p_j)(t_j - t_i) + margin)."""
    j = torch.as_tensor(partner, device=pred.device)
    return torch.clamp((pred - pred[j]) * (true[j] - true) + margin, min=0.0).mean()


def bin_weights(dsc: np.ndarray, bins: int) -> np.ndarray:
    """Per-bin weights (bins,) = inverse frequency of true DSC in [0, 1], normalised to mean 1 over samples."""
    counts = np.bincount(np.clip((dsc * bins).astype(int), 0, bins - 1), minlength=bins).astype(float)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / bins, 0.0)
    mean = (weights[np.clip((dsc * bins).astype(int), 0, bins - 1)]).mean()
    return weights / mean


def mirrored_name(name: str) -> str | None:
    """The other side's name of a lateral structure (``Putamen_L`` -> ``Putamen_R``, ``Left X`` ->
    ``Right X``); None for a name without a side (``Brain``, ``Brodmann area 4``)."""
    for side, other in (("_L", "_R"), ("_R", "_L")):
        if name.endswith(side):
            return name[: -len(side)] + other
    for side, other in (("Left ", "Right "), ("Right ", "Left ")):
        if name.startswith(side):
            return other + name[len(side):]
    return None


def mirror_index(names: list[str]) -> np.ndarray:
    """(len(names),) int64: for each name, the index in ``names`` of what a left-right flip makes of
    it: itself for a name without a side, its other side's name for a lateral one, -1 when that name
    is not in ``names`` (such samples are not flipped: no name would be true for them)."""
    position = {name: i for i, name in enumerate(names)}
    out = np.empty(len(names), dtype=np.int64)
    for i, name in enumerate(names):
        other = mirrored_name(name)
        out[i] = i if other is None else position.get(other, -1)
    return out


def _augment(x: torch.Tensor, generator: torch.Generator, intensity_prob: float = 0.0,
             flippable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-right flips and a random gamma of the image channels (x: (b, C, s, s) in [0, 1]; even
    channels are images, odd ones masks); returns (augmented x, (b,) bool: which were flipped).
    ``flippable`` (b,) bool limits the flips to those samples (None: any). With ``intensity_prob``,
    also a smooth multiplicative bias field (exp of a random quadratic in x, y; coefficient std
    0.15) and Gaussian noise (std U(0, 0.04)) on the image channels of that share of samples: a
    scanner and subject change the intensities, and the training data hold one subject only.

    Written on the batch tensor with the training generator (not MONAI's per-sample Rand*
    transforms, which draw from their own NumPy state) so that a resumed run repeats the same draws.
    """
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    if flippable is not None:
        flip &= flippable
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    gamma = torch.exp(torch.randn(b, generator=generator) * 0.15)[:, None, None, None]
    is_image = (torch.arange(c) % 2 == 0)[None, :, None, None]
    x = torch.where(is_image, x.clamp_min(0) ** gamma, x)
    if intensity_prob <= 0:
        return x, flip
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    basis = torch.stack([xx, yy, xx * yy, xx ** 2, yy ** 2])  # (5, h, w)
    coeffs = torch.randn(b, c, 5, generator=generator) * 0.15
    field = torch.exp(torch.einsum("bck,khw->bchw", coeffs, basis))
    noise = torch.randn(x.shape, generator=generator) * (torch.rand(b, 1, 1, 1, generator=generator) * 0.04)
    chosen = (torch.rand(b, generator=generator) < intensity_prob)[:, None, None, None] & is_image
    return torch.where(chosen, (x * field + noise).clamp(0, 1.5), x), flip


def jitter_text(text: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """``text`` (b, dim) embeddings plus random Gaussian noise of norm about ``noise`` times each row's norm.

    The training data name ~140 structures: points in the text space. A structure never trained on
    falls between them; noise on the training names teaches the head to answer smoothly in their
    neighbourhood instead of only at the points. 0 returns ``text`` itself.
    """
    if noise <= 0:
        return text
    direction = torch.randn(text.shape, generator=generator) / math.sqrt(text.shape[1])
    return text + noise * text.norm(dim=1, keepdim=True) * direction


@torch.no_grad()
def predict_set(net: SentinelNet, samples: SampleSet, text_table: torch.Tensor, batch_size: int = 256,
                device: str = "cpu") -> np.ndarray:
    """Predicted DSC (N,) of every slice of ``samples`` (clamped to [0, 1])."""
    net.eval()
    out = []
    for start in range(0, len(samples.x), batch_size):
        x = torch.from_numpy(samples.x[start:start + batch_size]).float().div_(255.0).to(device)
        t = text_table[torch.from_numpy(samples.name[start:start + batch_size]).long()].to(device)
        out.append(net(x, t).clamp(0.0, 1.0).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def evaluate_predictions(samples: SampleSet, pred: np.ndarray) -> dict[str, Any]:
    """Slice- and volume-level agreement of ``pred`` (one per slice) with the truth in ``samples``.

    Slice level: slices with a defined 2D DSC. Volume level: the area-weighted mean over each
    sample volume's 10 volume slices vs its true 3D DSC; also broken down by kind and by band.
    """
    names = np.asarray(samples.names)
    ok = ~np.isnan(samples.dsc)
    report: dict[str, Any] = {"slice": agreement(pred[ok], samples.dsc[ok], names[samples.name[ok]])}
    n_vol = len(samples.volume_dsc)
    vol_pred = np.full(n_vol, np.nan)
    for v in range(n_vol):
        sel = (samples.volume == v) & samples.in_volume
        vol_pred[v] = area_weighted_mean(pred[sel], samples.area[sel])
    report["volume"] = agreement(vol_pred, samples.volume_dsc, names[samples.volume_name])
    bands = samples.volume_kind == KINDS.index("degraded")  # the five nnQC DSC bands
    report["volume_bands"] = agreement(vol_pred[bands], samples.volume_dsc[bands], names[samples.volume_name[bands]])
    report["by_kind"] = {}
    for k, kind in enumerate(KINDS):
        sel = samples.volume_kind == k
        if sel.any():
            report["by_kind"][kind] = {"n": int(sel.sum()), "mean_pred": float(np.mean(vol_pred[sel])),
                                       "mean_true": float(np.mean(samples.volume_dsc[sel])),
                                       "max_pred": float(np.max(vol_pred[sel])),
                                       "mae": float(np.mean(np.abs(vol_pred[sel] - samples.volume_dsc[sel])))}
    report["volume_pred"] = vol_pred.tolist()
    return report


def text_table_for(names: list[str], encoder) -> torch.Tensor:
    """(len(names), dim) float tensor of the names' embeddings."""
    return torch.from_numpy(np.asarray(encoder.encode(names), dtype=np.float32))


#: SentinelConfig fields that do not shape the network or its inputs (may differ when fine-tuning)
_TRAINING_ONLY_FIELDS = ("freeze_backbone",)


def check_same_network(card: str | Path, config: SentinelConfig, ignore: tuple[str, ...] = ()) -> None:
    """Raise :class:`InputError` naming ``card`` and the first setting where its network differs from
    ``config``'s (backbone, width, input size, context, text encoder, modality, ...); settings named in
    ``ignore`` are not compared (those not known yet)."""
    try:
        theirs = SentinelConfig.from_dict(json.loads(Path(card).read_text())["config"]).to_dict()
    except (OSError, ValueError, KeyError) as err:
        raise InputError(card, f"not a Sentinel model card ({err})") from None
    ours = config.to_dict()
    for key in ours:
        if key not in _TRAINING_ONLY_FIELDS + ignore and theirs.get(key) != ours[key]:
            raise InputError(card, f"cannot fine-tune from it: its {key} is {theirs.get(key)!r}, this run's is "
                                   f"{ours[key]!r} (train with the same network settings)")


def train(out_dir: str | Path, train_set: SampleSet, val_set: SampleSet, config: SentinelConfig,
          options: TrainOptions, encoder, progress: bool = True, log=print, device: str = "cpu",
          init: str | Path | None = None) -> Path:
    """Train (resuming from ``out_dir/checkpoint.pt`` when present); returns the best model card path.

    ``init``: a model card whose weights a new run starts from (fine-tuning); its network must be
    ``config``'s (:func:`check_same_network`). A resumed run continues from its checkpoint instead.

    The best epoch by validation volume-level LCC is saved as ``out_dir/best.{safetensors,json}``.
    ``device``: where the network runs ("cpu" or "cuda"); batches are drawn and augmented on the CPU
    with the seeded generator, so a run's samples do not depend on the device. A checkpoint holds
    the generator's state at the start of its epoch (which fixes the epoch's sample order) and
    after its last finished batch, so a resumed run continues the same draws. Raises
    KeyboardInterrupt after saving the checkpoint on Ctrl-C or SIGTERM.
    """
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    from ..progress import progress_bar

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    device = torch.device(device)
    net = SentinelNet(resolve_backbone(config)).to(device)  # before the optimiser: its state follows the parameters
    # channels-last convolutions: 1.3x faster training steps on CPU (benchmarks/bench_sentinel_train.py)
    channels_last = device.type == "cpu"
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=options.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(options.epochs, 1))
    # where the run stands: the next batch to train, the generator at the epoch's start and now, the loss EMA
    at = {"epoch": 0, "batch": 0, "epoch_generator": generator.get_state(), "generator": generator.get_state(),
          "running": 0.0}
    best, history = -math.inf, []
    checkpoint = out_dir / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        best = float(state["best"])
        history = json.loads((out_dir / "history.json").read_text()) if (out_dir / "history.json").exists() else []
        at.update(epoch=int(state["epoch"]), batch=int(state.get("batch", 0)))
        if "generator" in state:
            at.update(epoch_generator=state["epoch_generator"], generator=state["generator"],
                      running=float(state["running"]))
        else:  # written by an older version, after an epoch: it reseeded the generator per resumed epoch
            generator.manual_seed(options.seed + at["epoch"])
            at.update(epoch_generator=generator.get_state(), generator=generator.get_state())
        log(f"resuming at epoch {at['epoch'] + 1}, batch {at['batch']} (best val volume LCC {best:.4f})")
    elif init is not None:
        check_same_network(init, config)
        net.load_state_dict(load_model(init).net.state_dict())
        log(f"fine-tuning {init}")
    elif config.is_openclip:  # SegAE: start from the pretrained open_clip tower
        log(f"open_clip vision tower from {load_backbone_checkpoint(net, config)}"
            f"{' (frozen)' if config.freeze_backbone else ''}")

    train_text = text_table_for(train_set.names, encoder)
    mirror = torch.from_numpy(mirror_index(train_set.names)) if options.flip_names else None
    val_text = text_table_for(val_set.names, encoder)
    usable = np.flatnonzero(~np.isnan(train_set.dsc))
    weights_per_bin = torch.from_numpy(bin_weights(train_set.dsc[usable], options.bins)).float()
    n_batches = len(usable) // options.batch_size

    def save_checkpoint() -> None:
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"net": net.state_dict(), "optimiser": optimiser.state_dict(),
                    "scheduler": scheduler.state_dict(), "best": best, **at}, tmp)
        tmp.replace(checkpoint)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
    try:
        with stop_between_steps() as stop, progress_bar(*columns, disable=not progress) as bar:
            for epoch in range(at["epoch"], options.epochs):
                net.train()
                first, running = at["batch"], at["running"]
                generator.set_state(at["epoch_generator"])  # the epoch's order, drawn as when it began
                order = usable[torch.randperm(len(usable), generator=generator).numpy()]
                if first:  # resumed inside the epoch: continue the draws after its last finished batch
                    generator.set_state(at["generator"])
                task = bar.add_task(f"epoch {epoch + 1}/{options.epochs}", total=n_batches, loss=running,
                                    completed=first)
                started = last_save = time.perf_counter()
                for b in range(first, n_batches):
                    idx = np.sort(order[b * options.batch_size:(b + 1) * options.batch_size])
                    names = torch.from_numpy(train_set.name[idx]).long()
                    x, flipped = _augment(torch.from_numpy(train_set.x[idx]).float().div_(255.0), generator,
                                          options.intensity_prob, None if mirror is None else mirror[names] >= 0)
                    if mirror is not None:  # a flipped left structure is now on the right: say so
                        names = torch.where(flipped, mirror[names], names)
                    text = train_text[names]
                    true = torch.from_numpy(train_set.dsc[idx]).float()
                    x = x.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
                    pred = net(x, jitter_text(text, options.text_noise, generator).to(device)).cpu()
                    w = weights_per_bin[torch.clamp((true * options.bins).long(), 0, options.bins - 1)]
                    loss = (w * (pred - true) ** 2).mean()
                    if options.rank_weight:
                        loss = loss + options.rank_weight * ranking_loss(pred, true, optimal_pairs(text),
                                                                         options.margin)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    running = 0.98 * running + 0.02 * loss.item() if b else loss.item()
                    at.update(batch=b + 1, generator=generator.get_state(), running=running)
                    bar.update(task, advance=1, loss=running)
                    stop.check()
                    if time.perf_counter() - last_save > 60 * options.checkpoint_minutes:
                        save_checkpoint()
                        last_save = time.perf_counter()
                report = evaluate_predictions(val_set, predict_set(net, val_set, val_text, device=str(device)))
                score = report["volume"]["lcc"]
                history = [h for h in history if h["epoch"] <= epoch]  # validation interrupted before: redone
                history.append({"epoch": epoch + 1, "loss": running, "seconds": time.perf_counter() - started,
                                "val_slice": report["slice"], "val_volume": report["volume"]})
                log(f"epoch {epoch + 1}: loss {running:.4f}  val slice LCC {report['slice']['lcc']:.3f}  "
                    f"volume LCC {score:.3f} SROCC {report['volume']['srocc']:.3f} MAE {report['volume']['mae']:.3f}")
                if score > best:
                    best = score
                    save_model(net, config, out_dir / "best", {"name": "best", "trained_epochs": epoch + 1})
                scheduler.step()
                at.update(epoch=epoch + 1, batch=0, epoch_generator=generator.get_state(),
                          generator=generator.get_state(), running=0.0)
                save_checkpoint()
                stop.check()
    except KeyboardInterrupt:
        save_checkpoint()
        log(f"interrupted: checkpoint saved at epoch {at['epoch'] + 1}, batch {at['batch']}; "
            "run the same command to resume")
        raise
    return out_dir / "best.json"
