"""Metric math: hand-computed cases, the empty-mask rule, agreement with MONAI, bootstrap CI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tumorseg.metrics import (
    Counts,
    bootstrap_ci,
    confusion,
    dice,
    iou,
    precision,
    recall,
    scores_from_counts,
)

Z = np.zeros((3, 4), dtype=np.uint8)
ONE = np.zeros((3, 4), dtype=np.uint8)
ONE[1, 2] = 1


# ----------------------------------------------------------------------------- confusion counts


def test_confusion_counts_exact_against_a_pixel_loop() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        shape = tuple(int(s) for s in rng.integers(1, 12, size=2))
        pred = rng.integers(0, 2, size=shape) * 255  # any non-zero value is foreground
        gt = rng.integers(0, 2, size=shape).astype(bool)
        tp = fp = fn = tn = 0
        for p, g in zip(pred.ravel(), gt.ravel(), strict=True):
            if p and g:
                tp += 1
            elif p:
                fp += 1
            elif g:
                fn += 1
            else:
                tn += 1
        assert confusion(pred, gt) == Counts(tp, fp, fn, tn)


def test_confusion_hand_case_and_addition() -> None:
    pred = np.array([[1, 0], [0, 1]])
    gt = np.array([[1, 0], [1, 1]])
    c = confusion(pred, gt)
    assert c == Counts(tp=2, fp=0, fn=1, tn=1)
    assert c + Counts(1, 2, 3, 4) == Counts(3, 2, 4, 5)


def test_confusion_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="shape"):
        confusion(np.zeros((2, 3)), np.zeros((3, 2)))


# ----------------------------------------------------------------------------- hand-computed scores


def test_known_overlap_dice_08_iou_two_thirds() -> None:
    c = confusion(np.array([[1, 0], [0, 1]]), np.array([[1, 0], [1, 1]]))
    assert dice(c) == pytest.approx(0.8, abs=1e-12)
    assert iou(c) == pytest.approx(2 / 3, abs=1e-12)
    assert precision(c) == 1.0
    assert recall(c) == pytest.approx(2 / 3)


def test_both_empty_is_nan_by_default_and_one_with_empty_both() -> None:
    c = confusion(Z, Z)
    assert c == Counts(0, 0, 0, 12)
    assert math.isnan(dice(c)) and math.isnan(iou(c))
    assert dice(c, "1") == 1.0 and iou(c, "1") == 1.0
    row = scores_from_counts(c)
    assert row["gt_empty"] is True and row["pred_empty"] is True
    assert math.isnan(row["precision"]) and math.isnan(row["recall"])  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", ["nan", "1"])
def test_prediction_on_empty_ground_truth_scores_zero(rule: str) -> None:
    c = confusion(ONE, Z)
    assert c == Counts(0, 1, 0, 11)
    assert dice(c, rule) == 0.0  # type: ignore[arg-type]
    assert iou(c, rule) == 0.0  # type: ignore[arg-type]
    row = scores_from_counts(c, rule)  # type: ignore[arg-type]
    assert row["gt_empty"] is True and row["pred_empty"] is False
    assert row["precision"] == 0.0 and math.isnan(row["recall"])  # type: ignore[arg-type]


@pytest.mark.parametrize("rule", ["nan", "1"])
def test_missed_tumour_scores_zero(rule: str) -> None:
    c = confusion(Z, ONE)
    assert c == Counts(0, 0, 1, 11)
    assert dice(c, rule) == 0.0  # type: ignore[arg-type]
    assert iou(c, rule) == 0.0  # type: ignore[arg-type]
    row = scores_from_counts(c, rule)  # type: ignore[arg-type]
    assert row["gt_empty"] is False and row["pred_empty"] is True
    assert row["recall"] == 0.0 and math.isnan(row["precision"])  # type: ignore[arg-type]


def test_perfect_prediction_scores_one() -> None:
    c = confusion(ONE, ONE)
    assert dice(c) == 1.0 and iou(c) == 1.0


def test_scores_row_has_all_per_case_columns() -> None:
    row = scores_from_counts(Counts(3, 1, 2, 10))
    assert list(row) == ["tp", "fp", "fn", "tn", "gt_pixels", "pred_pixels", "gt_empty", "pred_empty",
                         "dice", "iou", "precision", "recall"]
    assert row["gt_pixels"] == 5 and row["pred_pixels"] == 4
    assert row["dice"] == pytest.approx(6 / 9) and row["iou"] == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------- agreement with MONAI


def test_dice_and_iou_agree_with_monai_on_random_masks() -> None:
    import torch
    from monai.metrics import compute_dice, compute_iou

    rng = np.random.default_rng(0)
    n = 300
    preds, gts = [], []
    for i in range(n):
        h, w = (int(s) for s in rng.integers(4, 40, size=2))
        density_p, density_g = rng.uniform(0, 0.6, size=2)
        gt = (rng.random((h, w)) < density_g).astype(np.uint8)
        if i % 10 == 0:
            pred = np.zeros((h, w), np.uint8)  # empty prediction on a non-empty ground truth
        elif i % 10 == 1:
            pred = gt.copy()  # perfect
        else:
            pred = (rng.random((h, w)) < density_p).astype(np.uint8)
        if i % 25 == 2:
            gt = np.zeros((h, w), np.uint8)  # empty ground truth: MONAI is only compared where GT is non-empty
        preds.append(pred)
        gts.append(gt)
    compared = 0
    for pred, gt in zip(preds, gts, strict=True):
        c = confusion(pred, gt)
        yp = torch.from_numpy(pred[None, None].astype(np.float32))
        yg = torch.from_numpy(gt[None, None].astype(np.float32))
        if not gt.any():  # our rule, not MONAI's: a prediction on empty GT scores 0, both empty NaN
            if pred.any():
                assert dice(c) == 0.0 and iou(c) == 0.0
            else:
                assert math.isnan(dice(c)) and math.isnan(iou(c))
            continue
        m_dice = float(compute_dice(yp, yg, include_background=True, ignore_empty=False).item())
        m_iou = float(compute_iou(yp, yg, include_background=True, ignore_empty=False).item())
        assert dice(c) == pytest.approx(m_dice, abs=1e-6)
        assert iou(c) == pytest.approx(m_iou, abs=1e-6)
        compared += 1
    assert compared >= 280


# ----------------------------------------------------------------------------- bootstrap CI


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_more_data() -> None:
    rng = np.random.default_rng(3)
    small = rng.uniform(0.3, 0.9, size=20)
    large = rng.uniform(0.3, 0.9, size=2000)
    lo_s, hi_s = bootstrap_ci(small, n=2000, seed=0)
    lo_l, hi_l = bootstrap_ci(large, n=2000, seed=0)
    assert lo_s < small.mean() < hi_s
    assert lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3  # ~sqrt(100) = 10x narrower in expectation
    # the standard error of the mean of U(0.3, 0.9) with n=2000 is 0.6/sqrt(12)/sqrt(2000) ~ 0.0039
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * 0.6 / math.sqrt(12) / math.sqrt(2000), rel=0.2)


def test_bootstrap_ci_is_seeded_ignores_nan_and_handles_degenerate_input() -> None:
    v = np.array([0.2, 0.4, np.nan, 0.9, 0.5])
    assert bootstrap_ci(v, n=500, seed=7) == bootstrap_ci(v, n=500, seed=7)
    assert bootstrap_ci(v, n=500, seed=7) == bootstrap_ci(v[np.isfinite(v)], n=500, seed=7)
    assert bootstrap_ci(np.full(10, 0.7), n=100) == pytest.approx((0.7, 0.7))
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([np.nan, np.nan])))
    assert all(math.isnan(x) for x in bootstrap_ci(np.array([0.5]), n=0))
