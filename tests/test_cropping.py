"""nnU-Net's crop to the nonzero region (planning rule V0) and its z-score over the nonzero voxels (V7).

The box, the paste, the normalisation by hand, training, inference and the plan.

Volumes with a zero border (a skull-stripped brain's background) are written as NIfTI files, ingested and read
back by the product's own reader; the model is trained for a few steps (checked for grids, not quality).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_volumes import LPS, SHAPE, TINY_3D, blob_volume, ingest, rows

from tumorseg.config import TrainConfig, load_config
from tumorseg.cropping import box_shape, nonzero_box, paste
from tumorseg.imageio.nifti import write_nifti

BORDERS = [((3, 5), (2, 6), (1, 2)), ((0, 7), (4, 0), (2, 1)), ((6, 2), (1, 3), (0, 3))]
"""Zero voxels before and after the anatomy per stored axis, one pattern per case (cycled)."""


def test_the_box_spans_every_channel() -> None:
    image = np.zeros((2, 6, 7, 5), np.float32)
    image[0, 1, 2, 3] = 5.0  # channel 0 reaches (1, 2, 3)
    image[1, 4, 5, 1] = -2.0  # channel 1 reaches (4, 5, 1): negative values are not background
    assert nonzero_box(image) == (slice(1, 5), slice(2, 6), slice(1, 4))
    assert nonzero_box(np.zeros((1, 3, 4, 2))) == (slice(0, 3), slice(0, 4), slice(0, 2))  # all zero: the whole
    assert box_shape(nonzero_box(image)) == (4, 4, 3)


def test_paste_puts_background_outside_the_box() -> None:
    box = (slice(1, 3), slice(0, 2), slice(2, 3))
    sigmoid = paste(np.full((2, 2, 1), 0.75, np.float32), box, (4, 3, 3), softmax=False)
    assert sigmoid.shape == (4, 3, 3) and sigmoid.sum() == pytest.approx(4 * 0.75)
    assert sigmoid[1:3, 0:2, 2].min() == 0.75
    classes = np.zeros((3, 2, 2, 1), np.float32)
    classes[2] = 1.0  # class 2 everywhere inside
    soft = paste(classes, box, (4, 3, 3), softmax=True)
    assert soft.shape == (3, 4, 3, 3)
    np.testing.assert_array_equal(soft.sum(axis=0), np.ones((4, 3, 3)))  # still a distribution everywhere
    assert soft[0].sum() == 36 - 4 and soft[2].sum() == 4  # background outside, the prediction inside


def test_the_nonzero_zscore_by_hand() -> None:
    from tumorseg.intensity import mode_of, normalize, prescale

    image = np.array([[[0, 2], [4, 0]], [[0, 0], [1, 3]]], np.float32)  # voxel (0, 0) is zero in both channels
    out = prescale(image, "nonzero")
    s0, s1 = math.sqrt(8 / 3), math.sqrt(42 / 27)  # channel 0 over {2, 4, 0}: mean 2; channel 1 over {0, 1, 3}: 4/3
    want = [[[0, 0 / s0], [2 / s0, -2 / s0]], [[0, -4 / 3 / s1], [-1 / 3 / s1, 5 / 3 / s1]]]
    np.testing.assert_allclose(out, np.asarray(want, np.float32), atol=1e-6)
    assert mode_of({"nonzero": True}) == "nonzero"
    np.testing.assert_array_equal(normalize(image, {"nonzero": True}), out)  # no dataset part
    # without zeros it is the plain per-image z-score
    full = image + 10
    np.testing.assert_allclose(prescale(full, "nonzero"), prescale(full, "image"), atol=1e-6)


def test_the_nonzero_zscore_counts_enclosed_zeros_as_inside() -> None:
    from tumorseg.intensity import prescale

    cube = np.full((1, 3, 3, 3), 2.0, np.float32)
    cube[0, 1, 1, 1] = 0.0  # a zero voxel enclosed by the scan: inside (nnU-Net fills the mask's holes)
    cube[0, 0, 0, 0] = 0.0  # a zero voxel on the border: background, left at 0
    inside = np.ones(27, bool)
    inside[0] = False  # flat index of (0, 0, 0)
    values = cube.reshape(-1)[inside].astype(np.float64)  # 25 twos and the enclosed zero
    mean, std = 50 / 26, math.sqrt(25 * (2 - 50 / 26) ** 2 / 26 + (50 / 26) ** 2 / 26)
    assert math.isclose(values.mean(), mean) and math.isclose(values.std(), std)
    out = prescale(cube, "nonzero")
    assert out[0, 0, 0, 0] == 0.0
    assert math.isclose(float(out[0, 1, 1, 1]), -mean / std, rel_tol=1e-6)  # not left at 0
    assert math.isclose(float(out[0, 2, 2, 2]), (2 - mean) / std, rel_tol=1e-6)


def test_the_plan_masks_the_zscore_only_where_the_crop_removes_a_quarter() -> None:
    from test_volumes import fingerprint

    from tumorseg.planning import volumes

    mri = fingerprint((1.0, 1.0, 1.0), (160, 192, 160))
    brain = mri.model_copy(update={"nonzero_share": 0.4, "shape_median_cropped": (120, 150, 120)})  # type: ignore
    rule, why = volumes.intensity_rule(brain)
    assert rule == "nonzero" and "40%" in why
    assert volumes.intensity_rule(brain.model_copy(update={"nonzero_share": 0.9}))[0] == "image"
    assert volumes.intensity_rule(mri)[0] == "image"  # type: ignore[arg-type]  # not measured: as before
    ct = brain.model_copy(update={"intensity": [{"p0_5": -1024.0, "p50": -700.0, "p99_5": 1200.0, "mean": -500.0,
                                                 "std": 400.0}]})
    assert volumes.intensity_rule(ct)[0] == "ct"  # Hounsfield units keep the CT rule
    # the plan's training settings carry both rules, and they make a valid config
    from tumorseg.planning.probe import Throughput

    planned = volumes.choose(brain, 1800, 8, lambda *a: Throughput(4.0, 12.0), "cpu")  # type: ignore[arg-type]
    train = planned["train"]
    assert train["crop_nonzero"] is True and train["normalize"] == "nonzero"
    assert "keeps 40%" in planned["reasons"]["crop_nonzero"]
    assert TrainConfig.model_validate({**train, "manifest": "m"}).crop_nonzero
    # the user's crop_nonzero=false: the stored volumes are planned (a larger grid), with the plain z-score
    stored = volumes.choose(brain, 1800, 8, lambda *a: Throughput(4.0, 12.0), "cpu", crop=False)  # type: ignore
    assert stored["train"]["crop_nonzero"] is False and stored["train"]["normalize"] == "image"
    assert math.prod(stored["train"]["image_size"]) > math.prod(train["image_size"])


def padded(seed: int, border: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """A blob volume (nonzero everywhere) inside a zero border, and its label volume."""
    image, label = blob_volume(seed, empty=seed % 6 == 5)
    return np.pad(image, border), np.pad(label, border)


def write_padded(root: Path, n: int) -> tuple[Path, Path]:
    images, masks = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(n):
        image, label = padded(i, BORDERS[i % len(BORDERS)])
        if i == 0:
            label[0, 0, 0] = 1  # a stray label in the zero border: outside the box the image defines
        write_nifti(images / f"case_{i:03d}.nii.gz", image, LPS)
        write_nifti(masks / f"case_{i:03d}.nii.gz", label, LPS)
    return images, masks


@pytest.fixture(scope="module")
def cropped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(manifest folder, run folder): 12 zero-bordered volumes, a tiny 3D model trained on their boxes."""
    from tumorseg.train import run as train

    root = tmp_path_factory.mktemp("crop")
    images, masks = write_padded(root / "data", 12)
    mdir = ingest(images, masks, root / "m", seed=1)
    cfg = load_config(TrainConfig, None, [*TINY_3D, "crop_nonzero=true", "cache=disk", "normalize=nonzero"],
                      base={"manifest": str(mdir), "out": str(root / "runs")})
    return mdir, Path(train(cfg).run_dir)


def test_training_reads_each_volume_cut_to_its_box(cropped_run: tuple[Path, Path],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    from tumorseg import checkpoint
    from tumorseg.data import CaseReader
    from tumorseg.data.disk import DiskSplit, cache_key, check, folder_name
    from tumorseg.intensity import mode_of
    from tumorseg.manifest import load_manifest

    mdir, run_dir = cropped_run
    info, df = load_manifest(mdir)
    df = df.sort_values("case_id").iloc[:3]
    whole = CaseReader(info, str(mdir)).read_all(df)
    with caplog.at_level("WARNING"):
        cut = CaseReader(info, str(mdir), crop=True).read_all(df)
    for w, c in zip(whole, cut, strict=True):
        assert c.image.shape[1:] == SHAPE == c.mask.shape  # the border is gone on every (canonical) axis
        assert w.image.shape[1:] != SHAPE and np.all(c.image != 0)
        stray = c.case_id.endswith("case_000")
        assert int(c.mask.sum()) == int(w.mask.sum()) - stray  # the stray border label is dropped, and said
    assert "case_000.nii.gz: 1 labelled voxels lie outside the image's nonzero box" in caplog.text
    # the disk cache holds the cropped masks (val scores on them), in a folder of its own
    val_ids = [str(c) for c in load_manifest(mdir)[1].query("split == 'val'")["case_id"]]
    ckpt = checkpoint.load(run_dir / "best.pt")
    keys = {crop: cache_key(info.dataset_digest, "val", val_ids, (16, 16, 16), 1, "nonzero", 0, crop)
            for crop in (True, False)}
    assert keys[True] != keys[False]
    folder = mdir / "cache" / folder_name("val", (16, 16, 16), keys[True])
    meta, why = check(folder, keys[True])
    assert meta is not None, why
    split = DiskSplit(folder, meta)
    assert all(split.original_mask(i).shape == SHAPE for i in range(len(split)))
    # what a resume reads back: the same crop and rule
    assert checkpoint.train_config(ckpt).crop_nonzero and mode_of(ckpt["intensity"]) == "nonzero"


def test_a_cropping_model_predicts_on_the_whole_grid(cropped_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The prediction on a zero-bordered volume is the one on its box, pasted back, background outside."""
    from tumorseg import evaluate
    from tumorseg.config import EvaluateConfig
    from tumorseg.inference import Segmenter

    mdir, run_dir = cropped_run
    seg = Segmenter.from_checkpoint(run_dir / "best.pt", device="cpu")
    assert seg.config.crop_nonzero and seg.stats == {"nonzero": True}
    inner, _ = blob_volume(40)
    border = ((2, 9), (5, 1), (3, 4))
    full = np.pad(inner, border)[None].astype(np.float32)
    prob = seg.predict_proba([full])[0]
    assert prob.shape == full.shape[1:]
    box = tuple(slice(a, a + n) for (a, _), n in zip(border, SHAPE, strict=True))
    np.testing.assert_array_equal(prob[box], seg.predict_proba([inner[None].astype(np.float32)])[0])
    outside = np.ones(full.shape[1:], bool)
    outside[box] = False
    assert not prob[outside].any()
    # the same network without the crop sees the border: another prediction
    plain = Segmenter(seg.net, seg.config.model_copy(update={"crop_nonzero": False}), seg.in_channels, seg.device,
                      seg.stats, seg.post, seg.fingerprint, seg.classes)
    assert not np.array_equal(plain.predict_proba([full])[0][box], prob[box])
    # evaluate scores each test volume on its whole stored grid
    res = evaluate.run(EvaluateConfig(model=str(run_dir), manifest=mdir, out=tmp_path / "eval", bootstrap=0))
    shapes = {f"case_{i:03d}": math.prod(n + a + b for n, (a, b) in zip(SHAPE, BORDERS[i % 3], strict=True))
              for i in range(12)}
    for r in rows(res.out_dir, "per_case.csv"):
        assert sum(int(r[k]) for k in ("tp", "fp", "fn", "tn")) == shapes[r["case_id"]]


def test_the_fingerprint_and_plan_use_the_cropped_shape(cropped_run: tuple[Path, Path]) -> None:
    from tumorseg.manifest import load_manifest
    from tumorseg.planning import fingerprint as fpm
    from tumorseg.planning import volumes

    mdir, _ = cropped_run
    info, df = load_manifest(mdir)
    train = df[df["split"] == "train"]
    fp = fpm.compute(info, train, str(mdir))
    # canonical (RAS+) axes of the LPS files are the stored axes: the border patterns' median box is SHAPE
    assert fp.shape_median_cropped == SHAPE
    assert fp.shape_median is not None and fp.shape_median != SHAPE
    full = [math.prod(n + a + b for n, (a, b) in zip(SHAPE, pattern, strict=True)) for pattern in BORDERS]
    shares = [math.prod(SHAPE) / f for f in full]
    assert min(shares) <= fp.nonzero_share <= max(shares)  # type: ignore[operator]
    spacing, _ = volumes.target_spacing(fp)
    assert volumes.median_shape(fp) == SHAPE
    assert volumes.grid(fp, spacing) == SHAPE  # the planned grid is the anatomy's, not the stored volumes'
    assert f"keeps {fp.nonzero_share:.0%}" in volumes.crop_reason(fp)
