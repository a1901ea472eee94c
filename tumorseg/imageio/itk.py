"""NRRD and MHA/MHD through SimpleITK (the optional ``itk`` extra), as ``(X, Y, Z)`` grids in RAS+.

SimpleITK rather than ITK's Python wrapping (MONAI's ``ITKReader``): one 53 MB wheel with no
dependencies that imports in 0.25 s, where ``itk`` is several packages and over 100 MB.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.imageio.base import Decoded, DecodeError, affine_from_lps, grid_from_zyx

EXTRA = "pip install 'tumorseg[itk]'"


def _sitk(path: str | os.PathLike[str]) -> Any:
    try:
        import SimpleITK
    except ImportError as exc:
        raise DecodeError(f"{path}: reading NRRD/MHA/MHD needs SimpleITK, which is not installed; {EXTRA}") from exc
    return SimpleITK


def decode_itk(path: str | os.PathLike[str]) -> Decoded:
    """Read a scalar 2D or 3D NRRD/MHA/MHD image as a grid (a 2D image gets ``Z == 1``)."""
    sitk = _sitk(path)
    try:
        img = sitk.ReadImage(os.fspath(path))
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "rror" in ln), "unreadable")
        raise DecodeError(f"{path}: truncated or corrupt {Path(path).suffix[1:].upper()} file ({first[:160]}); "
                          "re-export the file") from exc
    return _grid(sitk, img, path)


def _grid(sitk: Any, img: Any, path: str | os.PathLike[str]) -> Decoded:
    dim = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise DecodeError(f"{path}: {img.GetNumberOfComponentsPerPixel()} components per voxel; save one scalar "
                          "image per file (channels as separate files)")
    if dim not in (2, 3):
        raise DecodeError(f"{path}: {dim}D image; only 2D images and 3D volumes are supported")
    arr = sitk.GetArrayFromImage(img)  # (Z, Y, X) or (Y, X)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    if dim == 2:
        arr = arr[None]
        direction = np.pad(direction, ((0, 1), (0, 1)))
        direction[2, 2] = 1.0
        spacing, origin = np.append(spacing, 1.0), np.append(origin, 0.0)
    kind = "NRRD" if str(path).lower().endswith(".nrrd") else "MHA"
    return grid_from_zyx(arr, affine_from_lps(direction, spacing, origin), kind, path)


def itk_shape(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """The ``(X, Y, Z)`` size of a 3D NRRD/MHA/MHD from its header; ``None`` for a 2D image."""
    sitk = _sitk(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(os.fspath(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise DecodeError(f"{path}: truncated or corrupt header; re-export the file") from exc
    size = tuple(int(s) for s in reader.GetSize())
    return size if len(size) == 3 and size[2] > 1 else None


def mhd_data_file(header: bytes, path: str | os.PathLike[str]) -> Path | None:
    """The data file an MHD header names (``ElementDataFile``), or ``None`` when the data is inline (``LOCAL``)."""
    for line in header.decode("latin-1", "replace").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            name = value.strip()
            if name.upper() == "LOCAL" or not name:
                return None
            if name.upper().startswith("LIST") or "%" in name:
                raise DecodeError(f"{path}: MHD data split over several files ({name}); save it as one .mha file")
            return Path(path).parent / name
    raise DecodeError(f"{path}: MHD header without ElementDataFile; re-export the file")

