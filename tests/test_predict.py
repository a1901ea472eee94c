"""``tumorseg predict`` on real files: masks with the input's name, size, orientation and affine."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tumorseg.config import LossConfig, ModelConfig, PredictConfig, TrackingConfig, TrainConfig
from tumorseg.fsutil import sha256_file

EXPERIMENT = "test-predict"
MODEL_CFG = ModelConfig(channels=[8, 16, 32], num_res_units=1)
AFFINE = np.array([[0.0, -0.8, 0.0, 10.0], [0.6, 0.0, 0.0, -4.0], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])


def _checkpoint(path: Path, images: list[np.ndarray], masks: list[np.ndarray], steps: int,
                in_channels: int = 1) -> Path:
    """A tiny UNet (32x32 input) fitted briefly on synthetic pairs."""
    import torch

    from tumorseg import checkpoint
    from tumorseg.inference import preprocess, resize_mask
    from tumorseg.model import build_loss, build_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny net, shared 2-core machine
    try:
        torch.manual_seed(0)
        net = build_model(MODEL_CFG, in_channels)
        if steps:
            x = torch.stack([preprocess(im, (32, 32), in_channels) for im in images])
            y = torch.stack([resize_mask(m, (32, 32)) for m in masks])
            loss_fn = build_loss(LossConfig())
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            gen = torch.Generator().manual_seed(0)
            for _ in range(steps):
                idx = torch.randint(0, len(x), (8,), generator=gen)
                opt.zero_grad()
                loss_fn(net(x[idx]), y[idx]).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    cfg = TrainConfig(image_size=(32, 32), model=MODEL_CFG)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, checkpoint.build_payload(net, cfg, in_channels, state={"epoch": 1, "best_val_dice": 0.0}))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, synth_data: Path, mlflow_uri: str) -> dict[str, Any]:
    """A fitted checkpoint, test images of several kinds, and an MLflow experiment in a temp dir."""
    import mlflow

    from tumorseg.imageio import load_image, load_mask, write_png

    root = tmp_path_factory.mktemp("predict")
    mlflow.set_tracking_uri(mlflow_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    names = sorted(p.name for p in (synth_data / "images").iterdir())
    images = [load_image(synth_data / "images" / n) for n in names]
    masks = [load_mask([synth_data / "masks" / n]) for n in names]
    ckpt = _checkpoint(root / "tiny.pt", images, masks, steps=30)
    bad_channels = _checkpoint(root / "two_channel.pt", [], [], steps=0, in_channels=2)

    # non-square crops of synthetic images: a transposition would change the shape
    src = root / "inputs"
    src.mkdir()
    grey = images[1][0].astype(np.uint8)
    write_png(src / "wide.png", np.ascontiguousarray(np.concatenate([grey[:48], grey[:48, :16]], axis=1)))  # 48x80
    write_png(src / "tall.png", np.ascontiguousarray(grey[:, :40]))  # 64x40
    rgb = np.stack([images[2][0], images[2][0] * 0.8, images[2][0] * 0.5], axis=-1)[:40, :56].astype(np.uint8)
    from PIL import Image

    Image.fromarray(rgb, "RGB").save(src / "colour.png")  # 40x56 RGB
    volume = np.stack([images[i][0][:40, :56] for i in range(3, 9)], axis=2).astype(np.float32)  # (40, 56, 6)
    return {"root": root, "ckpt": ckpt, "bad_channels": bad_channels, "src": src, "volume": volume,
            "tracking": TrackingConfig(uri=mlflow_uri, experiment=EXPERIMENT), "uri": mlflow_uri,
            "plane": images[3][0][:40, :56].astype(np.float32)}


def _cfg(env: dict[str, Any], inputs: list[Path], out: Path, **kw: Any) -> PredictConfig:
    return PredictConfig(model=str(env["ckpt"]), inputs=inputs, output_dir=out, device="cpu",
                         tracking=env["tracking"], **kw)


def outputs(folder: Path) -> list[str]:
    """The files predict wrote into ``folder``, less its marker (a folder predict wrote)."""
    from tumorseg.predict.stage import MARKER

    assert (folder / MARKER).is_file()
    return sorted(p.name for p in folder.iterdir() if p.name != MARKER)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


# ----------------------------------------------------------------------------- PNG


def test_png_masks_keep_name_size_orientation(env: dict[str, Any], tmp_path: Path) -> None:
    import mlflow

    from tumorseg import predict
    from tumorseg.imageio import load_image
    from tumorseg.inference import Segmenter

    src = env["src"]
    before = _hashes(src)
    res = predict.run(_cfg(env, [src], tmp_path / "out"))
    assert res.output_dir == tmp_path / "out"
    assert res.n_written == 3 == res.n_inputs
    assert outputs(res.output_dir) == ["colour.png", "tall.png", "wide.png"]
    assert _hashes(src) == before  # inputs untouched, nothing added next to them

    seg = Segmenter.from_checkpoint(env["ckpt"], device="cpu")
    names = ["colour.png", "tall.png", "wide.png"]  # sorted input order = one batch, as predict runs it
    expected = seg.predict_masks([load_image(src / n) for n in names])
    shapes = {"colour.png": (40, 56), "tall.png": (64, 40), "wide.png": (48, 80)}
    some_tumour = False
    for name, exp in zip(names, expected, strict=True):
        mask = _read_png(res.output_dir / name)
        assert mask.shape == shapes[name], name
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask, exp.astype(np.uint8) * 255)
        some_tumour |= bool(mask.any())
    assert some_tumour, "the fitted model should find tumour pixels somewhere"

    client = mlflow.MlflowClient(env["uri"])
    run = client.get_run(res.run_id)
    assert run.data.tags["tumorseg.stage"] == "predict"
    assert run.data.params["model"] == str(env["ckpt"])
    assert run.data.params["checkpoint_sha256"] == sha256_file(env["ckpt"])
    assert run.data.metrics["n_written"] == 3 and run.data.metrics["n_inputs"] == 3
    assert run.data.tags["mlflow.note.content"].startswith("3 masks for 3 inputs")
    assert "predictions.csv" in {a.path for a in client.list_artifacts(res.run_id)}


def test_probabilities_and_tta(env: dict[str, Any], tmp_path: Path) -> None:
    from tumorseg import predict
    from tumorseg.imageio import load_image
    from tumorseg.inference import Segmenter

    src = env["src"]
    res = predict.run(_cfg(env, [src / "wide.png"], tmp_path / "out", probabilities=True, tta=True))
    assert res.n_written == 1 and res.n_probabilities == 1
    assert outputs(res.output_dir) == ["wide.png", "wide_prob.png"]
    seg = Segmenter.from_checkpoint(env["ckpt"], device="cpu")
    img = load_image(src / "wide.png")
    p_tta = seg.predict_proba([img], tta=True)[0]
    p_plain = seg.predict_proba([img], tta=False)[0]
    assert np.abs(p_tta - p_plain).max() > 1e-3, "flip averaging should change the probabilities"
    prob_png = _read_png(res.output_dir / "wide_prob.png")
    assert prob_png.shape == (48, 80) and prob_png.dtype == np.uint8
    assert np.abs(prob_png.astype(int) - np.rint(p_tta * 255).astype(int)).max() <= 1
    np.testing.assert_array_equal(_read_png(res.output_dir / "wide.png"), (p_tta > seg.threshold) * 255)


def test_threshold_option_moves_the_masks(env: dict[str, Any], tmp_path: Path) -> None:
    from tumorseg import predict

    wide = env["src"] / "wide.png"
    low = predict.run(_cfg(env, [wide], tmp_path / "low", threshold=0.05))
    high = predict.run(_cfg(env, [wide], tmp_path / "high", threshold=0.95))
    n_low = int((_read_png(low.output_dir / "wide.png") > 0).sum())
    n_high = int((_read_png(high.output_dir / "wide.png") > 0).sum())
    assert n_low > n_high


# ----------------------------------------------------------------------------- NIfTI


def test_nifti_output_keeps_affine_and_shape_and_reassembles_volumes(env: dict[str, Any], tmp_path: Path) -> None:
    import nibabel as nib

    from tumorseg import predict
    from tumorseg.inference import Segmenter

    src = tmp_path / "nii"
    src.mkdir()
    vol, plane = env["volume"], env["plane"]
    nib.save(nib.Nifti1Image(vol, AFFINE), str(src / "vol.nii.gz"))
    nib.save(nib.Nifti1Image(plane, AFFINE), str(src / "flat.nii.gz"))
    before = _hashes(src)
    res = predict.run(_cfg(env, [src, env["src"] / "wide.png"], tmp_path / "out", format="nifti",
                           probabilities=True))
    assert _hashes(src) == before
    assert res.n_written == 3 and res.n_slices == 6 + 1 + 1
    out = res.output_dir
    assert outputs(out) == ["flat.nii.gz", "flat_prob.nii.gz", "vol.nii.gz",
                                                      "vol_prob.nii.gz", "wide.nii.gz", "wide_prob.nii.gz"]
    seg = Segmenter.from_checkpoint(env["ckpt"], device="cpu")

    m = nib.load(str(out / "vol.nii.gz"))
    assert m.shape == vol.shape and np.allclose(m.affine, AFFINE)
    mask = np.asarray(m.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    expected = seg.predict_masks([vol[None, :, :, k] for k in range(vol.shape[2])])
    for k in range(vol.shape[2]):
        np.testing.assert_array_equal(mask[:, :, k], expected[k])
    p = nib.load(str(out / "vol_prob.nii.gz"))
    assert p.shape == vol.shape and p.get_data_dtype() == np.float32 and np.allclose(p.affine, AFFINE)
    probs = np.asarray(p.dataobj)
    assert 0.0 <= probs.min() and probs.max() <= 1.0
    np.testing.assert_array_equal(probs > seg.threshold, mask.astype(bool))

    f = nib.load(str(out / "flat.nii.gz"))
    assert f.shape == plane.shape and np.allclose(f.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(f.dataobj), seg.predict_masks([plane[None]])[0])

    w = nib.load(str(out / "wide.nii.gz"))
    assert w.shape == (48, 80) and np.allclose(w.affine, np.eye(4))


def test_a_2d_grid_file_gets_its_mask_on_its_own_grid(env: dict[str, Any], tmp_path: Path) -> None:
    """A 2D NIfTI holds (x, y) axes: its mask is a NIfTI on the same grid, not a PNG showing them transposed."""
    import nibabel as nib

    from tumorseg import predict
    from tumorseg.inference import Segmenter

    affine = np.diag([0.8, 0.6, 1.0, 1.0])
    src = tmp_path / "in"
    src.mkdir()
    nib.save(nib.Nifti1Image(env["plane"].T.copy(), affine), src / "flat2d.nii.gz")  # (x, y) = (56, 40)
    res = predict.run(_cfg(env, [src], tmp_path / "out"))
    assert outputs(res.output_dir) == ["flat2d.nii.gz"]
    out = nib.load(tmp_path / "out" / "flat2d.nii.gz")
    assert out.shape == (56, 40)
    np.testing.assert_allclose(out.affine, affine)
    seg = Segmenter.from_checkpoint(env["ckpt"], device="cpu")
    np.testing.assert_array_equal(np.asarray(out.dataobj), seg.predict_masks([env["plane"].T[None].copy()])[0])


def test_volume_along_another_axis_and_png_format_for_volumes(env: dict[str, Any], tmp_path: Path) -> None:
    import nibabel as nib

    from tumorseg import predict
    from tumorseg.inference import Segmenter

    src = tmp_path / "nii"
    src.mkdir()
    vol = np.ascontiguousarray(np.moveaxis(env["volume"], 2, 0))  # (6, 40, 56): slices along axis 0
    nib.save(nib.Nifti1Image(vol, AFFINE), str(src / "vol0.nii"))
    res = predict.run(_cfg(env, [src / "vol0.nii"], tmp_path / "out", slice_axis=0))  # format png
    assert outputs(res.output_dir) == ["vol0.nii.gz"]  # a PNG cannot hold a volume
    m = nib.load(str(res.output_dir / "vol0.nii.gz"))
    assert m.shape == vol.shape and np.allclose(m.affine, AFFINE)
    seg = Segmenter.from_checkpoint(env["ckpt"], device="cpu")
    expected = seg.predict_masks([vol[k][None] for k in range(vol.shape[0])])
    np.testing.assert_array_equal(np.asarray(m.dataobj), np.stack(expected, axis=0))


# ----------------------------------------------------------------------------- folders


def test_recursive_keeps_subfolders_and_skips_its_own_output(env: dict[str, Any], tmp_path: Path) -> None:
    from tumorseg import predict
    from tumorseg.imageio import write_png

    src = tmp_path / "tree"
    (src / "a").mkdir(parents=True)
    (src / "b" / "c").mkdir(parents=True)
    img = (env["plane"]).astype(np.uint8)
    for rel in ("top.png", "a/x.png", "b/c/x.png"):
        write_png(src / rel, img)
    (src / "notes.txt").write_text("not an image")
    flat = predict.run(_cfg(env, [src], tmp_path / "flat"))
    assert flat.n_written == 1 and (tmp_path / "flat" / "top.png").is_file()

    out = src / "predictions"  # inside the tree: never read back as inputs
    first = predict.run(_cfg(env, [src], out, recursive=True))
    assert first.n_written == 3
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a/x.png", "b/c/x.png", "top.png"]
    again = predict.run(_cfg(env, [src], out, recursive=True))
    assert again.n_written == 3


def test_other_formats_predict_on_their_own_grid(env: dict[str, Any], tmp_path: Path) -> None:
    """NRRD and DICOM-series volumes come back as NIfTI on the input's grid; JPEG and 2D DICOM as PNG."""
    import nibabel as nib
    import SimpleITK as sitk
    from PIL import Image

    from tests.test_formats import write_dicom, write_series
    from tumorseg import predict
    from tumorseg.imageio import decode, read_bytes
    from tumorseg.inference import Segmenter

    vol = env["volume"]  # (X=40, Y=56, Z=6)
    src = tmp_path / "in"
    src.mkdir()
    img = sitk.GetImageFromArray(np.transpose(vol, (2, 1, 0)))  # ITK's (Z, Y, X)
    img.SetSpacing((0.7, 0.7, 3.0))
    img.SetOrigin((4.0, -2.0, 9.0))
    sitk.WriteImage(img, str(src / "vol.nrrd"))
    write_series(src / "S1", np.transpose(vol, (2, 1, 0)).astype(np.uint16))
    Image.fromarray(env["plane"].astype(np.uint8)).save(src / "photo.jpg", quality=95)
    write_dicom(src / "us.dcm", env["plane"].astype(np.uint16), Modality="US", PixelSpacing=[0.2, 0.2])
    res = predict.run(_cfg(env, [src], tmp_path / "out"))
    assert res.n_written == 4 and res.n_slices == 6 + 6 + 1 + 1
    out = res.output_dir
    assert outputs(out) == ["S1.nii.gz", "photo.png", "us.png", "vol.nii.gz"]
    seg = Segmenter.from_checkpoint(env["ckpt"], device="cpu")
    for name, source in (("vol.nii.gz", src / "vol.nrrd"), ("S1.nii.gz", src / "S1")):
        grid = decode(read_bytes(source), source)
        m = nib.load(str(out / name))
        assert m.shape == grid.array.shape == vol.shape
        np.testing.assert_allclose(m.affine, grid.affine)  # exactly the input's voxels, in RAS+
        expected = seg.predict_masks([grid.array[None, :, :, k].astype(np.float32) for k in range(vol.shape[2])])
        np.testing.assert_array_equal(np.asarray(m.dataobj), np.stack(expected, axis=2))
    assert np.allclose(np.abs(np.diag(nib.load(str(out / "vol.nii.gz")).affine))[:3], [0.7, 0.7, 3.0])
    assert _read_png(out / "photo.png").shape == env["plane"].shape


# ----------------------------------------------------------------------------- CLI and errors


def test_cli_writes_masks_and_reports(env: dict[str, Any], tmp_path: Path) -> None:
    from tumorseg.cli import app

    src = env["src"]
    out = tmp_path / "cli_out"
    result = CliRunner().invoke(app, ["predict", str(env["ckpt"]), str(src / "wide.png"), str(src / "tall.png"),
                                      str(out), "--device", "cpu", "--experiment", EXPERIMENT])
    assert result.exit_code == 0, result.output
    assert f"wrote 2 mask(s) to {out}" in result.stdout
    assert outputs(out) == ["tall.png", "wide.png"]


def _one_line_exit_2(args: list[str], pattern: str) -> None:
    from tumorseg.cli import app

    result = CliRunner().invoke(app, ["predict", *args, "--device", "cpu", "--experiment", EXPERIMENT])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_refuses_to_write_into_or_over_the_inputs(env: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    from tumorseg.imageio import write_png

    src = tmp_path / "in"
    src.mkdir()
    write_png(src / "a.png", env["plane"].astype(np.uint8))
    write_png(src / "b.png", env["plane"][::-1].astype(np.uint8).copy())
    before = _hashes(src)
    ckpt = str(env["ckpt"])

    _one_line_exit_2([ckpt, str(src), str(src)], r"output folder is the input folder")
    _one_line_exit_2([ckpt, str(src / "a.png"), "-o", str(src)], r"output folder holds the input")
    link = tmp_path / "link"
    os.symlink(src, link)
    _one_line_exit_2([ckpt, str(src), str(link)], r"output folder is the input folder")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)  # an output folder holding the same files as the input
    _one_line_exit_2([ckpt, str(src), str(copy)], r"a copy of\) the input")
    assert _hashes(src) == before and _hashes(copy) == before
    # predict typed like ingest (IMAGES MASKS): ground-truth masks named like the outputs are never overwritten
    truth = tmp_path / "masks"
    truth.mkdir()
    for name in ("a.png", "b.png"):
        write_png(truth / name, (env["plane"] > 128).astype(np.uint8) * 255)
    kept = _hashes(truth)
    _one_line_exit_2([ckpt, str(src), str(truth)], r"masks/a\.png: exists and no earlier tumorseg predict wrote")
    assert _hashes(truth) == kept
    # its own folder: a second predict replaces what the first wrote
    from tumorseg.cli import app

    for _ in range(2):
        result = CliRunner().invoke(app, ["predict", ckpt, str(src), str(tmp_path / "pred"), "--device", "cpu",
                                          "--experiment", EXPERIMENT])
        assert result.exit_code == 0, result.output
    assert outputs(tmp_path / "pred") == ["a.png", "b.png"]


def test_input_and_model_errors(env: dict[str, Any], tmp_path: Path) -> None:
    ckpt = str(env["ckpt"])
    wide = str(env["src"] / "wide.png")
    out = str(tmp_path / "out")
    _one_line_exit_2([ckpt, str(tmp_path / "nope.png"), out], r"input not found")
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    _one_line_exit_2([ckpt, str(txt), "-o", out], r"unsupported format")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_exit_2([ckpt, str(empty), out], r"no images \(PNG, JPEG")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"garbage" * 20)
    _one_line_exit_2([str(corrupt), wide, out], r"corrupt or not a tumorseg checkpoint")
    _one_line_exit_2([str(env["bad_channels"]), wide, out], r"model takes 2 channel")
    _one_line_exit_2([str(tmp_path / "missing.pt"), wide, out], r"model not found")
    for bad in ("127", "-1", "nan"):  # a pixel value or a percentage for a probability
        _one_line_exit_2([ckpt, wide, out, "--threshold", bad], r"threshold")
    nan = tmp_path / "nan.tif"
    plane = env["plane"].astype(np.float32)
    plane[3, 4] = np.nan
    import tifffile

    tifffile.imwrite(nan, plane)
    _one_line_exit_2([ckpt, str(nan), out], r"nan\.tif: 1 NaN or infinite value\(s\); replace them")
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / os.fsdecode(b"scan\xe9.png")).write_bytes(Path(wide).read_bytes())  # Latin-1 bytes in the name
    _one_line_exit_2([ckpt, str(odd), out], r"scan\\xe9\.png: file name is not valid UTF-8")
    assert not any(Path(out).glob("*.png"))
