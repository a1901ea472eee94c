"""Post-processing chosen on val after training, as nnU-Net's ``determine_postprocessing``.

The best checkpoint predicts val once plainly and once with mirroring (streamed, case by case); every combination of
mirroring, probability threshold and component filter (keep all, keep the largest, drop
components smaller than half the smallest val tumour) is scored by mean val Dice (the same
per-case Dice as validation, so a false positive on a tumour-free image counts as 0). A choice
is kept only when it beats the plain prediction at threshold 0.5 by more than ``MIN_GAIN``;
it is stored in the checkpoint, so evaluate, predict and the MLflow model apply the same one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
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

    from tumorseg.data import Split
    from tumorseg.tracking import Run

log = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
MIN_GAIN = 0.002


def smallest_tumour(masks: Iterable[np.ndarray]) -> int:
    """Pixels of the smallest connected tumour component in ``masks`` (0 when there is none)."""
    from skimage.measure import label

    sizes = [int(n) for m in masks if m.any() for n in np.bincount(label(m > 0, connectivity=2).ravel())[1:]]
    return min(sizes) if sizes else 0


def choose(net: torch.nn.Module, val: Split, cfg: TrainConfig,
           device: torch.device) -> tuple[Postprocess, dict[str, Any]]:
    """The post-processing that maximises mean val Dice, and the scores behind the choice.

    One streaming pass: each case is predicted plainly and mirrored, every candidate scored on it,
    and only the running sums kept, so memory does not grow with the number of val cases.
    """
    min_size = max(1, smallest_tumour(val.original_mask(i) for i in range(len(val))) // 2)
    base = Postprocess(threshold=cfg.threshold)
    keeps: tuple[Literal["all", "largest", "min_size"], ...] = ("all", "largest", "min_size")
    grid = [(tta, threshold, Postprocess(threshold=threshold, keep=keep, min_size=min_size if keep == "min_size"
                                         else 0, tta=tta))
            for tta, threshold in product((False, True), THRESHOLDS) for keep in keeps]
    sums = np.zeros((len(grid) + 1, 2))  # (sum of finite Dice, count); row 0: the plain prediction
    plain_probs = val_probabilities(net, val, cfg, device, tta=False)
    mirrored_probs = val_probabilities(net, val, cfg, device, tta=True)
    for i, (plain, mirrored) in enumerate(zip(plain_probs, mirrored_probs, strict=True)):
        gt = val.original_mask(i)
        scores = [dice(confusion(base.mask(plain), gt))]
        labelled: dict[tuple[bool, float], tuple[np.ndarray, np.ndarray]] = {}
        for tta, threshold, post in grid:
            # label each case once per (mirroring, threshold); the three component rules reuse the labels
            key = (tta, threshold)
            if key not in labelled:
                labelled[key] = components((mirrored if tta else plain) > threshold)
            scores.append(dice(confusion(post.filter(*labelled[key]), gt)))
        finite = np.isfinite(scores)
        sums[finite, 0] += np.asarray(scores)[finite]
        sums[finite, 1] += 1
    means = [float(s / n) if n else float("nan") for s, n in sums]
    base_score, best, best_score = means[0], base, means[0]
    table: dict[str, float] = {}
    for (tta, threshold, post), score in zip(grid, means[1:], strict=True):
        table[f"tta={int(tta)},t={threshold},keep={post.keep}"] = score
        if math.isfinite(score) and score > best_score + MIN_GAIN:
            best, best_score = post, score
    log.info("post-processing on val: %s (val Dice %.4f, plain %.4f)", best.to_dict(), best_score, base_score)
    return best, {"val_dice_plain": base_score, "val_dice_postprocessed": best_score, "candidates": table}


def choose_and_store(run: Run, best: Path, cfg: TrainConfig, val_data: Split,
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
