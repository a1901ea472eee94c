"""Score tables of ``tumorseg evaluate``: per case, per group, the summary, the gallery of worst and best cases.

Binary models get one row per case. Multi-class models get one row per case and tumour class
(the ``label`` column), scored with the same counts and the same empty rule per class; their
summary holds each class's numbers under ``classes`` and, at the top, the mean over the tumour
classes (what promotion compares).
"""

from __future__ import annotations

import heapq
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import EvaluateConfig
from tumorseg.metrics import (
    EMPTY_RULES,
    Counts,
    bootstrap_ci,
    distribution,
    finite_stat,
    scores_from_counts,
    surface_summary,
)

if TYPE_CHECKING:
    import pandas as pd

COUNT_COLUMNS = ["tp", "fp", "fn", "tn", "gt_pixels", "pred_pixels"]
SCORE_COLUMNS = ["gt_empty", "pred_empty", "dice", "iou", "precision", "recall"]
PER_CASE_COLUMNS = ["case_id", "group", "split", *COUNT_COLUMNS, *SCORE_COLUMNS]
SURFACE_COLUMNS = ["hd95", "assd"]
PER_GROUP_COLUMNS = ["group", "n_cases", *COUNT_COLUMNS, *SCORE_COLUMNS]
CLASS_MEANS = ("dice_mean", "dice_median", "dice_mean_tumour", "iou_mean", "dice_global", "iou_global",
               "dice_group_mean", "iou_group_mean")
"""Summary keys that a multi-class summary reports at the top as the mean over the tumour classes."""



class Gallery:
    """The ``k`` worst and ``k`` best cases by Dice (NaN cases skipped), kept while streaming."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._worst: list[tuple[float, int, tuple[Any, ...]]] = []  # max-heap on Dice via -dice
        self._best: list[tuple[float, int, tuple[Any, ...]]] = []  # min-heap on Dice

    def offer(self, dice: float, index: int, item: tuple[Any, ...]) -> None:
        """Consider one case."""
        if not math.isfinite(dice):
            return
        if len(self._worst) < self.k:
            heapq.heappush(self._worst, (-dice, -index, item))
        elif -dice > self._worst[0][0]:
            heapq.heapreplace(self._worst, (-dice, -index, item))
        if len(self._best) < self.k:
            heapq.heappush(self._best, (dice, index, item))
        elif dice > self._best[0][0]:
            heapq.heapreplace(self._best, (dice, index, item))

    def items(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
        """Worst first (ascending Dice), then best (descending), each case once, titled to fit their panel."""
        from tumorseg.review import panel_title

        worst = sorted(((-d, -i, it) for d, i, it in self._worst), key=lambda t: (t[0], t[1]))
        best = sorted(self._best, key=lambda t: (-t[0], t[1]))
        out: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
        seen: set[int] = set()
        for label, group in (("worst", worst), ("best", best)):
            for d, i, (image, gt, pred, case_id) in group:
                if i in seen:
                    continue
                seen.add(i)
                title = panel_title(label, case_id, d, gt_empty=not gt.any(), pred_pixels=int(np.count_nonzero(pred)))
                out.append((image, gt, pred, title))
        return out


def per_group_table(per_case: pd.DataFrame, empty_both: str) -> pd.DataFrame:
    """Sum the counts per group (and class) and score the sums (volumetric Dice/IoU per patient)."""
    import pandas as pd

    by_label = "label" in per_case.columns
    keys = ["group", "label"] if by_label else ["group"]
    rows = []
    for key, sub in per_case.groupby(keys, sort=False):
        c = Counts(int(sub["tp"].sum()), int(sub["fp"].sum()), int(sub["fn"].sum()), int(sub["tn"].sum()))
        ident = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        rows.append({**ident, "n_cases": len(sub), **scores_from_counts(c, empty_both)})  # type: ignore[arg-type]
    columns = ["group", "label", *PER_GROUP_COLUMNS[1:]] if by_label else PER_GROUP_COLUMNS
    out = pd.DataFrame(rows, columns=columns)
    return out.sort_values("group", kind="stable").reset_index(drop=True)


def summarize(per_case: pd.DataFrame, per_group: pd.DataFrame, cfg: EvaluateConfig,
              surface_unit: str = "pixels") -> dict[str, Any]:
    """Compute the numbers of ``summary.json`` from the two tables (``surface_unit``: what HD95/ASSD are in)."""
    from tumorseg.metrics import dice, iou

    dice_v = per_case["dice"].to_numpy(dtype=np.float64)
    iou_v = per_case["iou"].to_numpy(dtype=np.float64)
    pooled = Counts(*(int(per_case[k].sum()) for k in ("tp", "fp", "fn", "tn")))
    gt_empty = per_case["gt_empty"].to_numpy(dtype=bool)
    pred_empty = per_case["pred_empty"].to_numpy(dtype=bool)
    n_gt_empty = int(gt_empty.sum())
    ci_low, ci_high = bootstrap_ci(dice_v, n=cfg.bootstrap, seed=cfg.seed)
    group_dice = per_group["dice"].to_numpy(dtype=np.float64)
    out: dict[str, Any] = {
        "n_cases": len(per_case),
        "n_scored": int(np.isfinite(dice_v).sum()),
        "n_gt_empty": n_gt_empty,
        "n_both_empty": int((gt_empty & pred_empty).sum()),
        "n_groups": len(per_group),
        **distribution(dice_v, "dice"),
        "dice_mean_tumour": finite_stat(dice_v[~gt_empty], np.mean),
        **distribution(iou_v, "iou"),
        "dice_ci_low": ci_low,
        "dice_ci_high": ci_high,
        "ci_level": 0.95,
        "bootstrap_samples": cfg.bootstrap,
        "dice_global": dice(pooled, cfg.empty_both),
        "iou_global": iou(pooled, cfg.empty_both),
        "dice_group_mean": finite_stat(group_dice, np.mean),
        "iou_group_mean": finite_stat(per_group["iou"].to_numpy(dtype=np.float64), np.mean),
        "n_fp_empty": int((gt_empty & ~pred_empty).sum()),
        "fp_rate_empty": float((gt_empty & ~pred_empty).sum() / n_gt_empty) if n_gt_empty else float("nan"),
        "empty_both": cfg.empty_both,
        "empty_rule": EMPTY_RULES[cfg.empty_both],
    }
    if cfg.surface:
        out.update(surface_summary(per_case["hd95"].to_numpy(dtype=np.float64),
                                   per_case["assd"].to_numpy(dtype=np.float64), gt_empty, pred_empty,
                                   cfg.hd95_empty, surface_unit))
    return out


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> ``None`` so ``summary.json`` is strict JSON."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float | np.floating) and not math.isfinite(float(obj)):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False, lineterminator="\n", float_format="%.10g").encode("utf-8")




def summarize_classes(per_case: pd.DataFrame, per_group: pd.DataFrame, cfg: EvaluateConfig, names: list[str],
                      surface_unit: str = "pixels") -> dict[str, Any]:
    """A multi-class ``summary.json``: each tumour class summarised, and at the top the mean over the classes.

    Each class is summarised on its own rows; the top holds the mean over the classes
    (:data:`CLASS_MEANS`); case counts, the false-positive rate on tumour-free cases and
    the bootstrap CI are per case (a case is tumour-free when it holds no class; its CI resamples each
    case's mean Dice over the classes).
    """
    classes = {name: summarize(per_case[per_case["label"] == name], per_group[per_group["label"] == name],
                               cfg, surface_unit) for name in names}
    cases = per_case.groupby("case_id", sort=False)
    gt_empty = cases["gt_empty"].all().to_numpy(dtype=bool)
    pred_empty = cases["pred_empty"].all().to_numpy(dtype=bool)
    case_dice = cases["dice"].mean().to_numpy(dtype=np.float64)  # NaN classes skipped; all NaN -> NaN
    ci_low, ci_high = bootstrap_ci(case_dice, n=cfg.bootstrap, seed=cfg.seed)
    n_gt_empty = int(gt_empty.sum())
    out: dict[str, Any] = {
        "n_cases": int(len(gt_empty)),
        "n_classes": len(names),
        "n_scored": int(np.isfinite(case_dice).sum()),
        "n_gt_empty": n_gt_empty,
        "n_both_empty": int((gt_empty & pred_empty).sum()),
        "n_groups": int(per_group["group"].nunique()),
        **{key: finite_stat(np.array([classes[n][key] for n in names], dtype=np.float64), np.mean)
           for key in CLASS_MEANS},
        "dice_ci_low": ci_low,
        "dice_ci_high": ci_high,
        "ci_level": 0.95,
        "bootstrap_samples": cfg.bootstrap,
        "n_fp_empty": int((gt_empty & ~pred_empty).sum()),
        "fp_rate_empty": float((gt_empty & ~pred_empty).sum() / n_gt_empty) if n_gt_empty else float("nan"),
        "empty_both": cfg.empty_both,
        "empty_rule": EMPTY_RULES[cfg.empty_both],
        "mean_over": "tumour classes (each class's score, then their mean)",
        "classes": classes,
    }
    for name in names:
        out.update({f"dice_mean_{name}": classes[name]["dice_mean"]})
    return out


def pixel_accuracy_summary(per_case: pd.DataFrame, matrix: np.ndarray | None, names: list[str]) -> dict[str, Any]:
    """``pixel_accuracy`` over all the split's pixels and ``pixel_accuracy_<class>`` per class (background too).

    A binary model's come from the per-case counts (background right: ``tn``; tumour right: ``tp``), a
    multi-class model's from its pixel confusion matrix of the labels.
    """
    from tumorseg.metrics import PIXEL_ACCURACY_NOTE, pixel_accuracy

    if matrix is None:
        tp, fp, fn, tn = (int(per_case[k].sum()) for k in ("tp", "fp", "fn", "tn"))
        matrix = np.array([[tn, fp], [fn, tp]], dtype=np.int64)
        names = ["background", "tumour"]
    overall, per_class = pixel_accuracy(matrix)
    return {"pixel_accuracy": overall, **{f"pixel_accuracy_{n}": v for n, v in zip(names, per_class, strict=True)},
            "pixel_accuracy_note": PIXEL_ACCURACY_NOTE}


def confusion_table(matrix: np.ndarray, names: list[str]) -> pd.DataFrame:
    """``confusion.csv``: one row per true class, one column per predicted class (pixel counts)."""
    import pandas as pd

    return pd.DataFrame({"true": names, **{f"pred_{n}": matrix[:, j] for j, n in enumerate(names)}})
