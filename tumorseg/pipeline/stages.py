"""The stage adapters: ingest, the "nothing new" check, train and evaluate as pipeline steps.

Each adapter builds its stage's config from the pipeline YAML, keys it by its inputs,
skips it when an earlier attempt of this cycle finished it, and records its outputs.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tumorseg import tracking
from tumorseg.errors import ExitCode, TumorsegError
from tumorseg.pipeline import registry
from tumorseg.pipeline.config import PipelineConfig
from tumorseg.pipeline.state import Cycle, PipelineResult, is_done, key_of, run_stage, skip

log = logging.getLogger(__name__)


def _ensure_synth(cfg: PipelineConfig) -> str | None:
    """Write the synthetic dataset when the pipeline has a ``synth`` section and the data is missing."""
    out = cfg.synth_dir()
    if cfg.synth is None or out is None:
        return None
    images = out / "images"
    if images.is_dir() and sum(1 for p in images.iterdir() if p.is_file()) >= cfg.synth.n:
        return "present"  # (fewer files: an interrupted synth; it rewrites the same files)
    from tumorseg import synth

    res = synth.run(out, n=cfg.synth.n, size=cfg.synth.size, seed=cfg.synth.seed, classes=cfg.synth.classes,
                    dims=cfg.synth.dims)
    log.info("synth: wrote %d pairs to %s", res.n, out)
    return "generated"


def ingest_stage(ctx: Cycle) -> dict[str, Any]:
    """Synthesise (when configured) and ingest; skipped when done with the same options and manifest."""
    icfg = ctx.cfg.ingest_config(ctx.tracking)
    key = key_of(icfg.model_dump(mode="json", exclude={"tracking", "workers"}))
    st = ctx.stage("ingest")
    if is_done(st, key) and _manifest_digest(Path(st["manifest_dir"])) == st.get("dataset_digest"):
        return skip(ctx, "ingest")

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

    out = run_stage(ctx, "ingest", key, work)
    ctx.parent_tags(
        {
            "tumorseg.dataset_digest": out["dataset_digest"],
            "pipeline.ingest.run_id": out["run_id"],
            "tumorseg.manifest": Path(out["manifest_dir"]).name,
        }
    )
    ctx.parent_metrics({"ingest.cases": out["n_cases"], "ingest.rejected": out["n_rejected"]})
    ctx.parent_input(Path(out["manifest_dir"]))
    return out


def _manifest_digest(manifest_dir: Path) -> str | None:
    try:
        return str(json.loads((manifest_dir / "manifest.json").read_text(encoding="utf-8"))["dataset_digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def nothing_new(ctx: Cycle, ing: dict[str, Any]) -> PipelineResult | None:
    """Stop when the data is exactly what the champion was trained on (unless forced)."""
    if ctx.peek("train").get("status") == "done" or ctx.state.get("force"):
        return None
    name = ctx.cfg.registry.model_name
    champ = registry.champion_digest(tracking.client(ctx.uri), name)
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
    return PipelineResult(ExitCode.OK, msg, "nothing_new", ctx.work_dir, dataset_digest=digest, model_version=version)


def _find_resumable(out_dir: Path) -> Path | None:
    """Find the newest run folder under ``out_dir`` with a ``last.pt`` (an interrupted training)."""
    found = sorted(out_dir.glob("**/last.pt"), key=lambda p: p.stat().st_mtime) if out_dir.is_dir() else []
    return found[-1].parent if found else None


def train_stage(ctx: Cycle, ing: dict[str, Any]) -> dict[str, Any]:
    """Train (or resume an interrupted training of) this cycle's model."""
    manifest = Path(ing["manifest_dir"])
    probe = ctx.cfg.train_cfg(manifest, ctx.work_dir / "runs", ctx.tracking)
    key = key_of(
        {
            "train": probe.model_dump(mode="json", exclude={"tracking", "out", "manifest"}),
            "dataset_digest": ing["dataset_digest"],
        }
    )
    st = ctx.stage("train")
    if is_done(st, key) and Path(st.get("best_checkpoint", "")).is_file():
        return skip(ctx, "train")
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

    out = run_stage(ctx, "train", key, work)
    ctx.parent_tags(
        {
            "pipeline.train.run_id": out["mlflow_run_id"],
            "pipeline.train.run_dir": out["run_dir"],
            "pipeline.train.stopped_reason": out.get("stopped_reason") or None,
        }
    )
    ctx.parent_metrics({"train.best_val_dice": out["best_val_dice"], "train.best_epoch": out["best_epoch"]})
    return out


def dice_of(summary: Mapping[str, Any]) -> float:
    """The mean Dice of an evaluate summary (NaN when absent)."""
    value = summary.get("dice_mean")
    try:
        return float("nan") if value is None else float(value)
    except (TypeError, ValueError):
        return float("nan")


def evaluate_stage(ctx: Cycle, ing: dict[str, Any], tr: dict[str, Any]) -> dict[str, Any]:
    """Score the trained model once on the evaluate split: the score promotion uses."""
    out_dir = ctx.work_dir / "eval" / ctx.cycle / "candidate"
    ecfg = ctx.cfg.evaluate_cfg(tr["run_dir"], Path(ing["manifest_dir"]), out_dir, ctx.tracking)
    key = key_of(
        {
            "evaluate": ecfg.model_dump(mode="json", exclude={"tracking", "out"}),
            "train_run": tr["mlflow_run_id"],
            "dataset_digest": ing["dataset_digest"],
        }
    )
    st = ctx.stage("evaluate")
    if is_done(st, key):
        return skip(ctx, "evaluate")

    def work() -> dict[str, Any]:
        from tumorseg import evaluate

        res = evaluate.run(ecfg)
        headline = {f"{ecfg.split}_{k}": res.summary.get(k) for k in evaluate.HEADLINE}
        return {
            "headline": {k: float(v) for k, v in headline.items() if isinstance(v, int | float) and math.isfinite(v)},
            "dice_mean": dice_of(res.summary),
            "run_id": res.run_id,
            "out_dir": str(res.out_dir),
            "n_cases": int(res.n_cases),
            "split": ecfg.split,
        }

    out = run_stage(ctx, "evaluate", key, work)
    ctx.parent_tags({"pipeline.evaluate.run_id": out["run_id"], "pipeline.evaluate.split": out["split"]})
    # the same names as on the evaluate and training runs (test_dice_mean...), so the runs table lines them up
    ctx.parent_metrics({"evaluate.dice_mean": out["dice_mean"], "evaluate.n_cases": out["n_cases"],
                        **out.get("headline", {})})
    return out
