"""Training and evaluation of QANet on :class:`~SegQCLib.train.qanet_data.QANetSamples`.

Loss: MSE between predicted and true SEG (QANet eq. 4), each sample weighted by the inverse
frequency of its true-SEG bin (10 bins, weights normalised to mean 1), plus the same for the
``seg_objects`` head, plus ``aux_weight`` times the MSE of any other [0, 1] target (negative-exponential
MHD), plus ``distance_weight`` times the Huber loss (delta 1 px) of the distance targets (MHD95, ASD).
Adam, cosine learning-rate decay, flips / 90-degree in-plane rotations and a random intensity
affine + gamma as augmentation.

A trained model is extended with distance heads by ``train(..., base=its state)``: its weights are
loaded and frozen (batch-norm statistics too) and only the new head learns, so the extended model's
other predictions are the base model's exactly.

Checkpoints: ``OUT/checkpoint.pt`` (weights, optimiser, scheduler, epoch, batch within the epoch,
augmentation generator's state, running loss, best score, history) every ``checkpoint_minutes`` and
after every epoch; Ctrl-C or SIGTERM saves it and stops at the end of the current batch; running the
same call again resumes at the next batch with the same draws (the epoch's sample order is a
function of the seed and the epoch), so it ends with the weights of a run that never stopped. The
best epoch by validation score (Pearson r minus MAE of SEG) is saved as ``OUT/best.{safetensors,json}``.
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

from ..models.qanet import (DISTANCE_TARGETS, QANetConfig, QANetQC, RibCageNet, build_network, count_parameters,
                            encode_batch, save_model)
from .evaluation import agreement
from .qanet_data import KINDS, QANetSamples
from .stopping import stop_between_steps


@dataclass
class QANetTrainOptions:
    """epochs, batch size, Adam learning rate / weight decay, SEG bins of the loss weights, weight of
    extra targets, seed, CPU threads (1 is fastest on a shared 2-core machine), checkpoint period,
    device ("auto", "cpu", "cuda") and an optional wall-clock limit (minutes) after which training
    stops cleanly at the end of an epoch."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    bins: int = 10
    aux_weight: float = 0.5
    distance_weight: float = 0.05
    seed: int = 0
    threads: int = 1
    checkpoint_minutes: float = 3.0
    device: str = "auto"
    max_minutes: float | None = None


def bin_weights(seg: np.ndarray, bins: int) -> np.ndarray:
    """Per-sample weights (N,): inverse frequency of the true-SEG bin, normalised to mean 1."""
    which = np.clip((np.asarray(seg) * bins).astype(int), 0, bins - 1)
    counts = np.bincount(which, minlength=bins).astype(float)
    w = (len(which) / np.maximum(counts, 1) / bins)[which]
    return (w / w.mean()).astype(np.float32)


def augment(x: torch.Tensor, s: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Same random flips / in-plane 90-degree rotations of images x (b, *P) and trinary maps s (b, *P),
    and a random intensity affine (gain U(0.8, 1.2), offset U(-0.05, 0.05)) and gamma on x."""
    b, dims = x.shape[0], x.ndim - 1
    for axis in range(1, dims + 1):
        flip = (torch.rand(b, generator=generator) < 0.5).view((b,) + (1,) * dims)
        x, s = torch.where(flip, x.flip(axis), x), torch.where(flip, s.flip(axis), s)
    if torch.rand(1, generator=generator).item() < 0.5 and x.shape[-1] == x.shape[-2]:
        x, s = x.transpose(-1, -2), s.transpose(-1, -2)
    gain = torch.empty(b).uniform_(0.8, 1.2, generator=generator).view((b,) + (1,) * dims)
    offset = torch.empty(b).uniform_(-0.05, 0.05, generator=generator).view((b,) + (1,) * dims)
    gamma = torch.exp(torch.randn(b, generator=generator) * 0.2).view((b,) + (1,) * dims)
    x = torch.where(x > 0, x.clamp_min(0) ** gamma, x) * gain + offset
    return x.contiguous(), s.contiguous()


def _to_device(x: np.ndarray, s: np.ndarray, encoding: str, device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xt = torch.as_tensor(x).float().unsqueeze(1).to(device)
    st = encode_batch(torch.as_tensor(s).to(device), encoding)
    if channels_last:
        fmt = torch.channels_last if xt.ndim == 4 else torch.channels_last_3d
        xt, st = xt.contiguous(memory_format=fmt), st.contiguous(memory_format=fmt)
    return xt, st


@torch.no_grad()
def predict_samples(net: RibCageNet, samples: QANetSamples, encoding: str, batch_size: int = 128,
                    device: str | torch.device = "cpu") -> np.ndarray:
    """Predictions (N, k) of ``net`` for every sample (eval mode)."""
    device = torch.device(device)
    net.eval()
    channels_last = device.type == "cpu"
    out = []
    for start in range(0, len(samples), batch_size):
        x, s = _to_device(samples.image[start:start + batch_size], samples.tri[start:start + batch_size],
                          encoding, device, channels_last)
        out.append(net(x, s).float().cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, len(samples.targets)))


def hit_rate_auc(pred: np.ndarray, true: np.ndarray, max_tol: float = 0.5, steps: int = 101) -> float:
    """Area under the hit-rate curve (share of |pred - true| <= tol) over tol in [0, max_tol], scaled to [0, 1]."""
    err = np.abs(np.asarray(pred) - np.asarray(true))
    tols = np.linspace(0.0, max_tol, steps)
    return float(np.trapezoid([(err <= t).mean() for t in tols], tols) / max_tol)


def evaluate_predictions(samples: QANetSamples, pred: np.ndarray) -> dict[str, Any]:
    """Agreement of predictions (N, k) with the truth: per target Pearson r (``lcc``), SROCC, MAE,
    RMSE, bias (mean pred - true) and hit-rate AUC; plus SEG by perturbation kind."""
    report: dict[str, Any] = {}
    for k, target in enumerate(samples.targets):
        if k >= pred.shape[1]:
            break
        p, t = pred[:, k], samples.target[:, k].astype(np.float64)
        row = agreement(p, t)
        row.update({"rmse": float(np.sqrt(np.mean((p - t) ** 2))) if len(t) else math.nan,
                    "bias": float(np.mean(p - t)) if len(t) else math.nan,
                    # hit-rate AUC over tolerances 0-0.5 is for [0, 1] scores only (QANet Table 1: N/A for distances)
                    "auc": hit_rate_auc(p, t) if len(t) and target not in DISTANCE_TARGETS else math.nan})
        report[target] = row
    report["by_kind"] = {}
    for i, kind in enumerate(KINDS):
        sel = samples.kind == i
        if sel.any():
            report["by_kind"][kind] = {"n": int(sel.sum()), "mean_true": float(samples.seg[sel].mean()),
                                       "mean_pred": float(pred[sel, 0].mean()),
                                       "mae": float(np.abs(pred[sel, 0] - samples.seg[sel]).mean())}
    return report


def train(out_dir: str | Path, train_set: QANetSamples, val_set: QANetSamples, config: QANetConfig,
          options: QANetTrainOptions, progress: bool = True, log=print,
          base: dict[str, torch.Tensor] | None = None) -> Path:
    """Train a QANet (resuming from ``out_dir/checkpoint.pt``); returns ``out_dir/best.json``.

    ``config.targets`` picks the predicted columns of the sample sets (``"seg"`` first; sets must
    hold them). ``base``: the state dict of a trained model of the same config without a distance
    head; it is loaded and frozen, and only the distance head trains on the distance targets (the
    sets must hold those and ``seg``); the best epoch is then the best mean validation Pearson r of
    the distances. Raises KeyboardInterrupt after saving the checkpoint on Ctrl-C / SIGTERM.
    """
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..progress import progress_bar

    from ..qc import resolve_device

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device(resolve_device(options.device))
    channels_last = device.type == "cpu"
    torch.manual_seed(options.seed)
    net = build_network(config).to(device)
    trained = list(config.targets)
    if base is not None:
        missing, unexpected = net.load_state_dict(base, strict=False)
        if unexpected or not missing or any(not k.startswith("distance_head.") for k in missing):
            raise ValueError("base must be a trained model of this config without a distance head")
        for name, parameter in net.named_parameters():
            parameter.requires_grad_(name.startswith("distance_head."))
        trained = [t for t in config.targets if t in DISTANCE_TARGETS]
    outputs = [config.targets.index(t) for t in trained]
    columns = [train_set.targets.index(t) for t in trained]
    if channels_last:
        net = net.to(memory_format=torch.channels_last if config.dims == 2 else torch.channels_last_3d)
    optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=options.lr,
                                  weight_decay=options.weight_decay)
    n_batches = len(train_set) // options.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=options.lr, total_steps=max(1, options.epochs * n_batches),
                                                    pct_start=0.05, anneal_strategy="cos")
    start_epoch, start_batch, best, history = 0, 0, -math.inf, []
    generator, resumed_draws, running = torch.Generator(), None, 0.0  # augmentation draws, loss EMA
    checkpoint = out_dir / "checkpoint.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, start_batch, best = int(state["epoch"]), int(state["batch"]), float(state["best"])
        resumed_draws = state.get("generator")  # absent from checkpoints of older versions
        running = float(state.get("running", 0.0))
        history = json.loads(state["history"])
        log(f"resuming at epoch {start_epoch + 1}, batch {start_batch} (best val score {best:.4f})")
    log(f"QANet {config.dims}D {config.fusion}/{config.encoding} width {config.width}: "
        f"{count_parameters(net):,} parameters, {len(train_set)} train / {len(val_set)} val patches, device {device}")
    weights = torch.from_numpy(bin_weights(train_set.seg, options.bins))
    target = torch.from_numpy(train_set.target[:, columns])
    task_weights = torch.tensor([1.0 if t in ("seg", "seg_objects") else options.aux_weight for t in trained])
    distance = torch.tensor([t in DISTANCE_TARGETS for t in trained])
    task_weights[distance] = options.distance_weight
    epoch, batch = start_epoch, start_batch
    started_run = time.perf_counter()

    def save_checkpoint() -> None:
        tmp = checkpoint.with_suffix(".tmp")
        torch.save({"net": net.state_dict(), "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
                    "epoch": epoch, "batch": batch, "generator": generator.get_state(), "running": running,
                    "best": best, "history": json.dumps(history)}, tmp)
        tmp.replace(checkpoint)
        (out_dir / "history.json").write_text(json.dumps(history, indent=1))

    bar_columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TimeRemainingColumn())
    try:
        with stop_between_steps() as stop, progress_bar(*bar_columns, disable=not progress) as bar:
            for epoch in range(start_epoch, options.epochs):
                net.train(base is None)  # a frozen base keeps its batch-norm statistics
                order = np.random.default_rng(options.seed * 1000 + epoch).permutation(len(train_set))
                first = start_batch if epoch == start_epoch else 0
                generator.manual_seed(options.seed * 1000 + epoch)
                if first and resumed_draws is not None:
                    generator.set_state(resumed_draws)  # the draws after the last finished batch
                running = running if first else 0.0
                task = bar.add_task(f"epoch {epoch + 1}/{options.epochs}", total=n_batches, loss=running,
                                    completed=first)
                started = last_save = time.perf_counter()
                for batch in range(first, n_batches):
                    idx = np.sort(order[batch * options.batch_size:(batch + 1) * options.batch_size])
                    xb = torch.from_numpy(train_set.image[idx].astype(np.float32))
                    sb = torch.from_numpy(train_set.tri[idx])
                    xb, sb = augment(xb, sb, generator)
                    x, s = _to_device(xb.numpy(), sb.numpy(), config.encoding, device, channels_last)
                    pred = net(x, s)[:, outputs]
                    truth = target[idx].to(device)
                    err = torch.where(distance.to(device),
                                      torch.nn.functional.huber_loss(pred, truth, reduction="none", delta=1.0),
                                      (pred - truth) ** 2) * task_weights.to(device)
                    loss = (weights[idx].to(device) * err.sum(dim=1)).mean()
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    scheduler.step()
                    running = 0.98 * running + 0.02 * loss.item() if batch else loss.item()
                    bar.update(task, advance=1, loss=running)
                    if stop.requested or time.perf_counter() - last_save > 60 * options.checkpoint_minutes:
                        batch += 1  # the next batch to run
                        stop.check()
                        save_checkpoint()
                        batch -= 1
                        last_save = time.perf_counter()
                batch = n_batches  # an interrupt from here on resumes at this epoch's validation
                pred_val = predict_samples(net, val_set, config.encoding, device=device)
                shown = [t for t in config.targets if t in val_set.targets]
                val_view = QANetSamples(val_set.image, val_set.tri, val_set.target[:, [val_set.targets.index(t) for t in shown]],
                                        val_set.n_gt, val_set.n_pred, val_set.group, val_set.kind, tuple(shown))
                report = evaluate_predictions(val_view, pred_val[:, [config.targets.index(t) for t in shown]])
                if base is None:
                    score = report["seg"]["lcc"] - report["seg"]["mae"]
                else:
                    score = float(np.mean([report[t]["lcc"] for t in trained]))
                history.append({"epoch": epoch + 1, "loss": running, "seconds": time.perf_counter() - started,
                                "val": {t: report[t] for t in shown}})
                log(f"epoch {epoch + 1}: loss {running:.4f}  val " + "  ".join(
                    f"{t} r {report[t]['lcc']:.3f} MAE {report[t]['mae']:.3f}" for t in (trained if base is not None else ["seg"]))
                    + f"  ({time.perf_counter() - started:.0f} s)")
                if score > best:
                    best = score
                    save_model(net, config, out_dir / "best", {"name": "best", "trained_epochs": epoch + 1,
                                                                "val": {t: report[t] for t in shown}})
                epoch, batch = epoch + 1, 0
                save_checkpoint()
                stop.check()
                epoch -= 1
                if options.max_minutes and time.perf_counter() - started_run > 60 * options.max_minutes:
                    log(f"time limit of {options.max_minutes} min reached after epoch {epoch + 1}")
                    break
    except KeyboardInterrupt:
        save_checkpoint()
        log(f"interrupted: checkpoint saved at epoch {epoch + 1}, batch {batch}; run the same command to resume")
        raise
    return out_dir / "best.json"


def evaluate_model(model: QANetQC, samples: QANetSamples) -> dict[str, Any]:
    """Held-out agreement of a loaded QANet with the truth of ``samples`` (targets it predicts)."""
    shown = [t for t in model.config.targets if t in samples.targets]
    view = QANetSamples(samples.image, samples.tri, samples.target[:, [samples.targets.index(t) for t in shown]],
                        samples.n_gt, samples.n_pred, samples.group, samples.kind, tuple(shown))
    pred = predict_samples(model.net, view, model.config.encoding, device=model.device)
    return evaluate_predictions(view, pred[:, [model.config.targets.index(t) for t in shown]])


__all__ = ["QANetTrainOptions", "train", "evaluate_model", "evaluate_predictions", "predict_samples",
           "bin_weights", "augment", "hit_rate_auc"]
