"""Selection by the unit users report: per-group (volumetric) Dice when groups hold several cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tumorseg.config import TrainConfig
from tumorseg.labels import Classes
from tumorseg.planning.stacks import selection_unit
from tumorseg.train.validation import Tally, case_counts, class_means, group_units, val_units


def disk(n_pixels: int, size: int = 20) -> np.ndarray:
    """A mask with exactly ``n_pixels`` foreground pixels (row-major from the top left)."""
    m = np.zeros(size * size, np.uint8)
    m[:n_pixels] = 1
    return m.reshape(size, size)


def part(gt: np.ndarray, n_pixels: int) -> np.ndarray:
    """The first ``n_pixels`` foreground pixels of ``gt``."""
    flat = gt.ravel().copy()
    flat[np.flatnonzero(flat)[n_pixels:]] = 0
    return flat.reshape(gt.shape)


# two patients, two slices each: a large and a 2-pixel tumour; a 50-pixel tumour and a tumour-free slice
TRUTH = [disk(100), disk(2), disk(50), disk(0)]
GROUPS = ["g1", "g1", "g2", "g2"]
SPECK = np.zeros((20, 20), np.uint8)
SPECK[19, 19] = 1
EPOCHS = {
    # large tumours exact, the 2-pixel one missed, a 1-pixel speck on the empty slice
    "A": [TRUTH[0], disk(0), TRUTH[2], SPECK],
    # the large tumours half found, the small one exact, the empty slice clean
    "B": [part(TRUTH[0], 50), TRUTH[1], part(TRUTH[2], 25), disk(0)],
}


def scores(units: np.ndarray | None) -> dict[str, float]:
    classes = Classes()
    out = {}
    for epoch, preds in EPOCHS.items():
        tally = Tally(len(TRUTH), classes, units)
        for i, (p, g) in enumerate(zip(preds, TRUTH, strict=True)):
            tally.add(i, case_counts(p, g, classes))
        out[epoch] = class_means(tally.sums()[0], classes)[0]
    return out


def test_per_case_and_per_group_dice_by_hand() -> None:
    per_case = scores(None)
    # A: slices 1, 0, 1, 0 (the speck scores its empty slice 0); B: 2/3, 1, 2/3 (the clean empty slice is NaN)
    assert per_case["A"] == pytest.approx(0.5)
    assert per_case["B"] == pytest.approx(7 / 9)
    per_group = scores(group_units([f"s{i}" for i in range(4)], {f"s{i}": g for i, g in enumerate(GROUPS)}))
    # A: g1 pools tp 100, fn 2 -> 200/202; g2 pools tp 50, fp 1 -> 100/101
    assert per_group["A"] == pytest.approx((200 / 202 + 100 / 101) / 2)
    # B: g1 pools tp 52, fn 50 -> 104/154; g2 tp 25, fn 25 -> 50/75
    assert per_group["B"] == pytest.approx((104 / 154 + 50 / 75) / 2)


def test_per_case_and_per_group_pick_different_epochs() -> None:
    """A hand-built history: the per-case mean keeps epoch B, the per-patient Dice users report keeps A."""
    units = group_units([f"s{i}" for i in range(4)], {f"s{i}": g for i, g in enumerate(GROUPS)})
    per_case, per_group = scores(None), scores(units)
    assert max(per_case, key=lambda e: per_case[e]) == "B"
    assert max(per_group, key=lambda e: per_group[e]) == "A"


def test_selection_unit_rule() -> None:
    assert selection_unit([88] * 22)[0] == "group"  # slices of volumes
    assert selection_unit([36, 40, 1])[0] == "group"
    assert selection_unit([1] * 125)[0] == "case"  # one image per group (BUSI)
    assert selection_unit([1, 1, 2])[0] == "case"
    assert selection_unit([])[0] == "case"
    assert "88 cases (median)" in selection_unit([88] * 22)[1]


def test_val_units_follow_the_config_or_the_rule() -> None:
    df = pd.DataFrame({"case_id": ["a#1", "a#2", "b#1", "b#2"], "group": ["a", "a", "b", "b"]})
    ids = ["b#2", "a#1", "b#1", "a#2"]  # the order validation reads them
    units, unit, _ = val_units(TrainConfig(plan="off"), df, ids)
    assert unit == "group" and units is not None and units.tolist() == [0, 1, 0, 1]
    units, unit, reason = val_units(TrainConfig(plan="off", val_unit="case"), df, ids)
    assert units is None and unit == "case" and reason == "val_unit in the config"
    single = pd.DataFrame({"case_id": ["a", "b"], "group": ["a", "b"]})
    assert val_units(TrainConfig(plan="off"), single, ["a", "b"])[:2] == (None, "case")


def test_a_slice_stack_run_selects_by_patient(tmp_path: Path, mlflow_uri: str) -> None:
    """NIfTI volumes ingested in slice mode: one group per volume, so val Dice is pooled per volume."""
    import mlflow
    import nibabel as nib

    from tumorseg import ingest, train
    from tumorseg.checkpoint import load
    from tumorseg.config import IngestConfig

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    for v in range(8):
        vol = rng.normal(0, 0.3, (32, 32, 6)).astype(np.float32)
        lab = np.zeros((32, 32, 6), np.uint8)
        lab[8 + v:18 + v, 10:20, 1:5] = 1
        vol[lab == 1] += 2.0
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "img" / f"v{v}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "lab" / f"v{v}.nii.gz"))
    res = ingest.run(IngestConfig(images_dir=tmp_path / "img", masks_dir=tmp_path / "lab", name="stack",
                                  out_dir=tmp_path / "dm", fractions=(0.5, 0.25, 0.25), seed=1, workers=1,
                                  slice_axis=2))
    cfg = TrainConfig.model_validate({
        "manifest": str(res.manifest_dir), "out": str(tmp_path / "runs"), "run_name": "stack", "plan": "off",
        "epochs": 2, "batch_size": 4, "image_size": [32, 32], "model": {"channels": [8, 16, 32], "num_res_units": 1},
        "log_model": False, "val_overlays": 0, "val_window": 1,
    })
    out = train.run(cfg)
    history = load(tmp_path / "runs" / "stack" / "last.pt")["history"]
    assert all(0 <= row["val_dice_case"] <= 1 for row in history)
    params = mlflow.MlflowClient(mlflow_uri).get_run(out.mlflow_run_id).data.params
    assert params["selection_unit"] == "group" and "6 cases (median)" in params["selection_unit_reason"]
