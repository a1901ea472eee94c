"""``tumorseg pipeline run FILE``: ingest -> train -> evaluate -> register/promote, resumable.

The pipeline only wires the stages' ``run`` functions together; it computes nothing itself.
One MLflow parent run holds the stages' runs as children and records each stage's status
and headline figures. A work folder holds everything the pipeline needs to resume:

``WORK_DIR/state.json``
    the current cycle: parent run id, and per stage its status, a key of its inputs and its
    outputs. Written atomically after every step. A stage is skipped on the next run when it
    is done and its key (config + upstream outputs) is unchanged.
``WORK_DIR/.lock``
    ``fcntl.flock``-ed while a pipeline runs; the OS drops the lock when the process dies.
``WORK_DIR/manifests/NAME/``, ``WORK_DIR/runs/CYCLE-KEY/RUN/``, ``WORK_DIR/eval/CYCLE/...``
    the manifest, the training run folder and the evaluation outputs.

Relative paths in the pipeline YAML (``work_dir``, ``data.images_dir``, ``train_config``...)
resolve against the current working directory, like every other tumorseg path.

Exit codes (:data:`EXIT_CODES`): 0 promoted, first champion, or nothing new; 1 a stage
failed; 2 configuration error (or unreachable tracking server); 3 completed but the
challenger was not promoted; 4 another pipeline holds the work folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from tumorseg import registry
from tumorseg.config import (
    EvaluateConfig,
    IngestConfig,
    StrictModel,
    TrackingConfig,
    TrainConfig,
    build_config,
    deep_merge,
    read_yaml,
)
from tumorseg.errors import LockedError, TumorsegError
from tumorseg.fsutil import atomic_write_json

log = logging.getLogger(__name__)

STAGES = ("ingest", "train", "evaluate", "promote")
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
STATE_FORMAT = 1

EXIT_OK = 0
EXIT_STAGE_FAILED = 1
EXIT_CONFIG = 2
EXIT_NOT_PROMOTED = 3
EXIT_LOCKED = 4
EXIT_CODES = {
    EXIT_OK: "promoted, first champion, or nothing new",
    EXIT_STAGE_FAILED: "a stage failed (run the same command again to resume)",
    EXIT_CONFIG: "configuration error, or the tracking server cannot be reached",
    EXIT_NOT_PROMOTED: "completed, but the challenger was not promoted",
    EXIT_LOCKED: "another pipeline is running in the same work folder",
}

# Keys of the stage sections that the pipeline sets itself.
_RESERVED = {
    "data": {"tracking": "set tracking at the top level of the pipeline file"},
    "train": {
        "manifest": "the pipeline trains on the manifest it ingests",
        "out": "training runs go to WORK_DIR/runs",
        "tracking": "set tracking at the top level of the pipeline file",
    },
    "evaluate": {
        "model": "the pipeline evaluates the model it trains",
        "manifest": "the pipeline evaluates on the manifest it ingests",
        "out": "evaluation outputs go to WORK_DIR/eval",
        "tracking": "set tracking at the top level of the pipeline file",
    },
}


# ----------------------------------------------------------------------------- config


class SynthSpec(StrictModel):
    """Generate the built-in synthetic dataset before ingest, when its folder is missing or empty."""

    n: int = Field(160, ge=1)
    size: int = Field(128, ge=16)
    seed: int = 0
    out_dir: Path | None = Field(None, description="default: the parent of data.images_dir")


class RegistrySpec(StrictModel):
    """The registered model each trained model becomes a version of."""

    model_name: str
    margin: float = Field(0.0, ge=0.0, le=1.0, description="Dice the challenger must gain to be promoted")

    @field_validator("model_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v):
            raise ValueError("use letters, digits, '_', '.' and '-' (e.g. tumorseg-unet)")
        return v


class PipelineConfig(StrictModel):
    """A pipeline YAML (``pipelines/*.yaml``).

    ``data`` takes the options of ``tumorseg ingest`` (:class:`~tumorseg.config.IngestConfig`;
    ``out_dir`` defaults to ``WORK_DIR/manifests``), ``train`` the settings of a training
    config (:class:`~tumorseg.config.TrainConfig`), applied over ``train_config`` when given,
    and ``evaluate`` the options of ``tumorseg evaluate``. All relative paths resolve against
    the current working directory.
    """

    name: str | None = Field(None, description="label of the pipeline's runs; default: the YAML file's stem")
    work_dir: Path
    synth: SynthSpec | None = None
    data: dict[str, Any]
    train_config: Path | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    registry: RegistrySpec
    tracking: TrackingConfig = TrackingConfig()

    # -- the stage configs, built from the sections

    def ingest_config(self, tracking: TrackingConfig | None = None, source: str = "pipeline") -> IngestConfig:
        """Build the ingest stage's config."""
        data = {"out_dir": self.work_dir / "manifests", **self.data, "tracking": tracking or self.tracking}
        return _section(IngestConfig, data, source, "data")

    def train_settings(self, source: str = "pipeline") -> dict[str, Any]:
        """``train_config`` (if any) with the ``train`` section merged over it."""
        base: dict[str, Any] = {}
        if self.train_config is not None:
            base = read_yaml(self.train_config)
            for key in _RESERVED["train"]:
                if base.pop(key, None) is not None:
                    log.debug("%s: %s is set by the pipeline; ignoring the file's value", self.train_config, key)
        return deep_merge(base, self.train)

    def train_cfg(
        self,
        manifest: Path | None,
        out: Path,
        tracking: TrackingConfig | None = None,
        source: str = "pipeline",
    ) -> TrainConfig:
        """Build the train stage's config."""
        data = deep_merge(
            self.train_settings(source),
            {
                "manifest": None if manifest is None else str(manifest),
                "out": str(out),
                "tracking": (tracking or self.tracking).model_dump(),
            },
        )
        return _section(TrainConfig, data, source, "train")

    def evaluate_cfg(
        self,
        model: str,
        manifest: Path,
        out: Path | None,
        tracking: TrackingConfig | None = None,
        source: str = "pipeline",
        **overrides: Any,
    ) -> EvaluateConfig:
        """Build the evaluate stage's config for one model."""
        data = {
            **self.evaluate,
            **overrides,
            "model": model,
            "manifest": str(manifest),
            "out": None if out is None else str(out),
            "tracking": (tracking or self.tracking).model_dump(),
        }
        return _section(EvaluateConfig, data, source, "evaluate")

    def synth_dir(self) -> Path | None:
        """Where ``synth`` writes ``images/`` and ``masks/``; ``None`` without a synth section."""
        if self.synth is None:
            return None
        return self.synth.out_dir or Path(self.data.get("images_dir", ".")).parent

    def check(self, source: str) -> None:
        """Validate every section now, so a typo fails before any work (one-line error)."""
        for section, reserved in _RESERVED.items():
            values: Mapping[str, Any] = getattr(self, section)
            for key, why in reserved.items():
                if key in values:
                    raise TumorsegError(f"{source}: {section}.{key}: set by the pipeline ({why}); remove it")
        self.ingest_config(source=source)
        if self.train_config is not None and not self.train_config.is_file():
            raise TumorsegError(
                f"{source}: train_config: {self.train_config} not found (relative paths resolve "
                f"against the current folder, {Path.cwd()})"
            )
        train = self.train_cfg(None, self.work_dir / "runs", source=source)
        if not train.log_model:
            raise TumorsegError(f"{source}: train.log_model: must be true: the pipeline registers the logged model")
        self.evaluate_cfg("check", self.work_dir, None, source=source)
        if self.synth is not None:
            out = self.synth_dir()
            assert out is not None
            images, masks = Path(self.data["images_dir"]), self.data.get("masks_dir")
            if images != out / "images" or (masks is not None and Path(masks) != out / "masks"):
                raise TumorsegError(
                    f"{source}: synth writes {out / 'images'} and {out / 'masks'}; point "
                    "data.images_dir and data.masks_dir there (or set synth.out_dir)"
                )


def _section(cls: type[Any], data: dict[str, Any], source: str, section: str) -> Any:
    """Validate one section as ``cls``; the error names the section's key, in one line."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join([section, *(str(p) for p in err["loc"])])
        msg = "unknown setting; check the spelling" if err["type"] == "extra_forbidden" else err["msg"]
        more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
        raise TumorsegError(f"{source}: {loc}: {msg}{more}") from exc


def load(path: str | os.PathLike[str], tracking_uri: str | None = None) -> PipelineConfig:
    """Read and fully validate a pipeline YAML.

    Args:
        path: the YAML file.
        tracking_uri: overrides ``tracking.uri`` (the CLI's ``--tracking-uri``).

    Raises:
        TumorsegError: missing file, bad YAML, an unknown key or an invalid value (one line).
    """
    path = Path(path)
    cfg = build_config(PipelineConfig, read_yaml(path), str(path))
    if cfg.name is None:
        cfg.name = path.stem
    if tracking_uri:
        cfg.tracking = TrackingConfig(uri=tracking_uri, experiment=cfg.tracking.experiment)
    cfg.check(str(path))
    return cfg


# ----------------------------------------------------------------------------- result


@dataclass
class PipelineResult:
    """What one ``pipeline run`` did; ``message`` is the one line the CLI prints."""

    exit_code: int
    message: str
    outcome: str
    work_dir: Path
    parent_run_id: str | None = None
    stages: dict[str, str] = field(default_factory=dict)
    dataset_digest: str | None = None
    model_version: str | None = None
    decision: registry.Decision | None = None
    failed_stage: str | None = None


class _StageFailed(Exception):
    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


# ----------------------------------------------------------------------------- lock and signals


@contextmanager
def work_dir_lock(work_dir: Path) -> Iterator[None]:
    """Hold ``WORK_DIR/.lock`` exclusively, or raise :class:`LockedError` at once.

    ``flock`` locks belong to the open file, so the OS releases them when the process
    exits, however it exits: a crash never leaves the work folder locked.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_FILE
    fh = open(path, "a+", encoding="utf-8")  # held open for the whole block: the lock lives with it
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "holder unknown"
            raise LockedError(
                f"{work_dir}: another pipeline is already running in this work folder ({holder}); "
                f"wait for it to finish (the lock on {path} is released when that process exits)"
            ) from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``systemctl stop``, cron kill) into KeyboardInterrupt in this process.

    Runs then end as FAILED and the state says where to resume, instead of the process
    vanishing with RUNNING runs. Forked children (ingest's decode workers) keep dying on it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ----------------------------------------------------------------------------- state


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def _key(obj: Any) -> str:
    """Hash a stage's inputs: short and stable."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_state(work_dir: Path) -> dict[str, Any] | None:
    """``WORK_DIR/state.json``, or ``None`` when there is none (or it is unreadable)."""
    path = Path(work_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); starting a new cycle", path, exc.__class__.__name__)
        return None
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else None


@dataclass
class _Ctx:
    """What every stage function needs: the config, the tracking target and the state."""

    cfg: PipelineConfig
    tracking: TrackingConfig
    state: dict[str, Any]
    work_dir: Path
    parent_id: str = ""
    done_now: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        assert self.tracking.uri is not None
        return self.tracking.uri

    @property
    def cycle(self) -> str:
        return str(self.state["cycle"])

    def stage(self, name: str) -> dict[str, Any]:
        stages: dict[str, dict[str, Any]] = self.state["stages"]
        return stages.setdefault(name, {})

    def peek(self, name: str) -> dict[str, Any]:
        stages: dict[str, dict[str, Any]] = self.state["stages"]
        return stages.get(name, {})

    def save(self) -> None:
        self.state["updated_at"] = _now()
        atomic_write_json(self.work_dir / STATE_FILE, self.state)

    def parent_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the parent run (by id: right whichever child run is active); best effort."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items() if v is not None]
        self._log_batch(tags=items)

    def parent_metrics(self, metrics: Mapping[str, float | None]) -> None:
        """Log finite metrics on the parent run; best effort."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
        self._log_batch(metrics=items)

    def clear_parent_tags(self, keys: list[str]) -> None:
        """Delete tags from the parent run (missing ones are fine); best effort."""
        cl = registry.client(self.uri)
        for key in keys:
            try:
                cl.delete_tag(self.parent_id, key)
            except Exception:  # an absent tag, or a tracking hiccup: nothing to undo
                log.debug("tag %s not deleted from the pipeline run", key)

    def _log_batch(self, **items: Any) -> None:
        # The state file is the source of truth; a tracking hiccup must not turn a finished
        # stage into a failed one, nor hide the real error of a failed one.
        if not self.parent_id or not any(items.values()):
            return
        try:
            registry.client(self.uri).log_batch(self.parent_id, **items)
        except Exception as exc:
            log.warning("could not record %s on the pipeline run: %s", sorted(items), exc)


def _open_cycle(
    prev: dict[str, Any] | None, cfg: PipelineConfig, tracking: TrackingConfig, force: bool
) -> dict[str, Any]:
    """Resume the previous cycle when it did not finish (same store), else start a new one."""
    if prev is not None and not prev.get("finished"):
        same = (
            prev.get("tracking_uri") == tracking.uri
            and prev.get("experiment") == tracking.experiment
            and prev.get("model_name") == cfg.registry.model_name
        )
        if same and _run_exists(tracking, prev.get("parent_run_id")):
            prev["force"] = bool(prev.get("force")) or force
            prev["attempt"] = int(prev.get("attempt", 1)) + 1
            log.info("resuming pipeline cycle %s (attempt %d)", prev["cycle"], prev["attempt"])
            return prev
        log.warning(
            "the unfinished cycle %s in %s cannot be resumed here (tracking store, experiment or model "
            "name changed, or its parent run is gone); starting a new cycle",
            prev.get("cycle"),
            cfg.work_dir,
        )
    return {
        "format": STATE_FORMAT,
        "cycle": f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}",
        "pipeline": cfg.name,
        "model_name": cfg.registry.model_name,
        "tracking_uri": tracking.uri,
        "experiment": tracking.experiment,
        "parent_run_id": None,
        "force": force,
        "attempt": 1,
        "finished": False,
        "started_at": _now(),
        "stages": {},
    }


def _run_exists(tracking: TrackingConfig, run_id: str | None) -> bool:
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    try:
        registry.client(tracking.uri or "").get_run(run_id)
    except MlflowException:
        return False
    return True


# ----------------------------------------------------------------------------- entry point


def run(cfg: PipelineConfig, force: bool = False) -> PipelineResult:
    """Run (or resume) the pipeline in ``cfg.work_dir``.

    Args:
        cfg: from :func:`load`.
        force: train even when the data is what the champion was trained on.

    Returns:
        The outcome; ``exit_code`` and ``message`` are what the CLI reports. A failed stage is
        a result with exit code 1, not an exception.

    Raises:
        TumorsegError: the tracking server cannot be reached (checked first, in seconds).
        LockedError: another pipeline holds the work folder.
    """
    from tumorseg import tracking

    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_reachable(uri)  # before the lock, the data and any training
    track = TrackingConfig(uri=uri, experiment=cfg.tracking.experiment)
    with work_dir_lock(cfg.work_dir), _sigterm_as_interrupt():
        state = _open_cycle(read_state(cfg.work_dir), cfg, track, force)
        ctx = _Ctx(cfg, track, state, cfg.work_dir)
        return _run_cycle(ctx)


def _run_cycle(ctx: _Ctx) -> PipelineResult:
    from tumorseg import tracking

    cfg, state = ctx.cfg, ctx.state
    resumed_id = state.get("parent_run_id")
    tags = {
        "tumorseg.pipeline": cfg.name,
        "tumorseg.pipeline.cycle": ctx.cycle,
        "tumorseg.pipeline.work_dir": str(cfg.work_dir.resolve()),
        "tumorseg.registered_model": cfg.registry.model_name,
    }
    try:
        with tracking.start_run(
            ctx.tracking, "pipeline", run_name=f"pipeline-{cfg.name}", run_id=resumed_id, tags=tags
        ) as parent:
            ctx.parent_id = parent.run_id
            if resumed_id is None:
                state["parent_run_id"] = parent.run_id
                ctx.save()
                parent.log_params(
                    {"pipeline": cfg.model_dump(mode="json", exclude={"tracking"}), "force": state["force"]}
                )
            ctx.parent_tags(
                {
                    "pipeline.attempt": state["attempt"],
                    "pipeline.outcome": "running",
                    **{f"pipeline.{s}.status": ctx.peek(s).get("status", "pending") for s in STAGES},
                }
            )
            result = _stages(ctx)
            _finish(ctx, result)
            return result
    except _StageFailed as exc:
        result = PipelineResult(
            EXIT_STAGE_FAILED,
            f"pipeline failed at stage '{exc.stage}': {exc.reason} (fix it and run the same command again: "
            "finished stages are skipped)",
            "failed",
            cfg.work_dir,
            ctx.parent_id or None,
            dict(ctx.done_now),
            failed_stage=exc.stage,
        )
        state["outcome"] = "failed"
        ctx.save()
        return result


def _finish(ctx: _Ctx, result: PipelineResult) -> None:
    """Close the cycle: the next run starts a new one."""
    result.parent_run_id = ctx.parent_id
    result.stages = dict(ctx.done_now)
    ctx.parent_tags(
        {
            "pipeline.outcome": result.outcome,
            "pipeline.message": result.message,
            "pipeline.exit_code": result.exit_code,
        }
    )
    ctx.parent_metrics({"pipeline.exit_code": result.exit_code})
    if ctx.state.get("attempt", 1) > 1:
        ctx.clear_parent_tags(["pipeline.failed_stage", "pipeline.error"])  # from an earlier attempt
    ctx.state.update(
        finished=True,
        outcome=result.outcome,
        exit_code=result.exit_code,
        message=result.message,
        finished_at=_now(),
    )
    ctx.save()
    log.info("%s", result.message)


def _run_stage(ctx: _Ctx, name: str, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage, recording running/done/failed in the state file and on the parent run."""
    st = ctx.stage(name)
    st.update(status="running", key=key, started_at=_now())
    st.pop("error", None)
    ctx.save()
    ctx.parent_tags({f"pipeline.{name}.status": "running"})
    log.info("stage %s: started", name)
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as exc:
        reason = str(exc) if isinstance(exc, TumorsegError) else f"{exc.__class__.__name__}: {exc}"
        if isinstance(exc, TumorsegError):
            log.error("stage %s failed: %s", name, reason)
        else:
            log.exception("stage %s failed", name)  # our bug or the environment's: keep the traceback
        reason = " ".join(reason.split())  # one line
        st.update(status="failed", error=reason, failed_at=_now())
        ctx.save()
        ctx.done_now[name] = "failed"
        ctx.parent_tags(
            {
                f"pipeline.{name}.status": "failed",
                "pipeline.failed_stage": name,
                "pipeline.error": reason,
                "pipeline.outcome": "failed",
            }
        )
        raise _StageFailed(name, reason) from exc
    st.update(out, status="done", key=key, finished_at=_now(), seconds=round(time.perf_counter() - t0, 1))
    ctx.save()
    ctx.done_now[name] = "done"
    ctx.parent_tags({f"pipeline.{name}.status": "done"})
    log.info("stage %s: done in %.1f s", name, time.perf_counter() - t0)
    return st


def _skip(ctx: _Ctx, name: str, why: str = "skipped") -> dict[str, Any]:
    log.info("stage %s: %s (done in an earlier attempt of cycle %s)", name, why, ctx.cycle)
    ctx.done_now[name] = why
    ctx.parent_tags({f"pipeline.{name}.status": "done" if why == "skipped" else why})
    return ctx.stage(name)


def _is_done(st: dict[str, Any], key: str) -> bool:
    return st.get("status") == "done" and st.get("key") == key


# ----------------------------------------------------------------------------- the stages


def _stages(ctx: _Ctx) -> PipelineResult:
    ing = _ingest(ctx)
    try:
        unchanged = _nothing_new(ctx, ing)
    except Exception as exc:  # the registry cannot be read: the train stage cannot start
        log.exception("could not look up the champion")
        why = " ".join(str(exc).split())
        raise _StageFailed("train", f"could not look up the champion ({exc.__class__.__name__}: {why})") from exc
    if unchanged is not None:
        return unchanged
    tr = _train(ctx, ing)
    ev = _evaluate(ctx, ing, tr)
    return _promote(ctx, ing, tr, ev)


def _ensure_synth(cfg: PipelineConfig) -> str | None:
    """Write the synthetic dataset when the pipeline has a ``synth`` section and the data is missing."""
    out = cfg.synth_dir()
    if cfg.synth is None or out is None:
        return None
    images = out / "images"
    if images.is_dir() and sum(1 for p in images.iterdir() if p.is_file()) >= cfg.synth.n:
        return "present"  # (fewer files: an interrupted synth; it rewrites the same files)
    from tumorseg import synth

    res = synth.run(out, n=cfg.synth.n, size=cfg.synth.size, seed=cfg.synth.seed)
    log.info("synth: wrote %d pairs to %s", res.n, out)
    return "generated"


def _ingest(ctx: _Ctx) -> dict[str, Any]:
    icfg = ctx.cfg.ingest_config(ctx.tracking)
    key = _key(icfg.model_dump(mode="json", exclude={"tracking", "workers"}))
    st = ctx.stage("ingest")
    if _is_done(st, key) and _manifest_digest(Path(st["manifest_dir"])) == st.get("dataset_digest"):
        return _skip(ctx, "ingest")

    def work() -> dict[str, Any]:
        from tumorseg import ingest

        synth = _ensure_synth(ctx.cfg)
        if synth:
            ctx.parent_tags({"pipeline.synth": synth})
        res = ingest.run(icfg)
        return {
            "manifest_dir": str(res.manifest_dir),
            "dataset_digest": res.dataset_digest,
            "run_id": res.run_id,
            "n_cases": res.n_cases,
            "n_rejected": res.n_rejected,
        }

    out = _run_stage(ctx, "ingest", key, work)
    ctx.parent_tags(
        {
            "tumorseg.dataset_digest": out["dataset_digest"],
            "pipeline.ingest.run_id": out["run_id"],
            "tumorseg.manifest": Path(out["manifest_dir"]).name,
        }
    )
    ctx.parent_metrics({"ingest.cases": out["n_cases"], "ingest.rejected": out["n_rejected"]})
    return out


def _manifest_digest(manifest_dir: Path) -> str | None:
    try:
        return str(json.loads((manifest_dir / "manifest.json").read_text(encoding="utf-8"))["dataset_digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _nothing_new(ctx: _Ctx, ing: dict[str, Any]) -> PipelineResult | None:
    """Stop when the data is exactly what the champion was trained on (unless forced)."""
    if ctx.peek("train").get("status") == "done" or ctx.state.get("force"):
        return None
    name = ctx.cfg.registry.model_name
    champ = registry.champion_digest(registry.client(ctx.uri), name)
    digest = ing["dataset_digest"]
    if champ is None or champ[1] != digest:
        return None
    version = champ[0]
    for stage in ("train", "evaluate", "promote"):
        ctx.done_now[stage] = "not_needed"
    ctx.parent_tags(
        {
            **{f"pipeline.{s}.status": "not_needed" for s in ("train", "evaluate", "promote")},
            "pipeline.champion_version": version,
        }
    )
    msg = (
        f"nothing new: the data (digest {digest[:12]}) is what champion {name} version {version} was trained "
        "on; skipped training (pass --force to train anyway)"
    )
    return PipelineResult(EXIT_OK, msg, "nothing_new", ctx.work_dir, dataset_digest=digest, model_version=version)


def _find_resumable(out_dir: Path) -> Path | None:
    """Find the newest run folder under ``out_dir`` with a ``last.pt`` (an interrupted training)."""
    found = sorted(out_dir.glob("**/last.pt"), key=lambda p: p.stat().st_mtime) if out_dir.is_dir() else []
    return found[-1].parent if found else None


def _train(ctx: _Ctx, ing: dict[str, Any]) -> dict[str, Any]:
    manifest = Path(ing["manifest_dir"])
    probe = ctx.cfg.train_cfg(manifest, ctx.work_dir / "runs", ctx.tracking)
    key = _key(
        {
            "train": probe.model_dump(mode="json", exclude={"tracking", "out", "manifest"}),
            "dataset_digest": ing["dataset_digest"],
        }
    )
    st = ctx.stage("train")
    if _is_done(st, key) and Path(st.get("best_checkpoint", "")).is_file():
        return _skip(ctx, "train")
    out_dir = ctx.work_dir / "runs" / f"{ctx.cycle}-{key[:8]}"
    tcfg = ctx.cfg.train_cfg(manifest, out_dir, ctx.tracking)

    def work() -> dict[str, Any]:
        from tumorseg import train

        run_dir = _find_resumable(out_dir)
        if run_dir is not None:
            log.info("train: resuming the interrupted run %s from its last.pt", run_dir)
            ctx.parent_tags({"pipeline.train.resumed_from": str(run_dir)})
            res = train.resume(run_dir, tracking_uri=ctx.uri)
        else:
            res = train.run(tcfg)
        if not res.model_uri:
            raise TumorsegError(f"{res.run_dir}: training logged no model, so there is nothing to register")
        return {
            "run_dir": str(res.run_dir),
            "best_checkpoint": str(res.best_checkpoint),
            "mlflow_run_id": res.mlflow_run_id,
            "model_uri": res.model_uri,
            "best_val_dice": float(res.best_val_dice),
            "best_epoch": int(res.best_epoch),
            "stopped_reason": res.stopped_reason,
            "resumed": run_dir is not None,
        }

    out = _run_stage(ctx, "train", key, work)
    ctx.parent_tags(
        {
            "pipeline.train.run_id": out["mlflow_run_id"],
            "pipeline.train.run_dir": out["run_dir"],
            "pipeline.train.stopped_reason": out.get("stopped_reason") or None,
        }
    )
    ctx.parent_metrics({"train.best_val_dice": out["best_val_dice"], "train.best_epoch": out["best_epoch"]})
    return out


def _dice(summary: Mapping[str, Any]) -> float:
    value = summary.get("dice_mean")
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")


def _evaluate(ctx: _Ctx, ing: dict[str, Any], tr: dict[str, Any]) -> dict[str, Any]:
    out_dir = ctx.work_dir / "eval" / ctx.cycle / "candidate"
    ecfg = ctx.cfg.evaluate_cfg(tr["run_dir"], Path(ing["manifest_dir"]), out_dir, ctx.tracking)
    key = _key(
        {
            "evaluate": ecfg.model_dump(mode="json", exclude={"tracking", "out"}),
            "train_run": tr["mlflow_run_id"],
            "dataset_digest": ing["dataset_digest"],
        }
    )
    st = ctx.stage("evaluate")
    if _is_done(st, key):
        return _skip(ctx, "evaluate")

    def work() -> dict[str, Any]:
        from tumorseg import evaluate

        res = evaluate.run(ecfg)
        return {
            "dice_mean": _dice(res.summary),
            "run_id": res.run_id,
            "out_dir": str(res.out_dir),
            "n_cases": int(res.n_cases),
            "split": ecfg.split,
        }

    out = _run_stage(ctx, "evaluate", key, work)
    ctx.parent_tags({"pipeline.evaluate.run_id": out["run_id"], "pipeline.evaluate.split": out["split"]})
    ctx.parent_metrics({"evaluate.dice_mean": out["dice_mean"], "evaluate.n_cases": out["n_cases"]})
    return out


def _promote(ctx: _Ctx, ing: dict[str, Any], tr: dict[str, Any], ev: dict[str, Any]) -> PipelineResult:
    cfg = ctx.cfg
    name, margin = cfg.registry.model_name, cfg.registry.margin
    split = str(ev.get("split") or cfg.evaluate.get("split", "test"))
    key = _key(
        {
            "model_uri": tr["model_uri"],
            "train_run": tr["mlflow_run_id"],
            "name": name,
            "margin": margin,
            "evaluate": cfg.evaluate,
            "dataset_digest": ing["dataset_digest"],
        }
    )
    st = ctx.stage("promote")
    if _is_done(st, key):
        _skip(ctx, "promote")
    else:
        if st.get("key") != key:  # an earlier attempt promoted something else: forget its version
            st.clear()
        _run_stage(ctx, "promote", key, lambda: _register_and_decide(ctx, ing, tr, split, key))
    version, d = str(st["version"]), st["decision"]
    decision = registry.Decision(d["outcome"], d["reason"], d["challenger_dice"], d["champion_dice"], d["margin"])
    ctx.parent_tags(
        {
            "pipeline.model_version": version,
            "pipeline.champion_version": st.get("champion_version"),
            "pipeline.decision": decision.outcome,
            "pipeline.decision_reason": decision.reason,
        }
    )
    ctx.parent_metrics(
        {"promote.challenger_dice": decision.challenger_dice, "promote.champion_dice": decision.champion_dice}
    )
    if decision.outcome == "first_champion":
        code, msg = (
            EXIT_OK,
            (
                f"promoted: {name} version {version} is the first champion "
                f"(test Dice {decision.challenger_dice:.4f} on split '{split}')"
            ),
        )
    elif decision.promote:
        code, msg = (
            EXIT_OK,
            (
                f"promoted: {name} version {version} is the new champion, replacing version "
                f"{st.get('champion_version')} ({decision.reason})"
            ),
        )
    else:
        code, msg = (
            EXIT_NOT_PROMOTED,
            (
                f"not promoted: {name} version {version} stays challenger; champion "
                f"version {st.get('champion_version')} keeps the alias ({decision.reason})"
            ),
        )
    outcome = "not_promoted" if code == EXIT_NOT_PROMOTED else decision.outcome
    return PipelineResult(
        code,
        msg,
        outcome,
        ctx.work_dir,
        dataset_digest=ing["dataset_digest"],
        model_version=version,
        decision=decision,
    )


def _register_and_decide(ctx: _Ctx, ing: dict[str, Any], tr: dict[str, Any], split: str, key: str) -> dict[str, Any]:
    """Register the challenger, score it and the champion on the same split, move the aliases."""
    from tumorseg import evaluate, tracking

    cfg = ctx.cfg
    name, margin = cfg.registry.model_name, cfg.registry.margin
    cl = registry.client(ctx.uri)
    st = ctx.stage("promote")
    manifest = Path(ing["manifest_dir"])
    eval_dir = ctx.work_dir / "eval" / ctx.cycle
    with tracking.start_run(
        ctx.tracking,
        "promote",
        run_name=f"promote-{name}",
        tags={"tumorseg.registered_model": name, "tumorseg.dataset_digest": ing["dataset_digest"]},
    ) as run:
        # Register once per cycle: a resumed attempt reuses the version an earlier attempt made.
        version = st.get("version")
        if version is None or registry.get_version(cl, name, str(version)) is None:
            version = registry.register(
                tr["model_uri"],
                name,
                {
                    registry.TAG_DIGEST: ing["dataset_digest"],
                    registry.TAG_MANIFEST: Path(ing["manifest_dir"]).name,
                    registry.TAG_TRAIN_RUN: tr["mlflow_run_id"],
                    registry.TAG_PIPELINE_RUN: ctx.parent_id,
                    "tumorseg.best_val_dice": f"{tr['best_val_dice']:.6f}",
                },
            )
            st.update(version=version, key=key)
            ctx.save()
        version = str(version)
        registry.set_alias(cl, name, registry.CHALLENGER, version)

        decision_dict = st.get("decision")
        if decision_dict is None:
            champ = registry.get_alias(cl, name, registry.CHAMPION)
            champ_version = None if champ is None or str(champ.version) == version else str(champ.version)
            ch = evaluate.run(
                cfg.evaluate_cfg(
                    registry.model_ref(name, version),
                    manifest,
                    eval_dir / f"challenger-v{version}",
                    ctx.tracking,
                    write_back=False,
                )
            )
            champion_dice = None
            if champ_version is not None:
                ref = registry.model_ref(name, champ_version)
                k = evaluate.run(
                    cfg.evaluate_cfg(
                        ref, manifest, eval_dir / f"champion-v{champ_version}", ctx.tracking, write_back=False
                    )
                )
                champion_dice = _dice(k.summary)
            decision = registry.decide(_dice(ch.summary), champion_dice, margin)
            decision_dict = {
                "outcome": decision.outcome,
                "reason": decision.reason,
                "challenger_dice": decision.challenger_dice,
                "champion_dice": decision.champion_dice,
                "margin": decision.margin,
            }
            st.update(decision=decision_dict, champion_version=champ_version)
            ctx.save()
        decision = registry.Decision(**decision_dict)
        champ_version = st.get("champion_version")
        tags = {
            **decision.tags(),
            registry.TAG_CHAMPION_VERSION: champ_version or "none",
            registry.TAG_SPLIT: split,
        }
        registry.tag_version(cl, name, version, tags)
        if decision.promote:
            registry.set_alias(cl, name, registry.CHAMPION, version)
        run.set_tags({**tags, "tumorseg.model_version": version})
        run.log_metrics(
            {
                "challenger_dice": decision.challenger_dice,
                "champion_dice": float("nan") if decision.champion_dice is None else decision.champion_dice,
            }
        )
        ctx.parent_tags(tags)
        return {"version": version, "run_id": run.run_id}
