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
    ("1=necrosis,2=edema", "value 0 (background) is not declared"),
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
