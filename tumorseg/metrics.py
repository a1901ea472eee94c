"""Segmentation metrics: pure numpy on top of one confusion-count helper.

The empty-mask rule lives here and nowhere else (:data:`EMPTY_RULES`). Train's
validation and ``evaluate`` both score through :func:`scores_from_counts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

EmptyBoth = Literal["nan", "1"]

EMPTY_RULES: dict[str, str] = {
    "nan": (
        "Dice and IoU are NaN when both ground truth and prediction are empty (left out of means, as nnU-Net); "
        "any predicted pixel on an empty ground truth scores 0"
    ),
    "1": (
        "Dice and IoU are 1 when both ground truth and prediction are empty (as segmentation_models.pytorch); "
        "any predicted pixel on an empty ground truth scores 0"
    ),
}


@dataclass(frozen=True)
class Counts:
    """Pixel confusion counts of one binary prediction against its ground truth."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)


def confusion(pred: np.ndarray, gt: np.ndarray) -> Counts:
    """Count tp/fp/fn/tn of two same-shaped binary arrays (non-zero is foreground)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    p = np.asarray(pred) != 0
    g = np.asarray(gt) != 0
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    tn = int(p.size) - tp - fp - fn
    return Counts(tp, fp, fn, tn)


def dice(c: Counts, empty_both: EmptyBoth = "nan") -> float:
    """``2tp / (2tp + fp + fn)``; both empty -> NaN or 1 by ``empty_both``."""
    denom = 2 * c.tp + c.fp + c.fn
    if denom == 0:
        return float("nan") if empty_both == "nan" else 1.0
    return 2.0 * c.tp / denom


def iou(c: Counts, empty_both: EmptyBoth = "nan") -> float:
    """``tp / (tp + fp + fn)``; both empty -> NaN or 1 by ``empty_both``."""
    denom = c.tp + c.fp + c.fn
    if denom == 0:
        return float("nan") if empty_both == "nan" else 1.0
    return c.tp / denom


def precision(c: Counts) -> float:
    """``tp / (tp + fp)``; NaN when nothing is predicted."""
    return c.tp / (c.tp + c.fp) if c.tp + c.fp else float("nan")


def recall(c: Counts) -> float:
    """``tp / (tp + fn)``; NaN when the ground truth is empty."""
    return c.tp / (c.tp + c.fn) if c.tp + c.fn else float("nan")


def scores_from_counts(c: Counts, empty_both: EmptyBoth = "nan") -> dict[str, float | int | bool]:
    """The per-case row: raw counts, emptiness and all scores."""
    return {
        "tp": c.tp,
        "fp": c.fp,
        "fn": c.fn,
        "tn": c.tn,
        "gt_pixels": c.tp + c.fn,
        "pred_pixels": c.tp + c.fp,
        "gt_empty": c.tp + c.fn == 0,
        "pred_empty": c.tp + c.fp == 0,
        "dice": dice(c, empty_both),
        "iou": iou(c, empty_both),
        "precision": precision(c),
        "recall": recall(c),
    }


def surface_distances(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """HD95 and ASSD in pixels (MONAI's implementations); NaN when either mask is empty."""
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p = np.asarray(pred) != 0
    g = np.asarray(gt) != 0
    if not p.any() or not g.any():
        return float("nan"), float("nan")
    yp = torch.from_numpy(p[None, None].astype(np.float32))
    yg = torch.from_numpy(g[None, None].astype(np.float32))
    hd95 = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95)
    assd = compute_average_surface_distance(yp, yg, include_background=True, symmetric=True)
    return float(hd95.item()), float(assd.item())


def bootstrap_ci(values: np.ndarray, n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of the finite ``values``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = rng.choice(v, size=(n, v.size), replace=True).mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)
