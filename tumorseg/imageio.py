"""The one image loader: every stage reads and writes images and masks through here.

Conventions (the contract train, evaluate and predict rely on):

* A 2D image is returned as ``(C, H, W)``: rows first, exactly as the file stores them
  (PNG via Pillow, TIFF via tifffile, scikit-image's TIFF backend). Nothing here
  transposes axes: MONAI's ``PILReader`` would, so it is not used.
* A NIfTI file is read with nibabel as stored, ``(X, Y[, Z])``; a 3D volume is cut
  into 2D slices along ``slice_axis`` and each slice keeps the order of the remaining
  axes, so a mask written back with the same affine lines up with the input.
* Masks are binarised to ``{0, 1}`` ``uint8``. The rule and the encoding found are in
  :func:`binarize_mask`.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_path, atomic_write_with

Format = Literal["png", "tiff", "nifti"]
EXTENSIONS: dict[str, Format] = {
    ".png": "png",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".nii": "nifti",
    ".nii.gz": "nifti",
}
"""Supported file extensions (lower case) and their formats."""


class DecodeError(TumorsegError):
    """A file that cannot be read as an image or mask; the message says why."""


@dataclass(frozen=True)
class Decoded:
    """A decoded file.

    Attributes:
        array: 2D files ``(C, H, W)``; NIfTI files ``(X, Y, Z)`` (``Z == 1`` for 2D).
        mode: how the file stored its pixels, e.g. ``"PNG:L"``, ``"PNG:RGBA"``, ``"NIfTI"``.
        affine: the NIfTI affine, else ``None``.
    """

    array: np.ndarray
    mode: str
    affine: np.ndarray | None = None

    @property
    def is_volume(self) -> bool:
        """True for a NIfTI file with more than one slice."""
        return self.mode == "NIfTI" and self.array.shape[2] > 1


def split_ext(name: str) -> tuple[str, str]:
    """Split a file name into stem and a known image extension (lower case).

    ``"a.b.nii.gz" -> ("a.b", ".nii.gz")``; an unknown extension returns it as found.
    """
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[: -len(".nii.gz")], ".nii.gz"
    stem, ext = os.path.splitext(name)
    return stem, ext.lower()


def image_format(path: str | os.PathLike[str]) -> Format | None:
    """The format of a path by its extension, or ``None`` if unsupported."""
    return EXTENSIONS.get(split_ext(os.path.basename(os.fspath(path)))[1])


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """Read a whole file; a missing or empty file raises :class:`DecodeError`."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError as exc:
        raise DecodeError(f"{path}: file not found") from exc
    except OSError as exc:
        raise DecodeError(f"{path}: cannot read file ({exc.strerror})") from exc
    if not data:
        raise DecodeError(f"{path}: zero-byte file; re-export or remove it")
    return data


def decode(data: bytes, path: str | os.PathLike[str], role: Literal["image", "mask"] = "image") -> Decoded:
    """Decode file bytes by the path's extension.

    Args:
        data: the file's bytes (read once, so the caller can hash the same bytes).
        path: used for the format and in error messages.
        role: palette PNGs are expanded to RGB for images but keep their indices for masks.
    """
    fmt = image_format(path)
    if fmt == "png":
        return _decode_png(data, path, role)
    if fmt == "tiff":
        return _decode_tiff(data, path)
    if fmt == "nifti":
        return _decode_nifti(data, path)
    raise DecodeError(f"{path}: unsupported format; use PNG, TIFF or NIfTI (.nii/.nii.gz)")


def _decode_png(data: bytes, path: str | os.PathLike[str], role: str) -> Decoded:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            if mode == "P":
                if role == "mask":
                    arr = np.asarray(img)
                else:
                    has_alpha = "transparency" in img.info
                    arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                arr = np.asarray(img.convert("RGB"))
            elif mode == "1":
                arr = np.asarray(img).astype(np.uint8)
            else:
                arr = np.asarray(img)
    except OSError as exc:
        # Pillow's "cannot identify image file <BytesIO ...>" names our buffer, not the file: say it plainly.
        detail = "not a PNG image" if "cannot identify" in str(exc) else str(exc)
        raise DecodeError(f"{path}: truncated or corrupt PNG ({detail}); re-export the file") from exc
    except Image.DecompressionBombError as exc:  # pragma: no cover - defensive
        raise DecodeError(f"{path}: image too large to decode safely ({exc})") from exc
    return Decoded(_channels_first(arr, path), f"PNG:{mode}")


def _decode_tiff(data: bytes, path: str | os.PathLike[str]) -> Decoded:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            axes = series.axes
            arr = np.asarray(series.asarray())
    except Exception as exc:  # tifffile raises several types for broken files
        raise DecodeError(f"{path}: truncated or corrupt TIFF ({exc}); re-export the file") from exc
    # The series axes say what the dimensions are: a (H, W, 2) array may be a stack of
    # H pages and a (3, H, W) one planar RGB, which the shape alone cannot tell apart.
    for i in reversed(range(arr.ndim)):
        if arr.shape[i] == 1 and axes[i] not in "YX" and arr.ndim > 2:  # a stack of one page
            arr, axes = arr.squeeze(i), axes[:i] + axes[i + 1 :]
    if axes == "SYX" and arr.shape[0] in (2, 3, 4):  # planar colour (tifffile's default for (3, H, W))
        arr = np.moveaxis(arr, 0, -1)
    elif axes not in ("YX", "YXS"):
        raise DecodeError(
            f"{path}: TIFF with axes {axes} and shape {arr.shape} is not a 2D grey or colour image; "
            "multi-page or multi-channel stacks are not supported"
        )
    return Decoded(_channels_first(arr, path), "TIFF")


def _decode_nifti(data: bytes, path: str | os.PathLike[str]) -> Decoded:
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        img = nib.Nifti1Image.from_bytes(raw)
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for broken files
        raise DecodeError(f"{path}: truncated or corrupt NIfTI ({exc}); re-export the file") from exc
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DecodeError(f"{path}: NIfTI with shape {arr.shape}; only 2D images and 3D volumes are supported")
    return Decoded(np.ascontiguousarray(arr), "NIfTI", np.asarray(img.affine, dtype=np.float64))


def _channels_first(arr: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """``(H, W)`` -> ``(1, H, W)``; ``(H, W, 3|4)`` -> ``(3, H, W)`` with alpha dropped."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[2] in (2, 3, 4):
        keep = 1 if arr.shape[2] == 2 else 3  # grey+alpha or colour(+alpha): alpha dropped
        return np.ascontiguousarray(np.moveaxis(arr[:, :, :keep], 2, 0))
    raise DecodeError(
        f"{path}: pixel array of shape {arr.shape} is not a 2D grey or colour image; "
        "multi-page or multi-channel stacks are not supported"
    )


def slice_of(decoded: Decoded, slice_index: int, slice_axis: int) -> np.ndarray:
    """The 2D ``(C, H, W)`` view of a decoded file; ``slice_index < 0`` means a 2D file."""
    arr = decoded.array
    if decoded.mode != "NIfTI":
        return arr
    if slice_index < 0:
        if arr.shape[2] != 1:
            raise DecodeError("a NIfTI volume needs a slice index")
        return arr[None, :, :, 0]
    return np.take(arr, slice_index, axis=slice_axis)[None]


def plane_spacing(decoded: Decoded, slice_index: int, slice_axis: int) -> tuple[float, float] | None:
    """Pixel size of the plane :func:`slice_of` returns; ``None`` for PNG/TIFF (pixels).

    The NIfTI voxel sizes (the affine's column norms, usually mm) of the two axes the plane keeps.
    """
    if decoded.mode != "NIfTI" or decoded.affine is None:
        return None
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
            return np.full(raw.shape, int(lo != 0), dtype=np.uint8), f"{lo:g}"
        fg = raw == hi
        n_lo = raw.size - np.count_nonzero(raw) if lo == 0 else np.count_nonzero(raw == lo)
        if np.count_nonzero(fg) + n_lo == raw.size:
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

    A NIfTI volume is binarised as a whole, so its values (not one slice's) decide the rule,
    exactly as ``ingest`` validated it. A 2D mask's channels are reduced first (:func:`mask_plane`).
    """
    if decoded.mode == "NIfTI":
        binary, _ = binarize_mask(decoded.array, path, threshold)
        return Decoded(binary, decoded.mode, decoded.affine)
    binary, _ = binarize_mask(mask_plane(decoded.array, path), path, threshold)
    return Decoded(binary[None], decoded.mode, decoded.affine)


def label_decoded_mask(decoded: Decoded, path: str | os.PathLike[str], labels: dict[int, str]) -> Decoded:
    """A whole decoded label-map file as class indices (:func:`label_map`), shaped like a binarised mask."""
    if decoded.mode == "NIfTI":
        classes, _ = label_map(decoded.array, path, labels)
        return Decoded(classes, decoded.mode, decoded.affine)
    classes, _ = label_map(mask_plane(decoded.array, path), path, labels)
    return Decoded(classes[None], decoded.mode, decoded.affine)


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


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a ``(H, W)`` uint8/uint16 array as a greyscale PNG, atomically."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array))
    atomic_write_with(path, lambda fh: img.save(fh, format="PNG"))


def write_mask_png(path: str | os.PathLike[str], mask: np.ndarray) -> None:
    """Write a ``{0, 1}`` mask as a 0/255 greyscale PNG, atomically."""
    write_png(path, (np.asarray(mask) > 0).astype(np.uint8) * 255)


def write_nifti(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Write an array as NIfTI (``.nii`` or ``.nii.gz`` by name), atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    with atomic_path(path) as tmp:
        target = tmp.with_name(tmp.name + suffix)
        nib.save(img, str(target))
        os.replace(target, tmp)


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
