"""The training loop: epochs of optimiser steps, validation, checkpoints and per-epoch metrics.

Everything a loop needs travels in one :class:`TrainContext`; the mutable, checkpointed
progress is a :class:`State`. All randomness of an epoch (shuffle, augmentation, dropout) is
seeded from ``(seed, epoch)``, so a run resumed from ``last.pt`` continues exactly as it
would have.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg import checkpoint
from tumorseg.config import TrainConfig
from tumorseg.errors import TumorsegError
from tumorseg.inference import Fingerprint, Stats, amp_dtype
from tumorseg.labels import Classes
from tumorseg.progress import is_interactive
from tumorseg.train.postprocess import scoring_seconds, search_passes
from tumorseg.train.runtime import Dist, epoch_generator, rng_states
from tumorseg.train.validation import best_smoothed, smooth, val_span, validate

if TYPE_CHECKING:
    import torch

    from tumorseg.data import Split
    from tumorseg.tracking import Run

log = logging.getLogger(__name__)


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

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> State:
        """The state a checkpoint was saved at."""
        return cls(ckpt["epoch"], ckpt["global_step"], ckpt["best_val_dice"], ckpt["best_epoch"],
                   ckpt["bad_epochs"], list(ckpt["history"]), ckpt.get("stopped_reason", ""))


@dataclass
class TrainContext:
    """What the loop works with: the network and its optimiser, where it runs, and where results go.

    Attributes:
        cfg: the resolved training config.
        net: the network (DDP-wrapped when distributed).
        loss_fn: the loss.
        opt: the optimiser.
        sched: the LR scheduler, or ``None``.
        scaler: the fp16 ``GradScaler``, or ``None``.
        device: where the network runs.
        dist: the distributed context.
        in_channels: channels the network takes.
        stats: training-split intensity statistics (``None``: per-image normalisation).
        manifest_digest: digest of the manifest trained on.
        manifest_name: its name.
        run_dir: the run folder (checkpoints).
        run: the tracking run (``None`` on ranks other than 0).
        deadline: ``time.perf_counter()`` value by which training must stop (the time budget), or ``None``.
        fingerprint: the raw intensity range of the training images (stored in the checkpoint).
        classes: the label set the network predicts (stored in the checkpoint).
        val_units: val case -> group index when val Dice is pooled per group; ``None``: per case.
    """

    cfg: TrainConfig
    net: torch.nn.Module
    loss_fn: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    device: torch.device
    dist: Dist
    in_channels: int
    stats: Stats | None
    manifest_digest: str
    manifest_name: str
    run_dir: Path
    run: Run | None = None
    deadline: float | None = None
    val_seconds: float = 0.0
    finish_seconds: float = 10.0
    scoring_seconds: float | None = None  # the post-processing search's scoring of val, measured once
    val_stacks: list[list[int]] = field(default_factory=list)  # val's slice stacks (the volumetric candidates)
    refine_steps: bool = False
    refine_patience: bool = False
    val_units: np.ndarray | None = None

    def out_of_time(self) -> bool:
        """True when one more validation and the end of the run would overrun the budget."""
        return (self.deadline is not None
                and time.perf_counter() + self.val_seconds + self.finish_seconds >= self.deadline)
    fingerprint: Fingerprint | None = None
    classes: Classes = field(default_factory=Classes)

    def payload(self, state: State) -> dict[str, Any]:
        """A full checkpoint of the current weights, state and resume information."""
        return checkpoint.build_payload(
            self.net, self.cfg, self.in_channels, self.stats, fingerprint=self.fingerprint,
            labels=self.classes.to_json(), regions=self.classes.regions, state=asdict(state),
            manifest_digest=self.manifest_digest, manifest_name=self.manifest_name,
            mlflow_run_id=self.run.run_id if self.run else "", tracking_uri=self.run.tracking_uri if self.run else "",
            resume={
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict() if self.sched is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_states(),
            },
        )


def epoch_order(data: Split, oversample: float, gen: torch.Generator) -> torch.Tensor:
    """This epoch's case order: a permutation, or a weighted draw favouring tumour cases.

    With ``oversample`` above the tumour share of the cases, that share of the samples holds
    tumour (nnU-Net's foreground oversampling, at the level of whole images).
    """
    import torch

    n = len(data)
    tumour = torch.from_numpy(data.tumour())
    n_t = int(tumour.sum())
    if oversample <= 0 or n_t == 0 or n_t == n or n_t / n >= oversample:
        return torch.randperm(n, generator=gen)
    weights = torch.where(tumour, oversample / n_t, (1 - oversample) / (n - n_t)).double()
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def train_step(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: torch.nn.Module, opt: torch.optim.Optimizer,
    scaler: Any, device: torch.device, dtype: torch.dtype | None, frozen: list[torch.nn.Parameter] | None = None,
) -> torch.Tensor:
    """One optimiser step (autocast when ``dtype``, GradScaler when ``scaler``); returns the loss.

    A non-finite loss is returned without a backward pass or step, so the caller can stop
    with the weights of the last good step. ``frozen`` parameters lose their gradients before the
    step, so the optimiser leaves them (and their moments and weight decay) alone; under DDP their
    gradients are still reduced, so every rank keeps the same weights.
    """
    import torch

    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = loss_fn(net(x), y)
    if not torch.isfinite(loss):
        return loss
    (scaler.scale(loss) if scaler is not None else loss).backward()
    for p in frozen or []:
        p.grad = None
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return loss


def frozen_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimiser steps at the start of the run during which the encoder stays fixed (``model.freeze_encoder``).

    A share of the run's steps (``max_steps`` where set - a budget run refits it - else epochs x steps).
    """
    if not cfg.model.freeze_encoder:
        return 0
    span = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        span = min(span, cfg.max_steps)
    return int(cfg.model.freeze_encoder * span)


def train_one_epoch(
    ctx: TrainContext, data: Split, state: State, on_step: Callable[[int, int, float], None] | None = None,
) -> tuple[float, int]:
    """One pass over this rank's shard; returns (mean loss, images seen).

    ``on_step(step, steps, loss)`` is called after each optimiser step (the progress bar).
    """
    import torch

    from tumorseg.augment import augment_batch, crop_batch
    from tumorseg.model import channels_last, encoder_parameters
    from tumorseg.streaming import prefetch
    from tumorseg.train.runtime import steps_per_step

    cfg, device = ctx.cfg, ctx.device
    ctx.net.train()
    gen = epoch_generator(cfg.seed, state.epoch, ctx.dist.rank)
    torch.manual_seed(cfg.seed * 7 + state.epoch)  # dropout etc.: a function of (seed, epoch)
    n = len(data)
    order = epoch_order(data, cfg.oversample_foreground, gen)
    bs = cfg.batch_size
    steps = n // bs if n >= bs else 1  # drop the ragged tail (equal steps on every DDP rank)
    dtype = amp_dtype(device, cfg.amp)
    per_step = ctx.sched is not None and steps_per_step(cfg)
    n_frozen = frozen_steps(cfg, steps)
    encoder = encoder_parameters(ctx.net) if n_frozen else []
    total, seen = 0.0, 0
    # the next batches are read in a thread while this one trains (disk cache); the order is fixed
    # above, so the batches do not depend on the thread's timing
    batches = prefetch(data.read, (order[i * bs : (i + 1) * bs].numpy() for i in range(steps)),
                       1 if data.streams else 0, 2)
    for i, batch in enumerate(batches):
        if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
            break
        # at least one step per epoch; DDP ranks stop together, at an epoch's end
        if i > 0 and ctx.dist.world == 1 and ctx.out_of_time():
            state.stopped_reason = f"time budget {cfg.budget} reached"
            break
        x, y = data.to_device(batch, device)
        assert y is not None
        if cfg.patch_size is not None:
            x, y = crop_batch(x, y, cfg.patch_size, cfg.oversample_foreground, gen)
        x, y = augment_batch(x, y, cfg.augment, gen)
        if cfg.channels_last:
            x = channels_last(x)
        loss = train_step(ctx.net, x, y, ctx.loss_fn, ctx.opt, ctx.scaler, device, dtype,
                          encoder if state.global_step < n_frozen else None)
        if not torch.isfinite(loss):
            raise TumorsegError(
                f"loss became {loss.item()} at epoch {state.epoch + 1}, step {state.global_step + 1}; training "
                "stopped and the last good checkpoint (last.pt) is kept - lower optim.lr (--set optim.lr=1e-4) "
                "or set amp=false"
            )
        state.global_step += 1
        if per_step:
            ctx.sched.step()
        total += float(loss.detach()) * len(x)
        seen += len(x)
        if on_step is not None:
            on_step(i + 1, steps, total / seen)
    return (total / seen if seen else float("nan")), seen


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


def run_epochs(ctx: TrainContext, train_data: Split, val_data: Split | None, state: State) -> None:
    """Train until the epochs, ``max_steps`` or early stopping end the run; checkpoint every epoch."""
    with _progress(is_interactive() and ctx.dist.main) as bar:
        last_dice = "-"
        while state.epoch < ctx.cfg.epochs and not state.stopped_reason:
            if ctx.cfg.max_steps is not None and state.global_step >= ctx.cfg.max_steps:
                state.stopped_reason = f"max_steps={ctx.cfg.max_steps} reached"
                break
            if state.epoch > 0 and _agreed(ctx, ctx.out_of_time()):  # a run always ends with a checkpoint
                state.stopped_reason = f"time budget {ctx.cfg.budget} reached"
                break
            last_dice = _epoch(ctx, train_data, val_data, state, bar, last_dice)


def _refine_steps(ctx: TrainContext, train_seconds: float, seen: int, state: State) -> None:
    """After each epoch, fit the planned steps to the throughput measured in it.

    The plan's probe lasts seconds and a shared machine's speed drifts; the epochs are the
    better measurement. The run's ``max_steps`` (saved with every checkpoint, so a resume keeps
    it) and the LR schedule's length are set to the steps that fill the rest of the budget (and, with
    ``refine_patience``, the plan's early-stopping patience keeps its share of the epochs);
    changes under 2% are left alone, so the schedule does not jitter.
    """
    from tumorseg.train.runtime import set_span

    cfg = ctx.cfg
    if ctx.deadline is None or seen == 0 or train_seconds <= 0 or cfg.max_steps is None:
        return
    images_per_second = seen * ctx.dist.world / train_seconds
    steps_per_epoch = max(1, seen // cfg.batch_size)
    epoch_seconds = steps_per_epoch * cfg.batch_size * ctx.dist.world / images_per_second + ctx.val_seconds
    left = ctx.deadline - time.perf_counter() - ctx.finish_seconds
    steps = state.global_step + int(0.95 * max(0.0, left) / epoch_seconds * steps_per_epoch)
    steps = max(state.global_step + 1, steps)
    if abs(steps - cfg.max_steps) > 0.02 * cfg.max_steps:
        log.info("budget: %.1f img/s in epoch %d; steps %d -> %d", images_per_second, state.epoch, cfg.max_steps,
                 steps)
        cfg.max_steps = steps
        cfg.epochs = max(cfg.epochs, math.ceil(steps / steps_per_epoch))
        set_span(ctx.sched, steps)
        if ctx.refine_patience and cfg.early_stopping_patience is not None:
            from tumorseg.planning.rules import patience

            # the plan's patience is a share of its epochs; a longer refitted run keeps that share
            cfg.early_stopping_patience = max(cfg.early_stopping_patience, patience(cfg.epochs))


def _agreed(ctx: TrainContext, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (so DDP ranks stop on the same step)."""
    if ctx.dist.world == 1:
        return flag
    import torch
    import torch.distributed as td

    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    td.broadcast(t, src=0)
    return bool(t.item())


def _epoch(ctx: TrainContext, train_data: Split, val_data: Split | None, state: State, bar: Any,
           last_dice: str) -> str:
    """One epoch: train, validate, step the schedule, record, checkpoint; returns the val Dice label."""
    import torch

    cfg, device, dist = ctx.cfg, ctx.device, ctx.dist
    t0 = time.perf_counter()
    on_step = None
    task = None
    if bar is not None:
        task = bar.add_task(f"epoch {state.epoch + 1}/{cfg.epochs}", total=None, loss=float("nan"), dice=last_dice)

        def on_step(step: int, steps: int, loss: float) -> None:
            bar.update(task, completed=step, total=steps, loss=loss)
    try:
        train_loss, seen = train_one_epoch(ctx, train_data, state, on_step)
    except torch.cuda.OutOfMemoryError as exc:
        raise TumorsegError(
            f"CUDA out of memory at batch_size={cfg.batch_size}, image_size={list(cfg.image_size)}; lower "
            "batch_size (--set batch_size=4) or image_size, or keep the cache in RAM (--set cache=ram)"
        ) from exc
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - t0
    val_dice = float("nan")
    per_class: dict[str, float] = {}
    cases: dict[str, float] = {}
    if dist.main and val_data is not None:
        val_dice, per_class, cases = validate(getattr(ctx.net, "module", ctx.net), val_data, cfg, device, ctx.classes,
                                              ctx.val_units)
        ctx.val_seconds = time.perf_counter() - t0 - train_seconds
        # after the last epoch: overlays and the model (~10 s), and the post-processing search, which
        # predicts val once plainly and once per mirroring, then scores its candidates on every case
        search = ctx.val_seconds
        if cfg.postprocess == "auto":
            if ctx.scoring_seconds is None:
                ctx.scoring_seconds = scoring_seconds(val_data, cfg, ctx.classes, ctx.val_stacks)
            search = search_passes(cfg) * ctx.val_seconds + ctx.scoring_seconds
        ctx.finish_seconds = 10.0 + search
    if dist.world > 1:
        import torch.distributed as td

        shared = torch.tensor([val_dice], dtype=torch.float64, device=device)
        td.broadcast(shared, src=0)
        val_dice = float(shared.item())
    state.epoch += 1
    if ctx.refine_steps and not state.stopped_reason:
        _refine_steps(ctx, train_seconds, seen, state)
    score = val_dice if math.isfinite(val_dice) else -1.0
    smoothed = smooth(state.history, score, val_span(cfg))
    if ctx.sched is not None and cfg.optim.schedule == "plateau":
        ctx.sched.step(smoothed)
    improved = smoothed > best_smoothed(state.history, state.best_epoch)
    if improved:
        state.best_val_dice, state.best_epoch, state.bad_epochs = score, state.epoch, 0
    else:
        state.bad_epochs += 1
    if cfg.early_stopping_patience is not None and state.bad_epochs >= cfg.early_stopping_patience:
        state.stopped_reason = f"early stopping: no smoothed val Dice gain for {state.bad_epochs} epochs"
    if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
        state.stopped_reason = state.stopped_reason or f"max_steps={cfg.max_steps} reached"
    epoch_seconds = time.perf_counter() - t0
    row = {"epoch": state.epoch, "train_loss": train_loss, "val_dice": val_dice, "val_dice_smoothed": smoothed,
           "lr": ctx.opt.param_groups[0]["lr"], "epoch_seconds": epoch_seconds,
           "images_per_second": seen * dist.world / train_seconds if train_seconds > 0 else 0.0, **cases,
           **({f"val_dice_{name}": v for name, v in per_class.items()} if ctx.classes.multiclass else {})}
    state.history.append(row)
    if not dist.main:
        return last_dice
    payload = ctx.payload(state)
    if improved:
        checkpoint.save(ctx.run_dir / "best.pt", payload)
    checkpoint.save(ctx.run_dir / "last.pt", payload)
    assert ctx.run is not None
    ctx.run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=state.epoch)
    label = f"{val_dice:.4f} (best {state.best_val_dice:.4f}@{state.best_epoch})"
    if bar is not None:
        bar.update(task, loss=train_loss, dice=label)
    else:
        log.info(f"epoch {state.epoch}/{cfg.epochs} loss {train_loss:.4f} val_dice {val_dice:.4f} "
                 f"(smoothed {smoothed:.4f}) "
                 f"best {state.best_val_dice:.4f}@{state.best_epoch} lr {row['lr']:.2e} "
                 f"{row['images_per_second']:.1f} img/s {epoch_seconds:.1f}s")
    return label
