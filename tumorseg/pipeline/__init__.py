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

Exit codes (:class:`tumorseg.errors.ExitCode`): 0 promoted, first champion, or nothing new;
1 a stage failed; 2 configuration error (or unreachable tracking server); 3 completed but
the challenger was not promoted; 4 another pipeline holds the work folder.

Modules: :mod:`.config` (the YAML), :mod:`.state` (lock, ``state.json``, the stage runner),
:mod:`.stages` (ingest/train/evaluate adapters), :mod:`.registry` and :mod:`.promote`
(champion/challenger), :mod:`.runner` (the cycle).
"""

from tumorseg.errors import EXIT_CODES, LockedError
from tumorseg.pipeline.config import PipelineConfig, load
from tumorseg.pipeline.runner import run
from tumorseg.pipeline.state import LOCK_FILE, STAGES, STATE_FILE, PipelineResult, read_state, work_dir_lock

__all__ = [
    "EXIT_CODES",
    "LOCK_FILE",
    "STAGES",
    "STATE_FILE",
    "LockedError",
    "PipelineConfig",
    "PipelineResult",
    "load",
    "read_state",
    "run",
    "work_dir_lock",
]
