"""Segmentation metrics: pure numpy on top of one confusion-count helper.

The empty-mask rules live here and nowhere else (:data:`EMPTY_RULES` for Dice/IoU,
:data:`HD95_EMPTY_RULES` for surface distances, with :data:`HD95_DEFINITION`). Train's
validation and ``evaluate`` both score through :func:`scores_from_counts`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

EmptyBoth = Literal["nan", "1"]
HD95Empty = Literal["nan", "diagonal"]

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


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, n_classes: int) -> np.ndarray:
    """``int64 (K, K)`` pixel counts: row = true class, column = predicted class (class-index maps)."""
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    flat = np.asarray(gt, dtype=np.int64).ravel() * n_classes + np.asarray(pred, dtype=np.int64).ravel()
    return np.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def pixel_accuracy(matrix: np.ndarray) -> tuple[float, list[float]]:
    """Pixel accuracy of a ``(K, K)`` confusion matrix (rows true, columns predicted).

    Returns:
        The share of all pixels whose class is right, and per class the share of its true pixels
        predicted as it (its recall; NaN for a class with no pixels). The background dominates the
        first: on images that are 95% background, predicting no tumour at all scores 0.95.
    """
    m = np.asarray(matrix, dtype=np.float64)
    total = float(m.sum())
    overall = float(np.trace(m) / total) if total else float("nan")
    rows = m.sum(axis=1)
    per_class = [float(m[k, k] / rows[k]) if rows[k] else float("nan") for k in range(m.shape[0])]
    return overall, per_class


PIXEL_ACCURACY_NOTE = (
    "pixel_accuracy is the share of all pixels whose class is right (pooled over the split's pixels, as a Keras "
    "accuracy metric reports it); pixel_accuracy_<class> the share of that class's true pixels predicted as it. "
    "Background dominates it: predicting no tumour scores the background share of the pixels, so Dice (each "
    "case's overlap with its tumour) is the headline"
)
"""What ``pixel_accuracy`` means, written into ``summary.json``."""


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


HD95_DEFINITION = (
    "HD95 is the larger of the two directed 95th-percentile distances between the boundary pixels of prediction "
    "and ground truth: max(p95 of prediction->truth, p95 of truth->prediction), each distance from a boundary "
    "pixel to the nearest boundary pixel of the other mask (as MONAI's compute_hausdorff_distance(percentile=95) "
    "and DeepMind's surface-distance; not medpy's hd95, which takes one 95th percentile of both directions pooled "
    "and can differ by tens of pixels). ASSD is the mean of those distances in both directions together."
)
"""What ``hd95`` means, written into ``summary.json`` and the README."""

HD95_EMPTY_RULES: dict[str, str] = {
    "nan": (
        "HD95 and ASSD are undefined (NaN) when either mask is empty - a missed tumour, a false positive on a "
        "tumour-free image, or both empty - and left out of hd95_mean/assd_mean; n_hd95_undefined counts them "
        "(broken down in n_hd95_missed_tumour, n_hd95_fp_on_empty, n_hd95_both_empty)"
    ),
    "diagonal": (
        "a missed tumour or a false positive on a tumour-free image scores HD95 = the image diagonal, "
        "sqrt((H*dy)^2 + (W*dx)^2) in the same unit (the challenge convention, as BraTS' 373.13 mm, the diagonal "
        "of its 240x240x155 volume); both empty stays NaN, left out of hd95_mean and counted in n_hd95_undefined; "
        "ASSD stays NaN for all three"
    ),
}
"""What an empty mask does to HD95 (``EvaluateConfig.hd95_empty``)."""


def image_diagonal(shape: tuple[int, ...], spacing: tuple[float, ...] | None = None) -> float:
    """``sqrt(sum((n_i * spacing_i)^2))``: the HD95 penalty of the ``diagonal`` rule (pixels without spacing)."""
    s = (1.0,) * len(shape) if spacing is None else spacing
    return float(np.sqrt(sum((float(n) * float(d)) ** 2 for n, d in zip(shape, s, strict=True))))


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None = None, hd95_empty: HD95Empty = "nan"
) -> tuple[float, float]:
    """HD95 and ASSD (MONAI's implementations; :data:`HD95_DEFINITION`).

    Args:
        pred: binary prediction (non-zero is foreground).
        gt: binary ground truth of the same shape.
        spacing: pixel size per axis (e.g. mm from a NIfTI header); ``None`` gives pixels.
        hd95_empty: what an empty mask scores (:data:`HD95_EMPTY_RULES`): ``nan``, or ``diagonal`` for a
            missed tumour or a false positive on a tumour-free image (both empty stays NaN).

    Returns:
        ``(hd95, assd)`` in the unit of ``spacing``.
    """
    import torch
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    p = np.asarray(pred) != 0
    g = np.asarray(gt) != 0
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} != ground truth shape {g.shape}")
    if not p.any() or not g.any():
        one_empty = bool(p.any()) != bool(g.any())
        hd95 = image_diagonal(p.shape, spacing) if hd95_empty == "diagonal" and one_empty else float("nan")
        return hd95, float("nan")
    yp = torch.from_numpy(p[None, None].astype(np.float32))
    yg = torch.from_numpy(g[None, None].astype(np.float32))
    sp = None if spacing is None else [float(d) for d in spacing]
    hd95_t = compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=sp)
    assd_t = compute_average_surface_distance(yp, yg, include_background=True, symmetric=True, spacing=sp)
    return float(hd95_t.item()), float(assd_t.item())


def finite_stat(values: np.ndarray, fn: Callable[[np.ndarray], Any]) -> float:
    """``fn`` of the finite values (NaN - undefined - cases are left out); NaN when none is finite."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(fn(v)) if v.size else float("nan")


def distribution(values: np.ndarray, prefix: str) -> dict[str, float]:
    """Mean, median, std (sample, ddof=1), p5 and p95 of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    return {
        f"{prefix}_mean": finite_stat(v, np.mean),
        f"{prefix}_median": finite_stat(v, np.median),
        f"{prefix}_std": float(np.std(finite, ddof=1)) if finite.size > 1 else float("nan"),
        f"{prefix}_p5": finite_stat(v, lambda x: np.percentile(x, 5)),
        f"{prefix}_p95": finite_stat(v, lambda x: np.percentile(x, 95)),
    }


def surface_summary(hd95: np.ndarray, assd: np.ndarray, gt_empty: np.ndarray, pred_empty: np.ndarray,
                    hd95_empty: HD95Empty = "nan", unit: str = "pixels") -> dict[str, Any]:
    """Means and medians of per-case HD95/ASSD, stated with their definition, unit and the cases left out.

    ``n_hd95_undefined`` counts the cases left out of ``hd95_mean`` (NaN); the three ways a mask can be
    empty are counted whatever the rule, and ``n_hd95_penalised`` says how many scored the diagonal.
    """
    out: dict[str, Any] = {}
    for name, v in (("hd95", hd95), ("assd", assd)):
        out[f"{name}_mean"] = finite_stat(v, np.mean)
        out[f"{name}_median"] = finite_stat(v, np.median)
        out[f"n_{name}"] = int(np.isfinite(v).sum())
    gt_e, pr_e = np.asarray(gt_empty, dtype=bool), np.asarray(pred_empty, dtype=bool)
    one_empty = gt_e != pr_e
    out.update({
        "hd95_definition": HD95_DEFINITION,
        "surface_unit": unit,
        "hd95_empty": hd95_empty,
        "hd95_empty_rule": HD95_EMPTY_RULES[hd95_empty],
        "n_hd95_undefined": int((~np.isfinite(np.asarray(hd95, dtype=np.float64))).sum()),
        "n_hd95_missed_tumour": int((~gt_e & pr_e).sum()),
        "n_hd95_fp_on_empty": int((gt_e & ~pr_e).sum()),
        "n_hd95_both_empty": int((gt_e & pr_e).sum()),
        "n_hd95_penalised": int(one_empty.sum()) if hd95_empty == "diagonal" else 0,
    })
    return out


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
