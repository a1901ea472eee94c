"""``tumorseg evaluate`` on real files: synthetic PNGs -> ingest -> a tiny trained checkpoint -> scores."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from helpers import ingest_synth
from typer.testing import CliRunner

from tumorseg.config import EvaluateConfig, LossConfig, ModelConfig, TrackingConfig, TrainConfig
from tumorseg.fsutil import sha256_file
from tumorseg.postprocessing import Postprocess

EXPERIMENT = "test-evaluate"
SPLIT = "train"  # the split with the most cases (and some empty masks) in the synthetic manifest
PER_CASE = ["case_id", "group", "split", "tp", "fp", "fn", "tn", "gt_pixels", "pred_pixels", "gt_empty",
            "pred_empty", "dice", "iou", "precision", "recall"]
PER_GROUP = ["group", "n_cases", "tp", "fp", "fn", "tn", "gt_pixels", "pred_pixels", "gt_empty", "pred_empty",
             "dice", "iou", "precision", "recall"]
MODEL_CFG = ModelConfig(channels=[8, 16, 32], num_res_units=1)


# ----------------------------------------------------------------------------- fixtures



def make_checkpoint(path: Path, manifest_dir: Path | None, *, train_steps: int = 40, in_channels: int = 1,
                    mlflow_run_id: str = "", model_cfg: ModelConfig = MODEL_CFG) -> Path:
    """A tiny UNet fitted briefly at 32x32 on the manifest's train split (resized back to 64x64 at inference)."""
    import torch

    from tumorseg import checkpoint
    from tumorseg.model import build_model

    torch.manual_seed(0)
    net = build_model(model_cfg, in_channels)
    digest = ""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net on a shared 2-core machine: more threads only add contention
    try:
        if manifest_dir is not None and train_steps:
            digest = _fit(net, manifest_dir, train_steps, in_channels)
    finally:
        torch.set_num_threads(threads)
    cfg = TrainConfig(image_size=(32, 32), model=model_cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save(path, checkpoint.build_payload(net, cfg, in_channels, state={"epoch": 1, "best_val_dice": 0.0},
                                                   manifest_digest=digest, manifest_name="evalsyn",
                                                   mlflow_run_id=mlflow_run_id))
    return path


def _fit(net: Any, manifest_dir: Path, train_steps: int, in_channels: int) -> str:
    """Fit ``net`` with Dice loss on the train split; returns the manifest digest."""
    import torch

    from tumorseg.imageio import load_image, load_mask
    from tumorseg.inference import preprocess, resize_mask
    from tumorseg.manifest import image_path, load_manifest, mask_paths
    from tumorseg.model import build_loss

    info, df = load_manifest(manifest_dir)
    rows = df[df["split"] == "train"].to_dict("records")
    x = torch.stack([preprocess(load_image(image_path(info, r)), (32, 32), in_channels) for r in rows])
    y = torch.stack([resize_mask(load_mask(mask_paths(info, r)), (32, 32)) for r in rows])
    loss_fn = build_loss(LossConfig())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(train_steps):
        idx = torch.randint(0, len(x), (8,), generator=gen)
        opt.zero_grad()
        loss_fn(net(x[idx]), y[idx]).backward()
        opt.step()
    return info.dataset_digest


def relabel(src: Path, dest: Path, **meta: Any) -> Path:
    """Copy a checkpoint with some metadata changed (same weights)."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt.update(meta)
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dest)
    return dest


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, synth_data: Path, mlflow_uri: str) -> dict[str, Any]:
    """Manifest, run folder, checkpoint, a fake training run with a logged + registered model."""
    import mlflow

    root = tmp_path_factory.mktemp("evaluate")
    mlflow.set_tracking_uri(mlflow_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    tracking = TrackingConfig(uri=mlflow_uri, experiment=EXPERIMENT)
    manifest = ingest_synth(synth_data / "images", synth_data / "masks", root / "manifests", "evalsyn", tracking)
    run_dir = root / "runs" / "tiny"
    best = make_checkpoint(run_dir / "best.pt", manifest)
    (run_dir / "config.yaml").write_text("model: tiny\n")
    ckpt = root / "tiny.pt"
    shutil.copy(best, ckpt)

    # a "training run" that logged the checkpoint as its MLflow model, registered as version 1 (@champion)
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name="fake-train") as run:
        train_run_id = run.info.run_id
        with_run = relabel(best, root / "model_dir" / "model.pt", mlflow_run_id=train_run_id)
        mlflow.log_artifact(str(with_run), "model/artifacts")
        source = mlflow.get_artifact_uri("model")
    client = mlflow.MlflowClient()
    client.create_registered_model("tumorseg-test-evaluate")
    mv = client.create_model_version("tumorseg-test-evaluate", source, run_id=train_run_id)
    client.set_registered_model_alias("tumorseg-test-evaluate", "champion", mv.version)

    from tumorseg.manifest import load_manifest

    info, df = load_manifest(manifest)
    return {"root": root, "manifest": manifest, "run_dir": run_dir, "best": best, "ckpt": ckpt,
            "with_run": with_run, "train_run_id": train_run_id, "version": mv.version, "tracking": tracking,
            "uri": mlflow_uri, "info": info, "df": df}


def evaluate_cfg(world: dict[str, Any], model: str, out: Path, **kw: Any) -> EvaluateConfig:
    base: dict[str, Any] = {"model": model, "manifest": world["manifest"], "split": SPLIT, "out": out,
                            "bootstrap": 200, "gallery_k": 2, "tracking": world["tracking"], "device": "cpu"}
    base.update(kw)
    return EvaluateConfig(**base)


# ----------------------------------------------------------------------------- outputs of a real model


def test_run_folder_outputs_are_complete_and_consistent(world: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    from tumorseg import evaluate
    from tumorseg.imageio import load_image, load_mask
    from tumorseg.inference import Segmenter
    from tumorseg.manifest import image_path, mask_paths
    from tumorseg.metrics import EMPTY_RULES

    rows = world["df"][world["df"]["split"] == SPLIT].reset_index(drop=True)
    res = evaluate.run(evaluate_cfg(world, str(world["run_dir"]), tmp_path / "ev", batch_size=5))
    assert res.out_dir == tmp_path / "ev"
    assert res.n_cases == len(rows) >= 10
    for name in ("per_case.csv", "per_group.csv", "summary.json", "gallery.png", "dice.png", "config.yaml"):
        assert (res.out_dir / name).is_file(), name

    pc = pd.read_csv(res.out_dir / "per_case.csv", dtype={"case_id": str, "group": str})
    assert list(pc.columns) == PER_CASE
    assert len(pc) == len(rows)
    assert list(pc["case_id"]) == list(rows["case_id"])
    assert list(pc["group"]) == list(rows["group"])
    assert set(pc["split"]) == {SPLIT}

    # counts recomputed independently: the one loader, the model at original size, plain numpy
    info = world["info"]
    seg = Segmenter.from_checkpoint(world["best"], device="cpu")
    images = [load_image(image_path(info, r)) for r in rows.to_dict("records")]
    gts = [load_mask(mask_paths(info, r)) for r in rows.to_dict("records")]
    probs: list[np.ndarray] = []
    for i in range(0, len(images), 5):  # same batches as evaluate
        probs.extend(seg.predict_proba(images[i : i + 5]))
    for k, (gt, prob) in enumerate(zip(gts, probs, strict=True)):
        assert gt.shape == (64, 64) and prob.shape == (64, 64)  # original size, not the 32x32 network size
        pred = prob > seg.threshold
        g = gt.astype(bool)
        row = pc.iloc[k]
        assert (row.tp, row.fp, row.fn, row.tn) == (int((pred & g).sum()), int((pred & ~g).sum()),
                                                    int((~pred & g).sum()), int((~pred & ~g).sum()))
        assert row.gt_pixels == int(g.sum()) and row.pred_pixels == int(pred.sum())
        assert bool(row.gt_empty) == (not g.any()) and bool(row.pred_empty) == (not pred.any())
    assert pc["gt_empty"].any(), "the split should hold an empty-mask case"
    assert 0 < pc["dice"].mean() < 1, "the tiny model should be neither useless nor perfect"

    # per-case scores follow from the counts (NaN only when both are empty)
    denom = 2 * pc.tp + pc.fp + pc.fn
    expected = np.where(denom > 0, 2 * pc.tp / denom.where(denom > 0, 1), np.nan)
    np.testing.assert_allclose(pc["dice"], expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(pc["iou"], np.where(denom > 0, pc.tp / (pc.tp + pc.fp + pc.fn).where(denom > 0, 1),
                                                   np.nan), atol=1e-9)

    # per-group sums equal per-case sums
    pg = pd.read_csv(res.out_dir / "per_group.csv", dtype={"group": str})
    assert list(pg.columns) == PER_GROUP
    sums = pc.groupby("group")[["tp", "fp", "fn", "tn", "gt_pixels", "pred_pixels"]].sum()
    assert list(pg["group"]) == list(sums.index)
    for col in ("tp", "fp", "fn", "tn", "gt_pixels", "pred_pixels"):
        assert list(pg[col]) == list(sums[col]), col
    assert list(pg["n_cases"]) == list(pc.groupby("group").size())
    np.testing.assert_allclose(pg["dice"], 2 * pg.tp / (2 * pg.tp + pg.fp + pg.fn), atol=1e-9)

    # summary recomputed from the CSVs
    s = json.loads((res.out_dir / "summary.json").read_text())
    d = pc["dice"].dropna().to_numpy()
    assert s["n_cases"] == len(pc) == res.n_cases
    assert s["n_scored"] == len(d)
    assert s["dice_mean"] == pytest.approx(d.mean(), abs=1e-9) == res.summary["dice_mean"]
    assert s["dice_median"] == pytest.approx(np.median(d), abs=1e-9)
    assert s["dice_std"] == pytest.approx(np.std(d, ddof=1), abs=1e-9)
    assert s["dice_p5"] == pytest.approx(np.percentile(d, 5), abs=1e-9)
    assert s["dice_p95"] == pytest.approx(np.percentile(d, 95), abs=1e-9)
    assert s["iou_mean"] == pytest.approx(pc["iou"].dropna().mean(), abs=1e-9)
    assert s["dice_ci_low"] <= s["dice_mean"] <= s["dice_ci_high"]
    tp, fp, fn = pc.tp.sum(), pc.fp.sum(), pc.fn.sum()
    assert s["dice_global"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-9)
    assert s["dice_group_mean"] == pytest.approx(pg["dice"].mean(), abs=1e-9)
    empty = pc[pc["gt_empty"]]
    assert s["n_gt_empty"] == len(empty)
    assert s["fp_rate_empty"] == pytest.approx((~empty["pred_empty"]).mean(), abs=1e-12)
    tn = pc.tn.sum()
    assert s["pixel_accuracy"] == pytest.approx((tp + tn) / (tp + tn + fp + fn), abs=1e-12)  # beside Dice/IoU
    assert s["pixel_accuracy_tumour"] == pytest.approx(tp / (tp + fn), abs=1e-12)
    assert s["pixel_accuracy_background"] == pytest.approx(tn / (tn + fp), abs=1e-12)
    assert "Dice" in s["pixel_accuracy_note"]
    assert s["empty_rule"] == EMPTY_RULES["nan"]
    assert s["model"]["checkpoint_sha256"] == sha256_file(world["best"])
    assert s["model"]["kind"] == "run_dir" and s["model"]["ref"] == str(world["run_dir"])
    assert s["manifest"]["dataset_digest"] == world["info"].dataset_digest
    assert s["same_manifest_as_training"] is True

    for png in ("gallery.png", "dice.png"):
        with Image.open(res.out_dir / png) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100

    # MLflow: its own run, split-named metrics, the files as artifacts, the manifest as dataset input
    import mlflow

    client = mlflow.MlflowClient(world["uri"])
    run = client.get_run(res.run_id)
    assert run.data.tags["tumorseg.stage"] == "evaluate"
    assert run.data.tags["tumorseg.checkpoint_sha256"] == sha256_file(world["best"])
    note = run.data.tags["mlflow.note.content"]  # the run's description in the UI
    assert note.startswith(f"{SPLIT} mean Dice {s['dice_mean']:.4f} on {len(pc)} cases") and "`evalsyn`" in note
    assert "tumorseg.train_run_id" not in run.data.tags  # a checkpoint without a training run
    assert res.model.train_run_id == ""
    m = run.data.metrics
    assert m[f"{SPLIT}_dice_mean"] == pytest.approx(s["dice_mean"])
    assert m[f"{SPLIT}_dice_median"] == pytest.approx(s["dice_median"])
    assert m[f"{SPLIT}_iou_mean"] == pytest.approx(s["iou_mean"])
    assert m[f"{SPLIT}_dice_global"] == pytest.approx(s["dice_global"])
    assert m[f"{SPLIT}_dice_group_mean"] == pytest.approx(s["dice_group_mean"])
    assert m[f"{SPLIT}_fp_rate_empty"] == pytest.approx(s["fp_rate_empty"])
    assert m[f"{SPLIT}_n_cases"] == len(pc)
    arts = {a.path for a in client.list_artifacts(res.run_id, "evaluation")}
    assert {f"evaluation/{n}" for n in ("per_case.csv", "per_group.csv", "summary.json", "gallery.png",
                                        "dice.png")} <= arts
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "evalsyn"
    assert world["info"].dataset_digest.startswith(inputs[0].dataset.digest)


def test_checkpoint_file_and_write_back_to_training_run(world: dict[str, Any], tmp_path: Path) -> None:
    import mlflow

    from tumorseg import evaluate

    client = mlflow.MlflowClient(world["uri"])
    res = evaluate.run(evaluate_cfg(world, str(world["with_run"]), tmp_path / "ev", split="test"))
    assert res.model.kind == "checkpoint"
    train_id = world["train_run_id"]
    assert res.model.train_run_id == train_id
    assert client.get_run(res.run_id).data.tags["tumorseg.train_run_id"] == train_id
    train = client.get_run(train_id)
    for key in ("dice_mean", "dice_median", "iou_mean", "dice_global", "dice_group_mean"):
        assert train.data.metrics[f"test_{key}"] == pytest.approx(res.summary[key]), key
    assert train.data.tags["tumorseg.eval_run_id.test"] == res.run_id

    off = evaluate.run(evaluate_cfg(world, str(world["with_run"]), tmp_path / "off", split="val",
                                    write_back=False))
    assert off.run_id
    assert not any(k.startswith("val_") for k in client.get_run(train_id).data.metrics)


def test_mlflow_run_id_and_registered_model_refs(world: dict[str, Any], tmp_path: Path) -> None:
    from tumorseg import evaluate
    from tumorseg.modelref import resolve_model

    train_id = world["train_run_id"]
    sha = sha256_file(world["with_run"])
    local = evaluate.run(evaluate_cfg(world, str(world["with_run"]), tmp_path / "local", write_back=False))
    by_id = evaluate.run(evaluate_cfg(world, train_id, tmp_path / "id", write_back=False))
    champion = evaluate.run(evaluate_cfg(world, "models:/tumorseg-test-evaluate@champion", tmp_path / "champ",
                                         write_back=False))
    assert by_id.model.model_uri == f"runs:/{train_id}/model"
    assert by_id.model.checkpoint_path == f"runs:/{train_id}/model/artifacts/model.pt"
    assert champion.model.registered_name == "tumorseg-test-evaluate"
    assert champion.model.registered_version == str(world["version"])
    assert champion.model.checkpoint_path == f"models:/tumorseg-test-evaluate/{world['version']}/artifacts/model.pt"
    for res in (by_id, champion):
        assert res.model.checkpoint_sha256 == sha
        assert res.model.train_run_id == train_id
        a = pd.read_csv(local.out_dir / "per_case.csv")
        b = pd.read_csv(res.out_dir / "per_case.csv")
        pd.testing.assert_frame_equal(a, b)
    _, ref = resolve_model(f"models:/tumorseg-test-evaluate/{world['version']}", world["tracking"], "cpu")
    assert ref.kind == "registry" and ref.checkpoint_sha256 == sha
    _, ref = resolve_model(f"runs:/{train_id}/model", world["tracking"], "cpu")
    assert ref.kind == "run" and ref.train_run_id == train_id


# ----------------------------------------------------------------------------- exact scores with oracle models


class OracleSegmenter:
    """Predicts a fixed function of the true mask: exact, known scores."""

    def __init__(self, truth: dict[bytes, np.ndarray], mode: str) -> None:
        import torch

        self.truth, self.mode = truth, mode
        self.threshold = 0.5
        self.in_channels = self.base_channels = 1
        self.context = 0  # a plain 2D model (no neighbouring slices)
        self.device = torch.device("cpu")
        self.post = Postprocess(threshold=self.threshold)  # slice by slice (not volumetric)
        self.config = TrainConfig()  # a 2D model's (two image_size values)

    def mask(self, prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
        return (prob > (self.threshold if threshold is None else threshold)).astype(np.uint8)

    def stack_masks(self, probs: list[np.ndarray], threshold: float | None = None) -> list[np.ndarray]:
        return [self.mask(p, threshold) for p in probs]

    def intensity_outside_training(self, image: np.ndarray) -> str | None:
        return None

    def batch_for(self, requested: int) -> int:
        return requested

    def predict_proba(self, images: list[np.ndarray], tta: bool | None = None,
                      spacings: list[tuple[float, ...] | None] | None = None) -> list[np.ndarray]:
        out = []
        for img in images:
            gt = self.truth[img.tobytes()].astype(np.float32)
            out.append({"perfect": gt, "zeros": np.zeros_like(gt), "ones": np.ones_like(gt)}[self.mode])
        return out


@pytest.fixture
def oracle(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    from tumorseg.imageio import load_image, load_mask
    from tumorseg.manifest import image_path, mask_paths
    from tumorseg.modelref import ModelRef

    info = world["info"]
    truth = {load_image(image_path(info, r)).tobytes(): load_mask(mask_paths(info, r))
             for r in world["df"].to_dict("records")}

    def use(mode: str) -> None:
        def fake(ref: str, tracking: TrackingConfig, device: str) -> tuple[Any, ModelRef]:
            return OracleSegmenter(truth, mode), ModelRef(ref=ref, checkpoint_path=ref, checkpoint_sha256="0" * 64)

        monkeypatch.setattr("tumorseg.modelref.resolve_model", fake)

    return use


def test_perfect_model_scores_one_and_empty_rule_nan(world: dict[str, Any], oracle: Any, tmp_path: Path) -> None:
    from tumorseg import evaluate

    oracle("perfect")
    res = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "ev", surface=True))
    pc = pd.read_csv(res.out_dir / "per_case.csv")
    assert list(pc.columns) == PER_CASE + ["hd95", "assd"]
    full, empty = pc[~pc["gt_empty"]], pc[pc["gt_empty"]]
    assert len(empty) >= 1
    assert (full["dice"] == 1.0).all() and (full["iou"] == 1.0).all()
    assert (full["hd95"] == 0.0).all() and (full["assd"] == 0.0).all()
    assert empty["dice"].isna().all() and empty["iou"].isna().all() and empty["hd95"].isna().all()
    s = res.summary
    assert s["dice_mean"] == 1.0 and s["dice_global"] == 1.0 and s["dice_group_mean"] == 1.0
    assert s["n_scored"] == len(full) and s["n_both_empty"] == len(empty)
    assert s["fp_rate_empty"] == 0.0 and s["hd95_mean"] == 0.0
    # the definition, the unit and the cases left out of hd95_mean are stated next to it
    assert "max(p95 of prediction->truth, p95 of truth->prediction)" in s["hd95_definition"]
    assert "not medpy" in s["hd95_definition"]
    assert s["surface_unit"] == "pixels" and s["hd95_empty"] == "nan"
    assert s["n_hd95_undefined"] == s["n_hd95_both_empty"] == len(empty) and s["n_hd95"] == len(full)
    assert s["n_hd95_missed_tumour"] == 0 and s["n_hd95_fp_on_empty"] == 0 and s["n_hd95_penalised"] == 0
    saved = json.loads((res.out_dir / "summary.json").read_text())
    assert saved["hd95_definition"] == s["hd95_definition"] and saved["n_hd95_undefined"] == len(empty)


def test_hd95_of_missed_tumours_and_false_positives_nan_or_diagonal(world: dict[str, Any], oracle: Any,
                                                                    tmp_path: Path) -> None:
    from tumorseg import evaluate

    diagonal = math.sqrt(64**2 + 64**2)  # the synthetic images are 64x64 pixels
    oracle("zeros")  # every tumour missed; tumour-free cases both empty
    nan_rule = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "zeros", surface=True))
    s = nan_rule.summary
    n_tumour = s["n_cases"] - s["n_gt_empty"]
    assert math.isnan(s["hd95_mean"]) and s["n_hd95"] == 0
    assert s["n_hd95_undefined"] == s["n_cases"]
    assert s["n_hd95_missed_tumour"] == n_tumour and s["n_hd95_both_empty"] == s["n_gt_empty"]
    diag = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "zeros_diag", surface=True, hd95_empty="diagonal"))
    s = diag.summary
    pc = pd.read_csv(diag.out_dir / "per_case.csv")
    assert np.allclose(pc.loc[~pc["gt_empty"], "hd95"], diagonal)
    assert pc.loc[pc["gt_empty"], "hd95"].isna().all() and pc["assd"].isna().all()
    assert s["hd95_mean"] == pytest.approx(diagonal) and s["n_hd95"] == n_tumour
    assert s["n_hd95_penalised"] == n_tumour and s["n_hd95_undefined"] == s["n_hd95_both_empty"]
    assert "image diagonal" in s["hd95_empty_rule"]

    oracle("ones")  # a false positive on every tumour-free case
    ones = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "ones", surface=True, hd95_empty="diagonal"))
    s = ones.summary
    pc = pd.read_csv(ones.out_dir / "per_case.csv")
    assert np.allclose(pc.loc[pc["gt_empty"], "hd95"], diagonal)
    assert s["n_hd95_fp_on_empty"] == s["n_gt_empty"] == s["n_hd95_penalised"] >= 1
    assert s["n_hd95_undefined"] == 0 and s["n_hd95"] == s["n_cases"]


def test_hd95_empty_option_on_the_command_line(world: dict[str, Any], oracle: Any, tmp_path: Path) -> None:
    from tumorseg.cli import app

    oracle("zeros")
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["evaluate", "oracle", "--manifest", str(world["manifest"]), "--split", SPLIT,
                                      "--out", str(out), "--surface", "--hd95-empty", "diagonal",
                                      "--experiment", EXPERIMENT])
    assert result.exit_code == 0, result.output
    s = json.loads((out / "summary.json").read_text())
    assert s["hd95_empty"] == "diagonal" and s["n_hd95_penalised"] == s["n_cases"] - s["n_gt_empty"]
    assert "HD95 (px)" in result.stdout and "HD95 left out of the mean" in result.stdout


def test_empty_both_one_via_cli_counts_both_empty_cases(world: dict[str, Any], oracle: Any, tmp_path: Path) -> None:
    from tumorseg.cli import app

    oracle("perfect")
    out = tmp_path / "ev"
    result = CliRunner().invoke(app, ["evaluate", "oracle", "--manifest", str(world["manifest"]), "--split", SPLIT,
                                      "--out", str(out), "--empty-both", "1", "--experiment", EXPERIMENT])
    assert result.exit_code == 0, result.output
    assert "Dice" in result.stdout and "empty rule" in result.stdout
    pc = pd.read_csv(out / "per_case.csv")
    assert (pc["dice"] == 1.0).all() and (pc["iou"] == 1.0).all()
    s = json.loads((out / "summary.json").read_text())
    assert s["n_scored"] == len(pc) and s["empty_both"] == "1"
    assert "are 1 when both" in s["empty_rule"]


def test_false_positive_rate_on_empty_cases(world: dict[str, Any], oracle: Any, tmp_path: Path) -> None:
    from tumorseg import evaluate

    oracle("ones")
    ones = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "ones"))
    pc = pd.read_csv(ones.out_dir / "per_case.csv")
    assert (pc.loc[pc["gt_empty"], "dice"] == 0.0).all()
    assert ones.summary["fp_rate_empty"] == 1.0
    assert ones.summary["n_fp_empty"] == ones.summary["n_gt_empty"] >= 1

    oracle("zeros")
    zeros = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "zeros"))
    pc = pd.read_csv(zeros.out_dir / "per_case.csv")
    assert (pc.loc[~pc["gt_empty"], "dice"] == 0.0).all()
    assert pc.loc[pc["gt_empty"], "dice"].isna().all()
    assert zeros.summary["fp_rate_empty"] == 0.0 and zeros.summary["dice_global"] == 0.0
    assert zeros.summary["dice_mean"] == 0.0
    # why Dice is the headline: predicting no tumour at all scores the background's share of the pixels
    background = 1 - pc["gt_pixels"].sum() / (pc["tp"] + pc["fp"] + pc["fn"] + pc["tn"]).sum()
    assert zeros.summary["pixel_accuracy"] == pytest.approx(background) and background > 0.8
    assert zeros.summary["pixel_accuracy_background"] == 1.0 and zeros.summary["pixel_accuracy_tumour"] == 0.0


def test_nifti_volume_manifest_is_scored_per_slice(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    import nibabel as nib

    from tumorseg import evaluate
    from tumorseg.imageio import load_image, load_mask
    from tumorseg.manifest import image_path, load_manifest, mask_paths
    from tumorseg.modelref import ModelRef

    rng = np.random.default_rng(0)
    data = tmp_path / "vols"
    data.mkdir()
    for p in range(6):
        vol = (rng.random((40, 56, 3)) * 50).astype(np.float32)  # non-square slices: (X, Y) = (40, 56)
        mask = np.zeros((40, 56, 3), np.uint8)
        if p % 2:
            mask[5 + p : 20, 10:30 + p, 1:] = 1
        nib.save(nib.Nifti1Image(vol + 200 * mask, np.eye(4)), str(data / f"patient_{p:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(data / f"patient_{p:03d}_mask.nii.gz"))
    man = ingest_synth(data, data, tmp_path / "man", "vols", world["tracking"], slice_axis=2)
    info, df = load_manifest(man)
    truth = {}
    for r in df.to_dict("records"):
        sl = int(r["slice_index"])
        truth[load_image(image_path(info, r), sl).tobytes()] = load_mask(mask_paths(info, r), sl)
    monkeypatch.setattr("tumorseg.modelref.resolve_model", lambda ref, tracking, device: (
        OracleSegmenter(truth, "perfect"), ModelRef(ref=ref, checkpoint_path=ref, checkpoint_sha256="0" * 64)))
    res = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "ev", manifest=man))
    pc = pd.read_csv(res.out_dir / "per_case.csv")
    rows = df[df["split"] == SPLIT]
    assert list(pc["case_id"]) == list(rows["case_id"]) and len(pc) % 3 == 0
    assert (pc["tp"] + pc["fp"] + pc["fn"] + pc["tn"] == 40 * 56).all()
    assert (pc.loc[~pc["gt_empty"], "dice"] == 1.0).all() and pc.loc[pc["gt_empty"], "dice"].isna().all()
    assert list(pc["gt_pixels"]) == [int(truth[load_image(image_path(info, r), int(r["slice_index"])).tobytes()]
                                         .sum()) for r in rows.to_dict("records")]


def test_nifti_surface_distances_use_the_voxel_spacing(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    """Anisotropic voxels (0.5 x 2.0 mm in-plane): a 3-pixel offset along the 2 mm axis is HD95 = 6 mm."""
    import nibabel as nib

    from tumorseg import evaluate
    from tumorseg.imageio import load_image
    from tumorseg.manifest import image_path, load_manifest
    from tumorseg.modelref import ModelRef

    rng = np.random.default_rng(2)
    data = tmp_path / "vols"
    data.mkdir()
    affine = np.diag([0.5, 2.0, 3.0, 1.0])
    square = np.zeros((32, 32), np.uint8)
    square[10:20, 10:20] = 1
    shifted = np.zeros_like(square)
    shifted[10:20, 13:23] = 1  # 3 pixels along the second axis (2.0 mm pixels)
    for p in range(6):
        mask = np.zeros((32, 32, 2), np.uint8)
        if p % 2:
            mask[..., :] = square[..., None]
        vol = (rng.random((32, 32, 2)) * 50).astype(np.float32) + 200 * mask
        nib.save(nib.Nifti1Image(vol, affine), str(data / f"patient_{p:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, affine), str(data / f"patient_{p:03d}_mask.nii.gz"))
    man = ingest_synth(data, data, tmp_path / "man", "aniso", world["tracking"], slice_axis=2)
    info, df = load_manifest(man)
    truth = {}
    for r in df.to_dict("records"):
        img = load_image(image_path(info, r), int(r["slice_index"]))
        truth[img.tobytes()] = shifted if img.max() > 100 else np.zeros_like(square)
    monkeypatch.setattr("tumorseg.modelref.resolve_model", lambda ref, tracking, device: (
        OracleSegmenter(truth, "perfect"), ModelRef(ref=ref, checkpoint_path=ref, checkpoint_sha256="0" * 64)))
    res = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "ev", manifest=man, surface=True))
    pc = pd.read_csv(res.out_dir / "per_case.csv")
    tumour = pc[~pc["gt_empty"]]
    assert len(tumour) >= 2
    assert np.allclose(tumour["hd95"], 6.0)  # in pixels it would be 3
    assert np.allclose(tumour["assd"], 82 / 36, rtol=1e-5)
    assert res.summary["surface_unit"] == "mm" and res.summary["hd95_mean"] == pytest.approx(6.0)


# ----------------------------------------------------------------------------- errors: one line, exit 2


def _write_bad_checkpoints(root: Path) -> dict[str, Path]:
    import torch

    root.mkdir(parents=True, exist_ok=True)
    corrupt = root / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02not a zip file at all" * 10)
    foreign = root / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    mismatch = root / "mismatch.pt"
    make_checkpoint(mismatch, None, train_steps=0)
    ck = torch.load(mismatch, weights_only=True)
    ck["config"]["model"]["channels"] = [4, 8, 16]  # weights no longer fit the network the config builds
    torch.save(ck, mismatch)
    two_channel = make_checkpoint(root / "two_channel.pt", None, train_steps=0, in_channels=2)
    return {"corrupt": corrupt, "foreign": foreign, "mismatch": mismatch, "two_channel": two_channel}


@pytest.fixture(scope="module")
def broken(world: dict[str, Any], synth_data: Path) -> dict[str, Path]:
    root = world["root"] / "broken"
    paths = _write_bad_checkpoints(root / "ckpts")
    # a dataset whose image disappears after ingest
    data = root / "data"
    shutil.copytree(synth_data, data)
    man = ingest_synth(data / "images", data / "masks", root / "manifests", "gone", world["tracking"])
    from tumorseg.manifest import image_path, load_manifest

    info, df = load_manifest(man)
    image_path(info, df[df["split"] == "test"].iloc[0]).unlink()
    paths["missing_files_manifest"] = man
    # a dataset whose test image changed after ingest (same pixels, other bytes): scoring it would be silent
    data2 = root / "data2"
    shutil.copytree(synth_data, data2)
    man2 = ingest_synth(data2 / "images", data2 / "masks", root / "manifests", "changed", world["tracking"])
    info2, df2 = load_manifest(man2)
    victim = image_path(info2, df2[df2["split"] == "test"].iloc[0])
    victim.write_bytes(victim.read_bytes() + b"\0")
    paths["changed_files_manifest"] = man2
    paths["changed_file"] = victim
    (root / "empty_run").mkdir()
    paths["empty_run"] = root / "empty_run"
    return paths


ERROR_CASES = {
    "corrupt": ("{corrupt}", {}, r"corrupt or not a tumorseg checkpoint"),
    "foreign": ("{foreign}", {}, r"not a tumorseg checkpoint"),
    "mismatch": ("{mismatch}", {}, r"corrupt or foreign checkpoint"),
    "channels": ("{two_channel}", {}, r"model takes 2 channel"),
    "no_split": ("{ckpt}", {"--split": "nosuch"}, r"split: Input should be 'train', 'val' or 'test'"),
    "no_manifest": ("{ckpt}", {"--manifest": "{root}/nowhere"}, r"manifest not found"),
    "missing_files": ("{ckpt}", {"--manifest": "{missing_files_manifest}", "--split": "test"}, r"missing"),
    "changed_file": ("{ckpt}", {"--manifest": "{changed_files_manifest}", "--split": "test"},
                     r"patient_\d+_slice_\d+\.png: changed since ingest \(sha256 differs\); re-run tumorseg ingest"),
    "model_stage": ("models:/tumorseg-test-evaluate/Production", {},
                    r"model stages are deprecated.*models:/tumorseg-test-evaluate@champion"),
    "no_model": ("{root}/no/such/model.pt", {}, r"model not found"),
    "no_best": ("{empty_run}", {}, r"no best.pt"),
    "unknown_run": ("0123456789abcdef0123456789abcdef", {}, r"not found"),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_are_one_line_and_exit_2(case: str, world: dict[str, Any], broken: dict[str, Path],
                                        tmp_path: Path) -> None:
    from tumorseg.cli import app

    names = {**{k: str(v) for k, v in broken.items()}, "ckpt": str(world["ckpt"]), "root": str(world["root"])}
    model, opts, pattern = ERROR_CASES[case]
    args = ["evaluate", model.format(**names), "--manifest", str(world["manifest"]), "--out", str(tmp_path / "ev"),
            "--experiment", EXPERIMENT]
    for k, v in opts.items():
        args += [k, v.format(**names)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "ev" / "per_case.csv").exists()


# ----------------------------------------------------------------------------- helpers


def test_prefetch_keeps_order_and_bounds_lookahead() -> None:
    import threading
    import time

    from tumorseg.streaming import batched, prefetch

    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.001 * (5 - i % 5))  # later items finish first
        return i * i

    gen = prefetch(work, range(40), workers=3, ahead=4)
    first = next(gen)
    assert first == 0
    time.sleep(0.05)
    assert len(started) <= 5  # never more than `ahead` (+ the one handed out) in flight
    assert [first, *gen] == [i * i for i in range(40)]
    assert list(prefetch(work, range(5), workers=0, ahead=1)) == [0, 1, 4, 9, 16]
    assert [len(b) for b in batched(range(7), 3)] == [3, 3, 1]


def test_surface_and_distribution_helpers_handle_nan() -> None:
    from tumorseg.evaluate import distribution

    d = distribution(np.array([0.5, np.nan, 1.0, 0.0]), "dice")
    assert d["dice_mean"] == pytest.approx(0.5) and d["dice_median"] == pytest.approx(0.5)
    assert d["dice_std"] == pytest.approx(0.5)  # sample std of (0, .5, 1)
    empty = distribution(np.array([np.nan]), "iou")
    assert all(math.isnan(v) for v in empty.values())


def test_a_mask_changed_between_two_runs_in_one_process_is_read_fresh(world: dict[str, Any], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A NIfTI mask edited (and re-ingested) between two evaluations in one process is not read stale."""
    import nibabel as nib

    from tumorseg import evaluate
    from tumorseg.imageio import load_image
    from tumorseg.manifest import image_path, load_manifest
    from tumorseg.modelref import ModelRef

    data = tmp_path / "vols"
    data.mkdir()
    rng = np.random.default_rng(1)
    for p in range(6):
        vol = (rng.random((32, 32, 2)) * 50).astype(np.float32)
        mask = np.zeros((32, 32, 2), np.uint8)
        mask[4:12, 4:12, :] = 1
        nib.save(nib.Nifti1Image(vol + 200 * mask, np.eye(4)), str(data / f"patient_{p:03d}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(data / f"patient_{p:03d}_mask.nii.gz"))
    # the model predicts the original square on every slice
    square = np.zeros((32, 32), np.uint8)
    square[4:12, 4:12] = 1
    man = ingest_synth(data, data, tmp_path / "man", "fresh", world["tracking"], slice_axis=2)
    info, df = load_manifest(man)
    truth = {load_image(image_path(info, r), int(r["slice_index"])).tobytes(): square for r in df.to_dict("records")}
    monkeypatch.setattr("tumorseg.modelref.resolve_model", lambda ref, tracking, device: (
        OracleSegmenter(truth, "perfect"), ModelRef(ref=ref, checkpoint_path=ref, checkpoint_sha256="0" * 64)))
    first = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "ev1", manifest=man))
    assert first.summary["dice_mean"] == 1.0

    # the annotator redraws every mask as a smaller square; the dataset is ingested again
    for p in range(6):
        mask = np.zeros((32, 32, 2), np.uint8)
        mask[4:8, 4:12, :] = 1
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(data / f"patient_{p:03d}_mask.nii.gz"))
    man = ingest_synth(data, data, tmp_path / "man", "fresh", world["tracking"], slice_axis=2)
    second = evaluate.run(evaluate_cfg(world, "oracle", tmp_path / "ev2", manifest=man))
    pc = pd.read_csv(second.out_dir / "per_case.csv")
    assert (pc["gt_pixels"] == 32).all() and (pc["tp"] == 32).all() and (pc["fp"] == 32).all()
    assert second.summary["dice_mean"] == pytest.approx(2 * 32 / (2 * 32 + 32))
