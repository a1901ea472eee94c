"""The trained model as an ``mlflow.pyfunc`` model.

It wraps the network, its config and the pre/post-processing (:class:`tumorseg.inference.
Segmenter`), so it predicts on images of any size. One float array goes in; its rank says what
it is:

* ``(H, W)``: one grey image, and ``(C, H, W)``: one image with C channels -> a ``uint8 (H, W)`` mask;
* ``(N, C, H, W)``: a batch of N images of one size -> ``uint8 (N, H, W)`` masks.

A 3D model (trained on volumes, ``tumorseg_spatial_dims`` 3 in its metadata) takes one more axis:
``(D, H, W)`` or ``(C, D, H, W)`` one volume, ``(N, C, D, H, W)`` a batch, in the canonical RAS+ axis order
of :mod:`tumorseg.imageio.volume` (``tumorseg predict`` reorients NIfTI files itself). A model planned with a
target spacing (``target_spacing``: each volume resampled to that voxel size, :mod:`tumorseg.placement`) takes
the volumes' voxel size in mm as ``params={"spacing": [dx, dy, dz]}`` (canonical axes); without it, the
signature's default, the training volumes' median (``input_spacing``), is assumed. An older 3D model needs no
spacing: every volume is stretched to its training grid (``image_size``). Predictions come back on each
volume's own voxels.

A model trained with slice context (2.5D, ``tumorseg_slice_context`` in its metadata) takes the same shapes
and reads a batch (or a list) as **one ordered stack of consecutive slices** of a volume: each slice's
neighbours are the arrays before and after it (the ends repeat the edge slice), so send a volume's slices
in order, one volume per request; a single image is a stack of one. So does a model whose post-processing
is volumetric (``tumorseg_volumetric_postprocess``: its component rule spans the slices of a stack, chosen on
val for slice stacks): its masks are those of the batch as one stack.

Masks hold ``{0, 1}``; ``params={"probabilities": True}`` returns ``float32`` probabilities of
the same shape instead. A multi-class model returns label maps of its declared values (``uint8``),
and probabilities with one channel per class after the batch axis (``(K, H, W)``, ``(N, K, H, W)``);
its labels travel in the checkpoint and in the model's metadata (``tumorseg_labels``).
A batch of grey images is ``(N, 1, H, W)``: a 3-D array is always *one*
image, so ``(3, H, W)`` is one RGB image. Grey and RGB convert into each other to match the
network; any other channel count, or another rank, is an error naming the shape. From Python, a
list of 2-D/3-D arrays (sizes may differ) also works and returns a list of masks; the scoring
server takes one array (``{"inputs": [...]}``).

The logged signature declares the ``probabilities`` param but no input schema: MLflow checks a
tensor's rank exactly, so one ``TensorSpec`` cannot admit all three ranks; :func:`as_images` checks
them instead. The model folder holds a slim checkpoint (``artifacts/model.pt``, no optimiser
state), a copy of the ``tumorseg`` package and a small input example (a batch of one image), so
``mlflow.pyfunc.load_model("models:/NAME@champion")`` needs only torch and MONAI (and torchvision for a
torchvision encoder, which the logged requirements then name).
"""

from __future__ import annotations

import logging
import math
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.errors import TumorsegError
from tumorseg.imageio import nonfinite

log = logging.getLogger(__name__)

try:  # the class must subclass PythonModel, but mlflow stays out of `tumorseg --help`
    import mlflow.pyfunc as _pyfunc

    _Base: Any = _pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _Base = object

MODEL_ARTIFACT = "model"
CHECKPOINT_NAME = "model.pt"
EXAMPLE_SIDE = 32
"""The input example is a real validation image subsampled to at most this many pixels a side."""
CHUNK = 16
"""Images per forward pass; a larger batch is predicted in chunks of this size."""
SHAPES = "send one image as (H, W) or (C, H, W), a batch as (N, C, H, W)"
VOLUME_SHAPES = "send one volume as (D, H, W) or (C, D, H, W), a batch as (N, C, D, H, W)"


def as_images(array: Any, in_channels: int, spatial: int = 2) -> tuple[list[np.ndarray], bool]:
    """Split a model input into ``float32 (C, H, W)`` images (``(C, D, H, W)`` volumes) by its rank.

    Args:
        array: ``(H, W)`` or ``(C, H, W)`` (one image) or ``(N, C, H, W)`` (a batch); for a 3D model
            (``spatial=3``) ``(D, H, W)`` or ``(C, D, H, W)`` (one volume) or ``(N, C, D, H, W)``.
        in_channels: channels the network takes (1 and 3 convert into each other).
        spatial: the model's spatial dimensions.

    Returns:
        The images and whether the input was a single image.

    Raises:
        TumorsegError: not numeric, another rank, an empty image, NaN or infinite values, or a channel count the
            model cannot use.
    """
    try:
        arr = np.asarray(array, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise TumorsegError(f"model input is not a numeric array ({exc}); {SHAPES}") from exc
    shapes = VOLUME_SHAPES if spatial == 3 else SHAPES
    if arr.ndim not in range(spatial, spatial + 3):
        raise TumorsegError(f"model input of shape {arr.shape} has {arr.ndim} dimension(s); {shapes}")
    single = arr.ndim < spatial + 2
    batch = arr[None, None] if arr.ndim == spatial else arr[None] if arr.ndim == spatial + 1 else arr
    if 0 in batch.shape[1:]:
        raise TumorsegError(f"model input of shape {arr.shape} holds an empty image; {shapes}")
    if bad := nonfinite(arr):
        raise TumorsegError(f"model input holds {bad}")
    from tumorseg.inference import channels_compatible

    channels = int(batch.shape[1])
    if not channels_compatible(channels, in_channels, spatial == 3):
        read_as = "one image" if single else f"a batch of {batch.shape[0]} images"
        hint = f"; a batch of {in_channels}-channel images is (N, {in_channels}, H, W)" if single else ""
        raise TumorsegError(f"model input of shape {arr.shape} reads as {read_as} with {channels} channels, but "
                            f"the model takes {in_channels} channel(s){hint}; {shapes}")
    return list(batch), single


class TumorsegPyfunc(_Base):  # type: ignore[misc]
    """pyfunc wrapper around :class:`tumorseg.inference.Segmenter` (input rules in the module docstring)."""

    def load_context(self, context: Any) -> None:
        """Build the network from the slim checkpoint artifact."""
        from tumorseg.inference import Segmenter

        self.segmenter = Segmenter.from_checkpoint(context.artifacts["checkpoint"], device="auto")

    # `np.ndarray` as the type hint: MLflow infers no schema from it (the rank rules are checked
    # here) and does not warn that `predict` lacks type hints.
    def predict(
        self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray | list[np.ndarray]:
        """Masks (or probabilities) for one image, a batch, or (from Python) a list of images.

        Args:
            context: MLflow's model context (unused; the network is loaded in :meth:`load_context`).
            model_input: ``(H, W)``/``(C, H, W)`` one image, ``(N, C, H, W)`` a batch (an array or
                nested lists); from Python also a list of 2-D/3-D ``np.ndarray`` images.
            params: ``{"probabilities": True}`` for ``float32`` probabilities instead of masks; a 3D model with a
                target spacing also takes ``{"spacing": [dx, dy, dz]}``, the volumes' voxel size.

        Returns:
            ``(H, W)`` for one image, ``(N, H, W)`` for a batch, a list for a list.

        Raises:
            MlflowException: (invalid parameter value, HTTP 400 from the scoring server) an input
                it cannot read, naming its shape.
        """
        from mlflow.exceptions import MlflowException

        from tumorseg.inference import spacing_problem  # (tumorseg.placement's, through the layer allowed here)

        probabilities = bool((params or {}).get("probabilities", False))
        channels = self.segmenter.base_channels
        spatial = self.segmenter.config.spatial_dims
        try:
            spacing = _spacing((params or {}).get("spacing"))
            if why := spacing_problem(self.segmenter.config, spacing):
                raise TumorsegError(f"params spacing: {why}")
            if isinstance(model_input, list | tuple) and model_input and all(
                    isinstance(item, np.ndarray) for item in model_input):
                images = []
                for item in model_input:
                    one, single = as_images(item, channels, spatial)
                    if not single:
                        raise TumorsegError(f"a list item of shape {np.shape(item)} is a batch; give a list "
                                            "of (H, W) or (C, H, W) images, or one (N, C, H, W) array")
                    images += one
                return self._predict(images, probabilities, spacing)
            images, single = as_images(model_input, channels, spatial)
        except TumorsegError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from exc
        if not images:  # an empty batch (0, C, H, W)
            shape = np.shape(model_input)
            return np.zeros((0, *shape[2:]), dtype=np.float32 if probabilities else np.uint8)
        out = self._predict(images, probabilities, spacing)
        return out[0] if single else np.stack(out)

    def _predict(self, images: list[np.ndarray], probabilities: bool,
                 spacing: tuple[float, ...] | None = None) -> list[np.ndarray]:
        # in chunks: a client may post a large batch, and the network's activations grow with it
        seg = self.segmenter
        images = seg.stack(images)  # 2.5D: the images are one ordered stack of slices
        chunk = seg.batch_for(CHUNK)
        out = [o for i in range(0, len(images), chunk)
               for o in seg.predict_proba(images[i:i + chunk], spacings=[spacing] * len(images[i:i + chunk]))]
        if not probabilities:  # volumetric post-processing: the images are one ordered stack of slices
            out = seg.stack_masks(out)
        if not probabilities and seg.classes.multiclass:
            out = [seg.classes.to_values(o) for o in out]
        return out


def _spacing(value: Any) -> tuple[float, ...] | None:
    """The ``spacing`` param: three positive voxel sizes (mm, canonical axes), else ``None`` (the model's own).

    Raises:
        TumorsegError: a value that is not three positive numbers.
    """
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        out = ()
    if len(out) == 3 and all(v > 0 for v in out):
        return out
    if out and all(v == 0 for v in out):  # the signature's default: not given
        return None
    raise TumorsegError(f"params spacing {value!r}: give three positive voxel sizes in mm (canonical RAS+ axes of "
                        "the input), or leave it out for the model's input_spacing")


def _pin(pkg: str) -> str:
    try:
        return f"{pkg}=={version(pkg).split('+')[0]}"
    except PackageNotFoundError:  # pragma: no cover
        return pkg


def input_example(image: np.ndarray | None, in_channels: int) -> np.ndarray:
    """A batch of one ``float32 (1, C, h, w)`` image, subsampled to at most :data:`EXAMPLE_SIDE` a side.

    Small, so ``serving_input_example.json`` stays readable; ``None`` gives a blank image.
    """
    if image is None:
        return np.zeros((1, in_channels, EXAMPLE_SIDE, EXAMPLE_SIDE), dtype=np.float32)
    img = np.asarray(image, dtype=np.float32)
    img = img[None] if img.ndim == 2 else img
    step = max(1, math.ceil(max(img.shape[1:]) / EXAMPLE_SIDE))
    every = (slice(None, None, step),) * (img.ndim - 1)  # each spatial axis of an image or a volume
    return np.ascontiguousarray(img[(None, slice(None), *every)])


def log_segmenter_model(best: Path, run_dir: Path, example: np.ndarray | None) -> str:
    """Log the best checkpoint as a pyfunc model in the active run; return its model URI.

    Args:
        best: the checkpoint to log (written slim next to it in ``run_dir``).
        run_dir: the training run folder.
        example: one ``(C, H, W)`` validation image for the input example, or ``None``.
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    from tumorseg import checkpoint
    from tumorseg.inference import spacings  # (tumorseg.placement, through the layer this module may import)

    slim = checkpoint.write_slim(best, run_dir / CHECKPOINT_NAME)
    ckpt = checkpoint.load(slim)
    context = int(checkpoint.train_config(ckpt).slice_context)
    in_channels = int(ckpt["in_channels"]) // (2 * context + 1)  # what one input image holds
    classes = checkpoint.classes(ckpt)
    # No input schema: MLflow enforces a TensorSpec's rank exactly, and the model takes three ranks.
    params = [ParamSpec("probabilities", "boolean", False)]
    train_cfg = checkpoint.train_config(ckpt)
    resampled = spacings(train_cfg)  # (target, assumed when none is given), tumorseg.placement
    if resampled is not None:
        params.append(ParamSpec("spacing", "double", [float(v) for v in resampled[1]], shape=(-1,)))
    signature = ModelSignature(params=ParamSchema(params))
    packages = ["torch", "monai", "numpy", "pydantic", "pyyaml", "pandas", "pillow", "tifffile", "nibabel",
                "scikit-image"]
    model_cfg = checkpoint.train_config(ckpt).model
    from tumorseg.encoders import TORCHVISION_BACKBONES

    if model_cfg.name == "flexible_unet" and model_cfg.backbone in TORCHVISION_BACKBONES:
        packages.append("torchvision")  # the encoder is torchvision's network
    reqs = [_pin(p) for p in packages]
    metadata: dict[str, Any] = {
        "tumorseg_input": "float array: (H, W) or (C, H, W) one image; (N, C, H, W) a batch of one size",
        "tumorseg_output": "uint8 {0,1} mask (H, W) for one image, (N, H, W) for a batch; float32 "
                           "probabilities with params {'probabilities': true}",
        "tumorseg_in_channels": in_channels,
        "tumorseg_slice_context": context,
        "tumorseg_volumetric_postprocess": bool((ckpt.get("postprocess") or {}).get("volumetric", False)),
        "tumorseg_labels": classes.describe(),
        "tumorseg_input_normalization": checkpoint.input_normalization(checkpoint.train_config(ckpt),
                                                                       ckpt.get("intensity")),
    }
    metadata["tumorseg_spatial_dims"] = train_cfg.spatial_dims
    if train_cfg.spatial_dims == 3:
        grid = "x".join(str(v) for v in train_cfg.image_size)
        how = (f"no spacing needed: each volume is resampled to the training grid {grid} and predicted back to its "
               "own size") if resampled is None else (
               f"params spacing [dx, dy, dz] (mm, those axes; default {'x'.join(f'{v:g}' for v in resampled[1])}, the "
               f"training median): each volume is resampled to {'x'.join(f'{v:g}' for v in resampled[0])} mm in the "
               f"grid {grid} and predicted back onto its own voxels")
        metadata["tumorseg_input"] = ("float array in canonical RAS+ axis order: (D, H, W) or (C, D, H, W) one "
                                      f"volume; (N, C, D, H, W) a batch of one size; {how}")
        metadata["tumorseg_output"] = ("uint8 mask (D, H, W) for one volume, (N, D, H, W) for a batch (label maps of "
                                       "the declared values for a multi-class model); float32 probabilities with "
                                       "params {'probabilities': true}")
    if context:
        metadata["tumorseg_input"] += (f"; 2.5D (slice context {context}): a batch or list is one ordered stack of "
                                       "consecutive slices of a volume, each slice's neighbours taken from it")
    if classes.multiclass and train_cfg.spatial_dims == 2:
        metadata["tumorseg_output"] = ("uint8 label map of the values " + ", ".join(map(str, classes.values)) +
                                       " (H, W) for one image, (N, H, W) for a batch; float32 class "
                                       "probabilities (K, H, W) / (N, K, H, W) with params {'probabilities': true}")
    info = _log_model(slim, signature, reqs, input_example(example, in_channels), metadata)
    log.info("logged MLflow model %s", info.model_uri)
    return str(info.model_uri)


def _log_model(slim: Path, signature: Any, reqs: list[str], example: np.ndarray, metadata: dict[str, Any]) -> Any:
    import mlflow

    import tumorseg

    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={"checkpoint": str(slim)},
        code_paths=[str(Path(tumorseg.__file__).parent)],
        pip_requirements=reqs,
        signature=signature,
        input_example=example,
        metadata=metadata,
    )
