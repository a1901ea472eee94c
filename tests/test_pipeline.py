"""``tumorseg pipeline run``: stages under one parent run, resume, skip, promotion, lock, errors.

Everything real (ingest, training, evaluation, the MLflow SQLite store and registry) on
tiny settings: 24 synthetic 64x64 images, a UNet with channels [8, 16, 32], 1-2 epochs.
Scenarios that build on each other share a module-scoped fixture that performs the runs
and records what happened; the tests then check the records.
"""

from __future__ import annotations

import fcntl
import json
import math
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from tumorseg import pipeline, tracking
from tumorseg.cli import app
from tumorseg.pipeline import registry

TRAIN_TINY: dict[str, Any] = {
    "plan": "off",  # the tiny fixed settings below; planning has its own tests
    "epochs": 2,
    "batch_size": 4,
    "image_size": [64, 64],
    "device": "cpu",
    "amp": False,
    "val_overlays": 0,
    "early_stopping_patience": None,
    "model": {"channels": [8, 16, 32], "num_res_units": 1},
    "optim": {"lr": 0.01, "schedule": "none"},
}
WORSE = {"max_steps": 1, "epochs": 1, "optim": {"lr": 1e-6, "schedule": "none"}}
EVAL_TINY = {"split": "test", "device": "cpu", "bootstrap": 0, "workers": 0, "gallery_k": 1}


def write_pipeline(path: Path, *, work_dir: Path, data_dir: Path, model_name: str, tracking_uri: str | None = None,
                   train: dict[str, Any] | None = None, margin: float = 0.0, synth: bool = True,
                   **extra: Any) -> Path:
    """A tiny pipeline YAML: synth 24 x 64x64 (6 patients, seed 3 gives every split a tumour)."""
    doc: dict[str, Any] = {
        "name": path.stem,
        "work_dir": str(work_dir),
        "data": {"images_dir": str(data_dir / "images"), "masks_dir": str(data_dir / "masks"), "name": "tiny",
                 "group_pattern": r"(patient_\d+)", "seed": 3, "workers": 1},
        "train": train if train is not None else TRAIN_TINY,
        "evaluate": EVAL_TINY,
        "registry": {"model_name": model_name, "margin": margin},
        "tracking": {"experiment": "test-pipeline"},
        **extra,
    }
    if synth:
        doc["synth"] = {"n": 24, "size": 64, "seed": 0}
    if tracking_uri:
        doc["tracking"]["uri"] = tracking_uri
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["pipeline", "run", *args])


def state_of(work_dir: Path) -> dict[str, Any]:
    return json.loads((work_dir / "state.json").read_text())


def client(uri: str) -> Any:
    return tracking.client(uri)


def child_runs(cl: Any, parent: Any) -> list[Any]:
    return cl.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def alias(cl: Any, name: str, which: str) -> str:
    return str(cl.get_model_version_by_alias(name, which).version)


def versions(cl: Any, name: str) -> list[Any]:
    return sorted(cl.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


# ----------------------------------------------------------------------------- scenario A: a champion, then more runs


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> dict[str, Any]:
    """A full pipeline from scratch (synth included): the first model becomes champion."""
    root = tmp_path_factory.mktemp("pipe-a")
    work, data = root / "work", root / "data"
    yml = write_pipeline(root / "tiny.yaml", work_dir=work, data_dir=data, model_name="tiny-a",
                         tracking_uri=mlflow_uri)
    t0 = time.perf_counter()
    res = invoke(str(yml))
    return {"root": root, "work": work, "data": data, "yaml": yml, "res": res, "uri": mlflow_uri,
            "seconds": time.perf_counter() - t0}


@pytest.mark.slow
def test_full_pipeline(first_run: dict[str, Any]) -> None:
    res, work, uri = first_run["res"], first_run["work"], first_run["uri"]
    assert res.exit_code == 0, res.output
    assert "first champion" in res.output
    assert (first_run["data"] / "images").is_dir()  # synth wrote the data

    state = state_of(work)
    assert state["finished"] and state["outcome"] == "first_champion"
    assert [state["stages"][s]["status"] for s in pipeline.STAGES] == ["done"] * 4
    digest = state["stages"]["ingest"]["dataset_digest"]
    assert Path(state["stages"]["train"]["best_checkpoint"]).is_file()
    assert Path(state["stages"]["train"]["run_dir"]).is_relative_to(work / "runs")

    cl = client(uri)
    parent = cl.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["tumorseg.stage"] == "pipeline"
    for stage in pipeline.STAGES:
        assert tags[f"pipeline.{stage}.status"] == "done"
    assert tags["pipeline.outcome"] == "first_champion"
    assert tags["tumorseg.dataset_digest"] == digest
    assert tags[registry.TAG_DECISION] == "first_champion"
    assert tags["pipeline.model_version"] == "1"
    for key in ("ingest.cases", "train.best_val_dice", "evaluate.dice_mean", "promote.challenger_dice"):
        assert key in metrics, key
    assert metrics["ingest.cases"] == 24

    children = child_runs(cl, parent)
    assert sorted(r.data.tags["tumorseg.stage"] for r in children) == ["evaluate", "ingest", "promote", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    promote = next(r for r in children if r.data.tags["tumorseg.stage"] == "promote")
    # the challenger is scored once per cycle (the evaluate stage); a first champion has no rival to score
    assert child_runs(cl, promote) == []
    assert metrics["promote.challenger_dice"] == metrics["evaluate.dice_mean"]

    (v1,) = versions(cl, "tiny-a")
    assert v1.tags[registry.TAG_DIGEST] == digest
    assert v1.tags[registry.TAG_DECISION] == "first_champion"
    assert v1.tags[registry.TAG_CHAMPION_DICE] == "none"
    assert v1.tags[registry.TAG_TRAIN_RUN] == state["stages"]["train"]["mlflow_run_id"]
    assert v1.tags[registry.TAG_EVAL_RUN] == state["stages"]["evaluate"]["run_id"]
    assert alias(cl, "tiny-a", "champion") == "1"
    assert alias(cl, "tiny-a", "challenger") == "1"
    assert "pid" in (work / ".lock").read_text()  # the holder wrote who it was


@pytest.mark.slow
def test_mlflow_ui_shows_a_training_experiment_with_described_runs_and_models(first_run: dict[str, Any]) -> None:
    """What a reviewer sees in the UI: kind, run descriptions with their numbers, parent metrics, model notes."""
    assert first_run["res"].exit_code == 0, first_run["res"].output
    state, cl = state_of(first_run["work"]), client(first_run["uri"])
    parent = cl.get_run(state["parent_run_id"])
    exp = cl.get_experiment(parent.info.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"  # "Machine learning", not GenAI
    assert exp.tags[tracking.NOTE_TAG]

    digest = state["stages"]["ingest"]["dataset_digest"]
    ev, tr = state["stages"]["evaluate"], state["stages"]["train"]
    test_dice = f"{ev['dice_mean']:.4f}"
    note = {r.data.tags["tumorseg.stage"]: r.data.tags.get(tracking.NOTE_TAG, "") for r in child_runs(cl, parent)}
    note["pipeline"] = parent.data.tags.get(tracking.NOTE_TAG, "")
    assert sorted(note) == ["evaluate", "ingest", "pipeline", "promote", "train"]
    assert all(note.values()), note
    # each starts with its headline (the runs table shows the first ~50 characters)
    assert note["pipeline"].startswith(f"test Dice {test_dice} on {ev['n_cases']} cases; v1 promoted to champion")
    assert digest[:12] in note["pipeline"]
    assert note["ingest"].startswith("24 cases (") and digest[:12] in note["ingest"]
    assert note["train"].startswith(f"best val Dice {tr['best_val_dice']:.4f} at epoch")
    assert note["evaluate"].startswith(f"test mean Dice {test_dice} on {ev['n_cases']} cases")
    assert note["promote"].startswith(f"`tiny-a` v1 promoted to champion (the first): test Dice {test_dice}")

    # the headline metrics on the parent, under the names the evaluate and training runs use
    m = parent.data.metrics
    assert m["test_dice_mean"] == pytest.approx(ev["dice_mean"])
    assert {"test_dice_median", "test_iou_mean", "test_dice_global", "train.best_val_dice"} <= set(m)
    train_run = cl.get_run(tr["mlflow_run_id"])
    assert train_run.data.metrics["test_dice_mean"] == m["test_dice_mean"]
    # the runs table's Dataset column: the manifest is the parent's input too
    assert [d.dataset.name for d in parent.inputs.dataset_inputs] == ["tiny"]

    model = cl.get_registered_model("tiny-a")
    assert digest[:12] in model.description and f"**v1**, test Dice {test_dice} on" in model.description
    assert 'mlflow.pyfunc.load_model("models:/tiny-a@champion")' in model.description
    assert "tumorseg predict models:/tiny-a@champion" in model.description
    assert "`unet`" in model.description and "`test` split" in model.description
    p = train_run.data.params  # the plan line is the champion's training run's, as trained
    size = "x".join(map(str, json.loads(p["image_size"])))
    assert f"channels {p['model.channels']}, {size}, loss `{p['loss.name']}`, up to {p['epochs']} epochs" \
        in model.description and "per 2-D image" in model.description
    v1 = cl.get_model_version("tiny-a", "1")
    assert v1.description.startswith(f"v1 promoted to champion (the first): test Dice {test_dice} on")
    assert digest[:12] in v1.description and tr["mlflow_run_id"] in v1.description


@pytest.mark.slow
def test_champion_loads_as_pyfunc_and_predicts(first_run: dict[str, Any], tmp_path: Path) -> None:
    import mlflow
    import numpy as np

    assert first_run["res"].exit_code == 0, first_run["res"].output
    mlflow.set_tracking_uri(first_run["uri"])
    mlflow.set_registry_uri(first_run["uri"])
    model = mlflow.pyfunc.load_model("models:/tiny-a@champion")
    mask = model.predict(np.random.RandomState(0).rand(1, 64, 48).astype(np.float32))
    assert np.asarray(mask).shape == (64, 48)

    from tumorseg.cli import app as cli_app
    from tumorseg.imageio import load_image, load_mask

    image = sorted((first_run["data"] / "images").iterdir())[0]
    out = tmp_path / "pred"
    res = CliRunner().invoke(cli_app, ["predict", "models:/tiny-a@champion", str(image), str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [".tumorseg-predict", f"{image.stem}.png"]
    assert load_mask([out / f"{image.stem}.png"]).shape == load_image(image).shape[1:]


@pytest.mark.slow
def test_unchanged_data_skips_then_force_trains(first_run: dict[str, Any]) -> None:
    assert first_run["res"].exit_code == 0, first_run["res"].output
    yml, work, uri = first_run["yaml"], first_run["work"], first_run["uri"]
    cl = client(uri)
    n_versions = len(versions(cl, "tiny-a"))
    first_parent = state_of(work)["parent_run_id"]

    res = invoke(str(yml))
    assert res.exit_code == 0, res.output
    assert "nothing new" in res.output and "--force" in res.output
    state = state_of(work)
    assert state["outcome"] == "nothing_new" and state["parent_run_id"] != first_parent
    assert "train" not in state["stages"]
    assert len(versions(cl, "tiny-a")) == n_versions  # no new model version
    parent = cl.get_run(state["parent_run_id"])
    assert parent.data.tags["pipeline.outcome"] == "nothing_new"
    assert parent.data.tags["pipeline.train.status"] == "not_needed"
    assert parent.data.tags[tracking.NOTE_TAG].startswith("nothing new: the data (digest")
    assert [r.data.tags["tumorseg.stage"] for r in child_runs(cl, parent)] == ["ingest"]

    res = invoke(str(yml), "--force")
    assert res.exit_code in (0, 3), res.output
    state = state_of(work)
    assert state["stages"]["train"]["status"] == "done"
    assert len(versions(cl, "tiny-a")) == n_versions + 1
    new = versions(cl, "tiny-a")[-1]
    assert alias(cl, "tiny-a", "challenger") == str(new.version)
    # both were scored on the same split in the promote run: challenger and the champion
    assert new.tags[registry.TAG_CHAMPION_VERSION] != "none"
    assert new.tags[registry.TAG_DECISION] in ("promoted", "rejected")


@pytest.mark.slow
def test_worse_challenger_is_not_promoted(first_run: dict[str, Any], tmp_path: Path) -> None:
    assert first_run["res"].exit_code == 0, first_run["res"].output
    uri = first_run["uri"]
    cl = client(uri)
    champion_before = alias(cl, "tiny-a", "champion")
    yml = write_pipeline(tmp_path / "worse.yaml", work_dir=first_run["work"], data_dir=first_run["data"],
                         model_name="tiny-a", tracking_uri=uri, train={**TRAIN_TINY, **WORSE}, margin=0.05)
    res = invoke(str(yml), "--force")
    assert res.exit_code == 3, res.output
    assert "not promoted" in res.output
    new = versions(cl, "tiny-a")[-1]
    assert alias(cl, "tiny-a", "champion") == champion_before
    assert alias(cl, "tiny-a", "challenger") == str(new.version)
    tags = new.tags
    assert tags[registry.TAG_DECISION] == "rejected"
    assert tags[registry.TAG_CHAMPION_VERSION] == champion_before
    assert float(tags[registry.TAG_CHALLENGER_DICE]) < float(tags[registry.TAG_CHAMPION_DICE]) + 0.05
    assert "margin" in tags[registry.TAG_REASON]
    state = state_of(first_run["work"])
    parent = cl.get_run(state["parent_run_id"])
    assert parent.data.tags["pipeline.outcome"] == "not_promoted"
    assert parent.data.tags[registry.TAG_DECISION] == "rejected"
    assert parent.data.tags[registry.TAG_CHAMPION_DICE] == tags[registry.TAG_CHAMPION_DICE]
    assert parent.info.status == "FINISHED"
    note = parent.data.tags[tracking.NOTE_TAG]
    assert note.startswith("test Dice ")
    assert f"v{new.version} not promoted (v{champion_before} stays champion)" in note
    desc = cl.get_model_version("tiny-a", new.version).description
    champion_dice = float(tags[registry.TAG_CHAMPION_DICE])
    assert desc.startswith(f"v{new.version} not promoted")
    assert f"champion v{champion_before}: {champion_dice:.4f}" in desc
    # the registered model still describes the champion that kept the alias
    assert f"**v{champion_before}**" in cl.get_registered_model("tiny-a").description


# ----------------------------------------------------------------------------- scenario B: failures and resume


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> Iterator[dict[str, Any]]:
    """Train crashes after its checkpoints; evaluate fails; then a clean run finishes.

    Attempt 1: ``train.run`` trains for real, then raises -> exit 1, train resumable.
    Attempt 2: train resumes from last.pt (same MLflow run); evaluate raises -> exit 1.
    Attempt 3: nothing patched but ingest/train must not run again -> first champion.
    The champion is deliberately poor (one optimiser step), for the promotion test.
    """
    from tumorseg import evaluate, ingest, train

    root = tmp_path_factory.mktemp("pipe-b")
    work, data = root / "work", root / "data"
    yml = write_pipeline(root / "resume.yaml", work_dir=work, data_dir=data, model_name="tiny-b",
                         tracking_uri=mlflow_uri, train={**TRAIN_TINY, **WORSE})
    real_train, real_resume, real_eval = train.run, train.resume, evaluate.run
    rec: dict[str, Any] = {"root": root, "work": work, "data": data, "uri": mlflow_uri, "resume_calls": []}

    def train_then_crash(cfg: Any) -> Any:
        res = real_train(cfg)
        rec["train_run_1"] = res.mlflow_run_id
        raise RuntimeError("simulated crash after training")

    def resume_spy(run_dir: Path, tracking_uri: str | None = None) -> Any:
        rec["resume_calls"].append(Path(run_dir))
        return real_resume(run_dir, tracking_uri=tracking_uri)

    def failing_eval(cfg: Any) -> Any:
        raise RuntimeError("simulated evaluate failure")

    def must_not_run(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished stage ran again")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "run", train_then_crash)
        rec["res1"] = invoke(str(yml))
        rec["state1"] = state_of(work)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "run", must_not_run)
        mp.setattr(train, "resume", resume_spy)
        mp.setattr(evaluate, "run", failing_eval)
        rec["res2"] = invoke(str(yml))
        rec["state2"] = state_of(work)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "run", must_not_run)
        mp.setattr(train, "resume", must_not_run)
        mp.setattr(ingest, "run", must_not_run)
        rec["res3"] = invoke(str(yml))
        rec["state3"] = state_of(work)
    assert (train.run, evaluate.run) == (real_train, real_eval)
    yield rec


@pytest.mark.slow
def test_failed_stage_stops_and_rerun_resumes(resumed: dict[str, Any]) -> None:
    res1, res2, res3 = resumed["res1"], resumed["res2"], resumed["res3"]
    s1, s2, s3 = resumed["state1"], resumed["state2"], resumed["state3"]

    assert res1.exit_code == 1, res1.output
    assert "stage 'train'" in res1.output and "simulated crash" in res1.output
    assert s1["stages"]["ingest"]["status"] == "done" and s1["stages"]["train"]["status"] == "failed"
    assert not s1["finished"]

    assert res2.exit_code == 1, res2.output
    assert "stage 'evaluate'" in res2.output and "simulated evaluate failure" in res2.output
    assert len(resumed["resume_calls"]) == 1  # the interrupted training continued from its last.pt
    run_dir = resumed["resume_calls"][0]
    assert (run_dir / "last.pt").is_file() and run_dir.is_relative_to(resumed["work"] / "runs")
    assert s2["stages"]["train"]["status"] == "done" and s2["stages"]["train"]["resumed"] is True
    assert s2["stages"]["train"]["mlflow_run_id"] == resumed["train_run_1"]  # same MLflow run
    assert s2["stages"]["evaluate"]["status"] == "failed"

    assert res3.exit_code == 0, res3.output
    assert "first champion" in res3.output
    assert s3["finished"] and [s3["stages"][s]["status"] for s in pipeline.STAGES] == ["done"] * 4
    # one cycle, one parent run across the three attempts
    assert s1["parent_run_id"] == s2["parent_run_id"] == s3["parent_run_id"]
    assert s3["attempt"] == 3

    cl = client(resumed["uri"])
    parent = cl.get_run(s3["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pipeline.outcome"] == "first_champion"
    assert "pipeline.failed_stage" not in parent.data.tags and "pipeline.error" not in parent.data.tags
    assert parent.data.tags["pipeline.attempt"] == "3"
    assert parent.data.tags[tracking.NOTE_TAG].startswith("test Dice ")  # not "running", not "failed"
    stages = [r.data.tags["tumorseg.stage"] for r in child_runs(cl, parent)]
    # one ingest and one train run (resumed, not repeated); the failed evaluate made no run
    assert sorted(stages) == ["evaluate", "ingest", "promote", "train"]
    assert len(versions(cl, "tiny-b")) == 1


@pytest.mark.slow
def test_better_challenger_is_promoted(resumed: dict[str, Any], tmp_path: Path) -> None:
    assert resumed["res3"].exit_code == 0, resumed["res3"].output
    cl = client(resumed["uri"])
    assert alias(cl, "tiny-b", "champion") == "1"
    yml = write_pipeline(tmp_path / "better.yaml", work_dir=resumed["work"], data_dir=resumed["data"],
                         model_name="tiny-b", tracking_uri=resumed["uri"], train={**TRAIN_TINY, "epochs": 3})
    res = invoke(str(yml), "--force")
    assert res.exit_code == 0, res.output
    assert "new champion" in res.output and "replacing version 1" in res.output
    assert alias(cl, "tiny-b", "champion") == "2"
    assert alias(cl, "tiny-b", "challenger") == "2"
    tags = cl.get_model_version("tiny-b", "2").tags
    assert tags[registry.TAG_DECISION] == "promoted"
    assert float(tags[registry.TAG_CHALLENGER_DICE]) >= float(tags[registry.TAG_CHAMPION_DICE])
    assert tags[registry.TAG_CHAMPION_VERSION] == "1"


# ----------------------------------------------------------------------------- fast failures


def test_second_pipeline_on_the_same_work_dir_is_locked(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    yml = write_pipeline(tmp_path / "p.yaml", work_dir=work, data_dir=tmp_path / "data", model_name="locked")
    with open(work / pipeline.LOCK_FILE, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("pid 12345 on testhost since now\n")
        fh.flush()
        t0 = time.perf_counter()
        res = invoke(str(yml))
    assert res.exit_code == 4, res.output
    assert time.perf_counter() - t0 < 10
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "another pipeline is already running" in lines[0] and "pid 12345" in lines[0]
    assert not (work / "state.json").exists() and not (tmp_path / "data").exists()


def test_sigterm_becomes_keyboard_interrupt() -> None:
    import os
    import signal

    from tumorseg.pipeline.state import sigterm_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert signal.getsignal(signal.SIGTERM) == before


def test_lock_is_released_when_its_holder_dies(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    code = ("import fcntl, sys, time; fh = open(sys.argv[1], 'a+'); fcntl.flock(fh, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(work / pipeline.LOCK_FILE)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(pipeline.LockedError), pipeline.work_dir_lock(work):
            pass
        proc.kill()  # a crash: no cleanup code runs
        proc.wait(10)
        with pipeline.work_dir_lock(work):
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize(("section", "bad", "named"), [
    (None, {"trian": {"epochs": 1}}, "trian"),
    ("train", {"epoch": 2}, "train.epoch"),
    ("data", {"images_dirs": "x"}, "data.images_dirs"),
    ("registry", {"margn": 0.1}, "registry.margn"),
])
def test_unknown_key_is_one_line_exit_2(tmp_path: Path, section: str | None, bad: dict[str, Any],
                                        named: str) -> None:
    yml = write_pipeline(tmp_path / "p.yaml", work_dir=tmp_path / "work", data_dir=tmp_path / "data",
                         model_name="typo")
    doc = yaml.safe_load(yml.read_text())
    if section is None:
        doc.update(bad)
    else:
        doc[section].update(bad)
    yml.write_text(yaml.safe_dump(doc))
    res = invoke(str(yml))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert named in lines[0] and "unknown setting" in lines[0] and str(yml) in lines[0]
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(("section", "bad", "named"), [
    ("evaluate", {"split": "tset"}, "evaluate.split"),
    ("data", {"images_dir": "nowhere/images"}, "data.images_dir: nowhere/images not found"),
])
def test_a_bad_value_stops_the_pipeline_before_any_work(tmp_path: Path, section: str, bad: dict[str, Any],
                                                        named: str) -> None:
    yml = write_pipeline(tmp_path / "p.yaml", work_dir=tmp_path / "work", data_dir=tmp_path / "data",
                         model_name="badvalue")
    doc = yaml.safe_load(yml.read_text())
    doc.pop("synth", None)
    (tmp_path / "data" / "images").mkdir(parents=True, exist_ok=True)
    doc.setdefault(section, {}).update(bad)
    yml.write_text(yaml.safe_dump(doc))
    res = invoke(str(yml))
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], res.output
    assert not (tmp_path / "work").exists()


def test_reserved_key_is_rejected(tmp_path: Path) -> None:
    yml = write_pipeline(tmp_path / "p.yaml", work_dir=tmp_path / "work", data_dir=tmp_path / "data",
                         model_name="reserved", train={**TRAIN_TINY, "out": "elsewhere"})
    res = invoke(str(yml))
    assert res.exit_code == 2 and "train.out" in res.output and "set by the pipeline" in res.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_tracking_server_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yml = write_pipeline(tmp_path / "p.yaml", work_dir=tmp_path / "work", data_dir=tmp_path / "data",
                         model_name="unreachable")
    t0 = time.perf_counter()
    res = invoke(str(yml))
    assert time.perf_counter() - t0 < 10
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and uri in lines[0] and "cannot be reached" in lines[0]
    assert not (tmp_path / "work").exists() and not (tmp_path / "data").exists()

    other = f"http://127.0.0.1:{_closed_port()}"  # --tracking-uri wins over the environment
    res = invoke(str(yml), "--tracking-uri", other)
    assert res.exit_code == 2 and other in res.output


# ----------------------------------------------------------------------------- promotion rule


@pytest.mark.parametrize(("challenger", "champion", "margin", "outcome"), [
    (0.8, None, 0.0, "first_champion"),
    (0.8, 0.7, 0.05, "promoted"),
    (0.8, 0.7, 0.1, "promoted"),  # exactly the margin counts, float rounding notwithstanding
    (0.8, 0.78, 0.05, "rejected"),
    (0.7, 0.7, 0.0, "promoted"),  # a tie with margin 0 promotes the newer model
    (0.6, 0.7, 0.0, "rejected"),
    (math.nan, 0.7, 0.0, "rejected"),
    (math.nan, None, 0.0, "rejected"),
    (0.5, math.nan, 0.0, "promoted"),
    (0.0, None, 0.0, "rejected"),  # a model that found no tumour (a budget spent before training) is no champion
    (0.0, math.nan, 0.0, "rejected"),
])
def test_decide(challenger: float, champion: float | None, margin: float, outcome: str) -> None:
    d = registry.decide(challenger, champion, margin)
    assert d.outcome == outcome
    assert d.promote == (outcome != "rejected")
    tags = d.tags()
    assert tags[registry.TAG_DECISION] == outcome and tags[registry.TAG_REASON] == d.reason


def test_shipped_pipeline_files_validate() -> None:
    root = Path(__file__).resolve().parent.parent / "pipelines"
    demo = pipeline.load(root / "demo.yaml")
    assert demo.synth is not None and demo.synth_dir() == Path("data/synth")
    assert demo.work_dir == Path("pipeline_runs/demo")
    retrain = pipeline.load(root / "retrain.yaml")
    assert retrain.registry.margin > 0
    for name in ("README.md", "tumorseg-retrain.cron", "tumorseg-retrain.service", "tumorseg-retrain.timer"):
        assert (root / name).is_file(), name
    readme = (root / "README.md").read_text()
    for code in pipeline.EXIT_CODES:
        assert f"| {code} " in readme


def test_the_model_note_states_the_champions_plan_as_trained(mlflow_uri: str) -> None:
    """A planned run trains with other settings than the pipeline's file: the note reads the champion's run."""
    from types import SimpleNamespace

    import mlflow

    from tumorseg.pipeline import registry
    from tumorseg.pipeline.promote import champion_plan

    mlflow.set_tracking_uri(mlflow_uri)
    with mlflow.start_run() as run:
        mlflow.log_params({"model.name": "unet", "model.channels": "[32, 64, 128, 256, 320]", "epochs": 289,
                           "image_size": "[80, 48, 32]", "loss.name": "dice_ce", "batch_size": 2,
                           "normalize": "image"})
    cl = client(mlflow_uri)
    champ = SimpleNamespace(tags={registry.TAG_TRAIN_RUN: run.info.run_id}, run_id=None)
    plan, dims = champion_plan(cl, champ)
    assert dims == 3 and plan.startswith("`unet` channels [32, 64, 128, 256, 320], 80x48x32, loss `dice_ce`, up to "
                                         "289 epochs, batch 2, normalisation `image`")
    gone = SimpleNamespace(tags={registry.TAG_TRAIN_RUN: "0" * 32}, run_id=None)  # a deleted run: stays general
    assert champion_plan(cl, gone) == champion_plan(cl, None)
