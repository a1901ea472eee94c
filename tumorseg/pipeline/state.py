"""The pipeline's persistent state: the work-folder lock, ``state.json`` and the stage runner.

``WORK_DIR/state.json`` holds the current cycle: parent run id, and per stage its status,
a key of its inputs and its outputs, written atomically after every step. A stage is
skipped on the next run when it is done and its key is unchanged.
``WORK_DIR/.lock`` is ``fcntl.flock``-ed while a pipeline runs; the OS drops the lock when
the process dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
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

from tumorseg import tracking
from tumorseg.config import TrackingConfig
from tumorseg.errors import LockedError, TumorsegError
from tumorseg.fsutil import atomic_write_json
from tumorseg.pipeline.config import PipelineConfig
from tumorseg.pipeline.registry import Decision

log = logging.getLogger(__name__)

STAGES = ("ingest", "train", "evaluate", "promote")
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
STATE_FORMAT = 1


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
    decision: Decision | None = None
    failed_stage: str | None = None


class StageFailed(Exception):
    """A stage raised: the cycle stops with exit code 1 and resumes there next time."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


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
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n")
        fh.flush()
        yield
    finally:
        fh.close()


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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


def now() -> str:
    """The local time, ISO 8601 to the second."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def key_of(obj: Any) -> str:
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
class Cycle:
    """What every stage function needs: the config, the tracking target and the state."""

    cfg: PipelineConfig
    tracking: TrackingConfig
    state: dict[str, Any]
    work_dir: Path
    parent_id: str = ""
    done_now: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """The resolved tracking URI."""
        assert self.tracking.uri is not None
        return self.tracking.uri

    @property
    def cycle(self) -> str:
        """The cycle id (time stamp + random suffix)."""
        return str(self.state["cycle"])

    def stage(self, name: str) -> dict[str, Any]:
        """The state entry of a stage, created empty when missing."""
        stages: dict[str, dict[str, Any]] = self.state["stages"]
        return stages.setdefault(name, {})

    def peek(self, name: str) -> dict[str, Any]:
        """The state entry of a stage, or ``{}``."""
        stages: dict[str, dict[str, Any]] = self.state["stages"]
        return stages.get(name, {})

    def save(self) -> None:
        """Write ``state.json`` atomically."""
        self.state["updated_at"] = now()
        atomic_write_json(self.work_dir / STATE_FILE, self.state)

    def parent_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags on the parent run (by id: right whichever child run is active); best effort."""
        self._record(tags=tags)

    def parent_metrics(self, metrics: Mapping[str, float | None]) -> None:
        """Log finite metrics on the parent run; best effort."""
        self._record(metrics=metrics)

    def describe_parent(self, text: str) -> None:
        """Set the parent run's description (the note the MLflow UI shows); best effort."""
        self._record(tags={tracking.NOTE_TAG: text})

    def parent_input(self, manifest_dir: Path) -> None:
        """Log the cycle's manifest as the parent run's dataset (the runs table's Dataset column); best effort."""
        try:
            tracking.log_manifest_input(self.uri, self.parent_id, manifest_dir, "pipeline")
        except Exception as exc:  # a tracking hiccup must not fail a finished ingest
            log.warning("could not log the manifest as the pipeline run's dataset: %s", exc)

    def clear_parent_tags(self, keys: list[str]) -> None:
        """Delete tags from the parent run (missing ones are fine); best effort."""
        try:
            tracking.delete_tags(self.uri, self.parent_id, keys)
        except Exception as exc:  # a tracking hiccup: nothing to undo
            log.debug("tags %s not deleted from the pipeline run: %s", keys, exc)

    def _record(self, metrics: Mapping[str, float | None] | None = None,
                tags: Mapping[str, Any] | None = None) -> None:
        # The state file is the source of truth; a tracking hiccup must not turn a finished
        # stage into a failed one, nor hide the real error of a failed one.
        if not self.parent_id or not (metrics or tags):
            return
        try:
            tracking.log_to_run(self.uri, self.parent_id, metrics, tags)
        except Exception as exc:
            log.warning("could not record %s on the pipeline run: %s", sorted({**(metrics or {}), **(tags or {})}),
                        exc)


def open_cycle(prev: dict[str, Any] | None, cfg: PipelineConfig, track: TrackingConfig, force: bool) -> dict[str, Any]:
    """Resume the previous cycle when it did not finish (same store), else start a new one."""
    if prev is not None and not prev.get("finished"):
        same = (
            prev.get("tracking_uri") == track.uri
            and prev.get("experiment") == track.experiment
            and prev.get("model_name") == cfg.registry.model_name
        )
        if same and tracking.run_exists(track.uri or "", prev.get("parent_run_id")):
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
        "tracking_uri": track.uri,
        "experiment": track.experiment,
        "parent_run_id": None,
        "force": force,
        "attempt": 1,
        "finished": False,
        "started_at": now(),
        "stages": {},
    }


def run_stage(ctx: Cycle, name: str, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one stage, recording running/done/failed in the state file and on the parent run."""
    st = ctx.stage(name)
    st.update(status="running", key=key, started_at=now())
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
        st.update(status="failed", error=reason, failed_at=now())
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
        raise StageFailed(name, reason) from exc
    st.update(out, status="done", key=key, finished_at=now(), seconds=round(time.perf_counter() - t0, 1))
    ctx.save()
    ctx.done_now[name] = "done"
    ctx.parent_tags({f"pipeline.{name}.status": "done"})
    log.info("stage %s: done in %.1f s", name, time.perf_counter() - t0)
    return st


def skip(ctx: Cycle, name: str, why: str = "skipped") -> dict[str, Any]:
    """Record a stage as not run now (done earlier, or not needed); returns its state entry."""
    log.info("stage %s: %s (done in an earlier attempt of cycle %s)", name, why, ctx.cycle)
    ctx.done_now[name] = why
    ctx.parent_tags({f"pipeline.{name}.status": "done" if why == "skipped" else why})
    return ctx.stage(name)


def is_done(st: dict[str, Any], key: str) -> bool:
    """Whether a stage finished with exactly these inputs."""
    return st.get("status") == "done" and st.get("key") == key
