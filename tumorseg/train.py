"""``tumorseg train``: a MONAI U-Net with Dice loss on the manifest's train split.

Each epoch trains, then validates on ``val`` (per-case Dice at the original resolution,
with the metric code and empty-mask rule of ``evaluate``); mean val Dice drives the best
checkpoint, early stopping and the LR schedule. ``last.pt`` (every epoch) and ``best.pt``
are written atomically and hold everything needed for an exact resume. Under ``torchrun``
the model is wrapped in DDP (NCCL on CUDA, gloo on CPU), each rank trains on its shard and
rank 0 alone validates, logs, checkpoints and prints.

All randomness of an epoch (shuffle, augmentation, dropout) is seeded from
``(seed, epoch)``, so a run resumed from ``last.pt`` continues exactly as it would have.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import TrainConfig, dump_config
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_path, atomic_write_json, atomic_write_text, sha256_file
from tumorseg.manifest import load_manifest, select_split
from tumorseg.metrics import Counts, dice
from tumorseg.model import (
    CHECKPOINT_FORMAT,
    amp_dtype,
    build_loss,
    build_model,
    init_output_bias,
    load_checkpoint,
    resolve_device,
)
from tumorseg.progress import is_interactive

if TYPE_CHECKING:
    import torch

    from tumorseg.data import CachedSplit
    from tumorseg.tracking import Run

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run produced."""

    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_val_dice: float
    best_epoch: int
    epochs_run: int
    mlflow_run_id: str
    model_uri: str | None
    is_main_process: bool = True
    stopped_reason: str = ""
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Dist:
    """The distributed context (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the rank that logs, checkpoints and prints."""
        return self.rank == 0


@dataclass
class State:
    """Mutable training state saved in checkpoints."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_val_dice: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_reason: str = ""


# ----------------------------------------------------------------------------- entry points


def run(cfg: TrainConfig) -> TrainResult:
    """Train a new run into ``cfg.out / run name``."""
    if cfg.manifest is None:
        raise TumorsegError("train: no manifest given; pass data_manifest/NAME")
    dist = init_distributed(cfg)
    name = cfg.run_name or f"{Path(cfg.manifest).name}-{cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.out) / name
    if dist.main and (run_dir / "last.pt").exists():
        raise TumorsegError(f"{run_dir}: already holds a run; continue it with --resume {run_dir} or pick "
                            "another run_name")
    return _train(cfg, run_dir, None, dist)


def resume(run_dir: Path, tracking_uri: str | None = None) -> TrainResult:
    """Continue ``run_dir`` from its ``last.pt`` in the same MLflow run."""
    last = Path(run_dir) / "last.pt"
    if not last.is_file():
        raise TumorsegError(f"{last}: nothing to resume (no last.pt); start a new run instead")
    ckpt = load_checkpoint(last)
    cfg = TrainConfig.model_validate(ckpt["config"])
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    dist = init_distributed(cfg)
    return _train(cfg, Path(run_dir), ckpt, dist)


# ----------------------------------------------------------------------------- setup


def init_distributed(cfg: TrainConfig) -> Dist:
    """Join the torchrun process group when launched by torchrun."""
    import torch
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not td.is_initialized():
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        td.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; in deterministic mode also MONAI's set_determinism."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        from monai.utils import set_determinism

        set_determinism(seed=seed)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator for one epoch's shuffle and augmentation."""
    import torch

    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**63)
    return g


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD from the config."""
    import torch

    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer) -> Any:
    """Plateau on val Dice, cosine over the epochs, or none."""
    import torch

    o = cfg.optim
    if o.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=o.plateau_factor, patience=o.plateau_patience, min_lr=o.min_lr
        )
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=o.min_lr)
    return None


# ----------------------------------------------------------------------------- the loop


def train_one_epoch(
    net: torch.nn.Module,
    data: CachedSplit,
    loss_fn: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: Any,
    cfg: TrainConfig,
    state: State,
    device: torch.device,
    dist: Dist,
    on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[float, int]:
    """One pass over this rank's shard; returns (mean loss, images seen).

    ``on_step(step, steps, loss)`` is called after each optimiser step (the progress bar).
    """
    import torch

    from tumorseg.augment import augment_batch

    net.train()
    gen = epoch_generator(cfg.seed, state.epoch, dist.rank)
    torch.manual_seed(cfg.seed * 7 + state.epoch)  # dropout etc.: a function of (seed, epoch)
    n = len(data)
    order = torch.randperm(n, generator=gen)
    bs = cfg.batch_size
    steps = n // bs if n >= bs else 1  # drop the ragged tail (equal steps on every DDP rank)
    dtype = amp_dtype(device, cfg.amp)
    total, seen = 0.0, 0
    for i in range(steps):
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
            break
        idx = order[i * bs : (i + 1) * bs]
        x = data.images[idx.to(data.images.device)].to(device, non_blocking=True)
        y = data.masks[idx.to(data.masks.device)].to(device, non_blocking=True).float()
        x, y = augment_batch(x, y, cfg.augment, gen)
        if device.type == "cuda" and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = train_step(net, x, y, loss_fn, opt, scaler, device, dtype)
        if not torch.isfinite(loss):
            raise TumorsegError(
                f"loss became {loss.item()} at epoch {state.epoch + 1}, step {state.global_step + 1}; training "
                "stopped and the last good checkpoint (last.pt) is kept - lower optim.lr (--set optim.lr=1e-4) "
                "or set amp=false"
            )
        state.global_step += 1
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
        if on_step is not None:
            on_step(i + 1, steps, total / seen)
    return (total / seen if seen else float("nan")), seen


def train_step(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: torch.nn.Module, opt: torch.optim.Optimizer,
    scaler: Any, device: torch.device, dtype: torch.dtype | None,
) -> torch.Tensor:
    """One optimiser step (autocast when ``dtype``, GradScaler when ``scaler``); returns the loss.

    A non-finite loss is returned without a backward pass or step, so the caller can stop
    with the weights of the last good step.
    """
    import torch

    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = loss_fn(net(x), y)
    if not torch.isfinite(loss):
        return loss
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    return loss


def validate(
    net: torch.nn.Module, data: CachedSplit, cfg: TrainConfig, device: torch.device
) -> tuple[float, list[float]]:
    """Per-case Dice at the original resolution; returns (mean over scored cases, per-case)."""
    import torch
    import torch.nn.functional as F

    net.eval()
    dtype = amp_dtype(device, cfg.amp)
    scores: list[float] = []
    bs = max(cfg.batch_size, 16)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    with torch.inference_mode(), autocast:
        for start in range(0, len(data), bs):
            x = data.images[start : start + bs].to(device, non_blocking=True)
            if device.type == "cuda" and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = net(x).float()
            for j in range(logits.shape[0]):
                gt_np = data.original_masks[start + j]
                lg = logits[j : j + 1]
                if tuple(lg.shape[-2:]) != gt_np.shape:
                    lg = F.interpolate(lg, size=gt_np.shape, mode="bilinear", align_corners=False)
                pred = torch.sigmoid(lg)[0, 0] > cfg.threshold
                gt = torch.from_numpy(gt_np).to(device) > 0
                tp = int((pred & gt).sum())
                fp = int(pred.sum()) - tp
                fn = int(gt.sum()) - tp
                scores.append(dice(Counts(tp, fp, fn, gt.numel() - tp - fp - fn)))
    finite = [s for s in scores if math.isfinite(s)]
    return (float(np.mean(finite)) if finite else float("nan")), scores


# ----------------------------------------------------------------------------- checkpoints


def rng_states() -> dict[str, Any]:
    """Python, numpy and torch RNG states as weights_only-loadable values."""
    import torch

    py = random.getstate()
    np_state: Any = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    import torch

    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    meta = states["numpy_meta"]
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), meta[0], meta[1], meta[2]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temp file, then rename: a crash never leaves half a checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _payload(net: torch.nn.Module, opt: Any, sched: Any, scaler: Any, state: State, cfg: TrainConfig,
             in_channels: int, digest: str, manifest_name: str, run: Run | None, full: bool) -> dict[str, Any]:
    module = getattr(net, "module", net)
    p: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "config": cfg.model_dump(mode="json"),
        "in_channels": in_channels,
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best_val_dice": state.best_val_dice,
        "best_epoch": state.best_epoch,
        "bad_epochs": state.bad_epochs,
        "history": state.history,
        "stopped_reason": state.stopped_reason,
        "manifest_digest": digest,
        "manifest_name": manifest_name,
        "mlflow_run_id": run.run_id if run else "",
        "tracking_uri": run.tracking_uri if run else "",
    }
    if full:
        p["optimizer"] = opt.state_dict()
        p["scheduler"] = sched.state_dict() if sched is not None else None
        p["scaler"] = scaler.state_dict() if scaler is not None else None
        p["rng"] = rng_states()
    return p


# ----------------------------------------------------------------------------- orchestration


def _train(cfg: TrainConfig, run_dir: Path, ckpt: dict[str, Any] | None, dist: Dist) -> TrainResult:
    import torch

    from tumorseg import data as datamod
    from tumorseg import tracking

    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    seed_everything(cfg.seed, cfg.deterministic)

    assert cfg.manifest is not None
    info, df = load_manifest(cfg.manifest)
    if ckpt is not None and ckpt["manifest_digest"] != info.dataset_digest:
        raise TumorsegError(f"{cfg.manifest}: differs from the manifest this run was trained on (digest "
                            f"{ckpt['manifest_digest'][:12]} vs {info.dataset_digest[:12]}); start a new run")
    source = str(Path(cfg.manifest) / "manifest.csv")
    train_df = select_split(df, "train", source)
    val_df = select_split(df, "val", source)
    in_channels = datamod.infer_in_channels(df) if cfg.model.in_channels == "auto" else int(cfg.model.in_channels)
    if ckpt is not None:
        in_channels = int(ckpt["in_channels"])

    # Each rank decodes only its shard of train (a fixed, seeded partition); rank 0 holds val.
    shard = np.random.RandomState(cfg.seed).permutation(len(train_df))
    if dist.world > 1:
        per_rank = math.ceil(len(shard) / dist.world)
        shard = np.resize(shard, per_rank * dist.world)[dist.rank :: dist.world]
    t0 = time.perf_counter()
    train_cases = datamod.load_cases(info, train_df.iloc[np.sort(shard)], source)
    stats = (ckpt or {}).get("intensity") or _dataset_stats(cfg, train_cases, in_channels, dist, device)
    train_data = datamod.place(datamod.cache_split(train_cases, cfg.image_size, in_channels, stats=stats),
                               device, cfg.cache)
    del train_cases
    val_data = None
    if dist.main:
        val_cases = datamod.load_cases(info, val_df, source)
        val_data = datamod.place(datamod.cache_split(val_cases, cfg.image_size, in_channels, keep_originals=True,
                                                     stats=stats), device, cfg.cache)
    log.info("decoded and cached %d train / %d val cases in %.1f s", len(train_data), len(val_df),
             time.perf_counter() - t0)

    net = build_model(cfg.model, in_channels)
    if ckpt is None:
        init_output_bias(net, _foreground_fraction(train_data, dist, device))
    net = net.to(device)
    if device.type == "cuda" and cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    loss_fn = build_loss(cfg.loss)
    opt = build_optimizer(cfg, net.parameters())
    sched = build_scheduler(cfg, opt)
    dtype = amp_dtype(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    state = State()
    if ckpt is not None:
        net.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if sched is not None and ckpt.get("scheduler"):
            sched.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        restore_rng(ckpt["rng"])
        state = State(ckpt["epoch"], ckpt["global_step"], ckpt["best_val_dice"], ckpt["best_epoch"],
                      ckpt["bad_epochs"], list(ckpt["history"]), ckpt.get("stopped_reason", ""))
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    run_cm = (tracking.start_run(cfg.tracking, "train", run_name=run_dir.name,
                                 run_id=(ckpt or {}).get("mlflow_run_id") or None,
                                 tags=_run_tags(cfg, info, device), system_metrics=True)
              if dist.main else _null_run())
    with run_cm as run:
        if ckpt is None:
            run.log_params(cfg.model_dump(mode="json"))
            run.log_params({"in_channels": in_channels, "train_cases": len(train_df), "val_cases": len(val_df),
                            "world_size": dist.world})
            run.log_manifest_input(Path(cfg.manifest), context="training")
            run.log_artifact(run_dir / "config.yaml")
        if ckpt is None and stats is not None:
            run.log_params({"intensity.mean": stats["mean"], "intensity.std": stats["std"]})
        ctx = (net, opt, sched, scaler, cfg, in_channels, info.dataset_digest, info.name, run if dist.main else None,
               stats)
        _loop(ctx, train_data, val_data, loss_fn, state, device, dist, run_dir)
        result = TrainResult(run_dir, run_dir / "best.pt", run_dir / "last.pt", state.best_val_dice,
                             state.best_epoch, state.epoch, run.run_id, None, dist.main, state.stopped_reason,
                             state.history)
        if dist.main:
            result.model_uri = _finish(run, run_dir, cfg, val_data, device, state)
            atomic_write_json(run_dir / "result.json", {
                "best_val_dice": state.best_val_dice, "best_epoch": state.best_epoch, "epochs_run": state.epoch,
                "mlflow_run_id": run.run_id, "model_uri": result.model_uri, "stopped_reason": state.stopped_reason,
            })
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()
        td.destroy_process_group()
    return result


def _loop(ctx: tuple, train_data: CachedSplit, val_data: CachedSplit | None, loss_fn: Any, state: State,
          device: torch.device, dist: Dist, run_dir: Path) -> None:

    net, opt, sched, scaler, cfg, in_channels, digest, mname, run, stats = ctx
    with _progress(is_interactive() and dist.main) as bar:
        _epochs(net, opt, sched, scaler, cfg, in_channels, digest, mname, run, stats, train_data, val_data,
                loss_fn, state, device, dist, run_dir, bar)


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich progress bar on a terminal (steps of the epoch, loss, last val Dice); else None."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]:.4f}  val Dice {task.fields[dice]}"), TimeRemainingColumn(),
                  transient=False) as progress:
        yield progress


def _epochs(net: Any, opt: Any, sched: Any, scaler: Any, cfg: TrainConfig, in_channels: int, digest: str,
            mname: str, run: Any, stats: Any, train_data: CachedSplit, val_data: CachedSplit | None, loss_fn: Any,
            state: State, device: torch.device, dist: Dist, run_dir: Path, bar: Any) -> None:
    import torch

    last_dice = "-"
    while state.epoch < cfg.epochs and not state.stopped_reason:
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
            state.stopped_reason = f"max_steps={cfg.max_steps} reached"
            break
        t0 = time.perf_counter()
        on_step = None
        if bar is not None:
            task = bar.add_task(f"epoch {state.epoch + 1}/{cfg.epochs}", total=None, loss=float("nan"), dice=last_dice)

            def on_step(step: int, steps: int, loss: float, task: Any = task) -> None:
                bar.update(task, completed=step, total=steps, loss=loss)
        try:
            train_loss, seen = train_one_epoch(net, train_data, loss_fn, opt, scaler, cfg, state, device, dist,
                                               on_step)
        except torch.cuda.OutOfMemoryError as exc:
            raise TumorsegError(
                f"CUDA out of memory at batch_size={cfg.batch_size}, image_size={list(cfg.image_size)}; lower "
                "batch_size (--set batch_size=4) or image_size, or keep the cache in RAM (--set cache=ram)"
            ) from exc
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        val_dice = float("nan")
        if dist.main and val_data is not None:
            val_dice, _ = validate(getattr(net, "module", net), val_data, cfg, device)
        if dist.world > 1:
            import torch.distributed as td

            shared = torch.tensor([val_dice], dtype=torch.float64, device=device)
            td.broadcast(shared, src=0)
            val_dice = float(shared.item())
        state.epoch += 1
        score = val_dice if math.isfinite(val_dice) else -1.0
        if sched is not None:
            sched.step(score) if cfg.optim.schedule == "plateau" else sched.step()
        improved = score > state.best_val_dice
        if improved:
            state.best_val_dice, state.best_epoch, state.bad_epochs = score, state.epoch, 0
        else:
            state.bad_epochs += 1
        if cfg.early_stopping_patience is not None and state.bad_epochs >= cfg.early_stopping_patience:
            state.stopped_reason = f"early stopping: no val Dice gain for {state.bad_epochs} epochs"
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
            state.stopped_reason = f"max_steps={cfg.max_steps} reached"
        epoch_seconds = time.perf_counter() - t0
        row = {"epoch": state.epoch, "train_loss": train_loss, "val_dice": val_dice,
               "lr": opt.param_groups[0]["lr"], "epoch_seconds": epoch_seconds,
               "images_per_second": seen * dist.world / train_seconds if train_seconds > 0 else 0.0}
        state.history.append(row)
        if dist.main:
            payload = _payload(net, opt, sched, scaler, state, cfg, in_channels, digest, mname, run, full=True)
            payload["intensity"] = stats
            if improved:
                save_checkpoint(run_dir / "best.pt", payload)
            save_checkpoint(run_dir / "last.pt", payload)
            assert run is not None
            run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=state.epoch)
            last_dice = f"{val_dice:.4f} (best {state.best_val_dice:.4f}@{state.best_epoch})"
            if bar is not None:
                bar.update(task, loss=train_loss, dice=last_dice)
            else:
                log.info(f"epoch {state.epoch}/{cfg.epochs} loss {train_loss:.4f} val_dice {val_dice:.4f} "
                         f"best {state.best_val_dice:.4f}@{state.best_epoch} lr {row['lr']:.2e} "
                         f"{row['images_per_second']:.1f} img/s {epoch_seconds:.1f}s")


def _dataset_stats(cfg: TrainConfig, cases: list[Any], in_channels: int, dist: Dist,
                   device: torch.device) -> dict[str, list[float]] | None:
    """Training-split intensity mean/std (summed over all DDP ranks), or None for per-image z-score."""
    if cfg.normalize != "dataset":
        return None
    import torch

    from tumorseg.model import intensity_sums, stats_from_sums

    sums = intensity_sums([c.image for c in cases], in_channels)
    if dist.world > 1:
        import torch.distributed as td

        t = torch.from_numpy(sums).to(device)
        td.all_reduce(t)
        sums = t.cpu().numpy()
    return stats_from_sums(sums)


def _foreground_fraction(data: CachedSplit, dist: Dist, device: torch.device) -> float:
    """Tumour pixel fraction of the (whole, across ranks) training split at image_size."""
    import torch

    t = torch.tensor([float(data.masks.sum()), float(data.masks.numel())], dtype=torch.float64, device=device)
    if dist.world > 1:
        import torch.distributed as td

        td.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else 0.5


class _null_run:
    """Context manager yielding a NullRun (ranks other than 0)."""

    def __enter__(self) -> Run:
        from tumorseg.tracking import NullRun

        return NullRun()

    def __exit__(self, *exc: object) -> None:
        return None


def _run_tags(cfg: TrainConfig, info: Any, device: torch.device) -> dict[str, str]:
    import torch

    tags = {
        "tumorseg.manifest": info.name,
        "tumorseg.dataset_digest": info.dataset_digest,
        "tumorseg.model": cfg.model.name,
        "device": str(device),
        "cuda.version": str(torch.version.cuda),
    }
    if device.type == "cuda":
        tags["gpu.name"] = torch.cuda.get_device_name(device)
    return tags


def _finish(run: Run, run_dir: Path, cfg: TrainConfig, val_data: CachedSplit | None, device: torch.device,
            state: State) -> str | None:
    """Learning curve, val overlays at the best epoch, and the MLflow model."""
    from tumorseg import review
    from tumorseg.model import Segmenter

    best = run_dir / "best.pt"
    curve = run_dir / "learning_curve.png"
    review.learning_curve(state.history, curve)
    run.log_artifact(curve)
    run.log_metrics({"best_val_dice": state.best_val_dice, "best_epoch": state.best_epoch})
    run.set_tags({"tumorseg.stopped_reason": state.stopped_reason or "epochs done",
                  "tumorseg.best_checkpoint_sha256": sha256_file(best)})
    seg = Segmenter.from_checkpoint(best, device=device.type)
    if val_data is not None and val_data.originals and cfg.val_overlays:
        k = min(cfg.val_overlays, len(val_data))
        images = val_data.originals[:k]
        preds = seg.predict_masks(images)
        items = []
        for i in range(k):
            from tumorseg.metrics import confusion

            d = dice(confusion(preds[i], val_data.original_masks[i]))
            items.append((images[i], val_data.original_masks[i], preds[i], f"{val_data.case_ids[i]} Dice {d:.3f}"))
        review.overlay_grid(items, run_dir / "val_overlays.png")
        run.log_artifact(run_dir / "val_overlays.png")
    if not cfg.log_model:
        return None
    from tumorseg.mlflow_model import log_segmenter_model

    return log_segmenter_model(best, run_dir, val_data.originals[0] if val_data and val_data.originals else None)
