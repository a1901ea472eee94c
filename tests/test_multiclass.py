"""Multi-class label maps end to end (issue #9): train, evaluate, predict, the pyfunc model, the registry.

Hand-computed cases for the pieces (majority-class resizing, per-class counts, the confusion
matrix, per-class component filtering, the softmax prior), then a real-world-shaped dataset of
four labels whose mask files each hold one class ({0, k}, as BraTS-style exports often do),
ingested, trained, evaluated and predicted through the product's own code and files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from tumorseg.cli import app
from tumorseg.labels import Classes

LABELS = "0=background,1=necrosis,2=edema,3=enhancing"
NAMES = ["necrosis", "edema", "enhancing"]
REGIONS = "whole=1,2,3 core=1,3 enhancing=3"
TINY = ["--set", "plan=off", "--set", "epochs=20", "--set", "batch_size=4", "--set", "image_size=[48,48]",
        "--set", "device=cpu", "--set", "amp=false", "--set", "model.channels=[8,16,32]",
        "--set", "model.num_res_units=1", "--set", "optim.lr=0.01", "--set", "optim.schedule=none",
        "--set", "loss.name=dice_ce", "--set", "early_stopping_patience=null", "--set", "val_overlays=1"]


# ----------------------------------------------------------------------------- the pieces, by hand


def test_label_map_resize_keeps_each_blocks_majority_class() -> None:
    from tumorseg.inference import resize_mask

    m = np.array([[2, 2, 1, 3],
                  [2, 0, 3, 0],
                  [0, 0, 1, 1],
                  [0, 1, 1, 3]], dtype=np.uint8)
    out = resize_mask(m, (2, 2)).numpy()
    np.testing.assert_array_equal(out[0], [[2, 3], [0, 1]])  # no class is invented at a border
    binary = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=np.uint8)
    np.testing.assert_array_equal(resize_mask(binary, (2, 2)).numpy()[0], [[1, 0], [0, 1]])  # >= half: tumour


def test_per_class_counts_and_confusion_matrix_by_hand() -> None:
    from tumorseg.metrics import Counts, confusion, confusion_matrix, dice

    gt = np.array([[0, 1, 1], [2, 2, 0], [0, 0, 3]])
    pred = np.array([[0, 1, 2], [2, 2, 0], [1, 0, 0]])
    classes = Classes({0: "background", 1: "a", 2: "b", 3: "c"})

    def counts(c: Classes, p: np.ndarray, g: np.ndarray) -> list[Counts]:
        return [confusion(a, b) for a, b in zip(c.score_masks(p), c.score_masks(g), strict=True)]

    c1, c2, c3 = counts(classes, pred, gt)
    assert c1 == Counts(tp=1, fp=1, fn=1, tn=6) and dice(c1) == 0.5
    assert c2 == Counts(tp=2, fp=1, fn=0, tn=6) and dice(c2) == pytest.approx(0.8)
    assert c3 == Counts(tp=0, fp=0, fn=1, tn=8) and dice(c3) == 0.0
    m = confusion_matrix(pred, gt, 4)
    np.testing.assert_array_equal(m, [[3, 1, 0, 0], [0, 1, 1, 0], [0, 0, 2, 0], [1, 0, 0, 0]])
    assert m.sum() == gt.size and np.trace(m) == 6
    assert counts(Classes(), pred > 0, gt > 0) == [Counts(tp=4, fp=1, fn=1, tn=3)]  # binary: one class
    # regions unite classes: whole = {1, 2, 3}, core = {1, 3}
    regions = Classes(classes.labels, {"whole": [1, 2, 3], "core": [1, 3]})
    whole, core = counts(regions, pred, gt)
    assert whole == Counts(tp=4, fp=1, fn=1, tn=3) and core == Counts(tp=1, fp=1, fn=2, tn=5)


def test_multiclass_postprocess_takes_the_argmax_and_filters_each_class() -> None:
    from tumorseg.inference import Postprocess

    index = np.zeros((12, 12), dtype=np.uint8)
    index[1:5, 1:5] = 1  # class 1: 16 px and a stray 1 px
    index[10, 10] = 1
    index[7:10, 1:4] = 2  # class 2: 9 px and 2 px
    index[1, 9:11] = 2
    prob = np.stack([(index == k).astype(np.float32) * 0.8 + 0.05 for k in range(3)])
    np.testing.assert_array_equal(Postprocess().mask(prob), index)  # argmax, the threshold plays no part
    kept = Postprocess(keep="largest").mask(prob)
    assert int((kept == 1).sum()) == 16 and int((kept == 2).sum()) == 9 and kept[10, 10] == 0 and kept[1, 9] == 0
    assert int((Postprocess(keep="min_size", min_size=2).mask(prob) > 0).sum()) == 16 + 9 + 2


@pytest.mark.parametrize("model", [{"name": "unet", "channels": [8, 16], "num_res_units": 0},
                                   {"name": "dynunet", "channels": [8, 16, 32, 64], "deep_supervision": True}])
def test_softmax_output_starts_at_the_class_priors(model: dict[str, Any]) -> None:
    import torch

    from tumorseg.config import ModelConfig
    from tumorseg.model import build_model, init_output_bias

    net = build_model(ModelConfig(**model), 1, 3)
    init_output_bias(net, [0.9, 0.08, 0.02])
    root = getattr(net, "output_block", net)  # DynUNet: its output block, not the last deep-supervision head
    last = [m for m in root.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
            and m.out_channels == 3][-1]
    assert last.bias is not None
    np.testing.assert_allclose(torch.softmax(last.bias.detach(), 0).numpy(), [0.9, 0.08, 0.02], rtol=1e-5)
    net.eval()
    assert net(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("model", [
    {"name": "unet", "channels": [8, 16, 32]},
    {"name": "basic_unet", "channels": [64, 128, 256, 512, 1024]},  # the classic Ronneberger U-Net
    {"name": "attention_unet", "channels": [8, 16, 32]},
    {"name": "segresnet", "init_filters": 8},
    {"name": "dynunet", "channels": [8, 16, 32, 64], "deep_supervision": True},
    {"name": "flexible_unet", "backbone": "resnet18"},
])
def test_every_model_trains_one_softmax_channel_per_class(model: dict[str, Any]) -> None:
    import torch

    from tumorseg.config import LossConfig, ModelConfig
    from tumorseg.model import build_loss, build_model, init_output_bias, main_output

    net = build_model(ModelConfig(**model), 1, 4)
    init_output_bias(net, [0.85, 0.1, 0.03, 0.02])
    target = torch.zeros(2, 1, 32, 32)
    target[:, 0, 4:12, 4:12], target[:, 0, 16:24, 16:24], target[:, 0, 2:6, 24:30] = 1, 3, 2
    loss = build_loss(LossConfig(name="dice_ce"), multiclass=True)(net(torch.randn(2, 1, 32, 32)), target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    with torch.no_grad():
        assert main_output(net(torch.randn(1, 1, 32, 32))).shape == (1, 4, 32, 32)


def test_multiclass_dice_leaves_the_background_out() -> None:
    import torch

    from tumorseg.config import LossConfig
    from tumorseg.model import build_loss

    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 2:5, 2:5] = 2
    target[0, 0, 6:8, 6:8] = 1
    perfect = torch.nn.functional.one_hot(target[:, 0].long(), 3).permute(0, 3, 1, 2).float() * 40 - 20
    dice = build_loss(LossConfig(name="dice"), multiclass=True)
    assert float(dice(perfect, target)) < 1e-4
    # everything called background: the Dice over the tumour classes is as bad as it gets
    background = torch.zeros(1, 3, 8, 8)
    background[:, 0] = 20
    assert float(dice(background, target)) > 0.99


def test_foreground_crops_centre_each_class_alike_and_binary_masks_draw_as_before() -> None:
    """nnU-Net's oversampling: a class is drawn first, then one of its pixels; a small class is centred as often."""
    import torch

    from tumorseg.augment import crop_batch

    mask = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
    mask[0, 0, 4:36, 4:36] = 1  # 1024 pixels of class 1
    mask[0, 0, 56:58, 56:58] = 2  # 4 pixels of class 2: a uniform pixel would be one of them once in 257
    images, gen = mask.float(), torch.Generator().manual_seed(0)
    for labels in (mask, mask.float()):  # training passes float class indices
        hits = [bool((crop_batch(images, labels, (8, 8), 1.0, gen)[1] == 2).any()) for _ in range(200)]
        assert 0.35 < float(np.mean(hits)) < 0.65

    # a binary mask draws as before: the coin, the corner, then one of all its tumour pixels (no class draw)
    binary = (mask > 0).to(torch.uint8)
    gen, mirror = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    fg = torch.nonzero(binary[0, 0] > 0)
    for _ in range(20):
        _, y = crop_batch(images, binary, (8, 8), 1.0, gen)
        torch.rand(1, generator=mirror), torch.rand(1, 2, generator=mirror)
        centre = fg[int(torch.randint(0, len(fg), (1,), generator=mirror))]
        top, left = (min(max(int(c) - 4, 0), 56) for c in centre)
        assert torch.equal(y, binary[:, :, top:top + 8, left:left + 8])


def test_label_sets_round_trip_and_compare() -> None:
    binary, multi = Classes(), Classes({0: "background", 2: "core", 4: "edema"})
    assert binary.to_json() is None and binary.out_channels == 1 and binary.describe() == "binary"
    assert Classes({0: "bg", 255: "tumour"}).same_as(binary)  # one tumour class is binary whatever its value
    assert multi.out_channels == 3 and multi.foreground == [(1, "core"), (2, "edema")]
    assert Classes.from_json(multi.to_json()).same_as(multi) and not multi.same_as(binary)
    np.testing.assert_array_equal(multi.to_values(np.array([[0, 1, 2]])), [[0, 2, 4]])


def test_regions_parse_check_and_paint_back_into_labels() -> None:
    from tumorseg.errors import TumorsegError
    from tumorseg.labels import format_regions, parse_regions

    labels = {0: "background", 1: "necrosis", 2: "edema", 3: "enhancing"}
    regions = parse_regions("whole=1,2,3 core=3,1 enhancing=3", labels)
    assert regions == {"whole": [1, 2, 3], "core": [1, 3], "enhancing": [3]}
    assert parse_regions(format_regions(regions), labels) == regions
    for bad, said in [("whole=1,2,4", "holds 4, which is not a declared tumour value"), ("core=0,1", "holds 0"),
                      ("whole", "is not NAME=VALUE"), ("2nd=1", "must start with a letter")]:
        with pytest.raises(TumorsegError, match=said):
            parse_regions(bad, labels)
    for args, said in [(["--regions", "whole=1"], "--regions needs --labels"),
                       (["--labels", LABELS, "--regions", "whole=1,9"], "holds 9, which is not a declared")]:
        res = CliRunner().invoke(app, ["ingest", "nowhere", "--name", "x", *args])
        assert res.exit_code == 2 and said in res.output and len(res.output.strip().splitlines()) == 1
    classes = Classes(labels, regions)
    assert classes.out_channels == 3 and not classes.softmax and classes.foreground[0] == (0, "whole")
    index = np.array([[0, 1, 2], [3, 2, 0], [1, 3, 0]], dtype=np.uint8)
    masks = np.stack(classes.score_masks(index))
    np.testing.assert_array_equal(classes.paint(masks), index)  # nested regions come back as their labels
    assert classes.channel_priors([0.7, 0.1, 0.15, 0.05]) == pytest.approx([0.3, 0.15, 0.05])
    np.testing.assert_array_equal(classes.decide(masks * 0.9, 0.5), index)


def test_region_loss_trains_one_sigmoid_channel_per_region() -> None:
    import torch

    from tumorseg.config import LossConfig
    from tumorseg.model import build_loss

    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, 1:6, 1:6] = 2  # edema around
    target[0, 0, 2:4, 2:4] = 3  # enhancing
    regions = [[1, 2, 3], [1, 3], [3]]
    truth = torch.cat([torch.isin(target.long(), torch.tensor(r)) for r in regions], 1).float()
    loss = build_loss(LossConfig(name="dice_ce"), multiclass=True, regions=regions)
    assert float(loss(truth * 40 - 20, target)) < 1e-3
    assert float(loss(-truth * 40 + 20, target)) > 1.0


# ----------------------------------------------------------------------------- a real-world-shaped dataset


def _blob(size: int, cy: int, cx: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _one_class_per_file(root: Path, n_patients: int = 8, size: int = 48) -> None:
    """Per patient, one file per class: each mask holds one class ({0, k}); the blob's brightness says which."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for p in range(n_patients):
        for k in (1, 2, 3):
            for s in range(2):
                cy, cx = (int(v) for v in rng.integers(12, size - 12, 2))
                blob = _blob(size, cy, cx, int(rng.integers(5, 10)))
                image = rng.integers(0, 40, (size, size)).astype(np.uint8)
                image[blob] = 70 * k
                stem = f"patient_{p:02d}_k{k}_s{s}"
                Image.fromarray(image).save(images / f"{stem}.png")
                Image.fromarray((blob * k).astype(np.uint8)).save(masks / f"{stem}.png")


def _ingest(root: Path, out: Path, *extra: str) -> str:
    for seed in range(20):
        res = CliRunner().invoke(app, ["ingest", str(root / "images"), str(root / "masks"), "--name", root.name,
                                       "--out-dir", str(out), "--group-pattern", r"(patient_\d+)", "--workers", "1",
                                       "--seed", str(seed), *extra])
        if res.exit_code == 0:
            return str(out / root.name)
        assert "pass --seed" in res.output or "no tumour case" in res.output, res.output
    raise AssertionError("no seed gives every split every class")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> dict[str, Any]:
    """Four labels, one class per mask file: ingested with --labels and trained (tiny, CPU)."""
    root = tmp_path_factory.mktemp("mc")
    _one_class_per_file(root / "bra")
    manifest = _ingest(root / "bra", root / "dm", "--labels", LABELS)
    res = CliRunner().invoke(app, ["train", manifest, "--out", str(root / "runs"), "--set", "run_name=mc",
                                   "--set", f"tracking.uri={mlflow_uri}", *TINY])
    assert res.exit_code == 0, res.output
    return {"root": root, "manifest": manifest, "run": root / "runs" / "mc"}


@pytest.fixture(scope="module")
def regions_run(trained: dict[str, Any], mlflow_uri: str) -> dict[str, Any]:
    """The same data with BraTS-style regions: ingested with --regions, trained with a sigmoid per region."""
    root = trained["root"]
    manifest = _ingest(root / "bra", root / "dm-regions", "--labels", LABELS, "--regions", REGIONS)
    res = CliRunner().invoke(app, ["train", manifest, "--out", str(root / "runs"), "--set", "run_name=regions",
                                   "--set", f"tracking.uri={mlflow_uri}", *TINY])
    assert res.exit_code == 0, res.output
    return {"root": root, "manifest": manifest, "run": root / "runs" / "regions"}


@pytest.mark.slow
def test_region_based_training_evaluates_and_predicts_per_region(regions_run: dict[str, Any],
                                                                 tmp_path: Path) -> None:
    from tumorseg import checkpoint

    ckpt = checkpoint.load(regions_run["run"] / "best.pt")
    assert ckpt["regions"] == [["whole", [1, 2, 3]], ["core", [1, 3]], ["enhancing", [3]]]  # the painting order
    info = json.loads((Path(regions_run["manifest"]) / "manifest.json").read_text())
    assert info["regions"] == ckpt["regions"]  # a list: sorted JSON keys cannot reorder it
    assert all(f"val_dice_{r}" in ckpt["history"][-1] for r in ("whole", "core", "enhancing"))
    assert ckpt["best_val_dice"] > 0.3
    res = CliRunner().invoke(app, ["evaluate", str(regions_run["run"]), "--manifest", regions_run["manifest"],
                                   "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    per_case = pd.read_csv(tmp_path / "ev" / "per_case.csv")
    assert list(per_case["label"].unique()) == ["whole", "core", "enhancing"]
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary["classes"]) == {"whole", "core", "enhancing"} and summary["regions"][1] == ["core", [1, 3]]
    # the whole-tumour row of a case counts every tumour pixel of its truth
    for (_, whole), (_, one) in zip(per_case[per_case["label"] == "whole"].iterrows(),
                                    per_case[per_case["label"] == "enhancing"].iterrows(), strict=True):
        assert whole["gt_pixels"] >= one["gt_pixels"]
    image = sorted((regions_run["root"] / "bra" / "images").glob("*.png"))[0]
    res = CliRunner().invoke(app, ["predict", str(regions_run["run"]), str(image), "--output-dir",
                                   str(tmp_path / "p"), "--probabilities"])
    assert res.exit_code == 0, res.output
    assert set(np.unique(np.asarray(Image.open(tmp_path / "p" / image.name)))) <= {0, 1, 2, 3}
    import tifffile

    prob = tifffile.imread(tmp_path / "p" / f"{image.stem}_prob.tif")
    assert prob.shape == (3, 48, 48) and prob.min() >= 0 and prob.max() <= 1  # a sigmoid per region
    # a manifest of the same labels without regions is another label set
    res = CliRunner().invoke(app, ["evaluate", str(regions_run["run"]), "--manifest", str(regions_run["root"] /
                                   "dm" / "bra"), "--out", str(tmp_path / "ev2")])
    assert res.exit_code == 2 and "regions whole=1,2,3 core=1,3 enhancing=3" in res.output


@pytest.mark.slow
def test_training_reports_val_dice_for_every_class(trained: dict[str, Any]) -> None:
    from tumorseg import checkpoint, tracking

    ckpt = checkpoint.load(trained["run"] / "best.pt")
    assert ckpt["labels"] == {"0": "background", "1": "necrosis", "2": "edema", "3": "enhancing"}
    history = ckpt["history"]
    for row in history:
        per_class = [row[f"val_dice_{n}"] for n in NAMES]
        finite = [v for v in per_class if math.isfinite(v)]
        assert row["val_dice"] == pytest.approx(float(np.mean(finite)))  # the mean drives the best checkpoint
    # the best checkpoint is the epoch with the best val Dice smoothed over epochs; it reports its own val Dice
    assert history[-1]["val_dice_smoothed"] == pytest.approx(max(r["val_dice_smoothed"] for r in history))
    assert ckpt["best_val_dice"] == pytest.approx(history[-1]["val_dice"])
    run_id = json.loads((trained["run"] / "result.json").read_text())["mlflow_run_id"]
    run = tracking.client(None).get_run(run_id)
    for name in NAMES:
        assert f"val_dice_{name}" in run.data.metrics
    assert run.data.params["labels"] == LABELS
    assert ckpt["best_val_dice"] > 0.3  # 20 short epochs: learning, not chance


@pytest.mark.slow
def test_evaluate_writes_a_row_per_case_and_class_and_a_confusion_matrix(trained: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["evaluate", str(trained["run"]), "--manifest", trained["manifest"], "--split",
                                   "test", "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    ev = tmp_path / "ev"
    per_case = pd.read_csv(ev / "per_case.csv")
    cases = per_case["case_id"].unique()
    assert list(per_case.columns[:4]) == ["case_id", "group", "split", "label"]
    assert len(per_case) == 3 * len(cases) and set(per_case["label"]) == set(NAMES)
    # the empty rule per class: a class absent from both truth and prediction is NaN, never 1
    absent = per_case[per_case["gt_empty"] & per_case["pred_empty"]]
    assert absent["dice"].isna().all() and len(absent) > 0
    summary = json.loads((ev / "summary.json").read_text())
    assert set(summary["classes"]) == set(NAMES) and summary["n_cases"] == len(cases)
    out = " ".join(res.stdout.split())  # the printed summary: cases (not case x class rows), then each class
    assert f"test: {len(cases)} cases" in out
    for n in NAMES:
        assert f"class {n}: mean Dice {summary['classes'][n]['dice_mean']:.4f}" in out
    means = [summary["classes"][n]["dice_mean"] for n in NAMES]
    assert summary["dice_mean"] == pytest.approx(np.nanmean([m if m is not None else np.nan for m in means]))
    for n in NAMES:
        sub = per_case[per_case["label"] == n]
        assert summary["classes"][n]["dice_mean"] == pytest.approx(sub["dice"].mean())
        assert summary[f"dice_mean_{n}"] == summary["classes"][n]["dice_mean"]
    conf = pd.read_csv(ev / "confusion.csv")
    assert list(conf["true"]) == ["background", *NAMES]
    matrix = conf.drop(columns="true").to_numpy()
    one_class = per_case[per_case["label"] == NAMES[0]]
    assert matrix.sum() == one_class[["tp", "fp", "fn", "tn"]].to_numpy().sum()  # every pixel once
    for k, n in enumerate(NAMES, 1):  # the diagonal is each class's true positives
        assert matrix[k, k] == per_case[per_case["label"] == n]["tp"].sum()
        assert matrix[k].sum() == per_case[per_case["label"] == n]["gt_pixels"].sum()
    per_group = pd.read_csv(ev / "per_group.csv")
    assert set(per_group["label"]) == set(NAMES) and len(per_group) == 3 * per_case["group"].nunique()
    for name in ("gallery.png", "confusion.png", "dice.png"):
        assert Image.open(ev / name).size[0] > 100


@pytest.mark.slow
def test_predict_writes_label_maps_and_one_probability_channel_per_class(trained: dict[str, Any],
                                                                         tmp_path: Path) -> None:
    import nibabel as nib
    import tifffile

    images = sorted((trained["root"] / "bra" / "images").glob("patient_00_*.png"))[:3]
    res = CliRunner().invoke(app, ["predict", str(trained["run"]), *map(str, images), "--output-dir",
                                   str(tmp_path / "png"), "--probabilities"])
    assert res.exit_code == 0, res.output
    for img in images:
        mask = np.asarray(Image.open(tmp_path / "png" / img.name))
        assert mask.dtype == np.uint8 and mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 1, 2, 3}
        prob = tifffile.imread(tmp_path / "png" / f"{img.stem}_prob.tif")
        assert prob.shape == (4, 48, 48) and prob.dtype == np.float32
        np.testing.assert_allclose(prob.sum(axis=0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(mask, prob.argmax(axis=0))  # no component rule chosen: the argmax
    res = CliRunner().invoke(app, ["predict", str(trained["run"]), str(images[0]), "--output-dir",
                                   str(tmp_path / "nii"), "--format", "nifti", "--probabilities"])
    assert res.exit_code == 0, res.output
    nii = nib.load(str(tmp_path / "nii" / f"{images[0].stem}.nii.gz"))
    assert np.issubdtype(nii.get_data_dtype(), np.integer)
    np.testing.assert_array_equal(np.asarray(nii.dataobj), np.asarray(Image.open(tmp_path / "png" / images[0].name)))
    assert nib.load(str(tmp_path / "nii" / f"{images[0].stem}_prob.nii.gz")).shape == (48, 48, 4)


@pytest.mark.slow
def test_the_pyfunc_model_returns_label_maps(trained: dict[str, Any], tmp_path: Path) -> None:
    import mlflow.pyfunc

    from tumorseg.imageio import load_image

    result = json.loads((trained["run"] / "result.json").read_text())
    model = mlflow.pyfunc.load_model(result["model_uri"])
    assert model.metadata.metadata["tumorseg_labels"] == LABELS
    image = load_image(sorted((trained["root"] / "bra" / "images").glob("*.png"))[0])
    masks = model.predict(image[None])
    probs = model.predict(image[None], params={"probabilities": True})
    assert masks.shape == (1, 48, 48) and masks.dtype == np.uint8 and set(np.unique(masks)) <= {0, 1, 2, 3}
    assert probs.shape == (1, 4, 48, 48)
    np.testing.assert_array_equal(masks[0], probs[0].argmax(axis=0))


@pytest.mark.slow
def test_a_model_and_a_manifest_of_different_label_sets_are_refused(trained: dict[str, Any],
                                                                   manifest: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["evaluate", str(trained["run"]), "--manifest", str(manifest), "--out",
                                   str(tmp_path / "ev")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert f"its labels are binary but model {trained['run']} was trained on {LABELS}" in res.output
    binary = CliRunner().invoke(app, ["train", str(manifest), "--out", str(tmp_path / "runs"), "--set", "run_name=b",
                                      "--set", "epochs=1", "--set", "max_steps=1", "--set", "log_model=false",
                                      *TINY[:2], "--set", "model.channels=[8,16]", "--set", "image_size=[32,32]"])
    assert binary.exit_code == 0, binary.output
    res = CliRunner().invoke(app, ["evaluate", str(tmp_path / "runs" / "b"), "--manifest", trained["manifest"],
                                   "--out", str(tmp_path / "ev2")])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert f"its labels are {LABELS} but model" in res.output and "was trained on binary" in res.output


# ----------------------------------------------------------------------------- the pipeline and the registry


def _pipeline(path: Path, data: Path, classes: int, uri: str) -> Path:
    import yaml

    doc: dict[str, Any] = {
        "name": path.stem, "work_dir": str(path.parent / f"work-{path.stem}"),
        "synth": {"n": 24, "size": 64, "seed": 0, "classes": classes},
        "data": {"images_dir": str(data / "images"), "masks_dir": str(data / "masks"), "name": f"s{classes}",
                 "group_pattern": r"(patient_\d+)", "seed": 3, "workers": 1},
        "train": {"plan": "off", "epochs": 2, "batch_size": 4, "image_size": [64, 64], "device": "cpu", "amp": False,
                  "val_overlays": 1, "model": {"channels": [8, 16, 32], "num_res_units": 1},
                  "optim": {"lr": 0.01, "schedule": "none"}},
        "evaluate": {"split": "test", "device": "cpu", "bootstrap": 0, "workers": 0, "gallery_k": 1},
        "registry": {"model_name": "tiny-multiclass"},
        "tracking": {"experiment": "test-multiclass", "uri": uri},
    }
    if classes > 1:
        doc["data"]["labels"] = {0: "background", 1: "class_1", 2: "class_2", 3: "class_3"}
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_multiclass_pipeline_registers_a_champion_and_refuses_another_label_set(tmp_path: Path,
                                                                                mlflow_uri: str) -> None:
    from tumorseg import tracking
    from tumorseg.pipeline import registry

    res = CliRunner().invoke(app, ["pipeline", "run", str(_pipeline(tmp_path / "mc.yaml", tmp_path / "d3", 3,
                                                                     mlflow_uri))])
    assert res.exit_code == 0 and "first champion" in res.output, res.output
    cl = tracking.client(mlflow_uri)
    champ = cl.get_model_version_by_alias("tiny-multiclass", registry.CHAMPION)
    assert champ.tags[registry.TAG_LABELS] == "0=background,1=class_1,2=class_2,3=class_3"
    ev_run = cl.get_run(champ.tags[registry.TAG_EVAL_RUN])
    for name in ("class_1", "class_2", "class_3"):
        assert f"test_dice_mean_{name}" in ev_run.data.metrics
    files = {a.path for a in cl.list_artifacts(ev_run.info.run_id, "evaluation")}
    assert {"evaluation/confusion.csv", "evaluation/confusion.png", "evaluation/gallery.png"} <= files
    per_case = pd.read_csv(cl.download_artifacts(ev_run.info.run_id, "evaluation/per_case.csv", str(tmp_path)))
    assert set(per_case["label"]) == {"class_1", "class_2", "class_3"}

    # a binary model under the same registered name is refused before it is registered
    res = CliRunner().invoke(app, ["pipeline", "run", str(_pipeline(tmp_path / "bin.yaml", tmp_path / "d1", 1,
                                                                     mlflow_uri))])
    assert res.exit_code == 2, res.output
    assert "models of different label sets are not compared" in res.output
    assert len(cl.search_model_versions("name = 'tiny-multiclass'")) == 1


def test_postprocess_pick_needs_a_gain_and_drops_specks_that_cost_nothing() -> None:
    from tumorseg.inference import Postprocess
    from tumorseg.train.postprocess import MIN_GAIN, pick

    base = Postprocess()
    grid = [(Postprocess(tta=tta, keep=keep, min_size=9 if keep == "min_size" else 0), score)
            for tta, keep, score in [(False, "all", 0.90), (False, "largest", 0.85), (False, "min_size", 0.90),
                                     (True, "all", 0.95), (True, "largest", 0.80), (True, "min_size", 0.95)]]
    best, score = pick(grid, base, 0.90)
    assert (best.tta, best.keep, best.min_size, score) == (True, "min_size", 9, 0.95)  # a tie: specks go
    worse = [(p, s - 0.001) if p.keep == "min_size" else (p, s) for p, s in grid]
    assert pick(worse, base, 0.90)[0].keep == "all"  # a filter that costs val Dice is not taken
    small = [(p, 0.90 + MIN_GAIN / 2) if p.keep == "all" else (p, 0.0) for p, _ in grid]
    assert pick(small, base, 0.90) == (base, 0.90)  # no gain over MIN_GAIN: the plain prediction


def test_synth_classes_writes_label_maps_whose_brightness_tells_the_class(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["synth", str(tmp_path), "--n", "8", "--size", "32", "--classes", "3"])
    assert res.exit_code == 0 and "--labels 0=background,1=class_1,2=class_2,3=class_3" in res.output
    seen: set[int] = set()
    for mask_path in sorted((tmp_path / "masks").glob("*.png")):
        mask = np.asarray(Image.open(mask_path))
        image = np.asarray(Image.open(tmp_path / "images" / mask_path.name))
        seen |= set(np.unique(mask).tolist())
        for k in range(1, 4):  # every pixel of class k is k/3 bright, whatever else the image holds
            assert (image[mask == k] == round(255 * k / 3)).all() or not (mask == k).any()
    assert seen == {0, 1, 2, 3}
    res = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--classes", "0"])
    assert res.exit_code == 2 and "--classes 0" in res.output
