"""Shared fixtures: a real MLflow SQLite store per session and tiny synthetic PNG data.

`pytest` runs everything (what CI runs); `pytest -m "not slow"` skips the end-to-end tests
(torchrun, kill-and-resume, a real MLflow server, whole pipelines) for a quick inner loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One real SQLite tracking store for the session (a new database costs ~3.5 s)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{db}"


@pytest.fixture(autouse=True)
def _tracking_env(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stage in every test tracks into the session store, never ./mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic 64x64 image/mask PNG pairs (6 patients x 4 slices), written once."""
    from tumorseg import synth

    root = tmp_path_factory.mktemp("synth")
    synth.run(root, n=24, size=64, seed=0)
    return root


@pytest.fixture(scope="module")
def manifest(synth_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic data ingested by patient (a fresh manifest per test module)."""
    from tumorseg import ingest
    from tumorseg.config import IngestConfig

    cfg = IngestConfig(images_dir=synth_data / "images", masks_dir=synth_data / "masks", name="tiny",
                       out_dir=tmp_path_factory.mktemp("manifests"), group_pattern=r"(patient_\d+)", seed=3,
                       workers=1)
    return ingest.run(cfg).manifest_dir
