"""The pipeline against a real ``mlflow server`` (SQLite backend, artifacts proxied over HTTP).

Starts the server on a free 127.0.0.1 port, runs a tiny demo-style pipeline twice (the second
run must find nothing new), checks runs, registry and artifacts through ``MlflowClient``,
and stops the server by its PID in every case.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import free_port as _free_port
from helpers import stop_server as _stop
from typer.testing import CliRunner

from tumorseg.cli import app

MODEL = "tiny-server"
EXPERIMENT = "test-server"



def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:  # noqa: S310 - local test server
            return resp.status == 200
    except OSError:
        return False



@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real tracking server; yields its URI."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    root = tmp_path / "server"
    root.mkdir()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = root / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env)
    try:
        deadline = time.monotonic() + 90
        while not _healthy(uri):
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer /health in 90 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        _stop(proc)


def _pipeline_yaml(path: Path, root: Path) -> Path:
    doc: dict[str, Any] = {
        "name": "server-demo",
        "work_dir": str(root / "work"),
        "synth": {"n": 24, "size": 64, "seed": 0},
        "data": {"images_dir": str(root / "data" / "images"), "masks_dir": str(root / "data" / "masks"),
                 "name": "tiny", "group_pattern": r"(patient_\d+)", "seed": 3, "workers": 1},
        "train": {"plan": "off", "epochs": 1, "batch_size": 4, "image_size": [64, 64], "device": "cpu", "amp": False,
                  "val_overlays": 0, "model": {"channels": [8, 16, 32], "num_res_units": 1}},
        "evaluate": {"split": "test", "device": "cpu", "bootstrap": 0, "workers": 0, "gallery_k": 1},
        "registry": {"model_name": MODEL},
        "tracking": {"experiment": EXPERIMENT},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.slow
def test_pipeline_against_a_real_tracking_server(mlflow_server: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    yml = _pipeline_yaml(tmp_path / "server-demo.yaml", tmp_path)
    runner = CliRunner()

    first = runner.invoke(app, ["pipeline", "run", str(yml)])
    assert first.exit_code == 0, first.output
    assert "first champion" in first.output
    second = runner.invoke(app, ["pipeline", "run", str(yml), "--tracking-uri", mlflow_server])
    assert second.exit_code == 0, second.output
    assert "nothing new" in second.output

    cl = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    exp = cl.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    parents = cl.search_runs([exp.experiment_id], "tags.`tumorseg.stage` = 'pipeline'",
                             order_by=["attributes.start_time ASC"])
    assert [p.data.tags["pipeline.outcome"] for p in parents] == ["first_champion", "nothing_new"]
    assert all(p.info.status == "FINISHED" for p in parents)

    def children(run_id: str) -> dict[str, Any]:
        runs = cl.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        return {r.data.tags["tumorseg.stage"]: r for r in runs}

    kids = children(parents[0].info.run_id)
    assert sorted(kids) == ["evaluate", "ingest", "promote", "train"]
    assert sorted(children(parents[1].info.run_id)) == ["ingest"]  # no training the second time
    # the challenger is scored once, by the evaluate stage; a first champion has nothing to compare with
    assert children(kids["promote"].info.run_id) == {}
    assert parents[0].data.metrics["evaluate.dice_mean"] >= 0
    assert parents[0].data.metrics["promote.challenger_dice"] == parents[0].data.metrics["evaluate.dice_mean"]

    versions = cl.search_model_versions(f"name = '{MODEL}'")
    assert [str(v.version) for v in versions] == ["1"]
    v1 = versions[0]
    assert str(cl.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert str(cl.get_model_version_by_alias(MODEL, "challenger").version) == "1"
    assert v1.tags["tumorseg.decision"] == "first_champion"
    assert v1.tags["tumorseg.dataset_digest"] == parents[1].data.tags["tumorseg.dataset_digest"]
    assert v1.run_id == kids["train"].info.run_id

    # artifacts went through the server (proxied), onto its artifact folder
    train_run = kids["train"]
    assert train_run.info.artifact_uri.startswith("mlflow-artifacts:")
    names = {a.path for a in cl.list_artifacts(train_run.info.run_id)}
    assert "config.yaml" in names
    ingest_files = {a.path for a in cl.list_artifacts(kids["ingest"].info.run_id, "manifest")}
    assert "manifest/manifest.csv" in ingest_files
    server_files = {p.name for p in (tmp_path / "server" / "artifacts").rglob("*") if p.is_file()}
    assert {"config.yaml", "manifest.csv", "MLmodel"} <= server_files

    mlflow.set_tracking_uri(mlflow_server)
    mlflow.set_registry_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    mask = model.predict(np.random.RandomState(0).rand(1, 40, 56).astype(np.float32))
    assert np.asarray(mask).shape == (40, 56)
