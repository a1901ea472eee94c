"""``tumorseg ingest``: image/mask folders -> ``data_manifest/NAME/``.

Discovery pairs files by stem (never by position), decoding runs in parallel worker
processes that return one small row per case (memory does not grow with the data), every
problem with an image file becomes a row of ``rejected.csv``, files that are not images by
their extension (a dataset's README, CSVs) become rows of ``ignored.csv``, and the four
output files are written atomically. Splits come from :mod:`tumorseg.splits`.

Modules: :mod:`.discover` (pairing), :mod:`.inspect` (decoding and checks, in worker
processes), :mod:`.stage` (splits, summary, the written files).
"""

from tumorseg.ingest.discover import Task, discover
from tumorseg.ingest.stage import IngestResult, run

__all__ = ["IngestResult", "Task", "discover", "run"]
