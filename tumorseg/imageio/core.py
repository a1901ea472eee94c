"""What a decoded file is, which formats exist, and the dispatch from a path to its decoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tumorseg.errors import TumorsegError

Format = Literal["png", "jpeg", "bmp", "tiff", "nifti", "dicom", "itk", "dicom-series"]
EXTENSIONS: dict[str, Format] = {
    ".png": "png",
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".bmp": "bmp",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".nii": "nifti",
    ".nii.gz": "nifti",
    ".dcm": "dicom",
    ".dicom": "dicom",
    ".nrrd": "itk",
    ".mha": "itk",
    ".mhd": "itk",
}
"""Supported file extensions (lower case) and their formats. A folder holding one DICOM series is an image too
(format ``dicom-series``, see :mod:`tumorseg.imageio.dicom`)."""

FORMATS_TEXT = "PNG, JPEG, BMP, TIFF, DICOM, NIfTI (.nii/.nii.gz), NRRD or MHA/MHD"
"""The formats as error messages name them."""

PHYSICAL: frozenset[Format] = frozenset({"nifti", "itk", "dicom", "dicom-series"})
"""Formats that state their pixel size in millimetres (surface distances are in mm for these)."""

LOSSY: frozenset[Format] = frozenset({"jpeg"})
"""Formats whose stored values are not the values written: their masks are thresholded, never trusted as labels."""


class DecodeError(TumorsegError):
    """A file that cannot be read as an image or mask; the message says why."""


@dataclass(frozen=True)
class Decoded:
    """A decoded file.

    Attributes:
        array: a 2D image ``(C, H, W)`` (rows first, as the file stores them); a voxel grid ``(X, Y, Z)``
            (``Z == 1`` for a 2D grid such as a one-slice NIfTI).
        mode: how the file stored its pixels, e.g. ``"PNG:L"``, ``"JPEG:RGB"``, ``"NIfTI"``, ``"DICOM:MR"``.
        affine: a grid's voxel-to-world matrix in nibabel's RAS+ convention (millimetres); ``None`` for 2D
            images. Every volume format (NIfTI, NRRD/MHA, DICOM series and multi-frame files, TIFF stacks)
            is a grid, so spacing and orientation read the same whatever the file.
        lossy: the format does not store values exactly (JPEG).
        pixel_spacing: a 2D image's pixel size ``(dy, dx)`` where the file states it (DICOM), else ``None``.
    """

    array: np.ndarray
    mode: str
    affine: np.ndarray | None = None
    lossy: bool = False
    pixel_spacing: tuple[float, float] | None = None

    @property
    def is_grid(self) -> bool:
        """True for a voxel grid ``(X, Y, Z)`` with an affine, False for a ``(C, H, W)`` image."""
        return self.affine is not None

    @property
    def is_volume(self) -> bool:
        """True for a grid with more than one slice."""
        return self.is_grid and self.array.shape[2] > 1


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
    """The format of a path by its extension (a DICOM series folder by its files), or ``None`` if unsupported."""
    fmt = EXTENSIONS.get(split_ext(os.path.basename(os.fspath(path)))[1])
    if fmt is None and os.path.isdir(path):
        from tumorseg.imageio.dicom import is_series_folder

        return "dicom-series" if is_series_folder(path) else None
    return fmt


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes that make up an image: what its SHA-256 is taken of.

    A plain file's bytes; an MHD header followed by its data file; a DICOM series folder's files
    in name order, each behind its name. A missing or empty file raises :class:`DecodeError`.
    """
    fmt = image_format(path)
    if fmt == "dicom-series":
        from tumorseg.imageio.dicom import series_files

        return b"".join(os.path.basename(f).encode() + b"\0" + _read_file(f) for f in series_files(path))
    data = _read_file(path)
    if fmt == "itk" and split_ext(os.fspath(path))[1] == ".mhd":
        from tumorseg.imageio.itk import mhd_data_file

        extra = mhd_data_file(data, path)
        if extra is not None:
            data += b"\0" + _read_file(extra)
    return data


def source_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of :func:`read_bytes` (what ingest records); a plain file is hashed as it streams."""
    from tumorseg.fsutil import sha256_bytes, sha256_file

    fmt = image_format(path)
    if fmt == "dicom-series" or (fmt == "itk" and split_ext(os.fspath(path))[1] == ".mhd"):
        return sha256_bytes(read_bytes(path))
    return sha256_file(path)


def _read_file(path: str | os.PathLike[str]) -> bytes:
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
    """Decode an image's bytes (:func:`read_bytes`) by the path's format.

    Args:
        data: the bytes (read once, so the caller can hash the same bytes). Formats whose library reads
            from a path (NRRD/MHA through SimpleITK, DICOM series) read ``path`` itself.
        path: used for the format and in error messages.
        role: palette images are expanded to RGB for images but keep their indices for masks;
            colour JPEG masks are reduced to grey (compression makes their channels differ).
    """
    fmt = image_format(path)
    if fmt in ("png", "jpeg", "bmp"):
        from tumorseg.imageio.pillow import decode_pillow

        return decode_pillow(data, path, role, fmt)
    if fmt == "tiff":
        from tumorseg.imageio.tiff import decode_tiff

        return decode_tiff(data, path)
    if fmt == "nifti":
        from tumorseg.imageio.nifti import decode_nifti

        return decode_nifti(data, path)
    if fmt == "dicom":
        from tumorseg.imageio.dicom import decode_dicom

        return decode_dicom(data, path)
    if fmt == "dicom-series":
        from tumorseg.imageio.dicom import decode_series

        return decode_series(path)
    if fmt == "itk":
        from tumorseg.imageio.itk import decode_itk

        return decode_itk(path)
    raise DecodeError(f"{path}: unsupported format; use {FORMATS_TEXT}")


def volume_shape(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """The ``(X, Y, Z)`` shape of a volume file from its header alone; ``None`` for a 2D image.

    Cheap (headers only, no pixel data), so predict can plan its outputs before it decodes anything.
    """
    fmt = image_format(path)
    if fmt == "nifti":
        from tumorseg.imageio.nifti import nifti_shape

        shape = nifti_shape(path)
        return shape if any(s != 1 for s in shape[2:]) else None
    if fmt == "itk":
        from tumorseg.imageio.itk import itk_shape

        return itk_shape(path)
    if fmt == "dicom-series":
        from tumorseg.imageio.dicom import series_shape

        return series_shape(path)
    if fmt == "dicom":
        from tumorseg.imageio.dicom import dicom_shape

        return dicom_shape(path)
    if fmt == "tiff":  # the page rules live with the decoder; TIFF stacks are small next to the network's work
        decoded = decode(read_bytes(path), path)
        return tuple(decoded.array.shape) if decoded.is_volume else None
    return None


def grid_from_zyx(volume: np.ndarray, affine: np.ndarray, mode: str, path: str | os.PathLike[str]) -> Decoded:
    """A ``(Z, Y, X)`` array (ITK's, DICOM's and TIFF's order) as an ``(X, Y, Z)`` grid, checked."""
    if volume.size == 0:
        raise DecodeError(f"{path}: zero-sized volume {volume.shape}; re-export the file")
    arr = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))
    spacing = np.sqrt(np.square(affine[:3, :3]).sum(axis=0))
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise DecodeError(f"{path}: voxel spacing {tuple(round(float(s), 4) for s in spacing)} in the header is "
                          "zero or negative; fix the header's spacing")
    return Decoded(arr, mode, affine)


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM and ITK state positions in LPS+ (x to the patient's left); NIfTI and nibabel in RAS+."""


def affine_from_lps(direction: np.ndarray, spacing: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """The RAS+ voxel-to-world affine of a grid given in LPS+ (columns of ``direction`` are the axes)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64) * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps
