"""Inference: pre/post-processing, device choice and the :class:`Segmenter`.

Train's validation, ``evaluate``, ``predict`` and the MLflow pyfunc model all predict
through the functions here, so they share one preprocessing and one resize-back rule:
the network sees the image normalised (:func:`normalize`) and resized to ``image_size``;
its logits are resized back (bilinear) to the original size before the sigmoid and threshold.

The normalisation rule travels in the checkpoint (``intensity``), so every stage applies the
rule the model was trained with, and a checkpoint written before a rule existed keeps its own:

* ``{"mean", "std", "percentiles"}`` (``normalize: percentile``, the default): each image is
  first scaled by its own 0.5/99.5 percentiles to about [0, 1], then z-scored by the training
  split's mean/std of the scaled images. The same picture stored as 8-bit, as 16-bit (x257) or
  as 12-bit in a 16-bit container (x16) gives the same network input.
* ``{"mean", "std"}`` (``normalize: dataset``): z-scored by the training split's mean/std in the
  stored units (physical units such as CT Hounsfield; a 16-bit file given to an 8-bit model
  is out of range).
* ``None`` (``normalize: image``): each image z-scored by its own mean/std (nnU-Net's non-CT rule).

A separate intensity *fingerprint* of the raw training images (``intensity_fingerprint``)
lets :meth:`Segmenter.intensity_outside_training` say when an input's stored range is far from
what the model saw.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg import checkpoint
from tumorseg.config import TrainConfig
from tumorseg.errors import TumorsegError
from tumorseg.imageio import to_channels

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


Stats = dict[str, list[float]]
"""Per-channel intensity statistics ``{"mean": [...], "std": [...]}`` of a training split, plus
``"percentiles": [0.5, 99.5]`` when each image is first scaled by its own percentiles."""

Fingerprint = dict[str, float]
"""Raw intensity range of the training images: the mean of their per-image 0.5 and 99.5 percentiles
(``p0_5``, ``p99_5``), the lowest and highest per-image 99.5 percentile (``p99_5_min``, ``p99_5_max``)
and ``n_images``."""

SCALE_PERCENTILES = (0.5, 99.5)
"""Per-image percentiles mapped to 0 and 1 by ``normalize: percentile``."""
RANGE_FACTOR = 4.0
"""An input whose 99.5th percentile is more than this factor above (or below) every training image's is
reported (:meth:`Segmenter.intensity_outside_training`)."""


def percentile_scale(image: np.ndarray, percentiles: tuple[float, float] | list[float] = SCALE_PERCENTILES
                     ) -> np.ndarray:
    """``(x - p_lo) / (p_hi - p_lo)`` with the image's own percentiles (over all channels, so colours keep).

    Invariant to the stored scale and offset (8-bit, 16-bit x257, 12-bit in 16-bit x16 give the same
    result). A nearly constant image falls back to its min/max; a constant one becomes 0.
    """
    img = image.astype(np.float32, copy=False)
    lo, hi = (float(v) for v in np.percentile(img, [float(percentiles[0]), float(percentiles[1])]))
    if not hi > lo:
        lo, hi = float(img.min()), float(img.max())
    if not hi > lo:
        return np.zeros_like(img)
    return (img - np.float32(lo)) / np.float32(hi - lo)


def normalize(image: np.ndarray, stats: Stats | None = None) -> np.ndarray:
    """Normalise a ``(C, H, W)`` float image by the rule ``stats`` holds (see the module docstring).

    With ``stats`` every image is scaled by the training split's mean/std - after its own
    percentile scaling when ``stats`` has ``percentiles`` - one affine map for all images, so
    an image's mean and spread are not forced to 0 and 1. Without, each image is z-scored by
    its own statistics (``normalize: image``; constant images -> 0).
    """
    img = image.astype(np.float32, copy=False)
    if stats is not None:
        if stats.get("percentiles"):
            img = percentile_scale(img, stats["percentiles"])
        mean = np.asarray(stats["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(stats["std"], dtype=np.float32)[:, None, None]
        return (img - mean) / np.where(std > 1e-8, std, 1.0)
    mean = img.mean(axis=(1, 2), keepdims=True)
    std = img.std(axis=(1, 2), keepdims=True)
    return (img - mean) / np.where(std > 1e-8, std, 1.0)


def intensity_sums(images: list[np.ndarray], in_channels: int,
                   percentiles: tuple[float, float] | list[float] | None = None) -> np.ndarray:
    """``(3, C)`` float64 per-channel pixel count, sum and sum of squares (reducible across ranks).

    With ``percentiles`` each image is percentile-scaled first (:func:`percentile_scale`).
    """
    out = np.zeros((3, in_channels), dtype=np.float64)
    for image in images:
        img = to_channels(image, in_channels)
        if percentiles is not None:
            img = percentile_scale(img, percentiles)
        img = img.astype(np.float64)
        out[0] += img.shape[1] * img.shape[2]
        out[1] += img.sum(axis=(1, 2))
        out[2] += np.square(img).sum(axis=(1, 2))
    return out


def stats_from_sums(sums: np.ndarray, percentiles: tuple[float, float] | list[float] | None = None) -> Stats:
    """Mean and std per channel from :func:`intensity_sums` (with the ``percentiles`` they were scaled by)."""
    n = np.maximum(sums[0], 1.0)
    mean = sums[1] / n
    std = np.sqrt(np.maximum(sums[2] / n - mean**2, 0.0))
    out: Stats = {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    if percentiles is not None:
        out["percentiles"] = [float(percentiles[0]), float(percentiles[1])]
    return out


def raw_range(image: np.ndarray) -> tuple[float, float]:
    """The stored 0.5 and 99.5 percentiles of an image or volume (on at most ~1M evenly spaced values)."""
    flat = np.asarray(image).reshape(-1)
    step = max(1, flat.size // 1_000_000)
    lo, hi = np.percentile(flat[::step], SCALE_PERCENTILES)
    return float(lo), float(hi)


def range_sums(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``[sum p0.5, sum p99.5, n]`` (SUM-reducible) and ``[max p99.5, -min p99.5]`` (MAX-reducible) of raw images."""
    sums = np.zeros(3, dtype=np.float64)
    maxes = np.array([-np.inf, -np.inf], dtype=np.float64)
    for image in images:
        lo, hi = raw_range(image)
        sums += (lo, hi, 1.0)
        maxes = np.maximum(maxes, (hi, -hi))
    return sums, maxes


def fingerprint_from_sums(sums: np.ndarray, maxes: np.ndarray) -> Fingerprint | None:
    """The :data:`Fingerprint` from :func:`range_sums` (``None`` without images)."""
    n = float(sums[2])
    if n < 1:
        return None
    return {"p0_5": float(sums[0] / n), "p99_5": float(sums[1] / n), "p99_5_min": float(-maxes[1]),
            "p99_5_max": float(maxes[0]), "n_images": n}


def legacy_fingerprint(stats: Stats | None) -> Fingerprint | None:
    """An approximate fingerprint for checkpoints written before fingerprints existed.

    ``mean + 3 std`` of the stored-unit statistics stands in for the highest training 99.5th
    percentile; the lowest is unknown (0: no check below). ``None`` for checkpoints without
    stored-unit statistics.
    """
    if not stats or stats.get("percentiles") or not stats.get("mean"):
        return None
    ref = max(m + 3.0 * s for m, s in zip(stats["mean"], stats["std"], strict=True))
    if not ref > 0:
        return None
    return {"p0_5": 0.0, "p99_5": ref, "p99_5_min": 0.0, "p99_5_max": ref, "n_images": 0.0}


def range_message(image: np.ndarray, fingerprint: Fingerprint | None, stats: Stats | None) -> str | None:
    """Why ``image``'s stored intensities are far from the training images', or ``None``.

    Far means its 99.5th percentile is more than :data:`RANGE_FACTOR` times the highest training
    image's, or less than that fraction of the lowest one's.
    """
    if not fingerprint:
        return None
    lo_t, hi_t = float(fingerprint["p99_5_min"]), float(fingerprint["p99_5_max"])
    _, hi = raw_range(image)
    above = hi_t > 0 and hi > RANGE_FACTOR * hi_t
    below = lo_t > 0 and hi * RANGE_FACTOR < lo_t  # ratios mean nothing for signed data (CT): no lower check
    if not (above or below):
        return None
    if above:
        how = f"{hi / hi_t:.0f}x above"
    else:
        how = f"{lo_t / hi:.0f}x below" if hi > 0 else "far below"
    trained = f"{lo_t:g}" if lo_t == hi_t else f"{lo_t:g}-{hi_t:g}"
    if fingerprint.get("n_images", 1.0) == 0:
        trained = f"~{hi_t:g} (estimated from the checkpoint's mean/std)"
    head = (f"intensities up to {hi:g} (99.5th percentile), {how} the training images' {trained} - another "
            "bit depth (16-bit, 12-bit in 16) or another kind of image?")
    if stats is not None and not stats.get("percentiles"):
        return (f"{head} This model normalises in the training images' stored units (normalize: dataset), so its "
                "predictions on this image are likely wrong: store it like the training images, or retrain with "
                "normalize: percentile")
    return (f"{head} The model scales each image by its own intensity range, so the bit depth alone does not "
            "change its predictions; check that this is the kind of image it was trained on")


def preprocess(
    image: np.ndarray, size: tuple[int, int], in_channels: int, stats: Stats | None = None
) -> torch.Tensor:
    """``(C, H, W)`` image -> ``float32 (in_channels, *size)`` network input."""
    import torch
    import torch.nn.functional as F

    arr = normalize(to_channels(image, in_channels), stats)
    t = torch.from_numpy(np.ascontiguousarray(arr))[None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return t[0]


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``{0, 1} (H, W)`` mask -> ``float32 (1, *size)`` training target (area-resampled, >= 0.5)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = (F.interpolate(t, size=size, mode="area") >= 0.5).float()
    return t[0]


def logits_to_original(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(1, h, w)`` logits -> ``(H, W)`` probabilities at the original size."""
    import torch
    import torch.nn.functional as F

    x = logits.float()[None]
    if tuple(x.shape[-2:]) != tuple(shape):
        x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False)
    return torch.sigmoid(x)[0, 0]


# ----------------------------------------------------------------------------- device


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present else CPU; asking for CUDA without one is an error."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise TumorsegError("device=cuda but no CUDA GPU is visible; use --set device=cpu (or auto)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where supported, else fp16 on CUDA; ``None`` (fp32) on CPU or when disabled."""
    import torch

    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------- inference


class Segmenter:
    """A trained network plus everything needed to predict on images of any size.

    Args:
        net: the network (eval mode is set here).
        config: the training config (image size, model, threshold).
        in_channels: channels the network takes (images are converted to match).
        device: where to run.
        stats: the normalisation rule and statistics (the checkpoint's ``intensity``; see the module docstring).
        fingerprint: the training images' raw range (the checkpoint's ``intensity_fingerprint``); older
            checkpoints get an estimate from ``stats`` (:func:`legacy_fingerprint`) or none.
    """

    def __init__(
        self, net: torch.nn.Module, config: TrainConfig, in_channels: int, device: torch.device,
        stats: Stats | None = None, fingerprint: Fingerprint | None = None,
    ) -> None:
        self.net = net.to(device).eval()
        self.stats = stats
        self.fingerprint = fingerprint or legacy_fingerprint(stats)
        self.config = config
        self.in_channels = in_channels
        self.device = device
        self.threshold = config.threshold
        self._amp = amp_dtype(device, config.amp)
        self.checkpoint_meta: dict[str, Any] = {}
        if device.type == "cuda" and config.channels_last:
            import torch

            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> Segmenter:
        """Load a checkpoint written by ``tumorseg train`` (``best.pt``, ``last.pt`` or a model's ``model.pt``).

        Raises:
            TumorsegError: missing, corrupt or foreign checkpoint (one line naming the file).
        """
        from pydantic import ValidationError

        ckpt = checkpoint.load(path)
        try:
            cfg = checkpoint.train_config(ckpt)
            from tumorseg.model import build_model

            net = build_model(cfg.model, int(ckpt["in_channels"]))
            net.load_state_dict(ckpt["model"])
        except ValidationError as exc:
            raise TumorsegError(f"{path}: checkpoint config is not a valid tumorseg TrainConfig "
                                f"({exc.error_count()} problem(s)); it was written by another version or tool"
                                ) from exc
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            detail = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
            raise TumorsegError(f"{path}: corrupt or foreign checkpoint ({detail}); "
                                "use a best.pt/last.pt written by tumorseg train") from exc
        seg = cls(net, cfg, int(ckpt["in_channels"]), resolve_device(device), ckpt.get("intensity"),
                  ckpt.get("intensity_fingerprint"))
        seg.checkpoint_meta = {k: ckpt.get(k) for k in checkpoint.META_KEYS}
        return seg

    def intensity_outside_training(self, image: np.ndarray) -> str | None:
        """Why an image's (or volume's) stored intensities are far from the training images', else ``None``."""
        return range_message(image, self.fingerprint, self.stats)

    def predict_proba(self, images: list[np.ndarray], tta: bool = False) -> list[np.ndarray]:
        """Tumour probabilities ``float32 (H, W)`` for ``(C, H, W)`` images of any sizes.

        With ``tta`` the prediction is averaged over horizontal and vertical flips.
        """
        import torch

        if not images:
            return []
        size = (int(self.config.image_size[0]), int(self.config.image_size[1]))
        batch = torch.stack([preprocess(img, size, self.in_channels, self.stats) for img in images]).to(self.device)
        if self.device.type == "cuda" and self.config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._amp or torch.float32,
                                                    enabled=self._amp is not None):
            logits = self.net(batch).float()
            if tta:
                logits = logits + torch.flip(self.net(torch.flip(batch, dims=(3,))).float(), dims=(3,))
                logits = logits + torch.flip(self.net(torch.flip(batch, dims=(2,))).float(), dims=(2,))
                logits = logits / 3.0
        out = []
        for i, img in enumerate(images):
            prob = logits_to_original(logits[i], (int(img.shape[1]), int(img.shape[2])))
            out.append(prob.cpu().numpy().astype(np.float32))
        return out

    def predict_masks(self, images: list[np.ndarray], tta: bool = False,
                      threshold: float | None = None) -> list[np.ndarray]:
        """Binary ``uint8 (H, W)`` masks (probability > threshold)."""
        t = self.threshold if threshold is None else threshold
        return [(p > t).astype(np.uint8) for p in self.predict_proba(images, tta=tta)]


def channels_compatible(image_channels: int, model_channels: int) -> bool:
    """Whether images with ``image_channels`` can feed a model taking ``model_channels``.

    Equal counts always work; grey and RGB convert into each other (:func:`tumorseg.imageio.to_channels`).
    """
    return image_channels == model_channels or (image_channels in (1, 3) and model_channels in (1, 3))
