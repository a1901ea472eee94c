"""Experiment tracking behind a narrow interface; MLflow is the real tracker.

Every run of every stage goes through :func:`start_run`. The tracking URI is always set
explicitly: ``--tracking-uri`` / config, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<cwd>/mlflow.db`` (MLflow >= 3.13 refuses a ``./mlruns`` file store).
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.config import TrackingConfig
from tumorseg.errors import TumorsegError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000

NOTE_TAG = "mlflow.note.content"
"""The run's (and experiment's) description in the MLflow UI: markdown."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""What MLflow's UI calls a "Machine learning" / model-training experiment (not GenAI)."""
EXPERIMENT_NOTE = (
    "Tumour segmentation runs of tumorseg. A pipeline run (`pipeline-NAME`) holds its "
    "`ingest`, `train`, `evaluate` and `promote` runs as children (expand it in the runs table); every "
    "run's description says what ran on which data and its headline result."
)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else local SQLite."""
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")
"""Tracking URIs of a server; ``sqlite`` and the other SQLAlchemy databases (``postgresql``, ``mysql``, ``mssql``)
are stores too. A path or ``file:`` URI is the file store MLflow 3.13+ refuses."""
SQLITE_HEADER = b"SQLite format 3\x00"


@functools.lru_cache(maxsize=16)
def check_uri(uri: str) -> None:
    """Fail fast, in one line naming the URI, on a tracking URI no stage could log to (before any work is done).

    A path or ``file:`` URI (the ``./mlruns`` file store, which MLflow 3.13+ refuses), an ``sqlite:///`` path that is
    a folder or a file other than an SQLite database, or an HTTP server that does not answer. A URI that passed is
    not checked again in the process (the CLI checks it before a stage starts, the stage when it logs).
    """
    scheme = uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else uri.lower()
    use = "use sqlite:///ABSOLUTE/PATH/mlflow.db (a local database) or http://HOST:PORT (a tracking server)"
    if scheme == "file" or ("://" not in uri and scheme not in SERVER_SCHEMES):
        raise TumorsegError(f"tracking URI {uri}: a file store (./mlruns), which MLflow 3.13+ refuses; {use} with "
                            "--tracking-uri or MLFLOW_TRACKING_URI")
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        if path.is_dir():
            raise TumorsegError(f"tracking URI {uri}: {path} is a folder, not a database file; {use}")
        if path.is_file() and path.stat().st_size:
            with path.open("rb") as fh:
                if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    raise TumorsegError(f"tracking URI {uri}: {path} is not an SQLite database; name a new file "
                                        "(e.g. mlflow.db beside it) or an existing MLflow database")
        parent = next((p for p in path.absolute().parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise TumorsegError(f"tracking URI {uri}: {parent} is a file, so the database cannot be made there; {use}")
    check_reachable(uri)


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - user-chosen server
            if resp.status >= 500:
                raise TumorsegError(f"MLflow tracking server {uri} answered HTTP {resp.status}; check the server")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TumorsegError(f"MLflow tracking server {uri} answered HTTP {exc.code}; check the server") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TumorsegError(
            f"MLflow tracking server {uri} cannot be reached ({reason}); start it or fix the URI "
            "(--tracking-uri, else MLFLOW_TRACKING_URI)"
        ) from exc


def configure(tracking: TrackingConfig) -> str:
    """Point MLflow at the resolved URI (checked first) and return the URI."""
    import mlflow

    for name in ("mlflow", "alembic"):
        if logging.getLogger(name).level < logging.WARNING:
            logging.getLogger(name).setLevel(logging.WARNING)
    uri = resolve_tracking_uri(tracking.uri)
    check_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def client(uri: str) -> MlflowClient:
    """The one way tumorseg talks to MLflow outside a run: a client whose tracking and registry are ``uri``."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def run_exists(uri: str, run_id: str | None) -> bool:
    """Whether ``run_id`` is a run of the store at ``uri``."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        client(uri).get_run(run_id)
    except MlflowException:
        return False
    return True


def log_to_run(
    uri: str, run_id: str, metrics: Mapping[str, float | None] | None = None, tags: Mapping[str, Any] | None = None,
) -> bool:
    """Log finite metrics and tags to a run by id (not the active run); ``False`` when it is not in the store."""
    import math
    import time

    from mlflow.entities import Metric, RunTag

    if not run_exists(uri, run_id):
        return False
    ts = int(time.time() * 1000)
    items = [Metric(k, float(v), ts, 0) for k, v in (metrics or {}).items()
             if isinstance(v, int | float) and math.isfinite(float(v))]
    tag_items = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items() if v is not None]
    if items or tag_items:
        client(uri).log_batch(run_id, metrics=items, tags=tag_items)
    return True


def ui_link(uri: str, experiment_id: str) -> str:
    """Where the experiment's runs are in the MLflow UI, in its model-training view.

    MLflow 3.17's UI picks the GenAI or the model-training view per browser (the toggle at the
    top left, default GenAI) and not from the experiment's kind tag; ``workflowType`` in the
    link opens the model-training view, with the runs table, whatever the browser last chose.
    """
    path = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return f"http://127.0.0.1:5000/{path} (after: mlflow ui --backend-store-uri {uri})"


def describe_run(uri: str, run_id: str, text: str) -> None:
    """Set the description (MLflow's run note, markdown) of a run by id."""
    client(uri).set_tag(run_id, NOTE_TAG, text)


def log_manifest_input(uri: str, run_id: str, manifest_dir: Path, context: str) -> None:
    """Log a manifest as an MLflow dataset input (name, digest, source) of a run by id."""
    import warnings

    import pandas as pd
    from mlflow.data.pandas_dataset import from_pandas
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from tumorseg.manifest import read_manifest_info

    info = read_manifest_info(manifest_dir)
    df = pd.read_csv(manifest_dir / "manifest.csv", dtype=str, keep_default_na=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways"
        dataset = from_pandas(df, source=str((manifest_dir / "manifest.csv").resolve()), name=info.name,
                              digest=info.dataset_digest[:36])
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])
    client(uri).log_inputs(run_id, datasets=[entity])


def delete_tags(uri: str, run_id: str, keys: list[str]) -> None:
    """Delete tags from a run; absent tags are fine."""
    from mlflow.exceptions import MlflowException

    cl = client(uri)
    for key in keys:
        try:
            cl.delete_tag(run_id, key)
        except MlflowException:
            log.debug("tag %s not on run %s", key, run_id)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class Run:
    """One tracked run: what a stage logs goes through these few methods.

    Stages do not call MLflow's logging API themselves; the module's functions
    (:func:`client`, :func:`log_to_run`, :func:`delete_tags`, :func:`run_exists`) cover the
    few places that address a run by id or the model registry.
    """

    def __init__(self, run_id: str, uri: str, experiment_id: str = "") -> None:
        self.run_id = run_id
        self.tracking_uri = uri
        self.experiment_id = experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened) params; long values are truncated to MLflow's limit."""
        import mlflow

        flat = {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log finite metrics in one batch (NaN values are skipped)."""
        import math

        import mlflow

        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags."""
        import mlflow

        mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Upload a file or folder."""
        import mlflow

        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path)

    def log_manifest_input(self, manifest_dir: Path, context: str) -> None:
        """Log a manifest as an MLflow dataset input carrying its digest."""
        log_manifest_input(self.tracking_uri, self.run_id, manifest_dir, context)

    def set_description(self, text: str) -> None:
        """Set the run's description (the note the MLflow UI shows on the run page): short markdown."""
        describe_run(self.tracking_uri, self.run_id, text)


class NullRun(Run):
    """A run that logs nothing (DDP ranks other than 0)."""

    def __init__(self) -> None:
        super().__init__("", "")

    def log_params(self, params: Mapping[str, Any]) -> None:  # noqa: D102
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:  # noqa: D102
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:  # noqa: D102
        pass

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:  # noqa: D102
        pass

    def log_manifest_input(self, manifest_dir: Path, context: str) -> None:  # noqa: D102
        pass

    def set_description(self, text: str) -> None:  # noqa: D102
        pass


def version_tags() -> dict[str, str]:
    """Versions of tumorseg and its stack, for run tags."""
    from importlib.metadata import PackageNotFoundError, version

    import tumorseg

    tags = {"tumorseg.version": tumorseg.__version__}
    for pkg in ("torch", "monai", "mlflow"):
        try:
            tags[f"{pkg}.version"] = version(pkg)
        except PackageNotFoundError:  # pragma: no cover
            pass
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def git_commit() -> str | None:
    """The git commit of the tumorseg source tree, when it is a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _ensure_experiment(name: str, uri: str) -> None:
    """Create the experiment as a model-training one; with SQLite its artifacts go beside the database.

    MLflow's default puts artifacts in ``./mlruns`` of whatever folder first created the
    experiment, so runs started from different folders would scatter them; ``mlartifacts/``
    beside the database keeps them together. The kind tag says it is a model-training ("Machine
    learning") experiment, not a GenAI app, to a UI that picks its view per experiment (MLflow
    3.17's UI as shipped picks it per browser: see :func:`ui_link`). An existing experiment
    without a kind gets it too; one someone set a kind on keeps theirs.
    """
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
            client(uri).set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    try:
        mlflow.create_experiment(name, artifact_location=location,
                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, NOTE_TAG: EXPERIMENT_NOTE})
    except mlflow.exceptions.MlflowException:  # created concurrently by another process
        if mlflow.get_experiment_by_name(name) is None:
            raise


@contextmanager
def start_run(
    tracking: TrackingConfig,
    stage: str,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, Any] | None = None,
    system_metrics: bool = False,
) -> Iterator[Run]:
    """Start (or, with ``run_id``, resume) a run of ``stage``.

    Nested under the active run when there is one (the pipeline's parent run). On an
    exception the run is marked FAILED and the exception propagates.
    """
    import mlflow

    uri = configure(tracking)
    if run_id is None:
        _ensure_experiment(tracking.experiment, uri)
        mlflow.set_experiment(tracking.experiment)
        experiment_id = None
    else:
        experiment_id = mlflow.get_run(run_id).info.experiment_id
    nested = mlflow.active_run() is not None
    all_tags = {k: v for k, v in {"tumorseg.stage": stage, **version_tags(), **dict(tags or {})}.items()
                if v is not None}
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=experiment_id,
        run_name=run_name,
        nested=nested,
        tags={k: str(v) for k, v in all_tags.items()},
        log_system_metrics=system_metrics or None,
    ) as active:
        log.info("MLflow run %s (%s) at %s", active.info.run_id, stage, uri)
        yield Run(active.info.run_id, uri, active.info.experiment_id)
