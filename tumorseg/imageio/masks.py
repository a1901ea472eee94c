"""Masks and planes: binarising, label maps, the 2D planes of a decoded file, and the loaders built on them.

* A 2D image is ``(C, H, W)``: rows first, exactly as the file stores them. Nothing here
  transposes axes: MONAI's ``PILReader`` would, so it is not used.
* A grid (NIfTI, NRRD/MHA, DICOM series or multi-frame, TIFF stack) is ``(X, Y, Z)``; a volume is
  cut into 2D planes along ``slice_axis`` and each plane keeps the order of the remaining axes, so a
  mask written back with the same affine lines up with the input.
* Masks are binarised to ``{0, 1}`` ``uint8``. The rule and the encoding found are in
  :func:`binarize_mask`; a lossy (JPEG) mask is thresholded at half its range (:func:`mask_threshold_for`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_write_with
from tumorseg.imageio.base import Decoded, DecodeError
from tumorseg.imageio.read import decode, image_format, read_bytes


def mask_threshold_for(decoded: Decoded, threshold: float | None) -> float | None:
    """The threshold a mask is binarised with: the user's, else half the range of a lossy (JPEG) mask's type.

    JPEG never stores a two-valued mask exactly (its edges ring with values between 0 and 255), so
    "two values, the larger is tumour" cannot hold; half the 8-bit range is the rule every JPEG mask
    set's own tools use.
    """
    if threshold is not None or not decoded.lossy:
        return threshold
    return float(np.iinfo(decoded.array.dtype).max // 2) if decoded.array.dtype.kind in "ui" else 0.5


def slice_of(decoded: Decoded, slice_index: int, slice_axis: int) -> np.ndarray:
    """The 2D ``(C, H, W)`` view of a decoded file; ``slice_index < 0`` means a 2D file."""
    arr = decoded.array
    if not decoded.is_grid:
        return arr
    if slice_index < 0:
        if arr.shape[2] != 1:
            raise DecodeError("a volume needs a slice index")
        return arr[None, :, :, 0]
    return np.take(arr, slice_index, axis=slice_axis)[None]


def plane_spacing(decoded: Decoded, slice_index: int, slice_axis: int) -> tuple[float, float] | None:
    """Pixel size of the plane :func:`slice_of` returns; ``None`` where the file states none (pixels).

    A grid's voxel sizes (the affine's column norms, usually mm) of the two axes the plane keeps;
    a 2D DICOM's PixelSpacing.
    """
    if decoded.affine is None:
        return decoded.pixel_spacing
    zooms = np.sqrt(np.square(decoded.affine[:3, :3]).sum(axis=0))
    axis = 2 if slice_index < 0 else slice_axis
    kept = [float(zooms[i]) for i in range(3) if i != axis]
    return kept[0], kept[1]


def mask_plane(arr: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """Reduce a mask's channels to one plane; a colour mask must be grey stored as RGB."""
    if arr.shape[0] == 1:
        return arr[0]
    if all(np.array_equal(arr[0], arr[c]) for c in range(1, arr.shape[0])):
        return arr[0]
    raise DecodeError(f"{path}: colour mask whose channels differ; save masks as greyscale or 0/255 images")


def binarize_mask(
    raw: np.ndarray, path: str | os.PathLike[str], threshold: float | None = None
) -> tuple[np.ndarray, str]:
    """Binarise a mask array (any shape) to ``{0, 1}`` ``uint8``.

    The rule: with ``threshold``, foreground is ``raw > threshold``. Without it the mask
    must hold at most two values; the larger is foreground (``0/1``, ``0/255``, ``0/65535``,
    palette index ``0/1``, ``True/False``). A single value is all-background if it is 0,
    else all-foreground.

    Returns:
        The binary mask and the values found, e.g. ``"0/255"`` or ``">127"``.

    Raises:
        DecodeError: more than two values (or NaN) and no threshold.
    """
    if threshold is not None:
        return (raw > threshold).view(np.uint8), f">{threshold:g}"
    if raw.size:
        # Fast path for the usual binary mask: min/max and two counts, no sort (np.unique is
        # ~30x slower on a 256x256 mask and ingest runs this on every mask).
        lo, hi = raw.min(), raw.max()
        if lo == hi:
            if lo < 0:  # one negative value: the background of a -1/0 convention, not a mask of all tumour
                raise DecodeError(f"{path}: mask holds only {lo:g}; save masks with 0 as background and a positive "
                                  "value (1 or 255) as tumour")
            return np.full(raw.shape, int(lo != 0), dtype=np.uint8), f"{lo:g}"
        fg = raw == hi
        n_lo = raw.size - np.count_nonzero(raw) if lo == 0 else np.count_nonzero(raw == lo)
        if np.count_nonzero(fg) + n_lo == raw.size:
            if hi <= 0:  # the larger value, tumour by the rule, would be 0 (or below): not a mask convention
                raise DecodeError(f"{path}: mask values {lo:g}/{hi:g} would make {hi:g} the tumour; save masks with "
                                  "0 as background and a positive value (1 or 255) as tumour")
            return fg.view(np.uint8), f"{lo:g}/{hi:g}"
    if raw.dtype.kind == "f" and np.isnan(raw).any():
        raise DecodeError(f"{path}: mask contains NaN values; save masks as 0/1 or 0/255 integers")
    values = np.unique(raw)
    shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
    raise DecodeError(
        f"{path}: mask has {len(values)} distinct values ({shown}); a binary mask has 2 - "
        "pass --mask-threshold T to treat values > T as tumour, or --labels to declare label maps"
    )


def label_map(raw: np.ndarray, path: str | os.PathLike[str], labels: dict[int, str]) -> tuple[np.ndarray, str]:
    """A mask of declared label values -> ``uint8`` class indices (the background is class 0).

    The class order is :func:`tumorseg.labels.class_values`: the background value, then the others ascending.

    Returns:
        The class-index map and the values found, e.g. ``"0/3"``.

    Raises:
        DecodeError: a value that is not declared (named, with the declared set).
    """
    if raw.dtype.kind == "f" and np.isnan(raw).any():
        raise DecodeError(f"{path}: mask contains NaN values; save label maps as integers")
    from tumorseg.labels import class_values

    values = np.unique(raw)
    declared = sorted(labels)
    undeclared = [v for v in values.tolist() if v not in labels]
    if undeclared:
        shown = ", ".join(f"{v:g}" for v in undeclared[:4])
        raise DecodeError(f"{path}: value {shown} is not a declared label ({', '.join(map(str, declared))}); fix the "
                          "mask or add the value to --labels")
    lut = np.zeros(max(declared) + 1, dtype=np.uint8)
    for k, v in enumerate(class_values(labels)):
        lut[v] = k
    return lut[raw.astype(np.int64)], "/".join(f"{v:g}" for v in values.tolist())


def load_image(path: str | os.PathLike[str], slice_index: int = -1, slice_axis: int = 2) -> np.ndarray:
    """Read an image as ``float32 (C, H, W)`` (C is 1 or 3)."""
    decoded = decode(read_bytes(path), path, "image")
    return slice_of(decoded, slice_index, slice_axis).astype(np.float32)


def binarize_decoded_mask(decoded: Decoded, path: str | os.PathLike[str], threshold: float | None = None) -> Decoded:
    """Binarise a whole decoded mask file (:func:`binarize_mask`).

    A volume is binarised as a whole, so its values (not one slice's) decide the rule,
    exactly as ``ingest`` validated it. A 2D mask's channels are reduced first (:func:`mask_plane`).
    """
    threshold = mask_threshold_for(decoded, threshold)
    if decoded.is_grid:
        binary, _ = binarize_mask(decoded.array, path, threshold)
        return Decoded(binary, decoded.mode, decoded.affine)
    binary, _ = binarize_mask(mask_plane(decoded.array, path), path, threshold)
    return Decoded(binary[None], decoded.mode, decoded.affine, pixel_spacing=decoded.pixel_spacing)


def label_decoded_mask(decoded: Decoded, path: str | os.PathLike[str], labels: dict[int, str]) -> Decoded:
    """A whole decoded label-map file as class indices (:func:`label_map`), shaped like a binarised mask."""
    check_label_format(decoded, path)
    if decoded.is_grid:
        classes, _ = label_map(decoded.array, path, labels)
        return Decoded(classes, decoded.mode, decoded.affine)
    classes, _ = label_map(mask_plane(decoded.array, path), path, labels)
    return Decoded(classes[None], decoded.mode, decoded.affine, pixel_spacing=decoded.pixel_spacing)


def mask_from_decoded(
    decoded: Decoded, path: str | os.PathLike[str], slice_index: int = -1, slice_axis: int = 2,
    threshold: float | None = None,
) -> np.ndarray:
    """The ``uint8 (H, W)`` ``{0, 1}`` plane of one decoded mask file (binarised whole, then sliced)."""
    return slice_of(binarize_decoded_mask(decoded, path, threshold), slice_index, slice_axis)[0]


def union_masks(planes: Sequence[np.ndarray]) -> np.ndarray:
    """Merge a case's mask planes by union (``x_mask.png``, ``x_mask_1.png``, ...)."""
    if not planes:
        raise DecodeError("a case needs at least one mask")
    out = planes[0]
    for plane in planes[1:]:
        out = np.maximum(out, plane)
    return out.astype(np.uint8, copy=False)


def load_mask(
    paths: Sequence[str | os.PathLike[str]],
    slice_index: int = -1,
    slice_axis: int = 2,
    threshold: float | None = None,
) -> np.ndarray:
    """Read one or several masks of a case as one ``uint8 (H, W)`` in ``{0, 1}`` (union)."""
    return union_masks([
        mask_from_decoded(decode(read_bytes(p), p, "mask"), p, slice_index, slice_axis, threshold) for p in paths
    ])


def check_label_format(decoded: Decoded, path: str | os.PathLike[str]) -> None:
    """A label map must store its values exactly: a lossy (JPEG) one is refused with the fix."""
    if decoded.lossy:
        raise DecodeError(f"{path}: a JPEG mask cannot hold a label map (compression changes its values at every "
                          "edge); save label maps as PNG, or binarise with --mask-threshold instead of --labels")


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a ``(H, W)`` uint8/uint16 array as a greyscale PNG, atomically."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    atomic_write_with(path, lambda fh: img.save(fh, format="PNG"))


def write_mask_png(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a ``{0, 1}`` mask as a 0/255 greyscale PNG, atomically."""
    write_png(path, (np.asarray(mask) > 0).astype(np.uint8) * 255)


def read_nifti_affine(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The affine of a NIfTI file, or ``None`` for other formats."""
    if image_format(path) != "nifti":
        return None
    return decode(read_bytes(path), path).affine


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Convert a ``(C, H, W)`` image to 1 or 3 channels (grey <-> RGB)."""
    if image.shape[0] == channels:
        return image
    if channels == 3 and image.shape[0] == 1:
        return np.repeat(image, 3, axis=0)
    if channels == 1 and image.shape[0] == 3:
        return image.mean(axis=0, keepdims=True)
    raise TumorsegError(f"cannot convert a {image.shape[0]}-channel image to {channels} channels")
