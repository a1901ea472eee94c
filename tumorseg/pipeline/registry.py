"""The MLflow model registry: register challengers, compare them with the champion, promote.

Each trained model becomes a new version of one registered model and gets the alias
``challenger``. It takes the alias ``champion`` only when its mean test Dice beats the
champion's, measured on the same split, by at least ``margin`` (the first version is
champion by default). The decision, both scores and the reason are written as tags on the
version, so the registry alone tells why each version was or was not promoted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"

# Tags on model versions. The digest is what "nothing new" compares against.
TAG_DIGEST = "tumorseg.dataset_digest"
TAG_MANIFEST = "tumorseg.manifest"
TAG_TRAIN_RUN = "tumorseg.train_run_id"
TAG_PIPELINE_RUN = "tumorseg.pipeline_run_id"
TAG_EVAL_RUN = "tumorseg.eval_run_id"
TAG_DECISION = "tumorseg.decision"
TAG_REASON = "tumorseg.decision_reason"
TAG_CHALLENGER_DICE = "tumorseg.challenger_test_dice"
TAG_CHAMPION_DICE = "tumorseg.champion_test_dice"
TAG_CHAMPION_VERSION = "tumorseg.compared_with_version"
TAG_MARGIN = "tumorseg.margin"
TAG_SPLIT = "tumorseg.eval_split"
TAG_EVAL_CASES = "tumorseg.eval_cases"
TAG_LABELS = "tumorseg.labels"
"""The label set a version predicts: ``binary`` or the ``--labels`` text (absent on versions made before it)."""

Outcome = Literal["first_champion", "promoted", "rejected"]


@dataclass(frozen=True)
class Decision:
    """Whether the challenger becomes champion, and why."""

    outcome: Outcome
    reason: str
    challenger_dice: float
    champion_dice: float | None
    margin: float

    @property
    def promote(self) -> bool:
        """True when the challenger takes the ``champion`` alias."""
        return self.outcome != "rejected"

    def tags(self) -> dict[str, str]:
        """Return the decision as string tags (for the model version and the pipeline run)."""
        return {
            TAG_DECISION: self.outcome,
            TAG_REASON: self.reason,
            TAG_CHALLENGER_DICE: _fmt(self.challenger_dice),
            TAG_CHAMPION_DICE: "none" if self.champion_dice is None else _fmt(self.champion_dice),
            TAG_MARGIN: _fmt(self.margin),
        }


def _fmt(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.6f}"


def decide(challenger_dice: float, champion_dice: float | None, margin: float) -> Decision:
    """Apply the promotion rule.

    Args:
        challenger_dice: the challenger's mean test Dice.
        champion_dice: the champion's mean test Dice on the same split, ``None`` when there
            is no champion yet.
        margin: how much better (absolute Dice) the challenger must be; ``0`` lets a tie promote
            the newer model.

    Returns:
        ``first_champion`` without a champion; ``promoted`` when
        ``challenger >= champion + margin``; otherwise ``rejected``. A NaN challenger score is
        never promoted, nor is a score of 0 (no overlap with any tumour: a run that did not learn,
        e.g. a budget spent before training); a NaN champion score loses to any finite challenger score.
    """
    c = float(challenger_dice)
    if champion_dice is None:
        if math.isnan(c) or c <= 0:
            why = "is NaN (no scorable test case)" if math.isnan(c) else "is 0: it found no tumour (did it train?)"
            return Decision("rejected", f"no champion yet, but the challenger's test Dice {why}", c, None, margin)
        return Decision(
            "first_champion", f"first model: no champion to compare with (test Dice {c:.4f})", c, None, margin
        )
    k = float(champion_dice)
    if math.isnan(c):
        return Decision("rejected", "challenger's test Dice is NaN (no scorable test case)", c, k, margin)
    if c <= 0:
        return Decision("rejected", "challenger's test Dice is 0: it found no tumour (did it train?)", c, k, margin)
    if math.isnan(k):
        return Decision("promoted", f"champion's test Dice is NaN; challenger scores {c:.4f}", c, k, margin)
    gain = c - k
    # A tiny tolerance: "at least margin" must not fail on float rounding of equal scores.
    if gain >= margin - 1e-12:
        return Decision(
            "promoted",
            f"test Dice {c:.4f} vs champion {k:.4f}: gain {gain:+.4f} >= margin {margin:g}",
            c,
            k,
            margin,
        )
    return Decision(
        "rejected",
        f"test Dice {c:.4f} vs champion {k:.4f}: gain {gain:+.4f} < margin {margin:g}",
        c,
        k,
        margin,
    )


def get_alias(cl: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """Return the version holding ``alias``; ``None`` when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return cl.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def get_version(cl: MlflowClient, name: str, version: str) -> ModelVersion | None:
    """One version, or ``None`` when it does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return cl.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def champion_digest(cl: MlflowClient, name: str) -> tuple[str, str | None] | None:
    """``(version, dataset digest)`` of the current champion, or ``None`` without one."""
    mv = get_alias(cl, name, CHAMPION)
    if mv is None:
        return None
    return str(mv.version), (mv.tags or {}).get(TAG_DIGEST)


def register(model_uri: str, name: str, tags: Mapping[str, Any]) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if needed); return the version."""
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items() if v is not None})
    log.info("registered %s as %s version %s", model_uri, name, mv.version)
    return str(mv.version)


def tag_version(cl: MlflowClient, name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Set string tags on one version."""
    for key, value in tags.items():
        if value is not None:
            cl.set_model_version_tag(name, version, key, str(value))


def describe_model(cl: MlflowClient, name: str, text: str) -> None:
    """Set the registered model's description (markdown, shown on its page in the MLflow UI)."""
    cl.update_registered_model(name, description=text)


def describe_version(cl: MlflowClient, name: str, version: str, text: str) -> None:
    """Set one version's description (markdown)."""
    cl.update_model_version(name, version, description=text)


def set_alias(cl: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` (moving it from any other version)."""
    cl.set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> version %s", name, alias, version)


def model_ref(name: str, version: str) -> str:
    """``models:/NAME/VERSION``: a reference that stays on one version even when aliases move."""
    return f"models:/{name}/{version}"
