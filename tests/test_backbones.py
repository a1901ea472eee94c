"""Issue #22: flexible_unet on torchvision's VGG16 and MobileNet encoders, pretrained weights, their normalisation.

Nothing is downloaded: pretrained weights come from files the tests write (a randomly initialised
torchvision network's state dict), and ``imagenet`` from a fake torch hub cache or a refused download.
Sizes are tiny (VGG16's encoder alone has 15M parameters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import free_port, stop_server
from typer.testing import CliRunner

from tumorseg.cli import app
from tumorseg.config import ModelConfig, TrackingConfig, TrainConfig, build_config, load_config
from tumorseg.errors import TumorsegError

BACKBONES = ["vgg16", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_large"]


def _tv() -> Any:
    from tumorseg.encoders import import_torchvision

    return import_torchvision()


def _flex(backbone: str, **kw: Any) -> ModelConfig:
    return ModelConfig(name="flexible_unet", backbone=backbone, **kw)


def _weights_file(path: Path, backbone: str, seed: int = 1, classifier: bool = False) -> dict[str, torch.Tensor]:
    """A torchvision network's state dict as a lab would save it (``features.*``; with ``classifier``, all of it)."""
    torch.manual_seed(seed)
    model = getattr(_tv().models, backbone)(weights=None)
    state = model.state_dict() if classifier else {f"features.{k}": v for k, v in model.features.state_dict().items()}
    torch.save(state, path)
    return state


# ----------------------------------------------------------------------------- building


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_backbone_builds_for_grey_and_rgb_at_sizes_not_multiples_of_32(backbone: str, in_channels: int) -> None:
    from tumorseg.model import build_model

    net = build_model(_flex(backbone), in_channels, 3).eval()
    with torch.no_grad():
        feats = net.encoder(torch.zeros(1, in_channels, 64, 96))
        assert [tuple(f.shape[-2:]) for f in feats] == [(64 // s, 96 // s) for s in (2, 4, 8, 16, 32)]
        for size in [(40, 52), (48, 80), (64, 64)]:  # padded to a multiple of 32 inside, cropped back
            assert net(torch.zeros(2, in_channels, *size)).shape == (2, 3, *size)


def test_encoders_are_registered_in_monai_and_keep_torchvision_layer_names() -> None:
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    from tumorseg import encoders
    from tumorseg.model import build_model

    encoders.register()
    assert {"vgg16", "mobilenet_v2", "resnet34", "efficientnet-b0"} <= set(FLEXUNET_BACKBONE.register_dict)
    net = build_model(_flex("mobilenet_v2"), 3)
    own = set(net.encoder.state_dict())
    assert own == {f"features.{k}" for k in _tv().models.mobilenet_v2(weights=None).features.state_dict()}
    # the taps: the last block of each stride, as segmentation_models.pytorch (smp) cuts MobileNetV2 and VGG16
    assert encoders.stages("mobilenet_v2") == ([1, 3, 6, 13, 18], [16, 24, 32, 96, 1280])
    assert encoders.stages("vgg16") == ([8, 15, 22, 29, 30], [128, 256, 512, 512, 512])


def test_resnet_flexible_unet_now_takes_sizes_that_are_not_multiples_of_32() -> None:
    from tumorseg.model import build_model

    net = build_model(_flex("resnet18"), 1).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 48, 80)).shape == (1, 1, 48, 80)  # MONAI's FlexibleUNet alone: size mismatch


# ----------------------------------------------------------------------------- pretrained weights


@pytest.mark.parametrize("backbone", BACKBONES)
def test_local_weights_file_gives_exactly_its_encoder_weights(backbone: str, tmp_path: Path) -> None:
    from tumorseg.model import build_model

    path = tmp_path / f"{backbone}.pth"
    state = _weights_file(path, backbone, classifier=backbone.startswith("mobilenet"))  # classifier keys ignored
    rgb = build_model(_flex(backbone, pretrained=path), 3, load_weights=True).encoder.state_dict()
    assert set(rgb) == {k for k in state if k.startswith("features.")}
    for k, v in rgb.items():
        assert torch.equal(v, state[k]), k
    grey = build_model(_flex(backbone, pretrained=path), 1, load_weights=True).encoder.state_dict()
    first = "features.0.weight" if backbone.startswith("vgg") else "features.0.0.weight"
    assert grey[first].shape[1] == 1
    assert torch.equal(grey[first], state[first].sum(dim=1, keepdim=True))  # summed over RGB, as smp
    for k, v in grey.items():
        if k != first:
            assert torch.equal(v, state[k]), k


def test_wrong_weights_files_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    from tumorseg.model import build_model

    mobilenet = tmp_path / "mobilenet_v2.pth"
    _weights_file(mobilenet, "mobilenet_v2")
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not weights")
    resnet = tmp_path / "tv_resnet18.pth"
    torch.save(_tv().models.resnet18(weights=None).state_dict(), resnet)
    cases = [
        (_flex("mobilenet_v3_large", pretrained=mobilenet), "mobilenet_v2.pth: "),  # another backbone
        (_flex("vgg16", pretrained=tmp_path / "missing.pth"), "missing.pth: pretrained weights file not found"),
        (_flex("mobilenet_v2", pretrained=garbage), "notes.pth: cannot read"),
        # torchvision's ResNet-18 has projection shortcuts; MONAI's resnet18 (MedicalNet's) does not
        (_flex("resnet18", pretrained=resnet), "downsample"),
    ]
    for cfg, says in cases:
        with pytest.raises(TumorsegError) as info:
            build_model(cfg, 3, load_weights=True)
        assert says in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_imagenet_comes_from_torchvisions_cache_and_offline_is_one_line(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models._api as api

    from tumorseg import encoders
    from tumorseg.model import build_model

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert encoders.imagenet_cached("mobilenet_v2") is None

    def offline(*args: Any, **kwargs: Any) -> Any:
        raise OSError("network is unreachable")  # what urllib raises without a connection

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(TumorsegError) as info:
        build_model(_flex("mobilenet_v2", pretrained="imagenet"), 1, load_weights=True)
    msg = str(info.value)
    assert "could not be fetched" in msg and "model.pretrained=/path/mobilenet_v2.pth" in msg and "\n" not in msg
    monkeypatch.undo()

    # torchvision's weight API reads its cache without a download: a file put there is what loads
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    url = _tv().models.MobileNet_V2_Weights.DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    state = _weights_file(cached, "mobilenet_v2", seed=5, classifier=True)
    assert encoders.imagenet_cached("mobilenet_v2") == cached
    net = build_model(_flex("mobilenet_v2", pretrained="imagenet"), 3, load_weights=True)
    assert all(torch.equal(v, state[k]) for k, v in net.encoder.state_dict().items())
    with pytest.raises(TumorsegError, match="no ImageNet weights for backbone resnet18"):
        build_model(_flex("resnet18", pretrained="imagenet"), 3, load_weights=True)


def test_pretrained_stats_are_imagenets_after_percentile_scaling() -> None:
    from tumorseg.encoders import pretrained_stats

    rgb = pretrained_stats("vgg16", 3)
    assert rgb == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "percentiles": [0.5, 99.5]}
    grey = pretrained_stats("mobilenet_v3_large", 1)
    assert grey["mean"] == pytest.approx([0.449]) and grey["std"] == pytest.approx([0.226])


def test_config_keeps_old_key_and_refuses_what_cannot_work() -> None:
    old = TrainConfig.model_validate({"model": {"name": "flexible_unet", "pretrained_weights": "/w/enc.pth"}})
    assert str(old.model.pretrained) == "/w/enc.pth" and "pretrained_weights" not in old.model.model_dump()
    assert TrainConfig.model_validate({"model": {"pretrained_weights": None}}).model.pretrained == "none"
    bad = [
        ({"model": {"name": "unet", "pretrained": "imagenet"}}, "need model.name=flexible_unet"),
        ({"model": {"name": "flexible_unet", "backbone": "vgg19"}}, "unknown backbone 'vgg19'"),
        ({"model": {"name": "flexible_unet", "pretrained": "imagenet"}, "normalize": "image"}, "normalize: image"),
        ({"model": {"name": "flexible_unet", "freeze_encoder": 1.0}}, "freeze_encoder"),
    ]
    for data, says in bad:
        with pytest.raises(TumorsegError) as info:
            build_config(TrainConfig, data, "cfg.yaml")
        assert says in str(info.value) and "\n" not in str(info.value), str(info.value)


# ----------------------------------------------------------------------------- freezing


def test_frozen_encoder_is_left_alone_by_the_optimiser() -> None:
    from tumorseg.config import LossConfig
    from tumorseg.model import build_loss, build_model, encoder_parameters
    from tumorseg.train.loop import frozen_steps, train_step

    torch.manual_seed(0)
    net = build_model(_flex("mobilenet_v2"), 1)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    enc = encoder_parameters(net)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = torch.rand(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float()
    train_step(net, x, y, build_loss(LossConfig()), opt, None, torch.device("cpu"), None, enc)
    ids = {id(p) for p in enc}
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, b) == (id(p) in ids)  # encoder fixed (no decay either), the rest moved
    cfg = TrainConfig(epochs=10, max_steps=50, model=_flex("vgg16", freeze_encoder=0.2))
    assert frozen_steps(cfg, 8) == 10  # a fifth of min(10 x 8, 50)
    assert frozen_steps(TrainConfig(epochs=10), 8) == 0


# ----------------------------------------------------------------------------- train -> checkpoint -> pyfunc -> serve

TINY = ["plan=off", "epochs=1", "max_steps=2", "batch_size=4", "image_size=[48,80]", "val_overlays=1",
        "model.name=flexible_unet", "postprocess=none"]


def _train(manifest: Path, out: Path, backbone: str, *extra: str) -> Any:
    from tumorseg import train

    cfg = load_config(TrainConfig, None, [*TINY, f"model.backbone={backbone}", *extra],
                      base={"manifest": str(manifest), "out": str(out), "run_name": backbone})
    return train.run(cfg)


def _cases(manifest: Path, n: int = 3) -> list[np.ndarray]:
    from tumorseg.imageio import load_image

    root = Path(json.loads((manifest / "manifest.json").read_text())["data_root"])
    rows = (manifest / "manifest.csv").read_text().splitlines()[1:n + 1]
    return [load_image(root / r.split(",")[1]) for r in rows]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_backbone_trains_and_round_trips_checkpoint_pyfunc_and_serve(
        backbone: str, manifest: Path, tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    from tumorseg import checkpoint, serve
    from tumorseg.encoders import pretrained_stats
    from tumorseg.inference import Segmenter

    extra = []
    if backbone.startswith("mobilenet"):  # pretrained from a local file, the encoder frozen for half the steps
        _weights_file(tmp_path / "w.pth", backbone)
        extra = [f"model.pretrained={tmp_path / 'w.pth'}", "model.freeze_encoder=0.5"]
    result = _train(manifest, tmp_path / "runs", backbone, *extra)
    ckpt = checkpoint.load(result.best_checkpoint)
    if extra:
        assert ckpt["intensity"] == pretrained_stats(backbone, 1)
        assert ckpt["input_normalization"].startswith(f"pretrained: the {backbone} encoder's ImageNet mean/std")
    else:
        assert ckpt["input_normalization"].startswith("percentile")
    seg = Segmenter.from_checkpoint(result.best_checkpoint, device="cpu")
    assert seg.stats == ckpt["intensity"]
    images = _cases(manifest)
    probs = seg.predict_proba(images)
    assert [p.shape for p in probs] == [im.shape[1:] for im in images]

    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model(result.model_uri)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(result.model_uri)).read_text()
    assert "torchvision==" in requirements  # the served environment needs torchvision's network
    for image, prob in zip(images, probs, strict=True):
        np.testing.assert_allclose(model.predict(image, params={"probabilities": True}), prob, atol=1e-5)
    assert model.metadata.metadata["tumorseg_input_normalization"] == ckpt["input_normalization"]
    cmd = serve.prepare(result.model_uri, port=free_port(), tracking=TrackingConfig(uri=mlflow_uri))
    assert cmd.argv[-6:-4] == ["--env-manager", "local"]


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - local test server
        return json.loads(resp.read())["predictions"]


@pytest.mark.slow
def test_pretrained_mobilenet_is_served_over_http_with_its_normalisation(manifest: Path, tmp_path: Path,
                                                                         mlflow_uri: str) -> None:
    import mlflow

    _weights_file(tmp_path / "w.pth", "mobilenet_v3_large")
    result = _train(manifest, tmp_path / "runs", "mobilenet_v3_large", f"model.pretrained={tmp_path / 'w.pth'}")
    mlflow.set_tracking_uri(mlflow_uri)
    expected = mlflow.pyfunc.load_model(result.model_uri).predict(_cases(manifest, 1)[0],
                                                                  params={"probabilities": True})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": "/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tumorseg", "serve", result.model_uri, "--port", str(port),
                                 "--tracking-uri", mlflow_uri], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:  # noqa: S310
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tumorseg serve did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        image = _cases(manifest, 1)[0]
        got = np.asarray(_post(f"{url}/invocations", {"inputs": image.tolist(), "params": {"probabilities": True}}))
        np.testing.assert_allclose(got, expected, atol=1e-4)
    finally:
        stop_server(proc)


def test_a_wrong_weights_file_stops_train_with_one_line(manifest: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "resnet.pth"
    torch.save(_tv().models.resnet18(weights=None).state_dict(), wrong)
    res = CliRunner().invoke(app, ["train", str(manifest), *[f"--set={s}" for s in TINY],
                                   "--set", "model.backbone=vgg16", "--set", f"model.pretrained={wrong}",
                                   "--set", f"out={tmp_path / 'runs'}"])
    assert res.exit_code == 2, res.output
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resnet.pth" in errors[0] and "Traceback" not in res.output, res.output
