"""From manifest rows to arrays.

* :mod:`tumorseg.data.reader`: :class:`CaseReader`, the one reader of image and mask files
  (hash-checked against the manifest), used by train, evaluate and the planner.
* :mod:`tumorseg.data.split`: train's preprocessed splits, built once by streaming, and
  :class:`RamSplit`, held in RAM or on the GPU.
* :mod:`tumorseg.data.disk`: the on-disk cache, :class:`DiskSplit`, for datasets larger than RAM.
"""

from tumorseg.data.reader import Case, CaseReader, infer_in_channels
from tumorseg.data.split import Batch, RamSplit, Split, Summary, storage_for

__all__ = ["Batch", "Case", "CaseReader", "RamSplit", "Split", "Summary", "infer_in_channels", "storage_for"]
