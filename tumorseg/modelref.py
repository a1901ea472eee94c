"""Turn what a user calls "the model" into a loaded :class:`~tumorseg.inference.Segmenter`.

``evaluate``, ``predict`` and the pipeline accept the same references:

* a run folder written by ``tumorseg train`` (its ``best.pt``);
* a checkpoint file (``best.pt``, ``last.pt`` or a pyfunc model's ``artifacts/model.pt``);
* a downloaded MLflow model folder (holding ``artifacts/model.pt``);
* an MLflow run id (32 hex digits, read as ``runs:/<id>/model``);
* an MLflow model URI: ``runs:/<id>/model``, ``models:/NAME/3``, ``models:/NAME@champion``,
  ``models:/m-<model id>`` (or any URI ``mlflow.artifacts.download_artifacts`` resolves).

Remote models are downloaded to a temporary folder that is removed once the network is
loaded; :class:`ModelRef` records where the weights came from and their SHA-256.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.config import TrackingConfig
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import sha256_file

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from tumorseg.inference import Segmenter

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
MODEL_ARTIFACT = "model"
CHECKPOINT_IN_MODEL = "artifacts/model.pt"
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


@dataclass
class ModelRef:
    """Where a loaded model came from.

    Attributes:
        ref: the reference as the user gave it.
        checkpoint_path: the local checkpoint file, or for a remote model the artifact URI of its
            ``model.pt`` (the downloaded copy is deleted after loading).
        checkpoint_sha256: SHA-256 of the checkpoint file's bytes.
        train_run_id: MLflow run id of the training run ("" when unknown).
        manifest_digest: digest of the manifest the model was trained on ("" when unknown).
        kind: ``run_dir``, ``checkpoint``, ``model_dir``, ``run`` (``runs:/``), ``logged_model``
            (``models:/m-<id>``) or ``registry`` (``models:/NAME/V``, ``models:/NAME@alias``).
        model_uri: the MLflow URI resolved (``runs:/...``, ``models:/...``), else "".
        registered_name: registered model name for ``models:/NAME...`` refs, else "".
        registered_version: registered model version for ``models:/NAME...`` refs, else "".
    """

    ref: str
    checkpoint_path: str
    checkpoint_sha256: str
    train_run_id: str = ""
    manifest_digest: str = ""
    kind: str = "checkpoint"
    model_uri: str = ""
    registered_name: str = ""
    registered_version: str = ""

    def to_dict(self) -> dict[str, str]:
        """All fields as strings (for JSON, params and tags)."""
        return {k: str(v) for k, v in asdict(self).items()}

    @property
    def short_name(self) -> str:
        """A short, file-name-safe label, e.g. ``unet-3`` or ``tumour@champion``."""
        if self.kind == "run_dir":
            label = Path(self.ref).resolve().name
        elif self.kind == "checkpoint":
            p = Path(self.ref).resolve()
            label = f"{p.parent.name}-{p.stem}" if p.parent.name else p.stem
        elif self.kind == "model_dir":
            label = Path(self.ref).resolve().name
        elif self.registered_name:
            label = f"{self.registered_name}-v{self.registered_version}" if self.registered_version \
                else self.registered_name
        elif self.train_run_id:
            label = f"run-{self.train_run_id[:8]}"
        else:
            label = self.ref
        return re.sub(r"[^A-Za-z0-9._@-]+", "_", label).strip("_.") or "model"


def resolve_model(ref: str, tracking: TrackingConfig, device: str) -> tuple[Segmenter, ModelRef]:
    """Load the model that ``ref`` names onto ``device``.

    Args:
        ref: run folder, checkpoint file, MLflow model folder, run id or MLflow model URI.
        tracking: where MLflow refs are looked up (only used for run ids and URIs).
        device: ``auto``, ``cuda`` or ``cpu``.

    Returns:
        The segmenter and a :class:`ModelRef` describing it.

    Raises:
        TumorsegError: missing path, corrupt or foreign checkpoint, unknown run or model.
    """
    ref = str(ref).strip()
    if not ref:
        raise TumorsegError("model reference is empty; give a run folder, checkpoint, run id or "
                            "models:/NAME@alias")
    path = Path(ref).expanduser()
    if path.exists():
        kind, ckpt = _local_checkpoint(path)
        seg = load_segmenter(ckpt, device)
        return seg, _describe(seg, ref, str(ckpt.resolve()), sha256_file(ckpt), kind)
    if RUN_ID.match(ref):
        uri = f"runs:/{ref}/{MODEL_ARTIFACT}"
    elif _URI.match(ref) and not re.match(r"^[a-zA-Z]:[\\/]", ref):  # not a Windows drive letter
        uri = ref
    else:
        raise TumorsegError(f"{ref}: model not found; give a run folder (runs/NAME), a checkpoint (.pt), "
                            "an MLflow run id or a URI such as models:/NAME@champion")
    return _resolve_uri(ref, uri, tracking, device)


def _local_checkpoint(path: Path) -> tuple[str, Path]:
    """Find the checkpoint file of a run folder or model folder (or take the file itself)."""
    if path.is_file():
        return "checkpoint", path
    best = path / "best.pt"
    if best.is_file():
        return "run_dir", best
    found = find_model_checkpoint(path)
    if found is not None:
        return "model_dir", found
    hint = " (training has not finished an epoch yet? last.pt holds the latest weights)" \
        if (path / "last.pt").is_file() else ""
    raise TumorsegError(f"{path}: no best.pt in this folder{hint}; give a run folder written by "
                        "tumorseg train or a checkpoint file")


def find_model_checkpoint(folder: Path) -> Path | None:
    """Find the ``artifacts/model.pt`` of an MLflow model folder (searched recursively)."""
    hits = sorted(folder.glob(f"**/{CHECKPOINT_IN_MODEL}"))
    if not hits:
        hits = sorted(folder.glob("**/model.pt"))
    return hits[0] if hits else None


def load_segmenter(ckpt: Path, device: str) -> Segmenter:
    """Load a checkpoint file onto ``device`` (foreign or damaged files are one-line errors)."""
    from tumorseg.inference import Segmenter

    return Segmenter.from_checkpoint(ckpt, device=device)


def _describe(seg: Segmenter, ref: str, ckpt: str, sha: str, kind: str, model_uri: str = "",
              registry_run_id: str = "", name: str = "", version: str = "") -> ModelRef:
    meta = getattr(seg, "checkpoint_meta", {}) or {}
    return ModelRef(
        ref=ref,
        checkpoint_path=ckpt,
        checkpoint_sha256=sha,
        train_run_id=str(meta.get("mlflow_run_id") or registry_run_id or ""),
        manifest_digest=str(meta.get("manifest_digest") or ""),
        kind=kind,
        model_uri=model_uri,
        registered_name=name,
        registered_version=version,
    )


def _resolve_uri(ref: str, uri: str, tracking: TrackingConfig, device: str) -> tuple[Segmenter, ModelRef]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from tumorseg import tracking as trk

    cl = trk.client(trk.configure(tracking))
    name = version = ""
    source_run = ""
    try:
        if uri.startswith("runs:/"):
            source_run = uri.removeprefix("runs:/").split("/", 1)[0]
            cl.get_run(source_run)  # a clear error for an unknown run id
        elif uri.startswith("models:/"):
            name, version, source_run = _registry_info(cl, uri)
    except MlflowException as exc:
        raise TumorsegError(f"{ref}: {_mlflow_message(exc)} (tracking URI {mlflow.get_tracking_uri()}); "
                            "check the run id / model name or --tracking-uri") from exc
    tmp = Path(tempfile.mkdtemp(prefix="tumorseg-model-"))
    try:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except (MlflowException, OSError) as exc:
            raise TumorsegError(f"{ref}: cannot download the model ({_mlflow_message(exc)}); the run "
                                f"must have logged an MLflow model named '{MODEL_ARTIFACT}'") from exc
        ckpt = local if local.is_file() else find_model_checkpoint(local)
        if ckpt is None:
            raise TumorsegError(f"{ref}: the MLflow model holds no {CHECKPOINT_IN_MODEL}; "
                                "it was not logged by tumorseg train")
        sha = sha256_file(ckpt)
        seg = load_segmenter(ckpt, device)
        inner = ckpt.relative_to(local).as_posix() if local.is_dir() else ""
        # an alias moves; the version it pointed at when this model was loaded does not
        base = f"models:/{name}/{version}" if name and version else uri.rstrip("/")
        where = f"{base}/{inner}" if inner else base
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kind = "registry" if name else "logged_model" if uri.startswith("models:/") else "run"
    mref = _describe(seg, ref, where, sha, kind, uri, source_run, name, version)
    log.info("model %s -> %s (sha256 %s, training run %s)", ref, where, sha[:12], mref.train_run_id or "?")
    return seg, mref


def _registry_info(client: MlflowClient, uri: str) -> tuple[str, str, str]:
    """``(name, version, run_id)`` for ``models:/NAME/V`` and ``models:/NAME@alias``.

    ``models:/m-<id>`` (a logged model) gives ``("", "", source run id)``.
    """
    body = uri.removeprefix("models:/").strip("/")
    if body.startswith("m-") and "/" not in body and "@" not in body:
        logged: Any = client.get_logged_model(body)
        return "", "", str(getattr(logged, "source_run_id", "") or "")
    if "@" in body:
        name, alias = body.split("@", 1)
        mv: Any = client.get_model_version_by_alias(name, alias)
    else:
        name, _, ver = body.partition("/")
        if not ver:
            raise TumorsegError(f"{uri}: give a version or alias, e.g. models:/{name}/1 or "
                                f"models:/{name}@champion")
        if not ver.isdigit():
            # MLflow deprecated stages (models:/NAME/Production) in favour of aliases.
            raise TumorsegError(f"{uri}: model stages are deprecated in MLflow; use a version or an alias, "
                                f"e.g. models:/{name}/1 or models:/{name}@champion")
        mv = client.get_model_version(name, ver)
    return str(mv.name), str(mv.version), str(mv.run_id or "")


def _mlflow_message(exc: Exception) -> str:
    msg = getattr(exc, "message", None) or str(exc) or exc.__class__.__name__
    return " ".join(str(msg).split())[:200]
