"""tumorseg train: models, losses, exact resume, bad inputs, DDP, MLflow contents."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import kill_at_epoch
from typer.testing import CliRunner

from tumorseg.cli import app
from tumorseg.config import IngestConfig, LossConfig, ModelConfig, TrainConfig, load_config
from tumorseg.errors import TumorsegError

TINY = [
    "plan=off",  # the tiny fixed settings below; planning has its own tests
    "epochs=2",
    "batch_size=4",
    "image_size=[64,64]",
    "model.channels=[8,16,32]",
    "model.num_res_units=1",
    "log_model=false",
    "val_overlays=0",
]


def tiny_cfg(manifest: Path, out: Path, *extra: str) -> TrainConfig:
    cfg = load_config(TrainConfig, None, [*TINY, *extra], base={"manifest": str(manifest), "out": str(out)})
    return cfg


# ----------------------------------------------------------------------------- models and losses


@pytest.mark.parametrize(
    ("model", "in_channels", "loss"),
    [
        ({"name": "unet"}, 1, "dice"),
        ({"name": "unet", "norm": "instance"}, 3, "dice_ce"),
        ({"name": "unet", "channels": [8, 16, 32]}, 1, "dice_focal"),
        ({"name": "basic_unet", "channels": [8, 16, 32, 64, 128], "norm": "batch"}, 1, "dice"),
        ({"name": "attention_unet", "channels": [8, 16, 32]}, 1, "dice"),
        ({"name": "segresnet", "init_filters": 8}, 1, "dice_ce"),
        ({"name": "flexible_unet", "backbone": "resnet18"}, 3, "dice_focal"),
    ],
)
def test_each_model_and_loss_takes_a_step(model: dict, in_channels: int, loss: str) -> None:
    from tumorseg.model import build_loss, build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig.model_validate(model), in_channels)
    loss_fn = build_loss(LossConfig(name=loss))  # type: ignore[arg-type]
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = torch.randn(2, in_channels, 64, 64)
    y = (torch.rand(2, 1, 64, 64) > 0.7).float()
    before = [p.detach().clone() for p in net.parameters()]
    out = net(x)
    assert out.shape == (2, 1, 64, 64)
    value = loss_fn(out, y)
    assert torch.isfinite(value)
    value.backward()
    opt.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert changed > 0


def test_classic_unet_is_reachable_by_config() -> None:
    """The reference notebooks' U-Net: 64..1024, two 3x3 convs per level, batch norm, no residual units."""
    from tumorseg.model import build_model

    cfg = ModelConfig(name="basic_unet", channels=[64, 128, 256, 512, 1024], norm="batch")
    net = build_model(cfg, 1)
    n_params = sum(p.numel() for p in net.parameters())
    assert 31_000_000 < n_params < 32_500_000  # Ronneberger et al.: ~31M
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    with torch.no_grad():
        assert net(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)


def test_flexible_unet_reads_local_encoder_weights(tmp_path: Path) -> None:
    from tumorseg.model import build_model

    donor = build_model(ModelConfig(name="flexible_unet", backbone="resnet18"), 3)
    weights = tmp_path / "resnet18_encoder.pth"
    torch.save({f"encoder.{k}": v for k, v in donor.encoder.state_dict().items()}, weights)
    # `pretrained_weights` is the key of configs written before `model.pretrained`
    net = build_model(ModelConfig(name="flexible_unet", backbone="resnet18", pretrained_weights=weights), 3,
                      load_weights=True)
    for k, v in donor.encoder.state_dict().items():
        assert torch.equal(v, net.encoder.state_dict()[k]), k
    with pytest.raises(TumorsegError, match="not found"):
        build_model(ModelConfig(name="flexible_unet", pretrained_weights=tmp_path / "nope.pth"), 3, load_weights=True)


def test_augmentation_is_seeded_and_keeps_masks_binary() -> None:
    from tumorseg.augment import augment_batch
    from tumorseg.config import AugmentConfig

    x = torch.randn(6, 1, 32, 32)
    y = (torch.rand(6, 1, 32, 32) > 0.5).float()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = augment_batch(x, y, AugmentConfig(prob=1.0), g1)
    b = augment_batch(x, y, AugmentConfig(prob=1.0), g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(torch.unique(a[1]).tolist()) <= {0.0, 1.0}
    assert not torch.equal(a[0], x)
    off = augment_batch(x, y, AugmentConfig(prob=0.0), torch.Generator().manual_seed(1))
    assert torch.equal(off[0], x) and torch.equal(off[1], y)


# ----------------------------------------------------------------------------- a run and MLflow


def test_train_writes_run_folder_and_mlflow_run(manifest: Path, tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    from tumorseg import train
    from tumorseg.checkpoint import load as load_checkpoint

    cfg = tiny_cfg(manifest, tmp_path, "run_name=full", "log_model=true", "val_overlays=2", "epochs=3")
    res = train.run(cfg)
    run_dir = tmp_path / "full"
    for name in ("config.yaml", "last.pt", "best.pt", "learning_curve.png", "val_overlays.png", "result.json"):
        assert (run_dir / name).is_file(), name
    assert res.epochs_run == 3 and 1 <= res.best_epoch <= 3
    ckpt = load_checkpoint(run_dir / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "config", "manifest_digest",
                "mlflow_run_id"):
        assert key in ckpt, key
    assert ckpt["epoch"] == 3 and ckpt["mlflow_run_id"] == res.mlflow_run_id
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == res.best_epoch

    # what a loaded model reports about itself is what the checkpoint holds: no key it lacks
    from tumorseg.inference import Segmenter

    best = load_checkpoint(run_dir / "best.pt")
    meta = Segmenter.from_checkpoint(run_dir / "best.pt", device="cpu").checkpoint_meta
    assert meta and all(key in best for key in meta), sorted(set(meta) - set(best))
    assert meta == {key: best[key] for key in meta}
    assert meta["mlflow_run_id"] == res.mlflow_run_id and meta["epoch"] == res.best_epoch

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.data.params["epochs"] == "3"
    assert run.data.params["model.name"] == "unet"
    assert run.data.params["optim.lr"] == "0.001"
    assert run.data.tags["tumorseg.stage"] == "train"
    assert run.data.tags["tumorseg.dataset_digest"] == ckpt["manifest_digest"]
    note = run.data.tags["mlflow.note.content"]  # the run's description in the UI, final, not "running"
    assert note.startswith(f"best val Dice {res.best_val_dice:.4f} at epoch {res.best_epoch} of 3")
    assert "trained `unet`" in note
    assert ckpt["manifest_digest"][:12] in note
    for metric in ("train_loss", "val_dice", "lr", "epoch_seconds", "images_per_second"):
        assert [m.step for m in client.get_metric_history(res.mlflow_run_id, metric)] == [1, 2, 3], metric
    assert run.inputs.dataset_inputs[0].dataset.digest == ckpt["manifest_digest"][:36]
    artifacts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"config.yaml", "learning_curve.png", "val_overlays.png"} <= artifacts

    model = mlflow.pyfunc.load_model(f"runs:/{res.mlflow_run_id}/model")
    mask = model.predict(np.random.rand(1, 40, 72).astype(np.float32))  # any size, non-square
    assert mask.shape == (40, 72) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_exact_resume_after_killed_process(manifest: Path, tmp_path: Path, cache: str) -> None:
    """Deterministic mode: kill a training process, resume it, get the uninterrupted weights."""
    from tumorseg import train
    from tumorseg.checkpoint import load as load_checkpoint

    extra = ("deterministic=true", "epochs=40", "early_stopping_patience=null", "optim.schedule=plateau",
             "optim.plateau_patience=1", f"cache={cache}", f"cache_dir={tmp_path / 'cache'}")
    full = train.run(tiny_cfg(manifest, tmp_path, "run_name=full", *extra))

    args = [f"--set={s}" for s in (*TINY, "run_name=killed", *extra)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tumorseg", "train", str(manifest), "--out", str(tmp_path), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    killed_at = kill_at_epoch(proc, tmp_path / "killed" / "last.pt", 3, 120)
    assert 3 <= killed_at < 40
    assert not (tmp_path / "killed" / "result.json").exists()

    resumed = train.resume(tmp_path / "killed")
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["val_dice"] for h in full.history] == [h["val_dice"] for h in resumed.history]
    assert [h["train_loss"] for h in full.history] == [h["train_loss"] for h in resumed.history]
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert resumed.mlflow_run_id == b["mlflow_run_id"]  # same MLflow run continued


def test_nan_loss_stops_and_keeps_last_good_checkpoint(manifest: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tumorseg import train
    from tumorseg.checkpoint import load as load_checkpoint
    from tumorseg.model import build_loss as real_build_loss

    calls = {"n": 0}

    class NanAfterFirstEpoch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = real_build_loss(LossConfig())

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            value = self.inner(x, y)
            return value * float("nan") if calls["n"] > 4 else value

    monkeypatch.setattr("tumorseg.train.stage.build_loss", lambda cfg: NanAfterFirstEpoch())
    with pytest.raises(TumorsegError, match=r"loss became nan at epoch 2.*last\.pt"):
        train.run(tiny_cfg(manifest, tmp_path, "run_name=nan", "epochs=3"))
    assert load_checkpoint(tmp_path / "nan" / "last.pt")["epoch"] == 1


# ----------------------------------------------------------------------------- bad inputs, one line each


def _cli(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_bad_config_key_is_one_line(manifest: Path, tmp_path: Path) -> None:
    code, err = _cli(["train", str(manifest), "--out", str(tmp_path), "--set", "epochz=2"])
    _one_line_error(code, err, "epochz", "unknown setting")
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("epochs: 2\nmodel:\n  chanels: [8, 16]\n")
    code, err = _cli(["train", str(manifest), "--out", str(tmp_path), "--config", str(cfg_file)])
    _one_line_error(code, err, "model.chanels", str(cfg_file))
    code, err = _cli(["train", str(manifest), "--set", "image_size=[60,60]"])
    _one_line_error(code, err, "image_size", "multiples of 16")
    code, err = _cli(["train", str(manifest), "--set", "image_size=[32]"])  # a union's forms, said once
    _one_line_error(code, err, "image_size: [32] fits none of its forms (tuple[int, int], tuple[int, int, int])")
    code, err = _cli(["train", str(manifest), "--config", str(tmp_path / "missing.yaml")])
    _one_line_error(code, err, "missing.yaml", "not found")
    twice = tmp_path / "twice.yaml"  # PyYAML keeps the last of a repeated key: a setting lost without a word
    twice.write_text("epochs: 2\nmodel:\n  channels: [8, 16]\nepochs: 5\n")
    code, err = _cli(["train", str(manifest), "--config", str(twice)])
    _one_line_error(code, err, f"{twice}: 'epochs' is set twice in one mapping (line 4); keep one of them")
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [2\n")
    code, err = _cli(["train", str(manifest), "--config", str(broken)])
    _one_line_error(code, err, f"{broken}: invalid YAML at line 2; fix the syntax")


def test_train_takes_the_manifest_csv_for_its_folder(manifest: Path, tmp_path: Path) -> None:
    """``train data_manifest/NAME/manifest.csv`` trains on that manifest, as plan and evaluate take it."""
    args = ["train", str(manifest / "manifest.csv"), *[f"--set={s}" for s in TINY], "--set", "epochs=1",
            "--set", "run_name=csv", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "csv" / "best.pt").is_file()


def test_an_untrackable_uri_stops_train_before_any_work(manifest: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    code, err = _cli(["train", str(manifest), *[f"--set={s}" for s in TINY], "--out", str(tmp_path / "runs")])
    _one_line_error(code, err, "tracking URI ./mlruns", "file store", "sqlite:///")
    assert not (tmp_path / "runs").exists()


def test_missing_manifest_is_one_line(tmp_path: Path) -> None:
    code, err = _cli(["train", str(tmp_path / "data_manifest" / "nope")])
    _one_line_error(code, err, "manifest not found", "tumorseg ingest")


def test_changed_image_and_edited_manifest_are_refused(synth_data: Path, tmp_path: Path) -> None:
    from tumorseg import ingest

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    cfg = IngestConfig(images_dir=data / "images", masks_dir=data / "masks", name="m", out_dir=tmp_path / "dm",
                       group_pattern=r"(patient_\d+)", seed=3, workers=1)
    mdir = ingest.run(cfg).manifest_dir
    from tumorseg.manifest import image_path, load_manifest

    info, df = load_manifest(mdir)
    victim = image_path(info, df[df["split"] == "train"].iloc[0])  # train reads it first thing
    victim.write_bytes(victim.read_bytes() + b"\0")  # same pixels, different bytes
    code, err = _cli(["train", str(mdir), "--out", str(tmp_path / "runs"), *sum((["--set", s] for s in TINY), [])])
    _one_line_error(code, err, victim.name, "changed since ingest")
    victim.unlink()
    code, err = _cli(["train", str(mdir), "--out", str(tmp_path / "runs"), *sum((["--set", s] for s in TINY), [])])
    _one_line_error(code, err, victim.name, "missing")
    csv = mdir / "manifest.csv"
    csv.write_text(csv.read_text().replace("train", "val", 1))
    code, err = _cli(["train", str(mdir)])
    _one_line_error(code, err, "manifest.csv", "changed since ingest")


def test_resume_refuses_another_manifest(synth_data: Path, tmp_path: Path) -> None:
    from tumorseg import ingest, train

    def make(seed: int) -> Path:
        cfg = IngestConfig(images_dir=synth_data / "images", masks_dir=synth_data / "masks", name="m",
                           out_dir=tmp_path / "dm", group_pattern=r"(patient_\d+)", seed=seed, workers=1)
        return ingest.run(cfg).manifest_dir

    mdir = make(3)
    train.run(tiny_cfg(mdir, tmp_path, "run_name=r", "epochs=1"))
    make(5)  # same name, different splits: a different manifest
    code, err = _cli(["train", "--resume", str(tmp_path / "r")])
    _one_line_error(code, err, "differs from the manifest", "start a new run")
    # resume continues the run as it was set up: other settings are refused, not silently dropped
    code, err = _cli(["train", str(mdir), "--resume", str(tmp_path / "r"), "--budget", "30s", "--set", "epochs=9"])
    _one_line_error(code, err, "continues that run with its own settings", "drop MANIFEST, --set, --budget")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu_is_one_line(manifest: Path) -> None:
    code, err = _cli(["train", str(manifest), "--set", "device=cuda"])
    _one_line_error(code, err, "no CUDA GPU", "device=cpu")


# ----------------------------------------------------------------------------- DDP


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_ddp_two_cpu_processes(manifest: Path, tmp_path: Path, mlflow_uri: str, cache: str) -> None:
    """torchrun with 2 CPU processes on gloo: rank 0 alone logs, checkpoints and prints.

    In RAM each rank caches its own shard; ``normalize: ct`` then gathers both shards' foreground voxels.
    """
    import mlflow
    import pandas as pd

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_uri}
    rule = "ct" if cache == "ram" else "percentile"
    args = [f"--set={s}" for s in (*TINY, f"run_name=ddp-{cache}", "device=cpu", f"cache={cache}",
                                   f"cache_dir={tmp_path / 'cache'}", f"normalize={rule}")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tumorseg",
         "train", str(manifest), "--out", str(tmp_path), *args],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val Dice") == 1  # printed by rank 0 only
    run_dir = tmp_path / f"ddp-{cache}"
    assert (run_dir / "last.pt").is_file() and (run_dir / "best.pt").is_file()
    runs = mlflow.MlflowClient(mlflow_uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(mlflow_uri).search_experiments()],
        filter_string=f"attributes.run_name = 'ddp-{cache}'",
    )
    assert len(runs) == 1  # one MLflow run, not one per rank
    assert runs[0].data.params["world_size"] == "2"
    # on disk, rank 0 built each split once (no other rank built) and both ranks read it
    assert proc.stderr.count(": built ") == (2 if cache == "disk" else 0), proc.stderr[-3000:]
    built = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").glob("*") if cache == "disk")
    assert built == (["train", "val"] if cache == "disk" else [])
    if cache == "ram":  # both shards' foreground gathered, each train case once (a padded shard repeats one)
        n_train = int((pd.read_csv(manifest / "manifest.csv")["split"] == "train").sum())
        assert f"foreground voxels of {n_train} cases" in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_mixed_precision_run(manifest: Path, tmp_path: Path) -> None:
    from tumorseg import train
    from tumorseg.checkpoint import load as load_checkpoint

    res = train.run(tiny_cfg(manifest, tmp_path, "run_name=gpu", "device=cuda", "amp=true", "cache=gpu"))
    assert res.epochs_run == 2
    ckpt = load_checkpoint(tmp_path / "gpu" / "last.pt")
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
