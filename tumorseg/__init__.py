"""tumorseg: tumour segmentation on MONAI and PyTorch, tracked in MLflow.

Stages run in order and talk through files on disk:
``ingest`` -> ``train`` -> ``evaluate`` -> ``predict``; ``pipeline`` chains them.
"""

from __future__ import annotations

__version__ = "0.1.0"
