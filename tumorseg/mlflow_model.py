"""The trained model as an ``mlflow.pyfunc`` model.

It wraps the network, its config and the pre/post-processing (:class:`tumorseg.inference.
Segmenter`), so it predicts on an image of any size: input ``float32 (C, H, W)`` (or
``(H, W)``), output a ``uint8 (H, W)`` mask in ``{0, 1}``; ``params={"probabilities":
True}`` returns ``float32`` probabilities instead. The model folder holds a slim checkpoint
(``artifacts/model.pt``, no optimiser state) and a copy of the ``tumorseg`` package, so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` needs only torch and MONAI.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

try:  # the class must subclass PythonModel, but mlflow stays out of `tumorseg --help`
    import mlflow.pyfunc as _pyfunc

    _Base: Any = _pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _Base = object

MODEL_ARTIFACT = "model"
CHECKPOINT_NAME = "model.pt"


class TumorsegPyfunc(_Base):  # type: ignore[misc]
    """pyfunc wrapper around :class:`tumorseg.inference.Segmenter`."""

    def load_context(self, context: Any) -> None:
        """Build the network from the slim checkpoint artifact."""
        from tumorseg.inference import Segmenter

        self.segmenter = Segmenter.from_checkpoint(context.artifacts["checkpoint"], device="auto")

    def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]  # noqa: ANN001
        """Mask (or probabilities) for one ``(C, H, W)``/``(H, W)`` image, or a list of them."""
        probabilities = bool((params or {}).get("probabilities", False))
        single = isinstance(model_input, np.ndarray)
        images = [model_input] if single else list(model_input)
        arrays = [np.asarray(a, dtype=np.float32) for a in images]
        arrays = [a[None] if a.ndim == 2 else a for a in arrays]
        if probabilities:
            out: list[np.ndarray] = self.segmenter.predict_proba(arrays)
        else:
            out = self.segmenter.predict_masks(arrays)
        return out[0] if single else out


def _pin(pkg: str) -> str:
    try:
        return f"{pkg}=={version(pkg).split('+')[0]}"
    except PackageNotFoundError:  # pragma: no cover
        return pkg


def log_segmenter_model(best: Path, run_dir: Path, example: np.ndarray | None) -> str:
    """Log the best checkpoint as a pyfunc model in the active run; return its model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    from tumorseg import checkpoint

    slim = checkpoint.write_slim(best, run_dir / CHECKPOINT_NAME)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1))]),
        params=ParamSchema([ParamSpec("probabilities", "boolean", False)]),
    )
    reqs = [_pin(p) for p in ("torch", "monai", "numpy", "pydantic", "pyyaml", "pandas", "pillow", "tifffile",
                              "nibabel", "scikit-image")]
    import warnings

    with warnings.catch_warnings():
        # predict() takes ndarray or list input by design; the signature documents it.
        warnings.filterwarnings("ignore", message=".*type hint.*", category=UserWarning)
        info = _log_model(slim, signature, reqs, example)
    log.info("logged MLflow model %s", info.model_uri)
    return str(info.model_uri)


def _log_model(slim: Path, signature: Any, reqs: list[str], example: np.ndarray | None) -> Any:
    import mlflow

    import tumorseg

    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"checkpoint": str(slim)},
        code_paths=[str(Path(tumorseg.__file__).parent)],
        pip_requirements=reqs,
        signature=signature,
        input_example=None if example is None else np.asarray(example, dtype=np.float32),
    )
