"""The registered model served: the pyfunc's input ranks, ``tumorseg serve``, and a real scoring server.

A tiny untrained UNet is logged with :func:`tumorseg.mlflow_model.log_segmenter_model` (as
``train`` logs it) and registered as ``tiny-serve@champion`` once per module. The slow test starts
``tumorseg serve`` as a subprocess from a shell whose venv is not activated, on a free loopback
port, posts images over HTTP and stops the server by its PID in every case.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import free_port as _free_port
from helpers import stop_server as _stop
from typer.testing import CliRunner

from tumorseg.cli import app
from tumorseg.config import ModelConfig, TrackingConfig, TrainConfig
from tumorseg.errors import TumorsegError
from tumorseg.mlflow_model import CHUNK

MODEL = "tiny-serve"
EXPERIMENT = "test-serve"
H, W = 48, 40


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> dict[str, Any]:
    """A tiny UNet logged as train logs it, registered as ``MODEL@champion``."""
    import mlflow
    import torch

    from tumorseg import checkpoint
    from tumorseg.mlflow_model import log_segmenter_model
    from tumorseg.model import build_model

    root = tmp_path_factory.mktemp("serve")
    mlflow.set_tracking_uri(mlflow_uri)
    mlflow.set_registry_uri(mlflow_uri)
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(EXPERIMENT, str(root / "artifacts"))
    cfg = TrainConfig(image_size=(32, 32), model=ModelConfig(channels=[8, 16, 32], num_res_units=1))
    torch.manual_seed(0)
    checkpoint.save(root / "best.pt", checkpoint.build_payload(build_model(cfg.model, 1), cfg, 1))
    example = np.random.RandomState(0).rand(1, H, W).astype(np.float32)
    with mlflow.start_run(experiment_id=exp_id):
        uri = log_segmenter_model(root / "best.pt", root, example)
    version = mlflow.register_model(uri, MODEL).version
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", version)
    return {"uri": f"models:/{MODEL}@champion", "tracking": mlflow_uri, "root": root}


@pytest.fixture(scope="module")
def pyfunc(served: dict[str, Any]) -> Any:
    import mlflow

    mlflow.set_tracking_uri(served["tracking"])
    mlflow.set_registry_uri(served["tracking"])
    return mlflow.pyfunc.load_model(served["uri"])


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).rand(n, 1, H, W).astype(np.float32)


# ----------------------------------------------------------------------------- the pyfunc model


def test_pyfunc_takes_one_image_of_either_rank_and_a_batch(pyfunc: Any) -> None:
    batch = _images(3)
    one = pyfunc.predict(batch[0, 0])  # (H, W)
    assert one.shape == (H, W) and one.dtype == np.uint8 and set(np.unique(one)) <= {0, 1}
    assert np.array_equal(pyfunc.predict(batch[0]), one)  # (1, H, W)
    assert np.array_equal(pyfunc.predict(np.repeat(batch[0], 3, axis=0)), one)  # (3, H, W): one RGB image
    assert pyfunc.predict(batch[0, 0].tolist()).shape == (H, W)  # nested lists, as JSON gives them

    masks = pyfunc.predict(batch)  # three grey images are three masks, not one averaged image
    assert masks.shape == (3, H, W) and masks.dtype == np.uint8
    proba = pyfunc.predict(batch, params={"probabilities": True})
    assert proba.shape == (3, H, W) and proba.dtype == np.float32 and 0 <= proba.min() <= proba.max() <= 1
    for i in range(3):
        single = pyfunc.predict(batch[i], params={"probabilities": True})
        np.testing.assert_allclose(proba[i], single, atol=1e-5)
    assert pyfunc.predict(np.zeros((0, 1, H, W), np.float32)).shape == (0, H, W)
    assert pyfunc.predict(np.random.rand(CHUNK + 1, 1, 8, 8)).shape == (CHUNK + 1, 8, 8)  # float64, in chunks

    # from Python only: a list of images of different sizes -> a list of masks
    out = pyfunc.predict([batch[0, 0], np.random.rand(1, 20, 30).astype(np.float32)])
    assert [m.shape for m in out] == [(H, W), (20, 30)]


@pytest.mark.parametrize(
    ("shape", "says"),
    [
        ((1, 1, 1, 8, 8), "5 dimension"),
        ((8,), "1 dimension"),
        ((4, 8, 8), "one image with 4 channels"),  # a stack of grey images is (N, 1, H, W)
        ((2, 2, 8, 8), "a batch of 2 images with 2 channels"),
    ],
)
def test_pyfunc_names_the_shape_it_cannot_read(pyfunc: Any, shape: tuple[int, ...], says: str) -> None:
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=re.escape(str(shape))) as info:
        pyfunc.predict(np.zeros(shape, np.float32))
    assert says in info.value.message and "(N, C, H, W)" in info.value.message


def test_logged_model_declares_params_and_a_small_input_example(served: dict[str, Any], pyfunc: Any) -> None:
    signature = pyfunc.metadata.signature
    assert signature.inputs is None  # MLflow checks a tensor's rank exactly; the model takes three ranks
    assert [p.name for p in signature.params.params] == ["probabilities"]
    example = pyfunc.input_example
    assert example.shape == (1, 1, H // 2, W // 2)  # a batch of one image, subsampled to <= 32 px a side
    assert pyfunc.predict(example).shape == (1, H // 2, W // 2)
    assert pyfunc.metadata.metadata["tumorseg_in_channels"] == 1


# ----------------------------------------------------------------------------- tumorseg serve



def test_serve_refuses_what_it_cannot_serve(served: dict[str, Any]) -> None:
    runner = CliRunner()
    tracking = ["--tracking-uri", served["tracking"]]
    for ref, says in [(f"models:/{MODEL}-missing@champion", "not found"),
                      (f"models:/{MODEL}@nope", "nope"),
                      (str(served["root"] / "best.pt"), "not an MLflow model"),
                      ("no/such/thing", "model not found"),
                      (f"models:/{MODEL}", f"give a version or alias, e.g. models:/{MODEL}/1 or "
                                           f"models:/{MODEL}@champion")]:
        res = runner.invoke(app, ["serve", ref, "--port", str(_free_port()), *tracking])
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], res.output

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(TumorsegError, match="in use"):
            from tumorseg import serve

            serve.prepare(served["uri"], port=busy.getsockname()[1], tracking=TrackingConfig(uri=served["tracking"]))


def test_serve_runs_mlflow_with_this_interpreter(served: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from tumorseg import serve

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # a venv that is not activated
    cmd = serve.prepare(served["uri"], port=_free_port(), tracking=TrackingConfig(uri=served["tracking"]))
    assert cmd.argv[:5] == [sys.executable, "-m", "mlflow", "models", "serve"]
    assert cmd.argv[cmd.argv.index("--env-manager") + 1] == "local"
    assert cmd.argv[cmd.argv.index("--host") + 1] == "127.0.0.1"
    assert cmd.env["PATH"].split(os.pathsep)[0] == sysconfig.get_path("scripts")
    assert shutil.which("uvicorn", path=cmd.env["PATH"]) is not None
    assert cmd.env["MLFLOW_TRACKING_URI"] == cmd.env["MLFLOW_REGISTRY_URI"] == served["tracking"]



def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 - local test server
        return json.loads(resp.read())["predictions"]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:  # noqa: S310 - local test server
            return resp.status == 200
    except OSError:
        return False


@pytest.mark.slow
def test_served_model_answers_over_http(served: dict[str, Any], pyfunc: Any, tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PATH": "/usr/bin:/bin", "MLFLOW_DISABLE_TELEMETRY": "true"}  # venv not activated
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "tumorseg", "serve", served["uri"], "--port", str(port),
           "--tracking-uri", served["tracking"]]
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            if proc.poll() is not None:
                pytest.fail(f"tumorseg serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"tumorseg serve did not answer /ping in 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)

        batch = _images(2, seed=2)
        mask = np.asarray(_post(f"{url}/invocations", {"inputs": batch[0, 0].tolist()}))  # one (H, W) image
        assert mask.shape == (H, W) and set(np.unique(mask)) <= {0, 1}
        proba = np.asarray(_post(f"{url}/invocations", {"inputs": batch.tolist(), "params": {"probabilities": True}}))
        assert proba.shape == (2, H, W)
        np.testing.assert_allclose(proba, pyfunc.predict(batch, params={"probabilities": True}), atol=1e-4)

        with pytest.raises(urllib.error.HTTPError) as bad:
            _post(f"{url}/invocations", {"inputs": batch[None].tolist()})
        assert bad.value.code == 400
        assert "(1, 2, 1, 48, 40)" in json.loads(bad.value.read())["message"]
    finally:
        _stop(proc)
    assert proc.returncode is not None
