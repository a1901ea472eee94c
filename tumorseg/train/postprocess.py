"""Post-processing chosen on val after training, as nnU-Net's ``determine_postprocessing``.

The best checkpoint predicts val once plainly and once with mirroring (streamed, case by case); every combination of
mirroring, probability threshold, smallest peak probability of a kept component (binary models: hysteresis
thresholding, boundaries at the threshold, existence at the peak) and component filter (keep all, keep the
largest, drop components smaller than half the smallest val tumour) is scored by mean val Dice (the same
Dice per unit as validation, a case or a group with pooled counts, so a false positive on a tumour-free
unit counts as 0). Where val holds ordered slice stacks, each rule is also tried on the stacks' 3D components
(``volumetric``: a speck on a tumour-free slice is a component of its own, where a tumour continues over its
neighbours; :meth:`tumorseg.postprocessing.Postprocess.stack_masks`). A choice
is kept only when it beats the plain prediction at threshold 0.5 by more than ``MIN_GAIN``, and
small components are dropped whenever that costs nothing on val (:func:`pick`);
it is stored in the checkpoint, so evaluate, predict and the MLflow model apply the same one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import replace
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from tumorseg import checkpoint
from tumorseg.config import TrainConfig
from tumorseg.fsutil import atomic_write_json
from tumorseg.labels import Classes
from tumorseg.postprocessing import Postprocess, StackBuffer, component_peaks, components
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
    """Pixels (voxels, for stacked masks) of the smallest connected tumour component in ``masks`` (0: none).

    Label maps count each class's components on their own.
    """
    from skimage.measure import label

    sizes = [int(n) for m in masks if m.any() for n in np.bincount(label(m, connectivity=m.ndim).ravel())[1:]]
    return min(sizes) if sizes else 0


def smallest_tumours(val: Split, stacks: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Pixels of the smallest tumour component of a val case, and voxels of the smallest in a val stack (0: none).

    One pass over the val masks; a stack's masks are held until its last slice has been read.
    """
    buffer: StackBuffer[int, np.ndarray] = StackBuffer(stacks)
    pixels, voxels = [], []
    for i in range(len(val)):
        gt = val.original_mask(i)
        pixels.append(smallest_tumour([gt]))
        for group in buffer.add(i, gt):
            if len(group) > 1 and len({m.shape for _, m in group}) == 1:
                voxels.append(smallest_tumour([np.stack([m for _, m in group])]))
    pixels, voxels = [n for n in pixels if n], [n for n in voxels if n]
    return (min(pixels) if pixels else 0), (min(voxels) if voxels else 0)


def search_passes(cfg: TrainConfig) -> float:
    """The network passes over val the search makes, in validations: the plain one and one per mirroring.

    Four mirrorings for both axes of an image, eight for the three axes of a volume (nnU-Net's mirroring).
    """
    mirrors = len(mirror_dims(cfg))
    return 1.0 + (2.0**mirrors if mirrors else 0.0)


def mirror_dims(cfg: TrainConfig) -> tuple[int, ...]:
    """The batch dims the search mirrors: ``augment.flip_dims`` that the data have (an image has no depth)."""
    return tuple(dim for dim in cfg.augment.flip_dims if dim < 2 + cfg.spatial_dims)


def scoring_seconds(val: Split, cfg: TrainConfig, classes: Classes, stacks: Sequence[Sequence[int]] = ()) -> float:
    """Seconds the search will spend scoring its candidates on all of val, measured on one case (and one stack).

    The real candidate grid is scored on the first val case with tumour, its truth standing in for the
    probabilities: the component labelling at the original resolution, which dominates the search on
    large images and volumes (a volume's 3D labelling costs seconds where its network pass costs less
    than one). Where val holds slice stacks, the volumetric candidates are timed on the first stack the
    same way and scaled by the slices in stacks.
    """
    import time

    n = len(val)
    i = next((j for j in range(min(n, 64)) if np.any(val.original_mask(j))), 0)
    gt = val.original_mask(i)
    pixels = smallest_tumour([gt])
    grid = candidates(cfg, classes, pixels)
    prob = as_probabilities(gt, classes)
    t0 = time.perf_counter()
    flat_counts(grid, prob, prob, gt, classes)
    seconds = n * (time.perf_counter() - t0)
    runs = [list(run) for run in stacks if len(run) > 1]
    if runs:
        group = []
        for j in runs[0]:
            g = val.original_mask(j)
            p = as_probabilities(g, classes)
            group.append((j, (p, p, g, None)))
        t0 = time.perf_counter()
        stack_counts(volumetric_candidates(grid, max(1, pixels)), group, classes)
        seconds += (time.perf_counter() - t0) * sum(len(run) for run in runs) / len(runs[0])
    return seconds


def as_probabilities(gt: np.ndarray, classes: Classes) -> np.ndarray:
    """A truth mask as the probabilities a model sure of it would give (what :func:`scoring_seconds` scores)."""
    prob = np.stack([gt == k for k in range(classes.out_channels)]) if classes.multiclass else gt > 0
    return prob.astype(np.float32)


def volumetric_candidates(grid: list[tuple[bool, float, Postprocess]], voxels: int
                          ) -> list[tuple[bool, float, Postprocess]]:
    """The component rules of ``grid`` over a stack's 3D components.

    Keep-all without a confidence floor is the plain mask, so it is left out.
    """
    return [(tta, threshold, replace(post, volumetric=True,
                                     min_size=max(1, voxels // 2) if post.keep == "min_size" else 0))
            for tta, threshold, post in grid if post.keep != "all" or post.min_confidence > 0]


def candidates(cfg: TrainConfig, classes: Classes, pixels: int) -> list[tuple[bool, float, Postprocess]]:
    """The slice-by-slice candidates: (mirrored, threshold, post-processing) for every combination."""
    keeps: tuple[Literal["all", "largest", "min_size"], ...] = ("all", "largest", "min_size")
    thresholds = (cfg.threshold,) if classes.softmax else THRESHOLDS
    confidences = (0.0,) if classes.multiclass else CONFIDENCES
    ttas = (False, True) if mirror_dims(cfg) else (False,)  # no axis to mirror: no second val pass
    return [(tta, threshold, Postprocess(threshold=threshold, keep=keep, min_size=max(1, pixels // 2)
                                         if keep == "min_size" else 0, tta=tta, min_confidence=conf))
            for tta, threshold in product(ttas, thresholds) for conf in confidences for keep in keeps]


def choose(net: torch.nn.Module, val: Split, cfg: TrainConfig, device: torch.device,
           classes: Classes | None = None, units: np.ndarray | None = None,
           stacks: Sequence[Sequence[int]] = ()) -> tuple[Postprocess, dict[str, Any]]:
    """The post-processing that maximises mean val (foreground) Dice, and the scores behind the choice.

    One streaming pass: each case is predicted plainly and mirrored, every candidate scored on it,
    and only the running sums kept, so memory does not grow with the number of val cases (a stack's
    probabilities are held until its last slice has been predicted). A multi-class model takes the argmax
    (no threshold to choose; a region-based one thresholds its regions); the component rule applies per
    class. ``units`` pools the counts per group, as validation does. ``stacks`` (val indices in slice order)
    adds the volumetric candidates: the component rules over each stack's 3D components.
    """
    classes = classes or Classes()
    stacks = [list(run) for run in stacks if len(run) > 1]
    pixels, voxels = smallest_tumours(val, stacks)
    base = Postprocess(threshold=cfg.threshold)
    grid = candidates(cfg, classes, pixels)
    mirrored_pass = bool(mirror_dims(cfg))
    if stacks:  # the same rules on 3D components
        grid += volumetric_candidates(grid, voxels)
    n_flat = sum(not post.volumetric for _, _, post in grid)
    # per candidate, unit and tumour class: pooled tp/fp/fn; candidate 0: the plain prediction
    tally = Tally(len(val), classes, units, candidates=len(grid) + 1)
    plain_probs = val_probabilities(net, val, cfg, device, tta=False, softmax=classes.softmax)
    mirrored_probs = (val_probabilities(net, val, cfg, device, tta=True, softmax=classes.softmax) if mirrored_pass
                      else None)
    buffer: StackBuffer[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = StackBuffer(stacks)
    for i, plain in enumerate(plain_probs):
        mirrored = next(mirrored_probs) if mirrored_probs is not None else plain
        gt = val.original_mask(i)
        flat = np.asarray([case_counts(base.mask(plain, classes), gt, classes),
                           *flat_counts(grid[:n_flat], plain, mirrored, gt, classes)])
        for group in buffer.add(i, (plain, mirrored, gt, flat)):
            volumetric = stack_counts(grid[n_flat:], group, classes)
            for j, (case, (*_, counts)) in enumerate(group):
                tally.add(case, np.concatenate([counts, volumetric[j]]) if len(volumetric) else counts)
    sums = tally.sums()
    means = [class_means(row, classes)[0] for row in sums]
    base_score = means[0]
    table = {f"tta={int(tta)},t={threshold},conf={post.min_confidence},keep={post.keep}"
             + (",volumetric=1" if post.volumetric else ""): score
             for (tta, threshold, post), score in zip(grid, means[1:], strict=True)}
    best, best_score = pick([(post, score) for (_, _, post), score in zip(grid, means[1:], strict=True)],
                            base, base_score)
    log.info("post-processing on val: %s (val Dice %.4f, plain %.4f)", best.to_dict(), best_score, base_score)
    return best, {"val_dice_plain": base_score, "val_dice_postprocessed": best_score, "candidates": table}


def flat_counts(grid: list[tuple[bool, float, Postprocess]], plain: np.ndarray, mirrored: np.ndarray,
                gt: np.ndarray, classes: Classes) -> list[np.ndarray]:
    """``(K, 3)`` counts of each slice-by-slice candidate on one case (components labelled once per threshold)."""
    out = []
    labelled: dict[tuple[bool, float], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for tta, threshold, post in grid:
        prob = mirrored if tta else plain
        if classes.multiclass:
            out.append(case_counts(post.mask(prob, classes), gt, classes))
            continue
        key = (tta, threshold)
        if key not in labelled:
            labels, sizes = components(prob > threshold)
            labelled[key] = (labels, sizes, component_peaks(labels, sizes, prob))
        out.append(case_counts(post.filter(*labelled[key]), gt, classes))
    return out


def stack_counts(grid: list[tuple[bool, float, Postprocess]], group: list[tuple[Any, Any]],
                 classes: Classes) -> np.ndarray:
    """``(cases, candidates, K, 3)`` counts of each volumetric candidate on each case of a stack (or lone case).

    A binary model's candidates share one 3D labelling per (mirroring, threshold): each component's voxels
    and true positives are counted per slice once, and a candidate's counts are the sums over the
    components it keeps.
    """
    n = len(group)
    if not grid:
        return np.zeros((n, 0, len(classes.foreground), 3))
    plains = [item[0] for _, item in group]
    mirrors = [item[1] for _, item in group]
    gts = [item[2] for _, item in group]
    if classes.multiclass or n == 1 or len({p.shape for p in plains}) != 1:
        per_candidate = [post.stack_masks(mirrors if tta else plains, classes) for tta, _, post in grid]
        return np.asarray([[case_counts(masks[j], gts[j], classes) for masks in per_candidate] for j in range(n)])
    truth = np.stack([g > 0 for g in gts])
    gt_per_slice = truth.reshape(n, -1).sum(axis=1)
    out = np.zeros((n, len(grid), 1, 3))
    labelled: dict[tuple[bool, float], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
    for c, (tta, threshold, post) in enumerate(grid):
        key = (tta, threshold)
        if key not in labelled:
            prob = np.stack(mirrors if tta else plains)
            labels, sizes = components(prob > threshold)
            m = sizes.size
            index = (np.arange(n)[:, None] * m + labels.reshape(n, -1)).ravel()
            voxels = np.bincount(index, minlength=n * m).reshape(n, m)
            hits = np.bincount(index, weights=truth.ravel(), minlength=n * m).reshape(n, m)
            labelled[key] = (sizes, component_peaks(labels, sizes, prob), voxels, hits)
        sizes, peaks, voxels, hits = labelled[key]
        alive = post.alive(sizes, peaks).astype(np.float64)
        tp, predicted = hits @ alive, voxels @ alive
        out[:, c, 0] = np.stack([tp, predicted - tp, gt_per_slice - tp], axis=1)
    return out


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
            if (post.keep == "min_size" and (post.tta, post.threshold, post.min_confidence, post.volumetric)
                    == (best.tta, best.threshold, best.min_confidence, best.volumetric)
                    and math.isfinite(score) and score >= best_score - 1e-9):
                return post, score
    return best, best_score


def choose_and_store(run: Run, best: Path, cfg: TrainConfig, val_data: Split, device: torch.device,
                     units: np.ndarray | None = None, stacks: Sequence[Sequence[int]] = ()) -> None:
    """Choose threshold, mirroring and component filter on val; store the choice in ``best.pt``."""
    from tumorseg.inference import Segmenter

    seg = Segmenter.from_checkpoint(best, device=device.type)
    post, scores = choose(seg.net, val_data, cfg, device, seg.classes, units, stacks)
    ckpt = checkpoint.load(best)
    ckpt["postprocess"] = post.to_dict()
    checkpoint.save(best, ckpt)
    run.log_params({f"postprocess.{k}": v for k, v in post.to_dict().items()})
    run.log_metrics({"val_dice_plain": scores["val_dice_plain"],
                     "val_dice_postprocessed": scores["val_dice_postprocessed"]})
    atomic_write_json(best.parent / "postprocess.json", {"chosen": post.to_dict(), **scores})
    run.log_artifact(best.parent / "postprocess.json")
