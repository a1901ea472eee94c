"""Label maps at ingest (issue #9): --labels, per-class counts, undeclared values, clear refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tumorseg.cli import app
from tumorseg.errors import TumorsegError
from tumorseg.labels import format_labels, parse_labels

LABELS = "0=background,1=necrosis,2=edema,3=enhancing"


@pytest.mark.parametrize(("text", "said"), [
    ("0=background,1=a,1=b", "value 1 is declared twice"),
    ("1=necrosis,2=edema", "no background: value 0 is not declared and no value is named background"),
    ("1=background,2=Background,3=x", "values 1 and 2 are both named background"),
    ("0=background,1=core,2=core", "'core' is used for two values"),
    ("0=background,tumour", "is not VALUE=NAME"),
    ("0=background", "only background declared"),
    ("0=background,300=x", "outside 0..255"),
    ("0=background,1=2nd", "must start with a letter"),
])
def test_bad_label_declarations_are_one_line(text: str, said: str, tmp_path: Path) -> None:
    with pytest.raises(TumorsegError, match=re.escape(said)):
        parse_labels(text)
    res = CliRunner().invoke(app, ["ingest", str(tmp_path), "--name", "x", "--labels", text])
    assert res.exit_code == 2 and said in res.output and len(res.output.strip().splitlines()) == 1


def test_labels_parse_sorted_and_round_trip() -> None:
    labels = parse_labels("2=edema, 0=background ,1=necrosis")
    assert labels == {0: "background", 1: "necrosis", 2: "edema"} and list(labels) == [0, 1, 2]
    assert parse_labels(format_labels(labels)) == labels


def _blob(size: int, value: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return np.where((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, value, 0).astype(np.uint8)


def _dataset(root: Path, n_patients: int = 8) -> dict[str, np.ndarray]:
    """Per patient: one 3-class map (8-bit grey), one class-3-only map ({0, 3}), one palette PNG, one 16-bit PNG."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    truth: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    for p in range(n_patients):
        maps = {
            # edema around a necrotic core, and an enhancing blob elsewhere
            "a": np.where(_blob(48, 1, 20, 20, 4) > 0, 1, _blob(48, 2, 20, 20, 10)).astype(np.uint8)
            + _blob(48, 3, 36, 36, 5),
            "b": _blob(48, 3, 24, 24, 6),  # a file holding one class only: a valid map of class 3
            "c": _blob(48, 1, 10, 30, 5),
            "d": _blob(48, 2, 30, 12, 7),
        }
        for k, m in maps.items():
            stem = f"patient_{p:02d}_{k}"
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(images / f"{stem}.png")
            if k == "c":
                Image.fromarray(m, mode="P").save(masks / f"{stem}.png")  # palette indices are the values
            elif k == "d":
                Image.fromarray(m.astype(np.uint16)).save(masks / f"{stem}.png")  # 16-bit grey
            else:
                Image.fromarray(m).save(masks / f"{stem}.png")
            truth[stem] = m
    return truth


def _ingest(root: Path, out: Path, *extra: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, ["ingest", str(root / "images"), str(root / "masks"), "--name", "bra",
                                   "--out-dir", str(out), "--group-pattern", r"(patient_\d+)", "--workers", "1",
                                   *extra])
    return res.exit_code, res.output


def _ingest_labels(root: Path, out: Path) -> tuple[int, str]:
    """Ingest with ``--labels``, taking the seed ingest names when a split would miss a class."""
    code, text = _ingest(root, out, "--labels", LABELS, "--seed", "1")
    if code == 2 and "pass --seed" in text:
        code, text = _ingest(root, out, "--labels", LABELS, "--seed", text.split("pass --seed ")[1].split(",")[0])
    return code, text


def test_label_maps_ingest_with_per_class_counts(tmp_path: Path) -> None:
    truth = _dataset(tmp_path / "data")
    code, out = _ingest_labels(tmp_path / "data", tmp_path / "dm")
    assert code == 0, out
    info = json.loads((tmp_path / "dm" / "bra" / "manifest.json").read_text())
    assert info["labels"] == {"0": "background", "1": "necrosis", "2": "edema", "3": "enhancing"}
    df = pd.read_csv(tmp_path / "dm" / "bra" / "manifest.csv")
    assert len(df) == len(truth) and (pd.read_csv(tmp_path / "dm" / "bra" / "rejected.csv").empty)
    for _, row in df.iterrows():
        m = truth[row["case_id"]]
        assert row["px_necrosis"] == int((m == 1).sum())
        assert row["px_edema"] == int((m == 2).sum())
        assert row["px_enhancing"] == int((m == 3).sum())
        assert row["has_tumour"] == bool(m.any())
    for split in ("train", "val", "test"):  # every split holds every class
        sub = df[df["split"] == split]
        assert (sub[["px_necrosis", "px_edema", "px_enhancing"]].sum() > 0).all(), split

    # the product's reader gives class indices (the k-th declared value is class k)
    from tumorseg.data import CaseReader
    from tumorseg.manifest import load_manifest

    minfo, mdf = load_manifest(tmp_path / "dm" / "bra")
    reader = CaseReader(minfo, "m")
    row = mdf[mdf["case_id"] == "patient_00_a"].iloc[0]
    np.testing.assert_array_equal(reader.read(row).mask, truth["patient_00_a"])  # values 0..3 are indices 0..3

    # and the planner reads the label map (training, evaluating and predicting it: tests/test_multiclass.py)
    res = CliRunner().invoke(app, ["plan", str(tmp_path / "dm" / "bra"), "--budget", "20s", "--device", "cpu",
                                   "--out", str(tmp_path / "plan")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "plan" / "plan.json").read_text())["budget"] == "20s"


def test_class_indices_follow_declared_order(tmp_path: Path) -> None:
    """Declared values need not be 0..K-1: 0, 2, 4 become classes 0, 1, 2."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for p in range(6):
        Image.fromarray(np.full((32, 32), 9, np.uint8)).save(images / f"patient_{p}.png")
        m = np.maximum(_blob(32, 2, 10, 10, 5), _blob(32, 4, 22, 22, 5))
        Image.fromarray(m).save(masks / f"patient_{p}.png")
    from tumorseg import ingest
    from tumorseg.config import IngestConfig
    from tumorseg.data import CaseReader
    from tumorseg.manifest import load_manifest

    res = ingest.run(IngestConfig(images_dir=images, masks_dir=masks, name="x", out_dir=tmp_path / "dm",
                                  labels={0: "background", 2: "a", 4: "b"}, workers=1, fractions=(1.0, 0.0, 0.0)))
    info, df = load_manifest(res.manifest_dir)
    mask = CaseReader(info, "m").read(df.iloc[0]).mask
    assert sorted(np.unique(mask).tolist()) == [0, 1, 2]
    assert int((mask == 2).sum()) == int((_blob(32, 4, 22, 22, 5) > 0).sum())


def test_undeclared_value_is_a_rejected_row_naming_file_and_value(tmp_path: Path) -> None:
    _dataset(tmp_path / "data", 8)
    bad = tmp_path / "data" / "masks" / "patient_00_a.png"
    arr = np.array(Image.open(bad))
    arr[0, 0] = 7
    Image.fromarray(arr).save(bad)
    code, out = _ingest_labels(tmp_path / "data", tmp_path / "dm")
    assert code == 0, out
    rejected = pd.read_csv(tmp_path / "dm" / "bra" / "rejected.csv")
    reasons = dict(zip(rejected["path"], rejected["reason"], strict=True))
    assert "value 7 is not a declared label (0, 1, 2, 3)" in reasons["masks/patient_00_a.png"]


def test_multi_valued_masks_without_labels_stop_with_the_values_found(tmp_path: Path) -> None:
    _dataset(tmp_path / "data", 4)
    code, out = _ingest(tmp_path / "data", tmp_path / "dm")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "hold more than two values (0, 1, 2, 3;" in out
    assert "--labels 0=background,1=class1,2=class2,3=class3" in out
    assert not (tmp_path / "dm" / "bra").exists()


@pytest.mark.parametrize(("declared", "said"), [
    # the Medical Segmentation Decathlon's form (and nnU-Net v1's), names made valid class names
    ({"0": "background", "1": "non-enhancing tumor", "2": "edema", "3": "enhancing tumour"},
     "--labels 0=background,1=non_enhancing_tumor,2=edema,3=enhancing_tumour"),
    ({"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3},  # nnU-Net v2's form
     "--labels 0=background,1=necrosis,2=edema,3=enhancing"),
])
def test_a_dataset_json_beside_the_folders_gives_the_labels_to_declare(tmp_path: Path, declared: dict[str, object],
                                                                       said: str) -> None:
    _dataset(tmp_path / "data", 4)
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"name": "bra", "labels": declared}))
    code, out = _ingest(tmp_path / "data", tmp_path / "dm")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert f"as {tmp_path / 'data' / 'dataset.json'} declares them: {said} " in out
    # nnU-Net v2 regions (lists of values) are not a label set: the values found are suggested instead
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "whole": [1, 2, 3]}}))
    code, out = _ingest(tmp_path / "data", tmp_path / "dm")
    assert code == 2 and "--labels 0=background,1=class1,2=class2,3=class3" in out


def test_labels_and_threshold_together_are_refused(tmp_path: Path) -> None:
    _dataset(tmp_path / "data", 2)
    code, out = _ingest(tmp_path / "data", tmp_path / "dm", "--labels", LABELS, "--mask-threshold", "0")
    assert code == 2 and "give one" in out


def test_a_stray_multi_valued_mask_in_a_binary_dataset_stays_a_rejected_row(tmp_path: Path) -> None:
    """Under a quarter of the cases with more values: stray files, not label maps (the binary behaviour)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for i in range(5):
        Image.fromarray(np.full((32, 32), 9 + i, np.uint8)).save(images / f"c{i}.png")
        m = _blob(32, 255, 16, 16, 6)
        if i == 0:
            m[0, 0] = 100  # 0 / 100 / 255
        Image.fromarray(m).save(masks / f"c{i}.png")
    res = CliRunner().invoke(app, ["ingest", str(images), str(masks), "--name", "b", "--out-dir", str(tmp_path / "dm"),
                                   "--fractions", "1,0,0", "--workers", "1"])
    assert res.exit_code == 0, res.output
    rejected = pd.read_csv(tmp_path / "dm" / "b" / "rejected.csv")
    reasons = dict(zip(rejected["path"], rejected["reason"], strict=True))
    assert "mask has 3 distinct values (0, 100, 255)" in reasons["masks/c0.png"]
    assert "--labels" in reasons["masks/c0.png"]


# ----------------------------------------------------------------------------- issue #22: trimaps without 0


def test_a_label_set_without_0_names_its_background() -> None:
    from tumorseg.imageio import label_map
    from tumorseg.labels import Classes, background_value, check_regions

    labels = parse_labels("1=pet,2=background,3=border")
    assert background_value(labels) == 2 and background_value({0: "bg", 1: "t"}) == 0
    classes = Classes(labels)
    assert classes.values == [2, 1, 3] and classes.names == ["background", "pet", "border"]  # background is class 0
    index, found = label_map(np.array([[1, 2], [3, 2]], np.uint8), "m.png", labels)
    np.testing.assert_array_equal(index, [[1, 0], [2, 0]])
    assert found == "1/2/3"
    np.testing.assert_array_equal(classes.to_values(index), [[1, 2], [3, 2]])  # predictions come back as 1/2/3
    with pytest.raises(TumorsegError, match="region r holds 2"):
        check_regions({"r": [1, 2]}, labels)


def _trimaps(root: Path, n_patients: int = 8) -> dict[str, np.ndarray]:
    """Oxford-pets-style trimaps: 1 pet, 2 background, 3 border (no 0), on RGB photos."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    truth: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(1)
    for p in range(n_patients):
        for k in range(2):
            stem = f"patient_{p:02d}_{k}"
            cy, cx = 14 + 6 * k + p % 4, 18 + p % 5
            outer, inner = _blob(40, 1, cy, cx, 11) > 0, _blob(40, 1, cy, cx, 8) > 0
            m = np.where(inner, 1, np.where(outer, 3, 2)).astype(np.uint8)
            photo = np.stack([np.where(m == 2, 60, 190), np.where(m == 2, 90, 140), np.full_like(m, 70)], -1)
            noisy = np.clip(photo + rng.integers(0, 40, photo.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(images / f"{stem}.png")
            Image.fromarray(m).save(masks / f"{stem}.png")
            truth[stem] = m
    return truth


def test_trimaps_without_0_ingest_train_evaluate_and_predict(tmp_path: Path) -> None:
    truth = _trimaps(tmp_path / "data")
    declared = "1=pet,2=background,3=border"
    code, out = _ingest(tmp_path / "data", tmp_path / "dm", "--labels", declared, "--seed", "1")
    if code == 2 and "pass --seed" in out:
        code, out = _ingest(tmp_path / "data", tmp_path / "dm", "--labels", declared, "--seed",
                            out.split("pass --seed ")[1].split(",")[0])
    assert code == 0, out
    df = pd.read_csv(tmp_path / "dm" / "bra" / "manifest.csv")
    assert "px_background" not in df.columns
    for _, row in df.iterrows():
        m = truth[row["case_id"]]
        assert (row["px_pet"], row["px_border"]) == (int((m == 1).sum()), int((m == 3).sum()))
        assert bool(row["has_tumour"])

    runner = CliRunner()
    tiny = ["--set", "plan=off", "--set", "epochs=2", "--set", "batch_size=4", "--set", "image_size=[32,32]",
            "--set", "model.channels=[8,16,32]", "--set", "model.num_res_units=1", "--set", "loss.name=dice_ce",
            "--set", "val_overlays=0", "--set", "log_model=false", "--set", f"out={tmp_path / 'runs'}",
            "--set", "run_name=pets"]
    res = runner.invoke(app, ["train", str(tmp_path / "dm" / "bra"), *tiny])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["evaluate", str(tmp_path / "runs" / "pets"), "--manifest", str(tmp_path / "dm" / "bra"),
                              "--out", str(tmp_path / "eval")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["classes"]) == {"pet", "border"} and "pixel_accuracy" in summary
    assert {"pixel_accuracy_background", "pixel_accuracy_pet", "pixel_accuracy_border"} <= set(summary)
    conf = pd.read_csv(tmp_path / "eval" / "confusion.csv")
    matrix = conf.drop(columns="true").to_numpy()
    assert summary["pixel_accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum())
    first = sorted((tmp_path / "data" / "images").iterdir())[0]
    res = runner.invoke(app, ["predict", str(tmp_path / "runs" / "pets"), str(first), str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    written = np.asarray(Image.open(tmp_path / "pred" / first.name))
    assert written.shape == (40, 40) and set(np.unique(written).tolist()) <= {1, 2, 3}
