"""``tumorseg predict``: write a mask for every input image (see :mod:`tumorseg.predict.stage`)."""

from tumorseg.predict.stage import PredictResult, run

__all__ = ["PredictResult", "run"]
