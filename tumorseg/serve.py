"""``tumorseg serve MODEL``: MLflow's scoring server for a logged tumorseg model.

``mlflow models serve --env-manager local`` starts a bare ``uvicorn`` found on ``PATH``, so it
fails from a virtual environment that is not activated. :func:`run` starts the same server with
the interpreter tumorseg runs under (``python -m mlflow models serve``, that interpreter's scripts
folder first on ``PATH``), after checking that the model exists and the port is free, and then
*becomes* that server (``exec``), so Ctrl-C and SIGTERM stop it like any foreground server.

The endpoints are MLflow's: ``GET /ping`` (ready), ``POST /invocations`` with
``{"inputs": <array>}`` (shape rules in :mod:`tumorseg.mlflow_model`) and optionally
``"params": {"probabilities": true}``; the answer is ``{"predictions": <array>}``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from tumorseg.config import TrackingConfig
from tumorseg.errors import TumorsegError
from tumorseg.modelref import MODEL_ARTIFACT, RUN_ID

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5001
"""5000 is the MLflow UI's default port; the scoring server takes the next one."""
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


@dataclass(frozen=True)
class ServeCommand:
    """The scoring-server process :func:`run` starts.

    Attributes:
        argv: the command (``sys.executable -m mlflow models serve ...``).
        env: its environment (``PATH`` with this interpreter's scripts first, the tracking URI).
        model_uri: the model MLflow serves.
        url: where the server will answer.
    """

    argv: list[str]
    env: dict[str, str]
    model_uri: str
    url: str


def model_uri(ref: str) -> str:
    """The MLflow model URI for ``ref``: a URI as given, ``runs:/<id>/model`` for a run id, or a model folder.

    Raises:
        TumorsegError: ``ref`` is empty, a checkpoint or run folder (not an MLflow model), or unknown.
    """
    ref = str(ref).strip()
    path = Path(ref).expanduser()
    if ref and path.exists():
        if path.is_dir() and (path / "MLmodel").is_file():
            return str(path.resolve())
        raise TumorsegError(f"{ref}: not an MLflow model folder (no MLmodel file); serve the model training "
                            f"logged: tumorseg serve <training run id> or models:/NAME@champion")
    if RUN_ID.match(ref):
        return f"runs:/{ref}/{MODEL_ARTIFACT}"
    body = ref.removeprefix("models:/").strip("/")
    if ref.startswith("models:/") and body and not body.startswith("m-") and "/" not in body and "@" not in body:
        raise TumorsegError(f"{ref}: give a version or alias, e.g. models:/{body}/1 or models:/{body}@champion")
    if _URI.match(ref):
        return ref
    raise TumorsegError(f"{ref or '(empty)'}: model not found; give models:/NAME@alias, models:/NAME/VERSION, "
                        "runs:/<run id>/model, an MLflow run id or a downloaded MLflow model folder")


def _check_model(uri: str) -> None:
    """Fail now, in one line, when the model is missing or not a pyfunc model (not after the server starts)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.models.get_model_info(uri)
    except (MlflowException, OSError) as exc:
        msg = " ".join(str(getattr(exc, "message", None) or exc).split())[:200]
        raise TumorsegError(f"{uri}: {msg} (tracking URI {mlflow.get_tracking_uri()}); check the model "
                            "name, alias or run id, or --tracking-uri") from exc
    if "python_function" not in info.flavors:
        raise TumorsegError(f"{uri}: not a python_function model; serve a model logged by tumorseg train")


def _check_port(host: str, port: int) -> None:
    """Fail in one line when ``host:port`` cannot be listened on (in use, or not this machine's address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise TumorsegError(f"--host {host}: not a known address ({exc.strerror})") from exc
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind(addr)
        except OSError as exc:
            raise TumorsegError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port "
                                "or stop the process using it") from exc


def prepare(model: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
            tracking: TrackingConfig | None = None) -> ServeCommand:
    """Check the model and the port, and build the scoring-server command.

    Args:
        model: ``models:/NAME@alias``, ``models:/NAME/V``, ``runs:/<id>/model``, a run id or a model folder.
        host: interface to listen on (``0.0.0.0`` for every interface).
        port: port to listen on.
        tracking: where ``models:/`` and ``runs:/`` URIs are looked up.

    Raises:
        TumorsegError: unknown model, unreachable tracking server, busy port, no ``uvicorn`` installed.
    """
    from tumorseg import tracking as trk

    uri = model_uri(model)
    tracking_uri = trk.configure(tracking or TrackingConfig())
    _check_model(uri)
    _check_port(host, port)
    scripts = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(dict.fromkeys([*scripts, *env.get("PATH", "").split(os.pathsep)]))
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking_uri
    if shutil.which("uvicorn", path=env["PATH"]) is None:
        raise TumorsegError(f"uvicorn is not installed for {sys.executable}; install it with "
                            f"{sys.executable} -m pip install uvicorn")
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local",
            "--host", host, "--port", str(port)]
    shown = f"[{host}]" if ":" in host else host
    return ServeCommand(argv=argv, env=env, model_uri=uri, url=f"http://{shown}:{port}")


def run(model: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
        tracking: TrackingConfig | None = None) -> NoReturn:
    """Serve ``model`` until stopped: this process becomes MLflow's scoring server (see :func:`prepare`)."""
    cmd = prepare(model, host, port, tracking)
    log.info("serving %s at %s (POST /invocations, GET /ping); Ctrl-C stops it", cmd.model_uri, cmd.url)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        os.execve(cmd.argv[0], cmd.argv, cmd.env)
    except OSError as exc:
        raise TumorsegError(f"cannot start the scoring server with {cmd.argv[0]} ({exc.strerror})") from exc
