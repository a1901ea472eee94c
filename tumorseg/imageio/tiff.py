"""TIFF through tifffile: grey and colour frames (whatever the photometric tag says), and page stacks as volumes."""

from __future__ import annotations

import io
import os

import numpy as np

from tumorseg.imageio.base import Decoded, DecodeError, grid_from_zyx
from tumorseg.imageio.pillow import channels_first

STACK_AXES = ("ZYX", "QYX", "IYX", "TYX")
"""tifffile's axes of a page stack: one grey page per slice (a volume)."""


def decode_tiff(data: bytes, path: str | os.PathLike[str]) -> Decoded:
    """Decode a TIFF: ``(C, H, W)`` for a frame, an ``(X, Y, Z)`` grid for a stack of grey pages.

    tifffile, not Pillow: it reads frames whose header says BlackIsZero but holds three samples per
    pixel (older endoscopy exports), 16/32-bit and float pages, and stacks. The series axes say what the
    dimensions are: a ``(H, W, 2)`` array may be a stack of H pages and a ``(3, H, W)`` one planar RGB,
    which the shape alone cannot tell apart. A stack's voxel size is ImageJ's ``spacing`` and the
    resolution tags where present, else 1.
    """
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            axes = series.axes
            alike = sum(1 for other in tif.series[1:] if other.shape == series.shape and other.axes == axes)
            arr = np.asarray(series.asarray())
            spacing = _stack_spacing(tif)
    except Exception as exc:  # tifffile raises several types for broken files
        raise DecodeError(f"{path}: truncated or corrupt TIFF ({exc}); re-export the file") from exc
    if alike:  # pages of one stack saved one by one (a thumbnail or pyramid level has another shape: ignored)
        raise DecodeError(f"{path}: TIFF of {alike + 1} separate images of one shape; save one image per file, or a "
                          "stack as one series of grey pages (tifffile.imwrite of the whole array)")
    for i in reversed(range(arr.ndim)):
        if arr.shape[i] == 1 and axes[i] not in "YX" and arr.ndim > 2:  # a stack of one page
            arr, axes = arr.squeeze(i), axes[:i] + axes[i + 1 :]
    if axes == "SYX" and arr.shape[0] in (2, 3, 4):  # planar colour (tifffile's default for (3, H, W))
        arr = np.moveaxis(arr, 0, -1)
    elif axes in STACK_AXES:
        affine = np.diag([*spacing, 1.0])
        return grid_from_zyx(arr, affine, "TIFF-stack", path)
    elif axes not in ("YX", "YXS"):
        raise DecodeError(
            f"{path}: TIFF with axes {axes} and shape {arr.shape} is neither a 2D grey or colour image nor a "
            "stack of grey pages; save one image per file or one grey page per slice"
        )
    return Decoded(channels_first(arr, path), "TIFF")


def _stack_spacing(tif: object) -> tuple[float, float, float]:
    """``(dx, dy, dz)`` of a page stack: ImageJ's ``spacing`` for z and the resolution tags for x/y, else 1."""
    dz = 1.0
    meta = getattr(tif, "imagej_metadata", None) or {}
    try:
        dz = float(meta.get("spacing", 1.0)) or 1.0
    except (TypeError, ValueError):
        dz = 1.0
    dx = dy = 1.0
    if meta:  # ImageJ writes the resolution as pixels per unit; without ImageJ, the tags are usually DPI
        page = tif.pages[0]  # type: ignore[attr-defined]
        for tag, which in (("XResolution", "x"), ("YResolution", "y")):
            value = page.tags.get(tag)
            if value is not None and value.value[0] > 0:
                size = value.value[1] / value.value[0]
                dx, dy = (size, dy) if which == "x" else (dx, size)
    return dx, dy, abs(dz)
