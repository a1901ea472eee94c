"""The run loop: one cycle of ingest -> train -> evaluate -> promote under a parent MLflow run."""

from __future__ import annotations

import logging
from pathlib import Path

from tumorseg import tracking
from tumorseg.config import TrackingConfig
from tumorseg.errors import ExitCode
from tumorseg.labels import Classes
from tumorseg.pipeline.config import PipelineConfig
from tumorseg.pipeline.promote import check_label_set, outcome_phrase, promote
from tumorseg.pipeline.stages import evaluate_stage, ingest_stage, nothing_new, train_stage
from tumorseg.pipeline.state import (
    STAGES,
    Cycle,
    PipelineResult,
    StageFailed,
    now,
    open_cycle,
    read_state,
    sigterm_as_interrupt,
    work_dir_lock,
)

log = logging.getLogger(__name__)


def run(cfg: PipelineConfig, force: bool = False) -> PipelineResult:
    """Run (or resume) the pipeline in ``cfg.work_dir``.

    Args:
        cfg: from :func:`load`.
        force: train even when the data is what the champion was trained on.

    Returns:
        The outcome; ``exit_code`` and ``message`` are what the CLI reports. A failed stage is
        a result with exit code 1, not an exception.

    Raises:
        TumorsegError: the tracking server cannot be reached (checked first, in seconds), the data to ingest are
            missing, or the registered model's champion predicts another label set than the data declares.
        LockedError: another pipeline holds the work folder.
    """
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.check_uri(uri)  # before the lock, the data and any training
    cfg.check_data(f"pipeline {cfg.name}")
    track = TrackingConfig(uri=uri, experiment=cfg.tracking.experiment)
    # a champion of another label set is never compared: say so now, not after training
    icfg = cfg.ingest_config(track)
    check_label_set(tracking.client(uri), cfg.registry.model_name, Classes(icfg.labels, icfg.regions).describe())
    with work_dir_lock(cfg.work_dir), sigterm_as_interrupt():
        state = open_cycle(read_state(cfg.work_dir), cfg, track, force)
        ctx = Cycle(cfg, track, state, cfg.work_dir)
        return _run_cycle(ctx)


def _run_cycle(ctx: Cycle) -> PipelineResult:
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
            ctx.describe_parent(f"running: pipeline `{cfg.name}`, cycle `{ctx.cycle}`, attempt {state['attempt']}.")
            result = run_stages(ctx)
            _finish(ctx, result)
            log.info("runs in the MLflow UI: %s", tracking.ui_link(ctx.uri, parent.experiment_id))
            return result
    except StageFailed as exc:
        result = PipelineResult(
            ExitCode.STAGE_FAILED,
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
        ctx.describe_parent(describe(ctx, result))
        return result


def _finish(ctx: Cycle, result: PipelineResult) -> None:
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
    ctx.describe_parent(describe(ctx, result))
    if ctx.state.get("attempt", 1) > 1:
        ctx.clear_parent_tags(["pipeline.failed_stage", "pipeline.error"])  # from an earlier attempt
    ctx.state.update(
        finished=True,
        outcome=result.outcome,
        exit_code=result.exit_code,
        message=result.message,
        finished_at=now(),
    )
    ctx.save()
    log.info("%s", result.message)


def describe(ctx: Cycle, result: PipelineResult) -> str:
    """The parent run's description: the outcome line first (the runs table shows it), then the stages' figures."""
    ing, tr, ev, pr = (ctx.peek(s) for s in STAGES)
    d = result.decision
    if d is not None and ev and result.outcome != "failed":
        head = (f"test Dice {d.challenger_dice:.4f} on {ev.get('n_cases')} cases; "
                f"{outcome_phrase(str(result.model_version), d, pr.get('champion_version'))}")
    else:
        head = result.message
    lines = [head, "", f"Pipeline `{ctx.cfg.name}`, cycle `{ctx.cycle}`, exit code {result.exit_code}."]
    if ing.get("dataset_digest"):
        lines.append(f"- ingest: manifest `{Path(ing['manifest_dir']).name}` (digest "
                     f"`{ing['dataset_digest'][:12]}`), {ing.get('n_cases')} cases, {ing.get('n_rejected')} rejected")
    if tr.get("status") == "done":
        lines.append(f"- train: best val Dice {tr['best_val_dice']:.4f} at epoch {tr['best_epoch']} "
                     f"(run `{tr['mlflow_run_id']}`)")
    if ev.get("status") == "done":
        lines.append(f"- evaluate: mean Dice {ev['dice_mean']:.4f} on {ev['n_cases']} `{ev['split']}` cases")
    if d is not None:
        lines.append(f"- promote: `{ctx.cfg.registry.model_name}` v{result.model_version}: {d.reason}")
    return "\n".join(lines)


def run_stages(ctx: Cycle) -> PipelineResult:
    """Ingest; stop when nothing is new; else train, evaluate the candidate once, and promote."""
    ing = ingest_stage(ctx)
    try:
        unchanged = nothing_new(ctx, ing)
    except Exception as exc:  # the registry cannot be read: the train stage cannot start
        log.exception("could not look up the champion")
        why = " ".join(str(exc).split())
        raise StageFailed("train", f"could not look up the champion ({exc.__class__.__name__}: {why})") from exc
    if unchanged is not None:
        return unchanged
    tr = train_stage(ctx, ing)
    ev = evaluate_stage(ctx, ing, tr)
    return promote(ctx, ing, tr, ev)
