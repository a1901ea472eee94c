"""Metric math: hand-computed cases, the empty-mask rules, surface distances, agreement with MONAI, bootstrap CI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tumorseg.metrics import (
    Counts,
    bootstrap_ci,
    confusion,
    dice,
    image_diagonal,
    iou,
    precision,
    recall,
    scores_from_counts,
    surface_distances,
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


# ----------------------------------------------------------------------------- surface distances, by hand


def _squares(offset: int) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((32, 32), np.uint8)
    gt[10:20, 10:20] = 1
    pred = np.zeros_like(gt)
    pred[10:20, 10 + offset : 20 + offset] = 1
    return pred, gt


def test_hd95_of_two_squares_offset_by_three_pixels() -> None:
    # Each 10x10 square has a 36-pixel boundary ring. From the shifted ring to the other: 14 pixels at 0, four at
    # 1, four at 2 and 14 at 3 px (the far column, the overhanging corners, the middle of the near column).
    # p95 of those 36 distances (numpy's linear rule: position 0.95 * 35 = 33.25) is 3; the other direction mirrors
    # it. ASSD = (4*1 + 4*2 + 14*3) / 36 = 1.5.
    pred, gt = _squares(3)
    hd95, assd = surface_distances(pred, gt)
    assert hd95 == pytest.approx(3.0) and assd == pytest.approx(1.5)
    assert surface_distances(gt, gt) == (0.0, 0.0)


def test_hd95_is_the_max_of_the_two_directed_percentiles_not_the_pooled_one() -> None:
    # ground truth: one pixel; prediction: a 21-pixel line starting on it.
    # prediction -> truth: 0, 1, ..., 20 -> p95 = 0.95 * 20 = 19; truth -> prediction: 0 -> p95 = 0.
    # HD95 = max(19, 0) = 19. medpy pools the 22 distances [0, 0, 1, ..., 20]: p95 = 18.95 (it would differ).
    gt = np.zeros((40, 40), np.uint8)
    gt[5, 5] = 1
    pred = np.zeros_like(gt)
    pred[5, 5:26] = 1
    hd95, assd = surface_distances(pred, gt)
    assert hd95 == pytest.approx(19.0)
    assert assd == pytest.approx(sum(range(21)) / 22, rel=1e-6)  # both directions together: 210 / 22
    pooled = float(np.percentile([0, *range(21)], 95))
    assert pooled == pytest.approx(18.95) and hd95 != pytest.approx(pooled)


def test_surface_distances_use_an_anisotropic_spacing() -> None:
    # the same squares with pixels 0.5 (rows) x 2.0 (columns) mm, offset 3 columns = 6 mm: the far column is 6 mm
    # away, the near column's pixels reach the rows above/below at 0.5-2 mm. Distances (mm) from the shifted ring:
    # 14 at 0; 0.5, 1, 1.5 twice each; 2 four times; 4 twice; 6 ten times -> p95 = 6, ASSD = 82 / 36.
    pred, gt = _squares(3)
    hd95, assd = surface_distances(pred, gt, spacing=(0.5, 2.0))
    assert hd95 == pytest.approx(6.0) and assd == pytest.approx(82 / 36, rel=1e-6)
    hd95_t, _ = surface_distances(pred, gt, spacing=(2.0, 0.5))  # the offset now runs along 0.5 mm pixels
    assert hd95_t == pytest.approx(1.5)


def test_hd95_of_empty_masks_nan_or_the_image_diagonal() -> None:
    pred, gt = _squares(0)
    empty = np.zeros_like(gt)
    for p, g in ((empty, gt), (pred, empty), (empty, empty)):  # missed tumour, false positive, both empty
        assert all(math.isnan(v) for v in surface_distances(p, g))
    diag = math.sqrt(32**2 + 32**2)  # 45.25 px
    assert image_diagonal((32, 32)) == pytest.approx(diag)
    assert surface_distances(empty, gt, hd95_empty="diagonal")[0] == pytest.approx(diag)
    assert surface_distances(pred, empty, hd95_empty="diagonal")[0] == pytest.approx(diag)
    assert math.isnan(surface_distances(pred, empty, hd95_empty="diagonal")[1])  # ASSD stays NaN
    assert math.isnan(surface_distances(empty, empty, hd95_empty="diagonal")[0])  # both empty: not a miss
    # in mm: 32 rows of 0.5 mm and 32 columns of 2 mm -> sqrt(16^2 + 64^2)
    assert surface_distances(empty, gt, (0.5, 2.0), "diagonal")[0] == pytest.approx(math.sqrt(16**2 + 64**2))
    assert image_diagonal((240, 240, 155)) == pytest.approx(373.13, abs=0.01)  # BraTS' penalty


def test_surface_distances_agree_with_monai_directed_percentiles() -> None:
    import torch
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(4)
    for _ in range(10):
        gt = (rng.random((24, 30)) < 0.3).astype(np.uint8)
        pred = (rng.random((24, 30)) < 0.3).astype(np.uint8)
        yp, yg = (torch.from_numpy(a[None, None].astype(np.float32)) for a in (pred, gt))
        directed = [float(compute_hausdorff_distance(a, b, include_background=True, percentile=95, directed=True,
                                                     spacing=[1.5, 0.7]).item()) for a, b in ((yp, yg), (yg, yp))]
        assert surface_distances(pred, gt, (1.5, 0.7))[0] == pytest.approx(max(directed), rel=1e-6)


def test_pixel_accuracy_by_hand() -> None:
    from tumorseg.metrics import confusion_matrix, pixel_accuracy

    gt = np.array([[0, 1, 1], [2, 2, 0], [0, 0, 0]])
    pred = np.array([[0, 1, 2], [2, 2, 0], [1, 0, 0]])
    overall, per_class = pixel_accuracy(confusion_matrix(pred, gt, 4))
    assert overall == pytest.approx(7 / 9)  # 7 of 9 pixels right
    assert per_class[:3] == pytest.approx([4 / 5, 1 / 2, 1.0]) and np.isnan(per_class[3])  # class 3 absent
