"""Intensity normalisation: the rules, their statistics, and the raw-range fingerprint.

The normalisation rule travels in the checkpoint (``intensity``), so every stage applies the
rule the model was trained with, and a checkpoint written before a rule existed keeps its own:

* ``{"mean", "std", "percentiles"}`` (``normalize: percentile``, the default): each image is
  first scaled by its own 0.5/99.5 percentiles to about [0, 1], then z-scored by the training
  split's mean/std of the scaled images. The same picture stored as 8-bit, as 16-bit (x257) or
  as 12-bit in a 16-bit container (x16) gives the same network input.
* ``{"mean", "std"}`` (``normalize: dataset``): z-scored by the training split's mean/std in the
  stored units (physical units such as CT Hounsfield; a 16-bit file given to an 8-bit model
  is out of range).
* ``{"mean", "std", "clip"}`` (``normalize: ct``, nnU-Net's CT rule): clipped per channel to the 0.5/99.5
  percentiles of the training split's *foreground* voxels (label > 0) in stored units, then z-scored by the
  foreground's mean/std: the window a radiologist would set on the structures to segment.
* ``None`` (``normalize: image``): each image z-scored by its own mean/std (nnU-Net's non-CT rule).
* ``{"nonzero": True}`` (``normalize: nonzero``): each volume z-scored per channel by the mean/std of its
  voxels nonzero in any channel (holes filled), the others left at 0 (nnU-Net's z-score with
  ``use_mask_for_norm``, for masked scans such as a skull-stripped brain, whose zero background would otherwise
  count).

The dataset part (clip and affine map, :func:`finish`) is applied after resizing, in training and in
inference alike; the per-image part (:func:`prescale`) before.

A separate intensity *fingerprint* of the raw training images (``intensity_fingerprint``)
lets :meth:`Segmenter.intensity_outside_training` say when an input's stored range is far from
what the model saw.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


Stats = dict[str, Any]
"""Per-channel intensity statistics ``{"mean": [...], "std": [...]}`` (lists of floats) of a training split,
plus ``"percentiles": [0.5, 99.5]`` when each image is first scaled by its own percentiles, or ``"clip":
[[low, high], ...]`` (one window per channel) under ``normalize: ct``; ``{"nonzero": True}`` alone under
``normalize: nonzero`` (a per-volume rule without dataset statistics)."""

Fingerprint = dict[str, float]
"""Raw intensity range of the training images: the mean of their per-image 0.5 and 99.5 percentiles
(``p0_5``, ``p99_5``), the lowest and highest per-image 99.5 percentile (``p99_5_min``, ``p99_5_max``)
and ``n_images``."""

FOREGROUND_SAMPLES = 10_000
"""Foreground voxels drawn per case and channel for ``normalize: ct`` (nnU-Net samples its intensity
properties the same way; the draw is seeded, so a rebuild gives the same statistics)."""
FOREGROUND_TOTAL = 10_000_000
"""At most this many foreground voxels per channel over the whole split (nnU-Net's cap): a large split draws
fewer per case, so the samples held while the cache is built do not grow with the number of cases."""


def foreground_per_case(n_cases: int) -> int:
    """Foreground voxels drawn per case of a split of ``n_cases`` (:data:`FOREGROUND_SAMPLES`, capped by the total)."""
    return max(1, min(FOREGROUND_SAMPLES, FOREGROUND_TOTAL // max(1, n_cases)))

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
    its own statistics (``normalize: image``; constant images -> 0). It is
    :func:`prescale` (per image) followed by :func:`affine` (the dataset's map).
    """
    return finish(prescale_for(image, stats), stats)


def prescale_for(image: np.ndarray, stats: Stats | None) -> np.ndarray:
    """:func:`prescale` by the rule that made ``stats`` (what comes before resizing)."""
    return prescale(image, mode_of(stats),
                    stats["percentiles"] if stats and stats.get("percentiles") else SCALE_PERCENTILES)


def mode_of(stats: Stats | None) -> str:
    """The ``normalize`` rule that made ``stats`` (checkpoints carry the statistics, not the name)."""
    if stats is None:
        return "image"
    if stats.get("nonzero"):
        return "nonzero"
    if stats.get("percentiles"):
        return "percentile"
    return "ct" if stats.get("clip") else "dataset"


def finish(image: np.ndarray, stats: Stats | None) -> np.ndarray:
    """The dataset part of the rule on a prescaled ``(C, *spatial)`` array: clip (``ct``), then the affine map."""
    spatial = image.ndim - 1
    bounds = clip_range(stats, spatial)
    img = image if bounds is None else np.clip(image, bounds[0], bounds[1])
    mapping = affine(stats, spatial)
    if mapping is None:
        return img
    return (img - mapping[0]) / mapping[1]


def finish_tensor_(x: torch.Tensor, stats: Stats | None, rule: list[torch.Tensor | None] | None = None
                   ) -> torch.Tensor:
    """:func:`finish` in place on a ``(N, C, *spatial)`` tensor (on its device).

    ``rule``: the tensors of :func:`rule_tensors` for ``stats`` on ``x``'s device, made once by a caller that
    finishes many batches.
    """
    import torch

    lo, hi, mean, std = rule if rule is not None else rule_tensors(stats, x.dim() - 2, x.device)
    if lo is not None and hi is not None:
        torch.maximum(x, lo, out=x)
        torch.minimum(x, hi, out=x)
    if mean is not None and std is not None:
        x.sub_(mean).div_(std)
    return x


def rule_tensors(stats: Stats | None, spatial: int, device: torch.device) -> list[torch.Tensor | None]:
    """``[low, high, mean, std]`` of the dataset part of the rule as tensors on ``device`` (``None``: not used)."""
    import torch

    bounds = clip_range(stats, spatial) or (None, None)
    mapping = affine(stats, spatial) or (None, None)
    return [None if a is None else torch.from_numpy(a).to(device) for a in (*bounds, *mapping)]


def clip_range(stats: Stats | None, spatial: int = 2) -> tuple[np.ndarray, np.ndarray] | None:
    """``normalize: ct``'s per-channel ``(low, high)`` as ``float32 (C, 1, ...)`` arrays, or ``None``."""
    if not stats or not stats.get("clip"):
        return None
    bounds = np.asarray(stats["clip"], dtype=np.float32).reshape(-1, 2)
    shape = (-1, *([1] * spatial))
    return bounds[:, 0].reshape(shape), bounds[:, 1].reshape(shape)


def foreground_sample(image: np.ndarray, mask: np.ndarray, n: int = FOREGROUND_SAMPLES) -> np.ndarray:
    """Up to ``n`` of ``image``'s ``(C, *spatial)`` voxels where ``mask > 0``, as ``float32 (C, k)`` (seeded)."""
    idx = np.flatnonzero(np.asarray(mask).reshape(-1) > 0)
    if idx.size > n:
        idx = np.sort(np.random.default_rng(1234).choice(idx, n, replace=False))
    flat = np.asarray(image).reshape(image.shape[0], -1)
    return flat[:, idx].astype(np.float32)


def foreground_stats(samples: list[np.ndarray]) -> Stats | None:
    """``normalize: ct``'s statistics from pooled :func:`foreground_sample` draws (``None`` without foreground).

    The clip window is the pooled 0.5/99.5 percentiles; mean and std are those of the unclipped foreground
    (nnU-Net's ``CTNormalization``).
    """
    drawn = [s for s in samples if s.size]
    if not drawn:
        return None
    values = np.concatenate(drawn, axis=1).astype(np.float64)
    lo, hi = np.percentile(values, SCALE_PERCENTILES, axis=1)
    return {"mean": [float(v) for v in values.mean(axis=1)], "std": [float(v) for v in values.std(axis=1)],
            "clip": [[float(a), float(b)] for a, b in zip(lo, hi, strict=True)]}


def prescale(image: np.ndarray, mode: str,
             percentiles: tuple[float, float] | list[float] = SCALE_PERCENTILES) -> np.ndarray:
    """The per-image part of ``normalize: mode``: percentile-scaled, z-scored by itself, or as stored.

    It commutes with resizing up to rounding (the rest, :func:`affine`, is one map for all
    images), so a training cache can hold prescaled images before the dataset statistics exist.
    """
    img = image.astype(np.float32, copy=False)
    if mode == "percentile":
        return percentile_scale(img, percentiles)
    if mode == "nonzero":
        return nonzero_zscore(img)
    if mode == "image":
        spatial = tuple(range(1, img.ndim))
        mean = img.mean(axis=spatial, keepdims=True)
        std = img.std(axis=spatial, keepdims=True)
        return (img - mean) / np.where(std > 1e-8, std, 1.0)
    return img


def nonzero_zscore(image: np.ndarray) -> np.ndarray:
    """``normalize: nonzero``: each channel z-scored over the voxels nonzero in any channel; the rest stay 0.

    Zero voxels enclosed by nonzero ones (a dark spot inside a skull-stripped brain) count as inside: the mask is
    the nonzero voxels with their holes filled, nnU-Net's ``create_nonzero_mask``.
    """
    from scipy.ndimage import binary_fill_holes

    inside = binary_fill_holes(np.any(image != 0, axis=0))
    out = np.zeros_like(image, dtype=np.float32)
    if not inside.any():
        return out
    for c in range(image.shape[0]):
        values = image[c][inside].astype(np.float64)
        std = float(values.std())
        out[c][inside] = ((values - values.mean()) / (std if std > 1e-8 else 1.0)).astype(np.float32)
    return out


def affine(stats: Stats | None, spatial: int = 2) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean, std)`` as ``float32 (C, 1, 1)`` arrays, or ``None`` (per image).

    ``(C, 1, 1, 1)`` for volumes (``spatial=3``); the std of a constant channel is 1.
    """
    if stats is None or "mean" not in stats:
        return None
    shape = (-1, *([1] * spatial))
    mean = np.asarray(stats["mean"], dtype=np.float32).reshape(shape)
    std = np.asarray(stats["std"], dtype=np.float32).reshape(shape)
    return mean, np.where(std > 1e-8, std, np.float32(1.0)).astype(np.float32)


def prescaled_sums(image: np.ndarray) -> np.ndarray:
    """``(3, C)`` float64 pixel count, sum and sum of squares of one prescaled image.

    Summed over the training split (and over DDP ranks) they give :func:`stats_from_sums`.
    """
    img = image.astype(np.float64)
    spatial = tuple(range(1, img.ndim))
    return np.stack([np.full(img.shape[0], img[0].size, dtype=np.float64),
                     img.sum(axis=spatial), np.square(img).sum(axis=spatial)])


def stats_from_sums(sums: np.ndarray, percentiles: tuple[float, float] | list[float] | None = None) -> Stats:
    """Mean and std per channel from summed :func:`prescaled_sums` (with the ``percentiles`` they were scaled by)."""
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
    sums, maxes = empty_range()
    for image in images:
        add_range(sums, maxes, *raw_range(image))
    return sums, maxes


def empty_range() -> tuple[np.ndarray, np.ndarray]:
    """The zero of :func:`range_sums`."""
    return np.zeros(3, dtype=np.float64), np.array([-np.inf, -np.inf], dtype=np.float64)


def add_range(sums: np.ndarray, maxes: np.ndarray, lo: float, hi: float) -> None:
    """Add one image's raw 0.5/99.5 percentiles to :func:`range_sums`' accumulators, in place."""
    sums += (lo, hi, 1.0)
    np.maximum(maxes, (hi, -hi), out=maxes)


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
    if mode_of(stats) in ("dataset", "ct"):
        return (f"{head} This model normalises in the training images' stored units (normalize: "
                f"{mode_of(stats)}), so its predictions on this image are likely wrong: store it like the training "
                "images, or retrain with normalize: percentile")
    return (f"{head} The model scales each image by its own intensity range, so the bit depth alone does not "
            "change its predictions; check that this is the kind of image it was trained on")
