"""Post-processing chosen on val after training, as nnU-Net's ``determine_postprocessing``.

The best checkpoint predicts val once plainly and once with mirroring; every combination of
mirroring, probability threshold and component filter (keep all, keep the largest, drop
components smaller than half the smallest val tumour) is scored by mean val Dice (the same
per-case Dice as validation, so a false positive on a tumour-free image counts as 0). A choice
is kept only when it beats the plain prediction at threshold 0.5 by more than ``MIN_GAIN``;
it is stored in the checkpoint, so evaluate, predict and the MLflow model apply the same one.
"""

from __future__ import annotations

import logging
import math
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tumorseg import checkpoint
from tumorseg.config import TrainConfig
from tumorseg.fsutil import atomic_write_json
from tumorseg.inference import Postprocess, components
from tumorseg.metrics import confusion, dice
from tumorseg.train.loop import val_probabilities

if TYPE_CHECKING:
    import torch

    from tumorseg.data import CachedSplit
    from tumorseg.tracking import Run

log = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_GAIN = 0.002


def mean_dice(post: Postprocess, probs: list[np.ndarray], masks: list[np.ndarray]) -> float:
    """Mean per-case Dice of ``post`` applied to ``probs`` (both-empty cases left out)."""
    return _mean([dice(confusion(post.mask(p), m)) for p, m in zip(probs, masks, strict=True)])


def _mean(scores: list[float]) -> float:
    finite = [s for s in scores if math.isfinite(s)]
    return float(np.mean(finite)) if finite else float("nan")


def smallest_tumour(masks: list[np.ndarray]) -> int:
    """Pixels of the smallest connected tumour component in ``masks`` (0 when there is none)."""
    from skimage.measure import label

    sizes = [int(n) for m in masks if m.any() for n in np.bincount(label(m > 0, connectivity=2).ravel())[1:]]
    return min(sizes) if sizes else 0


def choose(net: torch.nn.Module, val: CachedSplit, cfg: TrainConfig,
           device: torch.device) -> tuple[Postprocess, dict[str, Any]]:
    """The post-processing that maximises mean val Dice, and the scores behind the choice."""
    masks = val.original_masks
    plain = list(val_probabilities(net, val, cfg, device, tta=False))
    mirrored = list(val_probabilities(net, val, cfg, device, tta=True))
    min_size = max(1, smallest_tumour(masks) // 2)
    base = Postprocess(threshold=cfg.threshold)
    base_score = mean_dice(base, plain, masks)
    best, best_score = base, base_score
    table: dict[str, float] = {}
    keeps: tuple[Literal["all", "largest", "min_size"], ...] = ("all", "largest", "min_size")
    for tta, threshold in product((False, True), THRESHOLDS):
        # label each case once per (mirroring, threshold); the three component rules reuse the labels
        labelled = [components(p > threshold) for p in (mirrored if tta else plain)]
        for keep in keeps:
            post = Postprocess(threshold=threshold, keep=keep, min_size=min_size if keep == "min_size" else 0,
                               tta=tta)
            score = _mean([dice(confusion(post.filter(*lab), m)) for lab, m in zip(labelled, masks, strict=True)])
            table[f"tta={int(tta)},t={threshold},keep={keep}"] = score
            if math.isfinite(score) and score > best_score + MIN_GAIN:
                best, best_score = post, score
    log.info("post-processing on val: %s (val Dice %.4f, plain %.4f)", best.to_dict(), best_score, base_score)
    return best, {"val_dice_plain": base_score, "val_dice_postprocessed": best_score, "candidates": table}


def choose_and_store(run: Run, best: Path, cfg: TrainConfig, val_data: CachedSplit,
                           device: torch.device) -> None:
    """Choose threshold, mirroring and component filter on val; store the choice in ``best.pt``."""
    from tumorseg.inference import Segmenter

    seg = Segmenter.from_checkpoint(best, device=device.type)
    post, scores = choose(seg.net, val_data, cfg, device)
    ckpt = checkpoint.load(best)
    ckpt["postprocess"] = post.to_dict()
    checkpoint.save(best, ckpt)
    run.log_params({f"postprocess.{k}": v for k, v in post.to_dict().items()})
    run.log_metrics({"val_dice_plain": scores["val_dice_plain"],
                     "val_dice_postprocessed": scores["val_dice_postprocessed"]})
    atomic_write_json(best.parent / "postprocess.json", {"chosen": post.to_dict(), **scores})
    run.log_artifact(best.parent / "postprocess.json")
