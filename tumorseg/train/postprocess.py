"""Post-processing chosen on val after training, as nnU-Net's ``determine_postprocessing``.

The best checkpoint predicts val once plainly and once with mirroring (streamed, case by case); every combination of
mirroring, probability threshold, smallest peak probability of a kept component (binary models: hysteresis
thresholding, boundaries at the threshold, existence at the peak) and component filter (keep all, keep the
largest, drop components smaller than half the smallest val tumour) is scored by mean val Dice (the same
Dice per unit as validation, a case or a group with pooled counts, so a false positive on a tumour-free
unit counts as 0). A choice
is kept only when it beats the plain prediction at threshold 0.5 by more than ``MIN_GAIN``, and
small components are dropped whenever that costs nothing on val (:func:`pick`);
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
from tumorseg.inference import Postprocess, component_peaks, components
from tumorseg.labels import Classes
from tumorseg.train.validation import Tally, case_counts, class_means, val_probabilities

if TYPE_CHECKING:
    import torch

    from tumorseg.data import Split
    from tumorseg.tracking import Run

log = logging.getLogger(__name__)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
CONFIDENCES = (0.0, 0.6, 0.7, 0.8, 0.9, 0.95)
"""Smallest peak probability of a kept component (binary models). On BUSI, most false positives on tumour-free
images are whole blobs the network is unsure of; measured by their peak rather than their mean, the choice
made on half of val scores higher on the other half in 4 of 5 runs (benchmarks/RESULTS.md)."""
MIN_GAIN = 0.002


def smallest_tumour(masks: Iterable[np.ndarray]) -> int:
    """Pixels of the smallest connected tumour component in ``masks`` (0 when there is none; per class)."""
    from skimage.measure import label

    sizes = [int(n) for m in masks if m.any() for n in np.bincount(label(m, connectivity=2).ravel())[1:]]
    return min(sizes) if sizes else 0


def choose(net: torch.nn.Module, val: Split, cfg: TrainConfig, device: torch.device,
           classes: Classes | None = None, units: np.ndarray | None = None) -> tuple[Postprocess, dict[str, Any]]:
    """The post-processing that maximises mean val (foreground) Dice, and the scores behind the choice.

    One streaming pass: each case is predicted plainly and mirrored, every candidate scored on it,
    and only the running sums kept, so memory does not grow with the number of val cases. A
    multi-class model takes the argmax (no threshold to choose; a region-based one thresholds its regions);
    the component rule applies per class. ``units`` pools the counts per group, as validation does.
    """
    classes = classes or Classes()
    min_size = max(1, smallest_tumour(val.original_mask(i) for i in range(len(val))) // 2)
    base = Postprocess(threshold=cfg.threshold)
    keeps: tuple[Literal["all", "largest", "min_size"], ...] = ("all", "largest", "min_size")
    thresholds = (cfg.threshold,) if classes.softmax else THRESHOLDS
    confidences = (0.0,) if classes.multiclass else CONFIDENCES
    ttas = (False, True) if cfg.augment.flip_dims else (False,)  # no axis to mirror: no second val pass
    grid = [(tta, threshold, Postprocess(threshold=threshold, keep=keep, min_size=min_size if keep == "min_size"
                                         else 0, tta=tta, min_confidence=conf))
            for tta, threshold in product(ttas, thresholds) for conf in confidences for keep in keeps]
    # per candidate, unit and tumour class: pooled tp/fp/fn; candidate 0: the plain prediction
    tally = Tally(len(val), classes, units, candidates=len(grid) + 1)
    plain_probs = val_probabilities(net, val, cfg, device, tta=False, softmax=classes.softmax)
    mirrored_probs = val_probabilities(net, val, cfg, device, tta=True, softmax=classes.softmax) if ttas[-1] else None
    for i, plain in enumerate(plain_probs):
        mirrored = next(mirrored_probs) if mirrored_probs is not None else plain
        gt = val.original_mask(i)
        counts = [case_counts(base.mask(plain, classes), gt, classes)]
        labelled: dict[tuple[bool, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for tta, threshold, post in grid:
            prob = mirrored if tta else plain
            if classes.multiclass:
                counts.append(case_counts(post.mask(prob, classes), gt, classes))
                continue
            # label each case once per (mirroring, threshold); the component rules reuse the labels
            key = (tta, threshold)
            if key not in labelled:
                labels, sizes = components(prob > threshold)
                labelled[key] = (labels, sizes, component_peaks(labels, sizes, prob))
            counts.append(case_counts(post.filter(*labelled[key]), gt, classes))
        tally.add(i, np.asarray(counts))
    sums = tally.sums()
    means = [class_means(row, classes)[0] for row in sums]
    base_score = means[0]
    table = {f"tta={int(tta)},t={threshold},conf={post.min_confidence},keep={post.keep}": score
             for (tta, threshold, post), score in zip(grid, means[1:], strict=True)}
    best, best_score = pick([(post, score) for (_, _, post), score in zip(grid, means[1:], strict=True)],
                            base, base_score)
    log.info("post-processing on val: %s (val Dice %.4f, plain %.4f)", best.to_dict(), best_score, base_score)
    return best, {"val_dice_plain": base_score, "val_dice_postprocessed": best_score, "candidates": table}


def pick(scored: list[tuple[Postprocess, float]], base: Postprocess,
         base_score: float) -> tuple[Postprocess, float]:
    """The candidate to keep: the best that beats the plain prediction by more than ``MIN_GAIN``, else ``base``.

    Then, where the kept choice keeps all components, its twin dropping small ones (smaller than half the
    smallest val tumour) is taken when it scores the same on val: it removes only specks the val data says
    are not tumours (val shows none), and a speck costs a whole case's Dice where a class is absent.
    """
    best, best_score = base, base_score
    for post, score in scored:
        if math.isfinite(score) and score > best_score + MIN_GAIN:
            best, best_score = post, score
    if best.keep == "all":
        for post, score in scored:
            if (post.keep == "min_size" and (post.tta, post.threshold, post.min_confidence)
                    == (best.tta, best.threshold, best.min_confidence)
                    and math.isfinite(score) and score >= best_score - 1e-9):
                return post, score
    return best, best_score


def choose_and_store(run: Run, best: Path, cfg: TrainConfig, val_data: Split, device: torch.device,
                     units: np.ndarray | None = None) -> None:
    """Choose threshold, mirroring and component filter on val; store the choice in ``best.pt``."""
    from tumorseg.inference import Segmenter

    seg = Segmenter.from_checkpoint(best, device=device.type)
    post, scores = choose(seg.net, val_data, cfg, device, seg.classes, units)
    ckpt = checkpoint.load(best)
    ckpt["postprocess"] = post.to_dict()
    checkpoint.save(best, ckpt)
    run.log_params({f"postprocess.{k}": v for k, v in post.to_dict().items()})
    run.log_metrics({"val_dice_plain": scores["val_dice_plain"],
                     "val_dice_postprocessed": scores["val_dice_postprocessed"]})
    atomic_write_json(best.parent / "postprocess.json", {"chosen": post.to_dict(), **scores})
    run.log_artifact(best.parent / "postprocess.json")
