"""What a decoded file is and which formats exist: the base every format module builds on."""

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


def nonfinite(array: np.ndarray, what: str = "value") -> str | None:
    """``"3 NaN or infinite value(s); replace them (...)"`` for an array holding any, else ``None``.

    Ingest, predict and the MLflow model say it alike.
    """
    if array.dtype.kind not in "fc" or bool(np.isfinite(array).all()):
        return None
    bad = int(np.count_nonzero(~np.isfinite(array)))
    return f"{bad} NaN or infinite {what}(s); replace them (e.g. with the background value)"


def split_ext(name: str) -> tuple[str, str]:
    """Split a file name into stem and a known image extension (lower case).

    ``"a.b.nii.gz" -> ("a.b", ".nii.gz")``; an unknown extension returns it as found.
    """
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return name[: -len(".nii.gz")], ".nii.gz"
    stem, ext = os.path.splitext(name)
    return stem, ext.lower()


def read_file(path: str | os.PathLike[str]) -> bytes:
    """A whole file's bytes; a missing, unreadable or empty file raises :class:`DecodeError`."""
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
