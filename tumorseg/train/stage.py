"""``tumorseg train``: set up data, network and tracking, run the loop, log the model.

Rank 0 alone validates, logs, checkpoints and prints under ``torchrun``; every rank trains
on its shard of the train split (decoded through :class:`tumorseg.data.CaseReader`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg import checkpoint
from tumorseg.config import TrainConfig, dump_config
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_write_json, atomic_write_text, sha256_file
from tumorseg.inference import amp_dtype, resolve_device
from tumorseg.manifest import (
    ManifestInfo,
    load_manifest,
    require_same_dims,
    require_same_labels,
    resolve_manifest_dir,
    select_split,
)
from tumorseg.model import build_loss, build_model, channels_last, init_output_bias
from tumorseg.train import postprocess
from tumorseg.train.inputs import class_priors, foreground_fraction, warn_mixed_ranges
from tumorseg.train.inputs import load as load_inputs
from tumorseg.train.loop import State, TrainContext, run_epochs
from tumorseg.train.planned import planned
from tumorseg.train.runtime import (
    Dist,
    build_optimizer,
    build_scheduler,
    init_distributed,
    restore_rng,
    seed_everything,
    total_steps,
)
from tumorseg.train.validation import case_dice, val_units

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tumorseg.data import Split
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


# ----------------------------------------------------------------------------- entry points


def run(cfg: TrainConfig, started: float | None = None) -> TrainResult:
    """Train a new run into ``cfg.out / run name``.

    ``started``: the ``time.perf_counter()`` reading the time budget counts from (the command's start, so its
    imports count too); default now.
    """
    if cfg.manifest is None:
        raise TumorsegError("train: no manifest given; pass data_manifest/NAME")
    from tumorseg import tracking

    manifest = resolve_manifest_dir(cfg.manifest)  # its folder, or a file in it
    cfg = cfg.model_copy(update={"manifest": manifest})
    tracking.check_uri(tracking.resolve_tracking_uri(cfg.tracking.uri))  # before planning and training
    dist = init_distributed(cfg)
    name = cfg.run_name or f"{manifest.name}-{cfg.model.name}-{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(cfg.out) / name
    if dist.main and (run_dir / "last.pt").exists():
        raise TumorsegError(f"{run_dir}: already holds a run; continue it with --resume {run_dir} or pick "
                            "another run_name")
    return _train(cfg, run_dir, None, dist, started)


def resume(run_dir: Path, tracking_uri: str | None = None, started: float | None = None) -> TrainResult:
    """Continue ``run_dir`` from its ``last.pt`` in the same MLflow run (``started``: as :func:`run`)."""
    last = Path(run_dir) / "last.pt"
    if not last.is_file():
        raise TumorsegError(f"{last}: nothing to resume (no last.pt); start a new run instead")
    ckpt = checkpoint.load(last)
    cfg = checkpoint.train_config(ckpt)
    if tracking_uri:
        cfg.tracking.uri = tracking_uri
    from tumorseg import tracking

    tracking.check_uri(tracking.resolve_tracking_uri(cfg.tracking.uri))
    dist = init_distributed(cfg)
    return _train(cfg, Path(run_dir), ckpt, dist, started)


# ----------------------------------------------------------------------------- orchestration


def _train(cfg: TrainConfig, run_dir: Path, ckpt: dict[str, Any] | None, dist: Dist,
           started: float | None = None) -> TrainResult:
    import torch

    from tumorseg import data as datamod
    from tumorseg import tracking

    t_start = time.perf_counter() if started is None else started
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)

    assert cfg.manifest is not None
    info, df = load_manifest(cfg.manifest)
    classes = info.classes
    if ckpt is not None:
        require_same_labels(checkpoint.classes(ckpt), classes, cfg.manifest, "the run being resumed")
    plan = None
    if ckpt is None and cfg.plan != "off":
        cfg, plan = planned(cfg, info, df, device, dist, run_dir)
    manifest = Path(str(cfg.manifest))
    require_same_dims(cfg.spatial_dims, info, manifest, f"image_size {list(cfg.image_size)}")
    seed_everything(cfg.seed, cfg.deterministic)
    if ckpt is not None and ckpt["manifest_digest"] != info.dataset_digest:
        raise TumorsegError(f"{cfg.manifest}: differs from the manifest this run was trained on (digest "
                            f"{ckpt['manifest_digest'][:12]} vs {info.dataset_digest[:12]}); start a new run")
    source = str(manifest / "manifest.csv")
    train_df = select_split(df, "train", source)
    val_df = select_split(df, "val", source)
    in_channels = datamod.infer_in_channels(df) if cfg.model.in_channels == "auto" else int(cfg.model.in_channels)
    in_channels *= 2 * int(cfg.slice_context) + 1  # 2.5D: each neighbouring slice brings the image's channels
    if ckpt is not None:
        in_channels = int(ckpt["in_channels"])

    inputs = load_inputs(cfg, info, train_df, val_df, in_channels, ckpt, dist, device, source)
    stats, fingerprint = inputs.stats, inputs.fingerprint
    if dist.main and cfg.normalize in ("dataset", "ct") and ckpt is None and fingerprint:
        warn_mixed_ranges(fingerprint, cfg.normalize)
    train_data, val_data = inputs.train, inputs.val
    units, val_unit, unit_reason = (val_units(cfg, val_df, val_data.case_ids) if val_data is not None
                                    else (None, "case", "no val split"))

    net = build_model(cfg.model, in_channels, classes.out_channels, load_weights=ckpt is None,
                      spatial_dims=cfg.spatial_dims)
    if ckpt is None:
        if classes.multiclass:
            init_output_bias(net, classes.channel_priors(class_priors(train_df, classes)), classes.softmax)
        else:
            init_output_bias(net, foreground_fraction(train_data, dist, device))
    net = net.to(device)
    if cfg.channels_last:
        net = channels_last(net)
    loss_fn = (build_loss(cfg.loss, multiclass=True, regions=classes.region_indices or None) if classes.multiclass
               else build_loss(cfg.loss))
    opt = build_optimizer(cfg, net.parameters())
    sched = build_scheduler(cfg, opt, total_steps(cfg, len(train_df), dist.world))
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
        state = State.from_checkpoint(ckpt)
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(net, device_ids=[device.index] if device.type == "cuda" else None)

    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    budget = cfg.budget_seconds
    spent = sum(float(r.get("epoch_seconds", 0.0)) for r in state.history)  # before a resume
    deadline = None if budget is None else t_start + budget - spent
    run_cm = (tracking.start_run(cfg.tracking, "train", run_name=run_dir.name,
                                 run_id=(ckpt or {}).get("mlflow_run_id") or None,
                                 tags=_run_tags(cfg, info, device), system_metrics=True)
              if dist.main else _null_run())
    with run_cm as run:
        run.set_description(_describe(cfg, info, len(train_df), len(val_df), None if ckpt is None else state))
        if ckpt is None:
            run.log_params(cfg.model_dump(mode="json"))
            run.log_params({"in_channels": in_channels, "labels": classes.describe(),
                            "train_cases": len(train_df), "val_cases": len(val_df),
                            "world_size": dist.world, "data_storage": "disk" if inputs.storage == "disk" else "memory",
                            "selection_unit": val_unit, "selection_unit_reason": unit_reason})
            run.log_manifest_input(manifest, context="training")
            run.log_artifact(run_dir / "config.yaml")
            if plan is not None:
                from tumorseg import planning

                planning.log_to(run, plan, run_dir / "plan.json", run_dir / "fingerprint.json")
        if ckpt is None and stats is not None and "mean" in stats:
            run.log_params({"intensity.mean": stats["mean"], "intensity.std": stats["std"]})
        if ckpt is None and fingerprint is not None:
            run.log_params({f"intensity.raw_{k}": round(v, 6) for k, v in fingerprint.items()})
        ctx = TrainContext(cfg=cfg, net=net, loss_fn=loss_fn, opt=opt, sched=sched, scaler=scaler, device=device,
                           dist=dist, in_channels=in_channels, stats=stats, manifest_digest=info.dataset_digest,
                           manifest_name=info.name, run_dir=run_dir, run=run if dist.main else None,
                           deadline=deadline, fingerprint=fingerprint, classes=classes,
                           finish_seconds=float(plan.estimates.get("finish_seconds", 10.0)) if plan else 10.0,
                           # planned steps are refitted to the first epoch's speed (one process: DDP ranks
                           # would each measure their own)
                           refine_steps=plan is not None and dist.world == 1 and "max_steps" not in plan.overrides,
                           refine_patience=plan is not None and "early_stopping_patience" not in plan.overrides,
                           val_units=units, val_stacks=val_stacks(val_df, val_data))
        run_epochs(ctx, train_data, val_data, state)
        result = TrainResult(run_dir, run_dir / "best.pt", run_dir / "last.pt", state.best_val_dice,
                             state.best_epoch, state.epoch, run.run_id, None, dist.main, state.stopped_reason,
                             state.history)
        if dist.main:
            result.model_uri = _finish(run, run_dir, cfg, val_data, device, state, info, val_df, source, units)
            if budget is not None:
                run.log_metrics({"wall_seconds": spent + time.perf_counter() - t_start, "budget_seconds": budget})
            run.set_description(_describe(cfg, info, len(train_df), len(val_df), state, done=True))
            atomic_write_json(run_dir / "result.json", {
                "best_val_dice": state.best_val_dice, "best_epoch": state.best_epoch, "epochs_run": state.epoch,
                "mlflow_run_id": run.run_id, "model_uri": result.model_uri, "stopped_reason": state.stopped_reason,
            })
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()
        td.destroy_process_group()
    return result


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


def _describe(cfg: TrainConfig, info: Any, n_train: int, n_val: int, state: State | None,
              done: bool = False) -> str:
    """The training run's description, headline first: the best val Dice (or "running"), model, data."""
    size = "x".join(str(v) for v in cfg.image_size)
    what = (f"`{cfg.model.name}` (channels {list(cfg.model.channels)}, {size}, loss {cfg.loss.name}) on "
            f"`{info.name}` (digest `{info.dataset_digest[:12]}`; {n_train} train / {n_val} val cases)")
    if state is None:
        return f"running: training {what}, up to {cfg.epochs} epochs."
    best = f"best val Dice {state.best_val_dice:.4f} at epoch {state.best_epoch}"
    if not done:
        return f"running, resumed at epoch {state.epoch} of {cfg.epochs} ({best} so far): training {what}."
    return f"{best} of {state.epoch} ({state.stopped_reason or 'all epochs done'}): trained {what}."


def val_stacks(val_df: pd.DataFrame, val_data: Split | None) -> list[list[int]]:
    """Val's ordered slice stacks as positions in ``val_data`` (the post-processing's volumetric candidates)."""
    if val_data is None:
        return []
    from tumorseg.context import SliceStacks

    return [list(run) for run in SliceStacks.from_frame(val_df).positions(val_data.case_ids)]


def _finish(run: Run, run_dir: Path, cfg: TrainConfig, val_data: Split | None, device: torch.device,
            state: State, info: ManifestInfo, val_df: pd.DataFrame, source: str,
            units: np.ndarray | None = None) -> str | None:
    """Learning curve, val overlays at the best epoch, and the MLflow model."""
    from tumorseg import review
    from tumorseg.data import CaseReader
    from tumorseg.inference import Segmenter

    best = run_dir / "best.pt"
    if cfg.postprocess == "auto" and val_data is not None and best.is_file():
        postprocess.choose_and_store(run, best, cfg, val_data, device, units, val_stacks(val_df, val_data))
    curve = run_dir / "learning_curve.png"
    review.learning_curve(state.history, curve)
    run.log_artifact(curve)
    run.log_metrics({"best_val_dice": state.best_val_dice, "best_epoch": state.best_epoch})
    run.set_tags({"tumorseg.stopped_reason": state.stopped_reason or "epochs done",
                  "tumorseg.best_checkpoint_sha256": sha256_file(best)})
    seg = Segmenter.from_checkpoint(best, device=device.type)
    # the first val cases at their original resolution (overlays, and the model's input example)
    k = min(max(cfg.val_overlays, 1), len(val_df)) if val_data is not None else 0
    from tumorseg.context import centre
    from tumorseg.train.inputs import slice_context

    context = slice_context(cfg, val_df, seg.in_channels, check=False)  # a case in no stack repeats its plane
    firsts = CaseReader(info, source, context=context).read_all(val_df.iloc[:k]) if k else []
    if firsts and cfg.val_overlays:
        preds = [m for c in firsts for m in seg.predict_masks([c.image], spacings=[c.spacing])]  # one at a time
        items = []
        for c, pred in zip(firsts, preds, strict=True):
            scores = [v for v in case_dice(pred, c.mask, seg.classes) if math.isfinite(v)]
            d = float(np.mean(scores)) if scores else float("nan")
            items.append((centre(c.image, cfg.slice_context), c.mask, pred, f"{c.case_id} Dice {d:.3f}"))
        review.overlay_grid(items, run_dir / "val_overlays.png",
                            classes=seg.classes.names if seg.classes.multiclass else None)
        run.log_artifact(run_dir / "val_overlays.png")
    if not cfg.log_model:
        return None
    from tumorseg.mlflow_model import log_segmenter_model

    return log_segmenter_model(best, run_dir, centre(firsts[0].image, cfg.slice_context) if firsts else None)
