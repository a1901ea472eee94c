"""The best checkpoint and early stopping follow the val Dice smoothed over epochs, not one lucky epoch."""

from __future__ import annotations

from pathlib import Path

import pytest

from tumorseg.config import TrainConfig
from tumorseg.train.validation import best_smoothed, smooth, val_span


def test_smoothing_is_an_exponential_moving_average_of_the_span() -> None:
    assert smooth([], 0.6, 5) == 0.6  # the first epoch is its own average
    # span 3: the new epoch weighs 2 / (3 + 1) = 0.5
    assert smooth([{"val_dice": 0.6, "val_dice_smoothed": 0.6}], 0.9, 3) == pytest.approx(0.75)
    # span 9: 0.2 * 0.1 + 0.8 * 0.9 = 0.74 (a speck on every tumour-free image moves it little)
    assert smooth([{"val_dice_smoothed": 0.9}], 0.1, 9) == pytest.approx(0.74)
    assert smooth([{"val_dice_smoothed": 0.6}], 0.9, 1) == 0.9  # span 1: the raw Dice
    assert smooth([{"val_dice_smoothed": 0.6}], -1.0, 3) == -1.0  # no val split: nothing to average


def test_the_span_is_a_tenth_of_the_epochs_unless_set() -> None:
    assert [val_span(TrainConfig(epochs=e, plan="off")) for e in (1, 3, 14, 15, 48, 87)] == [1, 1, 1, 2, 5, 9]
    assert val_span(TrainConfig(epochs=48, val_window=1, plan="off")) == 1


def test_best_smoothed_reads_old_histories() -> None:
    rows = [{"val_dice": 0.5}, {"val_dice": 0.7}]  # a checkpoint written before smoothing
    assert best_smoothed(rows, 2) == 0.7
    assert best_smoothed(rows, 0) == -1.0
    assert best_smoothed([{"val_dice": 0.5, "val_dice_smoothed": 0.45}], 1) == 0.45


def test_a_run_keeps_the_epoch_with_the_best_smoothed_dice(manifest: Path, tmp_path: Path) -> None:
    from tumorseg import train
    from tumorseg.checkpoint import load

    cfg = TrainConfig.model_validate({
        "manifest": str(manifest), "out": str(tmp_path), "run_name": "smooth", "plan": "off", "epochs": 6,
        "batch_size": 4, "image_size": [64, 64], "model": {"channels": [8, 16, 32], "num_res_units": 1},
        "log_model": False, "val_overlays": 0, "val_window": 3, "early_stopping_patience": 50,
    })
    res = train.run(cfg)
    history = load(tmp_path / "smooth" / "last.pt")["history"]
    assert len(history) == 6
    expected = history[0]["val_dice"]
    for row in history:  # every epoch's smoothed value follows the rule from the raw ones
        expected = expected if row is history[0] else 0.5 * row["val_dice"] + 0.5 * expected
        assert row["val_dice_smoothed"] == pytest.approx(expected)
    smoothed = [row["val_dice_smoothed"] for row in history]
    assert res.best_epoch == smoothed.index(max(smoothed)) + 1  # the first epoch that reached the best average
    assert res.best_val_dice == pytest.approx(history[res.best_epoch - 1]["val_dice"])  # what that model scored
    best = load(tmp_path / "smooth" / "best.pt")
    assert best["epoch"] == res.best_epoch and best["best_val_dice"] == pytest.approx(res.best_val_dice)


def test_each_epoch_logs_tumour_case_dice_and_the_false_positive_rate(manifest: Path, tmp_path: Path,
                                                                      mlflow_uri: str) -> None:
    import mlflow

    from tumorseg import train
    from tumorseg.checkpoint import load
    from tumorseg.manifest import load_manifest, select_split

    _, df = load_manifest(manifest)
    val = select_split(df, "val", manifest)
    n_tumour, n_free = int(val["has_tumour"].sum()), int((~val["has_tumour"]).sum())
    assert n_tumour and n_free  # the fixture's val split holds both kinds
    cfg = TrainConfig.model_validate({
        "manifest": str(manifest), "out": str(tmp_path), "run_name": "cases", "plan": "off", "epochs": 3,
        "batch_size": 4, "image_size": [64, 64], "model": {"channels": [8, 16, 32], "num_res_units": 1},
        "log_model": False, "val_overlays": 0, "val_unit": "case",  # the fixture's patients hold several slices
    })
    res = train.run(cfg)
    history = load(tmp_path / "cases" / "last.pt")["history"]
    for row in history:
        assert 0 <= row["val_dice_tumour"] <= 1 and row["val_fp_rate"] in {k / n_free for k in range(n_free + 1)}
        # a tumour-free case counts only when it has a false positive (then as 0): the val Dice follows exactly
        counted = n_tumour + row["val_fp_rate"] * n_free
        assert row["val_dice"] == pytest.approx(row["val_dice_tumour"] * n_tumour / counted)
        assert row["val_dice_case"] == row["val_dice"]  # selection per case: the same figure
    client = mlflow.MlflowClient(mlflow_uri)
    for key in ("val_dice_tumour", "val_fp_rate"):
        logged = [m.value for m in client.get_metric_history(res.mlflow_run_id, key)]
        assert logged == pytest.approx([row[key] for row in history]), key
