"""Validation during training: the val split predicted at its original resolution and scored per class.

The mean foreground Dice (the mean over tumour classes of each class's mean per-case Dice; for a
binary model, its one class), smoothed over epochs (:func:`smooth`), drives the best checkpoint,
early stopping and the LR plateau.
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

    from tumorseg.inference import logits_to_original, network_logits
    from tumorseg.streaming import prefetch

    net.eval()
    dtype = amp_dtype(device, cfg.amp)
    bs = max(cfg.batch_size, 16)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
    chunks = prefetch(lambda start: (start, data.read(np.arange(start, min(start + bs, len(data))), masks=False)),
                      range(0, len(data), bs), 1 if data.streams else 0, 2)
    for start, batch in chunks:
        with torch.inference_mode(), autocast:
            x, _ = data.to_device(batch, device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = network_logits(net, x, cfg.patch_size, tta, cfg.augment.flip_dims)
        for j in range(logits.shape[0]):
            gt = data.original_mask(start + j)
            yield logits_to_original(logits[j], (int(gt.shape[0]), int(gt.shape[1])), softmax).cpu().numpy()


def class_means(sums: np.ndarray, classes: Classes) -> tuple[float, dict[str, float]]:
    """``(mean foreground Dice, {class name: mean Dice})`` from per-class ``[sum of finite Dice, count]`` rows."""
    per_class = {name: float(s / n) if n else float("nan")
                 for (_, name), (s, n) in zip(classes.foreground, sums, strict=True)}
    finite = [v for v in per_class.values() if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), per_class


def case_dice(pred: np.ndarray, gt: np.ndarray, classes: Classes) -> list[float]:
    """Dice of each tumour class (or region) on one case (NaN where it is absent from both)."""
    return [dice(confusion(p, g)) for p, g in zip(classes.score_masks(pred), classes.score_masks(gt), strict=True)]


def validate(net: torch.nn.Module, data: Split, cfg: TrainConfig, device: torch.device,
             classes: Classes | None = None) -> tuple[float, dict[str, float], dict[str, float]]:
    """Per-case, per-class Dice at the original resolution (the counts of :func:`tumorseg.metrics.confusion`).

    Probabilities become class indices by :meth:`tumorseg.labels.Classes.decide` (cut at ``cfg.threshold``,
    the argmax, or regions painted); each class (or region) is scored on its own.
    Cases where a class is absent from both prediction and truth are NaN for that class and left out
    of its mean (a false positive on a tumour-free image counts as 0).

    Returns:
        (mean foreground Dice, ``{class name: mean Dice}``, ``{"val_dice_tumour": the mean Dice of the cases
        with tumour, "val_fp_rate": the share of tumour-free cases given any tumour pixel}``; NaN where there
        are no such cases). The last two tell a swing of the first apart: shapes, or specks on healthy images.
    """
    classes = classes or Classes()
    sums = np.zeros((len(classes.foreground), 2))
    tumour: list[float] = []
    fp: list[bool] = []
    for i, prob in enumerate(val_probabilities(net, data, cfg, device, softmax=classes.softmax)):
        pred = classes.decide(prob, cfg.threshold)
        gt = data.original_mask(i)
        scores = np.asarray(case_dice(pred, gt, classes))
        finite = np.isfinite(scores)
        sums[finite, 0] += scores[finite]
        sums[finite, 1] += 1
        if gt.any():
            tumour.append(float(np.mean(scores[finite])) if finite.any() else 0.0)
        else:
            fp.append(bool(pred.any()))
    mean, per_class = class_means(sums, classes)
    cases = {"val_dice_tumour": float(np.mean(tumour)) if tumour else float("nan"),
             "val_fp_rate": float(np.mean(fp)) if fp else float("nan")}
    return mean, per_class, cases


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
