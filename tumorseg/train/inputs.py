"""Train's inputs: the preprocessed train and val splits, and the statistics summed while building them.

``cache: auto`` keeps small datasets in RAM (or on the GPU) and puts larger ones in the
on-disk cache (:mod:`tumorseg.data.disk`), whose size in memory does not grow with the number
of cases. In RAM, every DDP rank builds its own shard and the statistics are summed over the
ranks; on disk, rank 0 builds (or reuses) the whole split and every rank reads its shard.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tumorseg.config import TrainConfig
from tumorseg.errors import TumorsegError
from tumorseg.intensity import SCALE_PERCENTILES, Fingerprint, Stats, fingerprint_from_sums, mode_of, stats_from_sums
from tumorseg.labels import Classes
from tumorseg.manifest import ManifestInfo
from tumorseg.train.runtime import Dist

if TYPE_CHECKING:
    import torch

    from tumorseg.data import Split, Summary

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    """What training reads: the splits and the normalisation they apply."""

    train: Split
    val: Split | None
    stats: Stats | None
    fingerprint: Fingerprint | None
    storage: str


def cache_root(cfg: TrainConfig) -> Path:
    """Where the on-disk cache lives: ``cache_dir``, else ``cache/`` in the manifest's folder."""
    from tumorseg.manifest import resolve_manifest_dir

    return Path(cfg.cache_dir) if cfg.cache_dir else resolve_manifest_dir(str(cfg.manifest)) / "cache"


def load(cfg: TrainConfig, info: ManifestInfo, train_df: pd.DataFrame, val_df: pd.DataFrame, in_channels: int,
         ckpt: dict[str, Any] | None, dist: Dist, device: torch.device, source: str) -> Inputs:
    """Build (or reuse) the train and val splits at ``cfg.image_size`` and normalise them.

    With ``cfg.slice_context`` each case's image holds its neighbouring slices (``in_channels`` counts them all).
    """
    from tumorseg.data import CaseReader, storage_for

    t0 = time.perf_counter()
    target = _target(cfg)
    reader = CaseReader(info, source, context=slice_context(cfg, pd.concat([train_df, val_df]), in_channels),
                        crop=cfg.crop_nonzero)
    mode = cfg.normalize if ckpt is None else mode_of(ckpt.get("intensity"))  # a resume keeps its rule
    group = _cpu_group(dist)
    storage = _agree(storage_for(cfg.cache, len(train_df) + len(val_df), in_channels, cfg.image_size), group)
    if storage == "disk":
        # recorded in the run's config (and so its checkpoints): a resume on a host with more memory reads
        # the same float16 cache, so it continues exactly
        cfg.cache = "disk"
    # a fixed, seeded partition of train over the DDP ranks (ranks take equal shares)
    shard = np.random.RandomState(cfg.seed).permutation(len(train_df))
    if dist.world > 1:
        per_rank = math.ceil(len(shard) / dist.world)
        shard = np.resize(shard, per_rank * dist.world)[dist.rank :: dist.world]
    shard = np.sort(shard)
    train: Split
    val: Split | None = None
    if storage == "disk":
        train, summary, val = _on_disk(cfg, info, reader, train_df, val_df, in_channels, mode, dist, shard, group)
    else:
        from tumorseg.data.split import in_ram

        train_ram, summary = in_ram(reader, train_df.iloc[shard], cfg.image_size, in_channels, mode, "caching train",
                                    target)
        summary = _all_reduce_summary(summary, dist, device, group, shard)
        train = train_ram
        if dist.main:
            val, _ = in_ram(reader, val_df, cfg.image_size, in_channels, mode, "caching val", target)
    if ckpt is None:
        stats = _stats(mode, summary, cfg, in_channels)
        fingerprint = fingerprint_from_sums(summary.range_sums, summary.range_max)
    else:  # a resumed run keeps the rule it started with (older checkpoints have no fingerprint)
        stats = ckpt.get("intensity")
        fingerprint = ckpt.get("intensity_fingerprint") or fingerprint_from_sums(summary.range_sums,
                                                                                   summary.range_max)
    from tumorseg.data import RamSplit
    from tumorseg.data.disk import DiskSplit

    for split in (train, val):
        if split is None:
            continue
        split.normalise(stats)
        if isinstance(split, RamSplit):
            split.place(device, cfg.cache)
        elif isinstance(split, DiskSplit):
            split.pin = device.type == "cuda"
    log.info("%s: %d train / %d val cases ready in %.1f s", "disk cache" if storage == "disk" else "cached",
             len(train), len(val_df), time.perf_counter() - t0)
    return Inputs(train, val, stats, fingerprint, storage)


def _target(cfg: TrainConfig) -> tuple[float, ...] | None:
    """The spacing the cache resamples volumes to (:func:`tumorseg.placement.spacings`); ``None``: stretched."""
    from tumorseg.placement import spacings

    rule = spacings(cfg)
    return None if rule is None else rule[0]


def slice_context(cfg: TrainConfig, df: pd.DataFrame, in_channels: int, check: bool = True) -> Any:
    """The reader's :class:`tumorseg.data.reader.SliceContext` for ``cfg.slice_context`` (``None`` without).

    Raises:
        TumorsegError: (``check``) slice context asked for data without ordered slice stacks.
    """
    k = int(cfg.slice_context)
    if k == 0:
        return None
    from tumorseg.data.reader import SliceContext

    missing = (f"{cfg.manifest}: slice_context={k} needs cases that are slices of ordered stacks (a volume in slice "
               "mode, or files named by a trailing slice number); this manifest has none - train with slice_context=0")
    return SliceContext.of(df, k, in_channels // (2 * k + 1), missing if check else None)


def _on_disk(cfg: TrainConfig, info: ManifestInfo, reader: Any, train_df: pd.DataFrame, val_df: pd.DataFrame,
             in_channels: int, mode: str, dist: Dist, shard: np.ndarray, group: Any
             ) -> tuple[Split, Summary, Split | None]:
    """Rank 0 builds or reuses the cache folders; then every rank opens them and takes its shard.

    The other ranks wait on a gloo group with a long timeout (a large build outlasts NCCL's default
    10 minutes), and learn whether rank 0 succeeded, so a failed build stops every rank.
    """
    from tumorseg.data.disk import open_or_build

    root = cache_root(cfg)

    def open_split(name: str, rows: pd.DataFrame, build: bool = True) -> tuple[Any, Summary]:
        return open_or_build(reader, rows, root, name, cfg.image_size, in_channels, mode, info.dataset_digest,
                             build=build, target=_target(cfg))

    if dist.world == 1:
        train, summary = open_split("train", train_df)
        val, _ = open_split("val", val_df)
        return train.subset(shard), summary, val
    import torch
    import torch.distributed as td

    ok = torch.zeros(1)
    failure: BaseException | None = None
    if dist.main:
        try:
            train, summary = open_split("train", train_df)
            val, _ = open_split("val", val_df)
            ok[0] = 1
        except BaseException as exc:  # noqa: BLE001 - told to the other ranks, then raised
            failure = exc
    td.broadcast(ok, src=0, group=group)
    if failure is not None:
        raise failure
    if not ok[0]:
        raise TumorsegError("rank 0 could not build the disk cache (its error is in its log); stopping this rank")
    if not dist.main:
        train, summary = open_split("train", train_df, build=False)
        val = None
    return train.subset(shard), summary, (val if dist.main else None)


def _cpu_group(dist: Dist) -> Any:
    """A gloo group over all ranks with a long timeout (CPU tensors, even under NCCL), or ``None`` alone."""
    if dist.world == 1:
        return None
    import torch.distributed as td

    return td.new_group(backend="gloo", timeout=timedelta(hours=24))


def _agree(storage: str, group: Any) -> str:
    """Rank 0's storage choice on every rank (ranks on hosts with different memory must not differ)."""
    if group is None:
        return storage
    import torch
    import torch.distributed as td

    choices = ["auto", "ram", "gpu", "disk"]
    t = torch.tensor([choices.index(storage)])
    td.broadcast(t, src=0, group=group)
    return choices[int(t.item())]


def _stats(mode: str, summary: Summary, cfg: TrainConfig | None = None, in_channels: int = 1) -> Stats | None:
    """The dataset normalisation for ``normalize: mode`` from the summed prescaled intensities.

    A pretrained encoder (``model.pretrained``) brings its own: ImageNet's mean/std after the same per-image
    percentile scaling (:func:`tumorseg.encoders.pretrained_stats`; the config requires ``percentile``).
    """
    if cfg is not None and str(cfg.model.pretrained) != "none":
        from tumorseg.encoders import pretrained_stats

        return pretrained_stats(cfg.model.backbone, in_channels, SCALE_PERCENTILES)
    if mode == "image":
        return None
    if mode == "nonzero":  # per volume: the rule has no dataset statistics
        return {"nonzero": True}
    if mode == "ct":
        window = summary.foreground_stats()
        if window is not None:
            voxels = sum(s.shape[1] for s in summary.foreground)
            sampled = (f" from {voxels} foreground voxels of {len(summary.foreground)} cases" if summary.foreground
                       else " (stored with the cache)")
            log.info("normalize: ct: clip window %s, foreground mean %s, std %s%s", window["clip"],
                     [round(v, 4) for v in window["mean"]], [round(v, 4) for v in window["std"]], sampled)
            return window
        log.warning("normalize: ct found no foreground voxel in the train split; z-scoring by the whole images' "
                    "mean/std without a clip window")
    return stats_from_sums(summary.sums, SCALE_PERCENTILES if mode == "percentile" else None)


def _all_reduce_summary(summary: Summary, dist: Dist, device: torch.device, group: Any,
                        shard: np.ndarray) -> Summary:
    """Every rank's shard summed, and the sampled foreground voxels of ``normalize: ct`` gathered.

    One sample set per case: a shard padded to the others' size repeats a case another rank holds.
    """
    if dist.world == 1:
        return summary
    import torch.distributed as td

    from tumorseg.data import Summary as S

    gathered: list[Any] = [None] * dist.world
    td.all_gather_object(gathered, (shard.tolist(), summary.foreground), group=group)
    by_case: dict[int, np.ndarray] = {}
    for rows, samples in gathered:
        for row, sample in zip(rows, samples, strict=False):  # no samples outside normalize: ct
            by_case.setdefault(int(row), sample)
    return S(_all_reduce(summary.sums, dist, device, "sum"), _all_reduce(summary.range_sums, dist, device, "sum"),
             _all_reduce(summary.range_max, dist, device, "max"), [by_case[r] for r in sorted(by_case)])


def _all_reduce(values: np.ndarray, dist: Dist, device: torch.device, op: str) -> np.ndarray:
    import torch
    import torch.distributed as td

    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(device)
    td.all_reduce(t, op=td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM)
    return t.cpu().numpy()


def foreground_fraction(data: Split, dist: Dist, device: torch.device) -> float:
    """Tumour pixel fraction of the (whole, across ranks) training split at image_size."""
    import torch

    t = torch.tensor([float(np.sum(data.fg_pixels)), float(len(data) * data.pixels)], dtype=torch.float64,
                     device=device)
    if dist.world > 1:
        import torch.distributed as td

        td.all_reduce(t)
    return float(t[0] / t[1]) if t[1] > 0 else 0.5


def class_priors(rows: pd.DataFrame, classes: Classes) -> list[float]:
    """Pixel share of each class (background first) in ``rows``, from the manifest's ``px_<name>`` counts."""
    total = float((rows["height"].astype(float) * rows["width"].astype(float)).sum())
    fg = [float(rows[f"px_{name}"].astype(float).sum()) / total if total else 0.0 for name in classes.names[1:]]
    return [max(0.0, 1.0 - sum(fg)), *fg]


def warn_mixed_ranges(fp: Fingerprint, mode: str = "dataset") -> None:
    """Stored-unit statistics cannot serve images stored at different bit depths: say so before training."""
    lo, hi = fp["p99_5_min"], fp["p99_5_max"]
    if lo > 0 and hi / lo > 16:
        log.warning("normalize: %s with training images whose intensity ranges differ %.0fx (99.5th "
                    "percentiles %g to %g: mixed bit depths?); the dimmer images will look almost constant to the "
                    "network. Use normalize: percentile (the default), which scales each image by its own range",
                    mode, hi / lo, lo, hi)
