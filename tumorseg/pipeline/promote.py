"""The promote step: register the challenger, compare it with the champion, move the aliases.

The challenger is scored once per cycle, by the evaluate stage; promotion reuses that
score and evaluates only the champion, on the same split of the same manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tumorseg import tracking
from tumorseg.errors import ExitCode, TumorsegError
from tumorseg.labels import Classes
from tumorseg.manifest import read_manifest_info
from tumorseg.pipeline import registry
from tumorseg.pipeline.stages import dice_of
from tumorseg.pipeline.state import Cycle, PipelineResult, is_done, key_of, run_stage, skip

log = logging.getLogger(__name__)


def promote(ctx: Cycle, ing: dict[str, Any], tr: dict[str, Any], ev: dict[str, Any]) -> PipelineResult:
    """Register the trained model and promote it when it beats the champion by the margin."""
    cfg = ctx.cfg
    name, margin = cfg.registry.model_name, cfg.registry.margin
    split = str(ev.get("split") or cfg.evaluate.get("split", "test"))
    key = key_of(
        {
            "model_uri": tr["model_uri"],
            "train_run": tr["mlflow_run_id"],
            "name": name,
            "margin": margin,
            "evaluate": cfg.evaluate,
            "eval_run": ev["run_id"],
            "dataset_digest": ing["dataset_digest"],
        }
    )
    st = ctx.stage("promote")
    if is_done(st, key):
        skip(ctx, "promote")
    else:
        if st.get("key") != key:  # an earlier attempt promoted something else: forget its version
            st.clear()
        run_stage(ctx, "promote", key, lambda: _register_and_decide(ctx, ing, tr, ev, split, key))
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
            ExitCode.OK,
            (
                f"promoted: {name} version {version} is the first champion "
                f"(test Dice {decision.challenger_dice:.4f} on split '{split}')"
            ),
        )
    elif decision.promote:
        code, msg = (
            ExitCode.OK,
            (
                f"promoted: {name} version {version} is the new champion, replacing version "
                f"{st.get('champion_version')} ({decision.reason})"
            ),
        )
    else:
        code, msg = (
            ExitCode.NOT_PROMOTED,
            (
                f"not promoted: {name} version {version} stays challenger; champion "
                f"version {st.get('champion_version')} keeps the alias ({decision.reason})"
            ),
        )
    outcome = "not_promoted" if code == ExitCode.NOT_PROMOTED else decision.outcome
    return PipelineResult(
        code,
        msg,
        outcome,
        ctx.work_dir,
        dataset_digest=ing["dataset_digest"],
        model_version=version,
        decision=decision,
    )


def _register_and_decide(ctx: Cycle, ing: dict[str, Any], tr: dict[str, Any], ev: dict[str, Any], split: str,
                         key: str) -> dict[str, Any]:
    """Register the challenger, score the champion on the challenger's split, move the aliases."""
    from tumorseg import evaluate

    cfg = ctx.cfg
    name, margin = cfg.registry.model_name, cfg.registry.margin
    cl = tracking.client(ctx.uri)
    st = ctx.stage("promote")
    manifest = Path(ing["manifest_dir"])
    eval_dir = ctx.work_dir / "eval" / ctx.cycle
    with tracking.start_run(
        ctx.tracking,
        "promote",
        run_name=f"promote-{name}",
        tags={"tumorseg.registered_model": name, "tumorseg.dataset_digest": ing["dataset_digest"]},
    ) as run:
        labels = read_manifest_info(manifest).classes.describe()
        check_label_set(cl, name, labels)
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
                    registry.TAG_EVAL_RUN: ev.get("run_id"),
                    registry.TAG_LABELS: labels,
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
            champion_dice = None
            if champ_version is not None:
                ref = registry.model_ref(name, champ_version)
                k = evaluate.run(
                    cfg.evaluate_cfg(
                        ref, manifest, eval_dir / f"champion-v{champ_version}", ctx.tracking, write_back=False
                    )
                )
                champion_dice = dice_of(k.summary)
            # The challenger's score is the evaluate stage's (same weights, same split, same settings).
            decision = registry.decide(float(ev["dice_mean"]), champion_dice, margin)
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
            registry.TAG_EVAL_CASES: ev.get("n_cases"),
        }
        registry.tag_version(cl, name, version, tags)
        if decision.promote:
            registry.set_alias(cl, name, registry.CHAMPION, version)
        note = version_note(ing, tr, ev, split, version, decision, champ_version)
        registry.describe_version(cl, name, version, note)
        registry.describe_model(cl, name, model_note(ctx, cl, split))
        run.set_description(f"`{name}` {note}")
        run.set_tags({**tags, "tumorseg.model_version": version})
        run.log_metrics(
            {
                "challenger_dice": decision.challenger_dice,
                "champion_dice": float("nan") if decision.champion_dice is None else decision.champion_dice,
            }
        )
        ctx.parent_tags(tags)
        return {"version": version, "run_id": run.run_id}


def check_label_set(cl: Any, name: str, labels: str) -> None:
    """Refuse (one line, before registering) a model whose label set is not the champion's.

    Dice means over different classes do not compare; a model of another label set belongs under
    another registered name. Versions registered before label sets existed are binary.
    """
    champ = registry.get_alias(cl, name, registry.CHAMPION)
    if champ is None:
        return
    theirs = (champ.tags or {}).get(registry.TAG_LABELS, "binary")
    if theirs != labels:
        raise TumorsegError(f"registry {name}: champion v{champ.version} predicts labels {theirs} but this model "
                            f"predicts {labels}; models of different label sets are not compared: set "
                            "registry.model_name to another name for this label set")


def outcome_phrase(version: str, decision: registry.Decision, champ_version: str | None) -> str:
    """``v2 promoted to champion, replacing v1`` and the like."""
    if decision.outcome == "first_champion":
        return f"v{version} promoted to champion (the first)"
    if decision.promote:
        return f"v{version} promoted to champion, replacing v{champ_version}"
    keeper = f"v{champ_version} stays champion" if champ_version else "no champion yet"
    return f"v{version} not promoted ({keeper})"


def version_note(ing: dict[str, Any], tr: dict[str, Any], ev: dict[str, Any], split: str, version: str,
                 decision: registry.Decision, champ_version: str | None) -> str:
    """A version's description, decision first: test Dice against the champion's, data, training run."""
    rival = ("" if decision.champion_dice is None
             else f" (champion v{champ_version}: {decision.champion_dice:.4f} on the same cases)")
    return (
        f"{outcome_phrase(version, decision, champ_version)}: test Dice {decision.challenger_dice:.4f} on "
        f"{ev.get('n_cases', '?')} `{split}` cases{rival}. Trained on manifest `{Path(ing['manifest_dir']).name}` "
        f"(digest `{ing['dataset_digest'][:12]}`, {ing.get('n_cases', '?')} cases) in training run "
        f"`{tr['mlflow_run_id']}` (best val Dice {tr['best_val_dice']:.4f}). Rule: {decision.reason}. "
        f"Evaluate run `{ev.get('run_id')}`."
    )


def model_note(ctx: Cycle, cl: Any, split: str) -> str:
    """The registered model's description: what it does, the data, the plan, the promotion rule, how to load."""
    cfg = ctx.cfg
    name = cfg.registry.model_name
    icfg = cfg.ingest_config(ctx.tracking)
    champ = registry.get_alias(cl, name, registry.CHAMPION)
    if champ is None:
        current = "no champion yet (no version has a scorable test Dice)."
    else:
        t = champ.tags or {}
        current = (f"**v{champ.version}**, test Dice {float(t.get(registry.TAG_CHALLENGER_DICE, 'nan')):.4f} on "
                   f"{t.get(registry.TAG_EVAL_CASES, '?')} `{t.get(registry.TAG_SPLIT, split)}` cases of manifest "
                   f"`{t.get(registry.TAG_MANIFEST, '?')}` (digest `{t.get(registry.TAG_DIGEST, '?')[:12]}`).")
    classes = Classes(icfg.labels, icfg.regions)
    what = (f"a label map ({classes.describe()}; mean Dice over the tumour classes)" if classes.multiclass
            else "a binary tumour mask")
    plan, dims = champion_plan(cl, champ)
    groups = f"pattern `{icfg.group_pattern}`" if icfg.group_pattern else f"by {icfg.group_by}"
    return "\n".join([
        f"Tumour segmentation: {what} per {'volume' if dims == 3 else '2-D image'}, trained by the tumorseg "
        f"pipeline `{cfg.name}`.",
        "",
        f"- **Data**: manifest `{icfg.name}` from `{icfg.source}`, split by patient group "
        f"({groups}, fractions {list(icfg.fractions)}, seed {icfg.seed}) "
        "into train / val / test; each version trains on train and keeps its best-val-Dice epoch.",
        f"- **Plan**: {plan}",
        f"- **Promotion**: every version is `@challenger`; it takes `@champion` when its mean Dice on the "
        f"`{split}` split beats the champion's on the same cases by at least {cfg.registry.margin:g}.",
        f"- **Champion**: {current}",
        f"- **Load**: `mlflow.pyfunc.load_model(\"models:/{name}@champion\")`, or "
        f"`tumorseg predict models:/{name}@champion IMAGES OUT_DIR`.",
    ])


def champion_plan(cl: Any, champ: Any) -> tuple[str, int]:
    """The champion's training settings as planned (its train run's parameters), and its spatial dimensions."""
    import json

    fallback = "each version's training run holds its plan (`plan.json`) and settings.", 2
    if champ is None:
        return fallback
    try:
        p = cl.get_run((champ.tags or {}).get(registry.TAG_TRAIN_RUN) or champ.run_id).data.params
        size = json.loads(p["image_size"])
    except Exception:  # noqa: BLE001 - a run deleted or logged by an older version: the note stays general
        return fallback
    return (f"`{p.get('model.name')}` channels {p.get('model.channels')}, {'x'.join(map(str, size))}, loss "
            f"`{p.get('loss.name')}`, up to {p.get('epochs')} epochs, batch {p.get('batch_size')}, normalisation "
            f"`{p.get('normalize')}` (the champion's training run, planned for its budget)."), len(size)
