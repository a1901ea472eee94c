"""Intensities and bit depths: one model for 8-bit, 16-bit and 12-bit-in-16-bit images of the same scenes.

A tiny model is trained on the 8-bit synthetic PNGs; the same images are then stored as 16-bit PNG (x257),
12-bit data in a 16-bit PNG (x16) and 16-bit TIFF and predicted through ``tumorseg predict``. A training set
mixing 8- and 16-bit files trains as the 8-bit one does. Checkpoints written before the percentile rule keep
their own rule.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import ingest_synth as _ingest

from tumorseg.config import PredictConfig, TrackingConfig, TrainConfig, load_config
from tumorseg.intensity import (
    fingerprint_from_sums,
    foreground_sample,
    foreground_stats,
    mode_of,
    normalize,
    percentile_scale,
    range_message,
    range_sums,
)
from tumorseg.metrics import confusion, dice

TINY = ["plan=off",  # fixed tiny settings; planning has its own tests
        "epochs=6", "batch_size=4", "image_size=[64,64]", "model.channels=[8,16,32]", "model.num_res_units=1",
        "log_model=false", "val_overlays=0", "deterministic=true", "device=cpu"]
STORED = {"16bit": (np.uint16, 257, ".png"), "12in16": (np.uint16, 16, ".png"), "16bit_tiff": (np.uint16, 257, ".tif")}
"""Ways a lab stores the same 8-bit picture: dtype, factor, extension."""


# ----------------------------------------------------------------------------- unit rules


def test_percentile_scale_is_invariant_to_the_stored_scale_and_offset() -> None:
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 256, size=(1, 40, 56)).astype(np.float32)
    ref = percentile_scale(img8)
    lo, hi = np.percentile(img8, [0.5, 99.5])
    np.testing.assert_allclose(ref, (img8 - lo) / (hi - lo), rtol=1e-6, atol=1e-6)
    for stored in (img8 * 257, img8 * 16, img8 * 16 + 100):  # 16-bit, 12-bit in 16, a camera offset
        np.testing.assert_allclose(percentile_scale(stored), ref, atol=1e-5)
    stats = {"mean": [0.3], "std": [0.2], "percentiles": [0.5, 99.5]}
    np.testing.assert_allclose(normalize(img8 * 257, stats), normalize(img8, stats), atol=1e-4)
    # a constant image maps to 0; a nearly constant one (a few bright pixels) falls back to min/max
    assert not percentile_scale(np.full((1, 8, 8), 7.0)).any()
    sparse = np.zeros((1, 40, 40), np.float32)
    sparse[0, 0, 0] = 50.0
    assert percentile_scale(sparse).max() == pytest.approx(1.0)


def test_stored_unit_rule_is_what_old_checkpoints_hold() -> None:
    img = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.testing.assert_allclose(normalize(img, {"mean": [2.0], "std": [4.0]}), (img - 2.0) / 4.0)
    z = normalize(img, None)  # normalize: image
    assert z.mean() == pytest.approx(0.0, abs=1e-6) and z.std() == pytest.approx(1.0, abs=1e-5)


def test_ct_rule_clips_to_the_foreground_window_then_z_scores_by_it() -> None:
    """nnU-Net's CT rule on a hand-computed case: foreground 0..999, air -1000 around it."""
    image = np.concatenate([np.arange(1000, dtype=np.float32).reshape(1, 10, 100),
                            np.full((1, 10, 100), -1000.0, np.float32)], axis=1)
    mask = np.zeros((20, 100), np.uint8)
    mask[:10] = 2  # any label counts as foreground
    stats = foreground_stats([foreground_sample(image, mask)])
    assert stats is not None and mode_of(stats) == "ct"
    (lo, hi), = stats["clip"]
    assert lo == pytest.approx(4.995) and hi == pytest.approx(994.005)  # 0.5/99.5 percentiles of 0..999
    assert stats["mean"] == [pytest.approx(499.5)]
    assert stats["std"] == [pytest.approx(math.sqrt((1000**2 - 1) / 12))]  # of the unclipped foreground
    out = normalize(image, stats)
    std = stats["std"][0]
    assert out[0, 15, 0] == pytest.approx((4.995 - 499.5) / std)  # air: clipped to the window first
    assert out[0, 5, 0] == pytest.approx((500 - 499.5) / std)
    assert out[0, 9, 99] == pytest.approx((994.005 - 499.5) / std)
    assert foreground_stats([foreground_sample(image, np.zeros_like(mask))]) is None  # no foreground: no window


def test_ct_rule_samples_each_case_with_a_seed_and_per_channel() -> None:
    image = np.stack([np.arange(40000, dtype=np.float32), -np.arange(40000, dtype=np.float32)]).reshape(2, 200, 200)
    mask = np.zeros((200, 200), np.uint8)
    mask[:100] = 1  # 20000 foreground voxels: 0..19999
    a, b = foreground_sample(image, mask), foreground_sample(image, mask)
    assert a.shape == (2, 10000) and np.array_equal(a, b)  # capped, and the same draw on a rebuild
    assert len(np.unique(a[0])) == 10000 and a[0].max() < 20000 and np.array_equal(a[1], -a[0])
    stats = foreground_stats([a, foreground_sample(image[:, :50], mask[:50])])  # two cases pooled
    assert stats is not None and len(stats["clip"]) == 2
    assert stats["clip"][1][0] == pytest.approx(-stats["clip"][0][1])  # channel 2 mirrors channel 1


def test_range_message_factor_four_both_ways() -> None:
    images = [np.full((1, 4, 4), v, np.float32) for v in (100.0, 200.0, 250.0)]
    fp = fingerprint_from_sums(*range_sums(images))
    assert fp is not None
    assert (fp["p99_5_min"], fp["p99_5_max"], fp["n_images"]) == (100.0, 250.0, 3.0)
    assert fp["p99_5"] == pytest.approx(550 / 3)
    assert fingerprint_from_sums(*range_sums([])) is None
    assert range_message(np.full((1, 4, 4), 1000.0), fp, None) is None  # exactly 4x the highest: fine
    assert range_message(np.full((1, 4, 4), 25.0), fp, None) is None  # exactly 1/4 of the lowest: fine
    above = range_message(np.full((1, 4, 4), 1001.0), fp, {"mean": [0.0], "std": [1.0], "percentiles": [0.5, 99.5]})
    assert above is not None and "4x above" in above and "does not change its predictions" in above
    below = range_message(np.full((1, 4, 4), 24.0), fp, {"mean": [0.0], "std": [1.0]})
    assert below is not None and "4x below" in below and "likely wrong" in below
    assert range_message(np.full((1, 4, 4), 5000.0), None, None) is None  # no fingerprint: nothing to compare


# ----------------------------------------------------------------------------- real files



def _store(src: Path, dest: Path, dtype: type, factor: int, ext: str, which: Any = lambda name: True) -> None:
    """Copy the PNGs of ``src`` into ``dest``, the selected ones stored as ``value * factor`` in ``dtype``."""
    import tifffile
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.glob("*.png")):
        if not which(p.name):
            shutil.copy(p, dest / p.name)
            continue
        with Image.open(p) as im:
            a = (np.asarray(im).astype(np.uint32) * factor).astype(dtype)
        if ext == ".tif":
            tifffile.imwrite(dest / f"{p.stem}.tif", a)
        else:
            Image.fromarray(a).save(dest / f"{p.stem}.png")


@pytest.fixture(scope="module")
def trained(synth_data: Path, tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> dict[str, Any]:
    """A tiny model trained on the 8-bit synthetic PNGs."""
    from tumorseg.train import stage

    root = tmp_path_factory.mktemp("intensity")
    manifest = _ingest(synth_data / "images", synth_data / "masks", root / "manifests", "bits8")
    cfg = load_config(TrainConfig, None, [*TINY, "run_name=bits8"],
                      base={"manifest": str(manifest), "out": str(root / "runs"),
                            "tracking": {"uri": mlflow_uri, "experiment": "test-intensity"}})
    res = stage.run(cfg)
    return {"root": root, "manifest": manifest, "result": res, "cfg": cfg, "synth": synth_data}


def _predict(model: Path, inputs: Path, out: Path, mlflow_uri: str) -> tuple[dict[str, np.ndarray], Any]:
    from PIL import Image

    from tumorseg import predict

    res = predict.run(PredictConfig(model=str(model), inputs=[inputs], output_dir=out, device="cpu",
                                    tracking=TrackingConfig(uri=mlflow_uri, experiment="test-intensity")))
    masks = {}
    for item in res.outputs:
        with Image.open(item[1]) as im:
            masks[Path(item[0]).stem] = (np.asarray(im) > 0).astype(np.uint8)
    return masks, res


def _pooled_dice(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    total = confusion(a[next(iter(a))], b[next(iter(a))])
    for k in list(a)[1:]:
        total = total + confusion(a[k], b[k])
    return dice(total, "1")


def test_16bit_and_12bit_copies_predict_like_the_8bit_images(trained: dict[str, Any], tmp_path: Path, mlflow_uri: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    from tumorseg.imageio import load_mask

    best = trained["result"].best_checkpoint
    images = trained["synth"] / "images"
    truth = {p.stem: load_mask([p]) for p in sorted((trained["synth"] / "masks").glob("*.png"))}
    with caplog.at_level(logging.WARNING, logger="tumorseg"):
        ref, res8 = _predict(best, images, tmp_path / "pred8", mlflow_uri)
    assert res8.n_intensity_outside_training == 0
    assert not [r for r in caplog.records if "training images'" in r.getMessage()]
    dice8 = _pooled_dice(ref, truth)
    assert dice8 > 0.5, f"the tiny model should have learnt something (pooled Dice {dice8:.3f})"

    for name, (dtype, factor, ext) in STORED.items():
        _store(images, tmp_path / name, dtype, factor, ext)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tumorseg"):
            got, res = _predict(best, tmp_path / name, tmp_path / f"pred_{name}", mlflow_uri)
        assert set(got) == set(ref)
        agreement = _pooled_dice(got, ref)
        assert agreement >= 0.98, f"{name}: Dice against the 8-bit predictions {agreement:.4f}"
        assert abs(_pooled_dice(got, truth) - dice8) <= 0.02
        # the raw range is far outside the 8-bit training images': each file is named (the first few) and counted
        assert res.n_intensity_outside_training == len(ref)
        named = [r.getMessage() for r in caplog.records if "training images'" in r.getMessage()]
        assert named and str(tmp_path / name) in named[0] and "x above" in named[0]
        assert "does not change its predictions" in named[0]


def test_mixed_8_and_16_bit_training_set_trains_like_the_8bit_one(trained: dict[str, Any], tmp_path: Path,
                                                                   mlflow_uri: str,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from tumorseg import evaluate
    from tumorseg.config import EvaluateConfig
    from tumorseg.train import stage

    odd = lambda name: int(name.split("_")[1]) % 2 == 1  # noqa: E731  # every other patient as 16-bit
    _store(trained["synth"] / "images", tmp_path / "images", np.uint16, 257, ".png", odd)
    manifest = _ingest(tmp_path / "images", trained["synth"] / "masks", tmp_path / "manifests", "mixed")
    cfg = trained["cfg"].model_copy(update={"manifest": manifest, "out": tmp_path / "runs", "run_name": "mixed"})
    res = stage.run(cfg)
    ref = trained["result"]
    assert math.isfinite(res.best_val_dice)
    assert abs(res.best_val_dice - ref.best_val_dice) <= 0.02, (res.best_val_dice, ref.best_val_dice)

    # the 8-bit model on this mixed manifest: one warning for the split, naming the first 16-bit file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tumorseg"):
        ev = evaluate.run(EvaluateConfig(model=str(ref.best_checkpoint), manifest=manifest, split="train",
                                         out=tmp_path / "ev", bootstrap=0, device="cpu", write_back=False,
                                         tracking=TrackingConfig(uri=mlflow_uri, experiment="test-intensity")))
    from tumorseg.manifest import load_manifest

    _, df = load_manifest(manifest)
    rows = df[df["split"] == "train"]
    n16 = sum(odd(Path(str(p)).name) for p in rows["image"])
    assert n16 >= 1 and ev.summary["n_intensity_outside_training"] == n16
    warned = [r.getMessage() for r in caplog.records if "training images'" in r.getMessage()]
    assert len(warned) == 1 and f"{n16} of {len(rows)} train cases" in warned[0]
    first16 = next(str(p) for p in rows["image"] if odd(Path(str(p)).name))
    assert first16 in warned[0]


def test_checkpoints_without_the_new_fields_keep_their_rule(trained: dict[str, Any], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint from before the percentile rule (stored-unit mean/std, no fingerprint) predicts as before."""
    import torch

    from tumorseg.inference import Segmenter, preprocess

    ckpt = torch.load(trained["result"].best_checkpoint, map_location="cpu", weights_only=True)
    assert ckpt["intensity"]["percentiles"] == [0.5, 99.5]
    fp = ckpt["intensity_fingerprint"]
    assert fp["n_images"] >= 10 and 200 < fp["p99_5_max"] <= 255 and 0 <= fp["p0_5"] < 10
    old = {k: v for k, v in ckpt.items() if k != "intensity_fingerprint"}
    old["intensity"] = {"mean": [60.0], "std": [80.0]}  # stored 8-bit units, as the old code wrote them
    torch.save(old, tmp_path / "old.pt")
    seg = Segmenter.from_checkpoint(tmp_path / "old.pt", device="cpu")
    img = np.asarray(np.random.default_rng(0).integers(0, 256, size=(1, 64, 64)), dtype=np.float32)
    x = preprocess(img, (64, 64), 1, seg.stats).numpy()
    np.testing.assert_allclose(x, (img - 60.0) / 80.0, rtol=1e-5, atol=1e-5)
    # its range is estimated from mean + 3 std = 300: a 16-bit image is far above it, and the message says why
    assert seg.intensity_outside_training(img) is None
    assert seg.intensity_outside_training(img / 16) is None  # no lowest training range known: no check below
    why = seg.intensity_outside_training(img * 257)
    assert why is not None and "estimated from the checkpoint's mean/std" in why and "likely wrong" in why

    image_rule = dict(old, intensity=None)  # normalize: image, written before fingerprints: no warning possible
    torch.save(image_rule, tmp_path / "image.pt")
    seg = Segmenter.from_checkpoint(tmp_path / "image.pt", device="cpu")
    assert seg.intensity_outside_training(img * 257) is None
    np.testing.assert_allclose(seg.predict_proba([img * 257])[0], seg.predict_proba([img])[0], atol=1e-4)
