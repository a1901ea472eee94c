"""The files of ``tumorseg predict``: each input, its outputs, and the writing of masks and probabilities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tumorseg.config import PredictConfig
from tumorseg.labels import Classes

if TYPE_CHECKING:
    from tumorseg.imageio import Decoded


@dataclass
class Item:
    """One input image and where its outputs go."""

    index: int
    path: Path
    rel: Path
    """Path relative to the input folder it was found in (its name for a file input)."""
    mask_out: Path = Path()
    prob_out: Path | None = None


@dataclass
class Loaded:
    """A decoded input cut into the 2D planes the network sees."""

    item: Item
    planes: list[np.ndarray]
    decoded: Decoded
    volume_shape: tuple[int, ...] | None = None


def write_outputs(loaded: Loaded, probs: list[np.ndarray], to_mask: Callable[[np.ndarray], np.ndarray],
                  cfg: PredictConfig, classes: Classes | None = None) -> int:
    """Write the mask (and probability map) of one input; returns the tumour pixel count.

    ``to_mask`` turns one plane's probabilities into its mask (the model's threshold and
    component filtering). A multi-class model's masks are label maps of the declared values and its
    probabilities hold one channel per class, last (NIfTI) or first (a float32 TIFF beside a PNG mask).
    """
    from tumorseg.imageio import write_mask_png, write_nifti, write_png

    item = loaded.item
    dec = loaded.decoded
    multi = classes is not None and classes.multiclass
    planes = [np.moveaxis(p, 0, -1) for p in probs] if multi else probs  # (H, W, K): the class axis last
    if dec.is_volume:
        prob = np.stack(planes, axis=cfg.slice_axis)
        mask = np.stack([to_mask(p) for p in probs], axis=cfg.slice_axis)
    else:
        prob = planes[0]
        mask = to_mask(probs[0])
    if multi:
        assert classes is not None
        mask = classes.to_values(mask)
    if item.mask_out.name.lower().endswith(".nii.gz"):
        affine = dec.affine if dec.is_grid else None
        shape = loaded.volume_shape
        if shape is not None and int(np.prod(shape)) == mask.size:
            mask_arr = mask.reshape(shape)
            prob_arr = prob.reshape((*shape, -1) if multi else shape)
        else:
            mask_arr, prob_arr = mask, prob
        write_nifti(item.mask_out, mask_arr, affine)
        if item.prob_out is not None:
            write_nifti(item.prob_out, prob_arr.astype(np.float32), affine)
    elif multi:
        write_png(item.mask_out, mask)
        if item.prob_out is not None:
            write_tiff(item.prob_out, np.moveaxis(prob, -1, 0).astype(np.float32))
    else:
        write_mask_png(item.mask_out, mask)
        if item.prob_out is not None:
            write_png(item.prob_out, np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8))
    return int(np.count_nonzero(mask))


def write_tiff(path: Path, array: np.ndarray) -> None:
    """Write a ``(K, H, W)`` float32 array as a multi-page TIFF (one page per class), atomically."""
    import tifffile

    from tumorseg.fsutil import atomic_path

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, photometric="minisblack")


