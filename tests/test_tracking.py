"""The MLflow interface: experiments tumorseg makes are model-training ones; runs carry a description."""

from __future__ import annotations

import pytest

from tumorseg import tracking
from tumorseg.config import TrackingConfig

KIND = tracking.EXPERIMENT_KIND_TAG


def test_new_experiment_opens_as_model_training_and_runs_get_descriptions(mlflow_uri: str) -> None:
    """The kind tag says "model training", not a GenAI app; the notes are the descriptions the UI shows."""
    with tracking.start_run(TrackingConfig(uri=mlflow_uri, experiment="kind-new"), "predict") as run:
        run.set_description("Predicted with `m`: **3 masks**")
    cl = tracking.client(mlflow_uri)
    exp = cl.get_experiment_by_name("kind-new")
    assert exp is not None
    assert exp.tags[KIND] == "custom_model_development"
    assert "pipeline" in exp.tags[tracking.NOTE_TAG]  # the experiment's description
    assert cl.get_run(run.run_id).data.tags[tracking.NOTE_TAG] == "Predicted with `m`: **3 masks**"
    assert run.experiment_id == exp.experiment_id
    tracking.describe_run(mlflow_uri, run.run_id, "changed")  # by id, as the pipeline does for its parent run
    assert cl.get_run(run.run_id).data.tags[tracking.NOTE_TAG] == "changed"


@pytest.mark.parametrize(("before", "after"), [(None, "custom_model_development"),
                                               ("genai_development", "genai_development")])
def test_existing_experiment_gets_the_kind_unless_one_was_chosen(mlflow_uri: str, before: str | None,
                                                                 after: str) -> None:
    cl = tracking.client(mlflow_uri)
    name = f"kind-old-{before}"
    exp_id = cl.create_experiment(name, tags={KIND: before} if before else None)
    tracking.configure(TrackingConfig(uri=mlflow_uri))
    tracking._ensure_experiment(name, mlflow_uri)
    assert cl.get_experiment(exp_id).tags.get(KIND) == after


def test_ui_link_opens_the_model_training_view() -> None:
    """MLflow 3.17's UI ignores the kind tag for its view; the link's workflowType picks it."""
    assert tracking.ui_link("http://mlflow.lab:5000/", "7") == (
        "http://mlflow.lab:5000/#/experiments/7/runs?workflowType=machine_learning")
    local = tracking.ui_link("sqlite:////data/mlflow.db", "1")
    assert local.startswith("http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning")
    assert "mlflow ui --backend-store-uri sqlite:////data/mlflow.db" in local


def test_null_run_describes_nothing() -> None:
    tracking.NullRun().set_description("ignored")  # DDP ranks other than 0: no MLflow call at all
