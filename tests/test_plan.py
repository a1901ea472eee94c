"""tumorseg plan: the rules on fingerprints, determinism, the budget, sliding windows, post-processing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tumorseg.config import LossConfig, ModelConfig, TrainConfig, load_config
from tumorseg.planning import rules
from tumorseg.planning.fingerprint import Fingerprint
from tumorseg.planning.probe import Throughput


def fingerprint(size: tuple[int, int], tumour_diameter: float, n_train: int = 500, empty_share: float = 0.2,
                small_diameter: float | None = None) -> Fingerprint:
    small = small_diameter if small_diameter is not None else tumour_diameter / 3
    area = {k: float(np.pi * d * d / 4) for k, d in (("median", tumour_diameter), ("p5", small), ("p1", small))}
    return Fingerprint(manifest_name="fp", manifest_digest="0" * 64, n_train=n_train, size_median=size,
                       size_p10=size, size_p90=size, channels=1, grey_as_rgb=False,
                       intensity=[{"p0_5": 0.0, "p50": 90.0, "p99_5": 250.0, "mean": 95.0, "std": 40.0}],
                       foreground_fraction=0.05, empty_share=empty_share, tumour_pixels=area,
                       tumour_diameter={"median": tumour_diameter, "p5": small, "p1": small}, sampled_images=10)


def fake_probe(pixels_per_second: float) -> Any:
    """A device that trains ``pixels_per_second`` (a nnU-Net DynUNet 4x slower), infers 3x faster."""
    calls: list[tuple[str, tuple[int, int]]] = []

    def probe(model: ModelConfig, size: tuple[int, int], batch: int) -> Throughput:
        calls.append((model.name, size))
        slow = {32: 2.0, 16: 1.0, 8: 0.6}[model.channels[0]] * (2.0 if model.name == "dynunet" else 1.0)
        ips = pixels_per_second / (size[0] * size[1]) / slow
        return Throughput(ips, 3 * ips, 0.0)

    probe.calls = calls  # type: ignore[attr-defined]
    return probe


def test_small_images_train_at_native_size_whole() -> None:
    out = rules.choose(fingerprint((64, 64), 20.0), 3600.0, 100, fake_probe(5e6), "cpu")
    t = out["train"]
    assert t["image_size"] == [64, 64] and t["patch_size"] is None
    assert out["estimates"]["scale"] == 1.0 and "native" in out["reasons"]["image_size"]
    assert t["model"]["name"] == "dynunet" and t["model"]["deep_supervision"]  # plenty of compute: nnU-Net's net
    assert t["model"]["channels"] == [32, 64, 128, 256, 512]  # 64 -> 4 px: four downsamplings (nnU-Net)


def test_large_images_train_on_patches_with_oversampling_and_sliding_window() -> None:
    out = rules.choose(fingerprint((2048, 2048), 400.0), 36000.0, 100, fake_probe(5e9), "cpu")
    t = out["train"]
    assert t["image_size"] == [2048, 2048]
    assert t["patch_size"] == [512, 512] and t["oversample_foreground"] == pytest.approx(0.33)
    assert len(t["model"]["channels"]) == 6  # sized for the 512 patch: 5 downsamplings (the cap) to 16 px
    assert "sliding-window" in out["reasons"]["patch_size"]


def test_the_floor_keeps_the_smallest_class_of_a_label_map_visible() -> None:
    import pandas as pd

    from tumorseg.planning.fingerprint import _class_diameters, smallest_structure

    # px_<class> counts of five train cases (0: the class is absent there): equivalent diameters by hand
    area = [float(np.pi * d * d / 4) for d in (100.0, 120.0, 140.0)]
    train = pd.DataFrame({"px_edema": [area[0], area[1], area[2], 0, 0], "px_core": [0, 0, 0, 1256.6370614359173,
                                                                                     1256.6370614359173]})
    got = _class_diameters(train, volumes=False)
    assert got["edema"]["median"] == pytest.approx(120.0) and got["core"]["median"] == pytest.approx(40.0)
    assert got["edema"]["p5"] == pytest.approx(float(np.sqrt(4 * np.percentile(area, 5) / np.pi)))
    vol = _class_diameters(pd.DataFrame({"px_a": [float(np.pi * 6**3 / 6)], "px_b": [1.0]}), volumes=True)
    assert vol["a"]["median"] == pytest.approx(6.0)  # a sphere's diameter from its voxels
    assert _class_diameters(train[["px_core"]], volumes=False) == {}  # one class: the tumour's own figures

    # the union (256 px across) alone would allow scale 0.25; its 128-px core class holds the floor at 0.5
    fp = fingerprint((512, 512), 256.0, small_diameter=64.0)
    multi = fp.model_copy(update={"class_diameter": {"edema": {"median": 200.0, "p5": 96.0},
                                                     "core": {"median": 128.0, "p5": 64.0}}})
    assert smallest_structure(multi)[0] == "core" and smallest_structure(fp)[0] == "tumour"
    assert rules.floor_scale(multi) == pytest.approx(0.5)
    tight = rules.choose(multi, 1500.0, 100, fake_probe(1e6), "cpu")  # short (53% of the samples), not starved
    assert tight["train"]["image_size"] == [256, 256]
    assert "keeps the median core at 64 px" in tight["reasons"]["image_size"]
    from tumorseg.planning import volumes  # the 3D floor alike: the core 24 voxels across (128 / 24 coarser at most)

    assert volumes.floor_factor(fp) == pytest.approx(8.0) and volumes.floor_factor(multi) == pytest.approx(128 / 24)


def test_the_budget_lowers_the_resolution_but_never_below_the_tumour_floor() -> None:
    fp = fingerprint((512, 512), 256.0, small_diameter=64.0)
    assert rules.floor_scale(fp) == pytest.approx(0.25)
    tight = rules.choose(fp, 60.0, 100, fake_probe(1e6), "cpu")
    # starved (rule 1): the floor halved, 256 * 0.125 = 32 px median tumour, and never below it
    assert tight["train"]["image_size"] == [64, 64] and tight["estimates"]["floor_scale"] == pytest.approx(0.125)
    assert tight["train"]["model"]["channels"] == [16, 32, 64, 128, 256]  # not starved at 64x64: 16..256, 4 px deep
    roomy = rules.choose(fp, 600.0, 100, fake_probe(1e7), "cpu")
    assert 128 < roomy["train"]["image_size"][0] < 512
    assert roomy["estimates"]["steps"] > tight["estimates"]["steps"]


def test_a_starved_budget_takes_the_narrower_network() -> None:
    """Under a quarter of the samples with UNet 16..256: UNet 8..128 (rule 3); above it, 16..256 as before."""
    fp = fingerprint((160, 160), 100.0, n_train=500, small_diameter=8.0)  # the floor is native, halved or not
    want = rules.target_samples(500)
    thr = fake_probe(2e6)(rules.network(rules.NETWORKS[-1][1], (160, 160)), (160, 160), 8)
    picked = {}
    for budget in (70.0, 240.0):
        share = rules.samples_in(budget, thr, 500, 100) / want
        out = rules.choose(fp, budget, 100, fake_probe(2e6), "cpu")
        picked[budget] = (share, out["train"]["model"]["channels"], out["reasons"]["network"])
    short, longer = picked[70.0], picked[240.0]
    assert short[0] < rules.STARVED < longer[0] < 1.0  # neither buys the samples; only the first is starved
    assert short[1] == [8, 16, 32, 64, 128, 128] and "lacks epochs more than width" in short[2]
    assert longer[1] == [16, 32, 64, 128, 256, 256] and longer[2].startswith("MONAI UNet, 16..256")
    assert "the fastest network; it buys" in longer[2]


def test_a_starved_budget_halves_the_tumour_floors() -> None:
    """Rule 1: where even UNet 16..256 buys under a quarter of the samples at the floor, both floors are halved (the
    median tumour 32 px, the small ones 8 px) and rule 3 chooses again there."""
    fp = fingerprint((512, 512), 75.0, n_train=500, small_diameter=27.0)  # issue #23's 512^2 set: tumours ~1.7%
    assert rules.floor_scale(fp) == pytest.approx(64 / 75)
    half = rules.floor_scale(fp, rules.MIN_TUMOUR_DIAMETER_STARVED, rules.MIN_SMALL_TUMOUR_DIAMETER_STARVED)
    assert half == pytest.approx(32 / 75)  # the median binds (the small ones would allow 8 / 27)
    thr = fake_probe(2e6)(rules.network(rules.NETWORKS[-1][1], (448, 448)), (448, 448), 8)
    # by hand: 16..256 buys 5356 of the 40000 wanted images at 448x448 in 600 s (13%: starved)
    assert rules.samples_in(600.0, thr, 500, 100) == pytest.approx(5356, abs=1)
    starved = rules.choose(fp, 600.0, 100, fake_probe(2e6), "cpu")
    assert starved["train"]["image_size"] == [224, 224]  # 512 * 32/75 = 218 -> 224
    assert starved["estimates"]["floor_scale"] == pytest.approx(32 / 75, abs=1e-4)
    assert starved["reasons"]["floor"].startswith("starved at the floor size 448x448 (5356 of the 40000 training")
    assert "halved to 32 and 8 px" in starved["reasons"]["floor"]
    assert "keeps the median tumour at 32 px and the small ones at 12 px" in starved["reasons"]["image_size"]
    assert starved["train"]["model"]["channels"][0] == 16  # no longer starved there: UNet 16..256 (rule 3)
    roomy = rules.choose(fp, 3000.0, 100, fake_probe(2e6), "cpu")  # short (69%), not starved: the floor holds
    assert "floor" not in roomy["reasons"] and roomy["train"]["image_size"] == [448, 448]
    small = fingerprint((512, 512), 75.0, n_train=500, small_diameter=8.0)  # 8 px small ones hold native
    assert "floor" not in rules.choose(small, 300.0, 100, fake_probe(2e6), "cpu")["reasons"]


def test_steps_grow_with_the_budget_and_the_schedule_spans_them() -> None:
    fp = fingerprint((64, 64), 20.0)
    a = rules.choose(fp, 600.0, 100, fake_probe(5e6), "cpu")["train"]
    b = rules.choose(fp, 1200.0, 100, fake_probe(5e6), "cpu")["train"]
    assert b["max_steps"] > 1.9 * a["max_steps"]
    assert a["optim"]["schedule"] == "poly" and 0 < a["optim"]["warmup_steps"] < a["max_steps"]


def test_a_tumour_free_heavy_set_gets_oversampling() -> None:
    mostly_empty = rules.choose(fingerprint((64, 64), 20.0, empty_share=0.9), 600.0, 100, fake_probe(5e6), "cpu")
    balanced = rules.choose(fingerprint((64, 64), 20.0, empty_share=0.2), 600.0, 100, fake_probe(5e6), "cpu")
    assert mostly_empty["train"]["oversample_foreground"] == pytest.approx(0.33)
    assert "tumour-free" in mostly_empty["reasons"]["oversample_foreground"]
    assert balanced["train"]["oversample_foreground"] == 0.0


def test_oversampled_epochs_draw_that_share_of_tumour_cases() -> None:
    import torch

    from tumorseg.data import RamSplit
    from tumorseg.train.loop import epoch_order

    masks = torch.zeros(100, 1, 4, 4, dtype=torch.uint8)
    masks[:10, 0, 1, 1] = 1  # 10% of the cases hold tumour
    data = RamSplit([str(i) for i in range(100)], torch.zeros(100, 1, 4, 4), masks,
                    fg_pixels=masks.flatten(1).sum(1).numpy(), pixels=16)
    draws = torch.cat([epoch_order(data, 0.33, torch.Generator().manual_seed(s)) for s in range(50)])
    assert float((draws < 10).float().mean()) == pytest.approx(0.33, abs=0.03)
    plain = epoch_order(data, 0.0, torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(100))


# ----------------------------------------------------------------------------- on real files


def test_plan_is_deterministic_and_written_with_its_fingerprint(manifest: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tumorseg.cli import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = []
    for k in range(2):
        res = CliRunner().invoke(app, ["plan", str(manifest), "--budget", "90s", "--device", "cpu",
                                       "--out", str(tmp_path / f"p{k}")])
        assert res.exit_code == 0, res.output
        assert "training size" in res.output and "batch / steps" in res.output
        runs.append(json.loads((tmp_path / f"p{k}" / "plan.json").read_text()))
    assert runs[0] == runs[1]  # the same manifest and device give the same plan
    plan = runs[0]
    assert plan["budget"] == "90s" and plan["budget_seconds"] == 90.0
    assert plan["train"]["image_size"] == [64, 64]  # small synthetic images: native
    fp = json.loads((tmp_path / "p0" / "fingerprint.json").read_text())
    assert fp["size_median"] == [64, 64] and fp["n_train"] == plan["train"]["max_steps"] * 0 + fp["n_train"]
    assert 0 < fp["empty_share"] < 1 and fp["tumour_pixels"]["median"] > 0
    assert (tmp_path / "cache" / "tumorseg" / "throughput.json").is_file()


def test_user_settings_win_over_the_plan_and_are_recorded(manifest: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from tumorseg import train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config(TrainConfig, None, ["budget=20s", "batch_size=4", "model.channels=[8,16,32]",
                                          "model.name=unet", "model.num_res_units=1", "log_model=false",
                                          "val_overlays=0", "device=cpu", "run_name=planned"],
                      base={"manifest": str(manifest), "out": str(tmp_path)})
    res = train.run(cfg)
    run_dir = tmp_path / "planned"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["overrides"]["batch_size"] == 4 and plan["overrides"]["model.channels"] == [8, 16, 32]
    used = TrainConfig.model_validate(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    assert used.batch_size == 4 and used.model.channels == [8, 16, 32]
    assert used.max_steps == plan["train"]["max_steps"] and used.optim.schedule == "poly" and used.plan == "off"
    assert (run_dir / "fingerprint.json").is_file() and (run_dir / "postprocess.json").is_file()
    assert res.epochs_run >= 1


def test_a_budget_run_stops_on_time_not_on_epochs(manifest: Path, tmp_path: Path) -> None:
    from tumorseg import train

    cfg = load_config(TrainConfig, None, ["plan=off", "budget=1s", "epochs=500", "batch_size=4", "image_size=[64,64]",
                                          "model.channels=[8,16,32]", "model.num_res_units=1", "log_model=false",
                                          "val_overlays=0", "device=cpu", "run_name=short"],
                      base={"manifest": str(manifest), "out": str(tmp_path)})
    res = train.run(cfg)
    assert res.stopped_reason == "time budget 1s reached" and res.epochs_run < 500


def test_the_budget_counts_from_the_commands_start(manifest: Path, tmp_path: Path) -> None:
    """A run whose command started a budget ago (imports, a slow disk) stops after its one epoch."""
    import time

    from tumorseg import train

    cfg = load_config(TrainConfig, None, ["plan=off", "budget=10m", "epochs=50", "batch_size=4", "image_size=[64,64]",
                                          "model.channels=[8,16,32]", "model.num_res_units=1", "log_model=false",
                                          "val_overlays=0", "device=cpu", "run_name=late"],
                      base={"manifest": str(manifest), "out": str(tmp_path)})
    res = train.run(cfg, started=time.perf_counter() - 600)
    assert res.stopped_reason == "time budget 10m reached" and res.epochs_run == 1


def test_the_train_command_passes_its_start(manifest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``tumorseg train`` hands the run the moment it started, before its heavy imports and the config."""
    import time
    from types import SimpleNamespace

    import tumorseg.train as stage
    from tumorseg.cli import app

    seen: dict[str, float | None] = {}

    def fake_run(cfg: TrainConfig, started: float | None = None) -> SimpleNamespace:
        seen.update(started=started, called=time.perf_counter())
        return SimpleNamespace(is_main_process=False)

    monkeypatch.setattr(stage, "run", fake_run)
    before = time.perf_counter()
    res = CliRunner().invoke(app, ["train", str(manifest), "--budget", "1m"])
    assert res.exit_code == 0, res.output
    assert seen["started"] is not None and before <= seen["started"] <= seen["called"]  # type: ignore[operator]


@pytest.mark.parametrize("budget", ["0", "soon", "0m", "-5m"])
def test_bad_budgets_are_one_line_errors(manifest: Path, budget: str) -> None:
    from tumorseg.cli import app

    for args in (["train", str(manifest), "--budget", budget], ["plan", str(manifest), "--budget", budget]):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "budget" in lines[0], res.stderr


def test_a_budget_without_a_unit_in_a_file_says_so(tmp_path: Path) -> None:
    """``budget: 5`` in YAML is a number: seconds or minutes? One line with the forms, not 'a valid string'."""
    from tumorseg.configio import load_config
    from tumorseg.errors import TumorsegError

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("budget: 5\n")
    with pytest.raises(TumorsegError, match=r"c\.yaml: budget: Value error, budget 5 has no unit; use e\.g\. 90s, 30m"):
        load_config(TrainConfig, cfg_file)


def test_a_plan_for_another_manifest_is_refused(manifest: Path, tmp_path: Path) -> None:
    from tumorseg.cli import app

    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"manifest_name": "x", "manifest_digest": "f" * 64, "device": "cpu", "budget": "1m",
                               "budget_seconds": 60, "train": {}, "estimates": {}, "reasons": {}}))
    res = CliRunner().invoke(app, ["train", str(manifest), "--plan", str(bad)])
    assert res.exit_code == 2 and "planned for another manifest" in res.stderr


# ----------------------------------------------------------------------------- inference by sliding window


def test_sliding_window_equals_the_whole_image_where_the_window_covers_it() -> None:
    import torch
    from monai.inferers import sliding_window_inference

    from tumorseg.inference import network_logits
    from tumorseg.model import build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(channels=[8, 16, 32], num_res_units=1), 1).eval()
    x = torch.randn(2, 1, 64, 96)
    with torch.inference_mode():
        whole = net(x)
        assert torch.allclose(network_logits(net, x, (64, 96)), whole)  # the window is the image
        covered = sliding_window_inference(x, (64, 96), 2, net, overlap=0.5, mode="gaussian")
        assert torch.allclose(torch.as_tensor(covered), whole, atol=1e-5)
        tiled = network_logits(net, x, (32, 32))  # smaller windows: tiled, same shape, blended
        assert tiled.shape == whole.shape and torch.isfinite(tiled).all()


def test_segmenter_predicts_large_images_by_sliding_window(tmp_path: Path) -> None:
    import torch

    from tumorseg import checkpoint
    from tumorseg.inference import Segmenter
    from tumorseg.model import build_model

    torch.manual_seed(0)
    model = ModelConfig(channels=[8, 16, 32], num_res_units=1)
    net = build_model(model, 1)
    image = np.random.default_rng(0).random((1, 100, 140)).astype(np.float32)
    whole = TrainConfig(image_size=(64, 96), model=model, plan="off")
    patched = whole.model_copy(update={"patch_size": (64, 96)})
    for cfg, name in ((whole, "whole.pt"), (patched, "patch.pt")):
        checkpoint.save(tmp_path / name, checkpoint.build_payload(net, cfg, 1))
    a = Segmenter.from_checkpoint(tmp_path / "whole.pt", "cpu").predict_proba([image])[0]
    b = Segmenter.from_checkpoint(tmp_path / "patch.pt", "cpu").predict_proba([image])[0]
    assert a.shape == b.shape == (100, 140)
    np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- post-processing


def test_postprocess_filters_components_exactly() -> None:
    from tumorseg.inference import Postprocess

    prob = np.zeros((20, 20), np.float32)
    prob[2:8, 2:8] = 0.9  # 36 px
    prob[12:14, 12:14] = 0.45  # 4 px, below 0.5
    prob[15:18, 15:18] = 0.8  # 9 px
    assert int(Postprocess().mask(prob).sum()) == 45
    assert int(Postprocess(threshold=0.4).mask(prob).sum()) == 49
    assert int(Postprocess(keep="largest").mask(prob).sum()) == 36
    assert int(Postprocess(threshold=0.4, keep="min_size", min_size=5).mask(prob).sum()) == 45
    assert Postprocess(keep="largest").mask(np.zeros((4, 4), np.float32)).sum() == 0


def test_postprocess_choice_travels_with_the_checkpoint_and_the_pyfunc_model(tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow
    import torch

    from tumorseg import checkpoint
    from tumorseg.inference import Postprocess, Segmenter
    from tumorseg.mlflow_model import log_segmenter_model
    from tumorseg.model import build_model

    torch.manual_seed(0)
    model = ModelConfig(channels=[8, 16, 32], num_res_units=1)
    cfg = TrainConfig(image_size=(32, 32), model=model, plan="off", loss=LossConfig())
    payload = checkpoint.build_payload(build_model(model, 1), cfg, 1)
    chosen = Postprocess(threshold=0.3, keep="min_size", min_size=7, tta=True)
    payload["postprocess"] = chosen.to_dict()
    best = tmp_path / "best.pt"
    checkpoint.save(best, payload)
    assert Segmenter.from_checkpoint(best, "cpu").post == chosen
    old = dict(payload)
    del old["postprocess"]  # a checkpoint from before post-processing: the config's threshold, nothing else
    checkpoint.save(tmp_path / "old.pt", old)
    assert Segmenter.from_checkpoint(tmp_path / "old.pt", "cpu").post == Postprocess(threshold=0.5)

    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run():
        uri = log_segmenter_model(best, tmp_path, None)
    loaded = mlflow.pyfunc.load_model(uri)
    assert loaded.unwrap_python_model().segmenter.post == chosen


def test_nnunet_intensity_augmentation_is_seeded_and_leaves_masks_alone() -> None:
    import torch

    from tumorseg.augment import augment_batch
    from tumorseg.config import AugmentConfig

    cfg = AugmentConfig(flip=False, rotate90=False, affine=False, intensity=False, gamma=True, noise=True, prob=1.0)
    x = torch.rand(4, 1, 16, 16) * 3 - 1
    y = (torch.rand(4, 1, 16, 16) > 0.7).float()
    a = augment_batch(x, y, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, y, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], y)
    assert not torch.allclose(a[0], x)
    gamma_only = augment_batch(x, y, cfg.model_copy(update={"noise": False}), torch.Generator().manual_seed(2))[0]
    assert torch.allclose(gamma_only.amin(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)), atol=1e-5)  # range kept
    assert torch.allclose(gamma_only.amax(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)), atol=1e-5)


def test_patches_for_time_when_whole_images_cannot_buy_the_samples() -> None:
    """A 512x512 set whose small tumours hold the scale at native: a slow CPU trains on crops instead."""
    fp = fingerprint((512, 512), 60.0, n_train=1000, small_diameter=8.0)
    assert rules.choose(fp, 1800.0, 100, fake_probe(2e6), "cpu")["train"]["patch_size"] is None  # asked for only
    slow = rules.choose(fp, 1800.0, 100, fake_probe(2e6), "cpu", patches_for_time=True)
    t = slow["train"]
    assert t["image_size"] == [512, 512] and slow["estimates"]["scale"] == 1.0  # the floor is native
    assert slow["reasons"]["image_size"].startswith("the tumour floor: scale 1.00 keeps")  # not "fits the budget"
    assert t["patch_size"] is not None and t["patch_size"][0] < 512
    assert t["patch_size"][0] >= 2 * 60  # the tumour and its context
    assert "buy fewer than" in slow["reasons"]["patch_size"] and t["oversample_foreground"] == pytest.approx(0.33)
    # the crop is the largest that buys the samples: one step larger would not
    floor_px = 512 * 512
    assert t["model"]["channels"][0] == 8  # a starved budget: the narrower network (rule 3)
    thr = fake_probe(2e6)(rules.network(rules.STARVED_NETWORK[1], (512, 512)), (512, 512), 8)
    p = t["patch_size"]
    if p[0] > 128:
        assert rules.samples_in(1800.0, thr, 1000, 100, p[0] * p[1] / floor_px, 1.0) >= rules.target_samples(1000)
    bigger = p[0] + rules.SIZE_STEP
    assert rules.samples_in(1800.0, thr, 1000, 100, bigger * bigger / floor_px, 1.0) < rules.target_samples(1000)
    fast = rules.choose(fp, 1800.0, 100, fake_probe(5e9), "cpu", patches_for_time=True)
    assert fast["train"]["patch_size"] is None  # whole images buy the samples: no crops


def test_patches_for_time_never_go_below_the_tumour_context() -> None:
    fp = fingerprint((512, 512), 100.0, n_train=1000, small_diameter=30.0)
    starved = rules.choose(fp, 120.0, 100, fake_probe(1e5), "cpu", patches_for_time=True)
    # starved: the floors halved, scale 0.32 keeps the median tumour at 32 px: crops of 2 x 32 px, no smaller
    assert starved["estimates"]["scale"] == pytest.approx(0.32) and starved["train"]["image_size"] == [160, 160]
    assert starved["train"]["patch_size"] == [64, 64]


def test_patches_for_time_go_below_the_crop_memory_allows() -> None:
    """A 1024x1024 set held at native: memory alone crops to 512x512 on a CPU; asked, time crops smaller."""
    fp = fingerprint((1024, 1024), 60.0, n_train=1000, small_diameter=8.0)
    memory = rules.choose(fp, 1800.0, 100, fake_probe(2e6), "cpu")
    assert memory["train"]["image_size"] == [1024, 1024] and memory["train"]["patch_size"] == [512, 512]
    assert "hold more pixels than fit" in memory["reasons"]["patch_size"]
    timed = rules.choose(fp, 1800.0, 100, fake_probe(2e6), "cpu", patches_for_time=True)
    side = timed["train"]["patch_size"][0]
    assert timed["train"]["image_size"] == [1024, 1024] and 2 * 60 <= side < 512
    assert timed["reasons"]["patch_size"].startswith("the 512x512 crops memory allows at 1024x1024 buy fewer than")
    assert timed["estimates"]["epochs"] > memory["estimates"]["epochs"]

# ----------------------------------------------------------------------------- issue #22: pretrained encoders


def test_pretrained_encoder_only_for_small_natural_2d_sets_with_cached_weights() -> None:
    natural = fingerprint((96, 96), 30.0).model_copy(update={"natural": True})
    cached = ("mobilenet_v2", "vgg16")
    out = rules.choose(natural, 3600.0, 100, fake_probe(5e6), "cpu", pretrained=cached)
    model = out["train"]["model"]
    # the largest cached candidate whose measured throughput buys the samples (VGG16-BN is not cached)
    assert (model["name"], model["backbone"], model["pretrained"]) == ("flexible_unet", "vgg16", "imagenet")
    assert "pretrained" not in out["reasons"]
    slow = fake_probe(5e6)

    def probe(m: ModelConfig, size: tuple[int, int], batch: int) -> Throughput:  # VGG too slow for the budget
        thr = slow(m, size, batch)
        return Throughput(thr.train_images_per_second / 1000, thr.infer_images_per_second, 0.0) \
            if m.backbone.startswith("vgg") and m.name == "flexible_unet" else thr

    assert rules.choose(natural, 3600.0, 100, probe, "cpu", pretrained=cached)["train"]["model"]["backbone"] == \
        "mobilenet_v2"
    for fp, why in [(fingerprint((96, 96), 30.0), "not all 2D 8-bit"),  # NIfTI, 16-bit, ...: never
                    (natural.model_copy(update={"n_train": 20_000}), "20000 train cases"),
                    (natural, "hub cache")]:
        out = rules.choose(fp, 3600.0, 100, fake_probe(5e6), "cpu", pretrained=() if why == "hub cache" else cached)
        assert out["train"]["model"]["name"] != "flexible_unet" and out["train"]["model"]["pretrained"] == "none"
        assert why in out["reasons"]["pretrained"]


def test_fingerprint_tells_natural_images_and_the_planner_asks_only_the_cache(
        manifest: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import pandas as pd

    from tumorseg import encoders, planning
    from tumorseg.planning.fingerprint import natural

    rows = pd.DataFrame({"image_mode": ["PNG:L uint8", "PNG:RGB uint8"], "slice_index": [-1, -1], "channels": [1, 3]})
    assert natural(rows)
    assert not natural(rows.assign(image_mode=["PNG:I;16 uint16", "PNG:RGB uint8"]))
    assert not natural(rows.assign(image_mode=["NIfTI float32", "NIfTI float32"], slice_index=[0, 1]))
    fp = fingerprint((64, 64), 20.0).model_copy(update={"natural": True})
    monkeypatch.setattr(encoders, "imagenet_cached",
                        lambda b: tmp_path / f"{b}.pth" if b == "mobilenet_v3_large" else None)
    assert planning.cached_encoders(TrainConfig(), fp) == ("mobilenet_v3_large",)
    assert planning.cached_encoders(TrainConfig(normalize="dataset"), fp) == ()
    assert planning.cached_encoders(TrainConfig(), fp.model_copy(update={"natural": False})) == ()

    # a user who names another network drops the plan's pretrained encoder with it
    plan = planning.Plan(manifest_name="m", manifest_digest="0" * 64, device="cpu", budget="1m", budget_seconds=60,
                         train={"model": {"name": "flexible_unet", "backbone": "mobilenet_v3_large",
                                          "pretrained": "imagenet"}}, estimates={}, reasons={})
    user = load_config(TrainConfig, None, ["model.name=unet"])
    merged, overrides = planning.apply(user, plan)
    assert merged.model.name == "unet" and merged.model.pretrained == "none"
    kept, _ = planning.apply(TrainConfig(), plan)
    assert (kept.model.backbone, kept.model.pretrained) == ("mobilenet_v3_large", "imagenet")

    # other widths at the plan's depth keep its per-axis strides (a 3D plan); another depth drops them
    plan3d = plan.model_copy(update={"train": {"image_size": [64, 48, 32], "model": {
        "name": "unet", "channels": [16, 32, 64, 128], "strides": [[2, 2, 2], [2, 2, 2], [2, 2, 1]]}}})
    wider, _ = planning.apply(load_config(TrainConfig, None, ["model.channels=[32,64,128,256]"]), plan3d)
    assert wider.model.channels == [32, 64, 128, 256] and wider.model.strides == [[2, 2, 2], [2, 2, 2], [2, 2, 1]]
    shallow, _ = planning.apply(load_config(TrainConfig, None, ["model.channels=[8,16,32]"]), plan3d)
    assert shallow.model.strides is None and shallow.image_size == (64, 48, 32)
