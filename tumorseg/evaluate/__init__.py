"""``tumorseg evaluate``: score a trained model on one split of a manifest (see :mod:`tumorseg.evaluate.stage`)."""

from tumorseg.evaluate.stage import CLASS_FILES, FILES, HEADLINE, EvaluateResult, run
from tumorseg.metrics import distribution

__all__ = ["CLASS_FILES", "FILES", "HEADLINE", "EvaluateResult", "distribution", "run"]
