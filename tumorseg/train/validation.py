"""Validation during training: the val split predicted at its original resolution and scored per class.

The mean foreground Dice (the mean over tumour classes of each class's mean Dice per unit; for a
binary model, its one class), smoothed over epochs (:func:`smooth`), drives the best checkpoint,
early stopping and the LR plateau. The unit is a case, or a group with its counts pooled over its
cases (volumetric Dice per patient; :func:`tumorseg.planning.stacks.selection_unit`): :class:`Tally`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from tumorseg.config import TrainConfig
from tumorseg.inference import amp_dtype
from tumorseg.labels import Classes
from tumorseg.metrics import confusion, dice

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tumorseg.data import Split


def val_probabilities(net: torch.nn.Module, data: Split, cfg: TrainConfig, device: torch.device,
                      tta: bool = False, softmax: bool = True) -> Iterator[np.ndarray]:
    """Probabilities of each cached case at its original resolution, in order.

    ``float32 (H, W)`` tumour probabilities of a binary network, ``(K, H, W)`` class probabilities of a
    multi-class one (``(R, H, W)`` region probabilities with ``softmax=False``). The same path as
    inference (:func:`tumorseg.inference.network_logits`: whole image
    or sliding window, optional mirroring), on the cached, already normalised inputs.
    """
    import torch

    from tumorseg.inference import logits_to_original, network_logits, volume_logits
    from tumorseg.model import channels_last
    from tumorseg.streaming import prefetch

    net.eval()
    dtype = amp_dtype(device, cfg.amp)
    bs = max(cfg.batch_size, 16) if cfg.spatial_dims == 2 else cfg.batch_size  # volumes: the planned batch
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    chunks = prefetch(lambda start: (start, data.read(np.arange(start, min(start + bs, len(data))), masks=False)),
                      range(0, len(data), bs), 1 if data.streams else 0, 2)
    for start, batch in chunks:
        with torch.inference_mode(), autocast:
            x, _ = data.to_device(batch, device)
            if cfg.channels_last:
                x = channels_last(x)
            places = [data.placement(start + j) for j in range(x.shape[0])]
            if all(where is None for where in places):
                logits = list(network_logits(net, x, cfg.patch_size, tta, cfg.augment.flip_dims))
            else:  # volumes at the target spacing: each cut out of the grid, at its own size, as inference does
                logits = [volume_logits(net, x[j:j + 1][(slice(None), slice(None), *where.region)] if where else
                                        x[j:j + 1], cfg, tta)[0] for j, where in enumerate(places)]
        for j, case in enumerate(logits):
            gt = data.original_mask(start + j)
            yield logits_to_original(case, tuple(int(s) for s in gt.shape), softmax).cpu().numpy()


def class_means(sums: np.ndarray, classes: Classes) -> tuple[float, dict[str, float]]:
    """``(mean foreground Dice, {class name: mean Dice})`` from per-class ``[sum of finite Dice, count]`` rows."""
    per_class = {name: float(s / n) if n else float("nan")
                 for (_, name), (s, n) in zip(classes.foreground, sums, strict=True)}
    finite = [v for v in per_class.values() if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), per_class


def case_dice(pred: np.ndarray, gt: np.ndarray, classes: Classes) -> list[float]:
    """Dice of each tumour class (or region) on one case (NaN where it is absent from both)."""
    return [dice(confusion(p, g)) for p, g in zip(classes.score_masks(pred), classes.score_masks(gt), strict=True)]


def case_counts(pred: np.ndarray, gt: np.ndarray, classes: Classes) -> np.ndarray:
    """``(K, 3)`` tp, fp, fn of each tumour class (or region) on one case."""
    out = np.zeros((len(classes.foreground), 3))
    for k, (p, g) in enumerate(zip(classes.score_masks(pred), classes.score_masks(gt), strict=True)):
        c = confusion(p, g)
        out[k] = (c.tp, c.fp, c.fn)
    return out


class Tally:
    """Confusion counts of val cases pooled per unit, for any number of candidates (predictions of each case).

    A unit is a case (``units`` is ``None``) or a group (``units[i]``: the group index of case ``i``).
    Each unit's Dice per class is ``2tp / (2tp + fp + fn)`` of its pooled counts (NaN where the class is
    absent from both, left out of that class's mean; a false positive on a tumour-free unit scores 0),
    so per case it is exactly the per-case Dice, and per group the volumetric Dice of ``per_group.csv``.
    """

    def __init__(self, n_cases: int, classes: Classes, units: np.ndarray | None = None, candidates: int = 1):
        self.units = np.arange(n_cases) if units is None else np.asarray(units, dtype=np.int64)
        self.counts = np.zeros((candidates, int(self.units.max(initial=-1)) + 1, len(classes.foreground), 3))

    def add(self, case: int, counts: np.ndarray) -> None:
        """Add one case's ``(candidates, K, 3)`` (or ``(K, 3)``) counts to its unit."""
        self.counts[:, self.units[case]] += counts

    def dice(self) -> np.ndarray:
        """``(candidates, units, K)`` Dice of each unit and class (NaN where absent from both)."""
        c = self.counts
        denom = 2 * c[..., 0] + c[..., 1] + c[..., 2]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, 2 * c[..., 0] / np.where(denom > 0, denom, 1), np.nan)

    def sums(self) -> np.ndarray:
        """``(candidates, K, 2)``: per class, the sum of finite unit Dice and their count (:func:`class_means`)."""
        d = self.dice()
        finite = np.isfinite(d)
        return np.stack([np.where(finite, d, 0.0).sum(axis=1), finite.sum(axis=1)], axis=-1)


def validate(net: torch.nn.Module, data: Split, cfg: TrainConfig, device: torch.device,
             classes: Classes | None = None, units: np.ndarray | None = None
             ) -> tuple[float, dict[str, float], dict[str, float]]:
    """Per-class Dice at the original resolution, averaged over units (counts of :func:`tumorseg.metrics.confusion`).

    Probabilities become class indices by :meth:`tumorseg.labels.Classes.decide` (cut at ``cfg.threshold``,
    the argmax, or regions painted); each class (or region) is scored on its own. A unit is a case, or with
    ``units`` (case -> group index) a group whose counts are pooled over its cases (:class:`Tally`).
    Units where a class is absent from both prediction and truth are NaN for that class and left out
    of its mean (a false positive on a tumour-free unit counts as 0).

    Returns:
        (mean foreground Dice per unit, ``{class name: mean Dice}``, ``{"val_dice_tumour": the mean Dice of the
        cases with tumour, "val_fp_rate": the share of tumour-free cases given any tumour pixel,
        "val_dice_case": the mean per-case Dice}``; NaN where there are no such cases). The last three tell a
        swing of the first apart: shapes, or specks on healthy images.
    """
    classes = classes or Classes()
    per_case = Tally(len(data), classes)
    per_unit = Tally(len(data), classes, units) if units is not None else per_case
    tumour: list[float] = []
    fp: list[bool] = []
    for i, prob in enumerate(val_probabilities(net, data, cfg, device, softmax=classes.softmax)):
        pred = classes.decide(prob, cfg.threshold)
        gt = data.original_mask(i)
        counts = case_counts(pred, gt, classes)
        per_case.add(i, counts)
        if per_unit is not per_case:
            per_unit.add(i, counts)
        if gt.any():
            denom = 2 * counts[:, 0] + counts[:, 1] + counts[:, 2]
            scores = np.where(denom > 0, 2 * counts[:, 0] / np.maximum(denom, 1), np.nan)
            finite = np.isfinite(scores)
            tumour.append(float(np.mean(scores[finite])) if finite.any() else 0.0)
        else:
            fp.append(bool(pred.any()))
    mean, per_class = class_means(per_unit.sums()[0], classes)
    cases = {"val_dice_tumour": float(np.mean(tumour)) if tumour else float("nan"),
             "val_fp_rate": float(np.mean(fp)) if fp else float("nan"),
             "val_dice_case": class_means(per_case.sums()[0], classes)[0]}
    return mean, per_class, cases


def group_units(case_ids: list[str], group_of: dict[str, str]) -> np.ndarray:
    """Case index -> group index (groups numbered in order of first appearance)."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(group_of[c], len(index)) for c in case_ids], dtype=np.int64)


def val_units(cfg: TrainConfig, val_df: pd.DataFrame, case_ids: list[str]) -> tuple[np.ndarray | None, str, str]:
    """``(units for validate, "case" | "group", reason)``: ``cfg.val_unit``, or the planning rule on ``auto``.

    ``case_ids`` are the val split's cases in the order validation reads them.
    """
    from tumorseg.planning.stacks import selection_unit

    if cfg.val_unit == "auto":
        unit, reason = selection_unit([int(n) for n in val_df.groupby("group").size()])
    else:
        unit, reason = cfg.val_unit, "val_unit in the config"
    if unit == "case":
        return None, unit, reason
    group_of = dict(zip(val_df["case_id"].astype(str), val_df["group"].astype(str), strict=True))
    return group_units(case_ids, group_of), unit, reason


def val_span(cfg: TrainConfig) -> int:
    """Epochs the val Dice is averaged over: ``cfg.val_window``, else a tenth of the epochs (at least 1)."""
    return cfg.val_window or max(1, round(cfg.epochs / 10))


def smooth(history: list[dict[str, float]], score: float, span: int) -> float:
    """This epoch's smoothed val Dice: an exponential moving average of span ``span`` over the epochs so far.

    One epoch's val Dice is noisy: a speck on a tumour-free image scores that case 0, and the
    checkpoint with the luckiest epoch is rarely the best model (nnU-Net picks its best checkpoint by
    a moving average too). ``score`` is this epoch's val Dice (-1 without a val split);
    ``history`` holds the epochs before this one (rows with ``val_dice_smoothed``).
    """
    last = history[-1].get("val_dice_smoothed") if history else None
    if last is None or not math.isfinite(last) or score < 0 or last < 0:
        return score
    weight = 2.0 / (span + 1)
    return weight * score + (1 - weight) * float(last)


def best_smoothed(history: list[dict[str, float]], best_epoch: int) -> float:
    """The smoothed val Dice of epoch ``best_epoch`` (1-based) in ``history``; -1 before the first."""
    if best_epoch < 1 or best_epoch > len(history):
        return -1.0
    row = history[best_epoch - 1]
    value = float(row.get("val_dice_smoothed", row.get("val_dice", -1.0)))
    return value if math.isfinite(value) else -1.0  # an old history's NaN (no val split) compares as -1
