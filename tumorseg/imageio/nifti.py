"""NIfTI through nibabel: 2D images and 3D volumes as ``(X, Y, Z)`` grids with their affine."""

from __future__ import annotations

import gzip
import io
import os
from typing import Any

import numpy as np

from tumorseg.fsutil import atomic_path
from tumorseg.imageio.base import Decoded, DecodeError

MAX_CHANNELS = 8
"""A 4D NIfTI with at most this many volumes on its last axis is one multi-channel volume (MR sequences)."""


def decode_nifti(data: bytes, path: str | os.PathLike[str]) -> Decoded:
    """Decode a ``.nii``/``.nii.gz`` file as stored, ``(X, Y[, Z])`` (a 2D file gets ``Z == 1``).

    A 4D file of a few volumes (``(X, Y, Z, C)``, C up to :data:`MAX_CHANNELS`) is one volume with C channels.
    """
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        # the header as written: nibabel would quietly turn a zero voxel size into 1
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
        ndim = min(3, int(header["dim"][0]))
        zooms = tuple(float(z) for z in header["pixdim"][1 : 1 + ndim])
    except Exception as exc:  # nibabel (and gzip, for a file cut short) raise several types
        raise DecodeError(f"{path}: truncated or corrupt NIfTI ({exc}); re-export the file") from exc
    if any(not z > 0 for z in zooms):
        raise DecodeError(f"{path}: voxel spacing {zooms} in the header is zero or negative; fix the header's pixdim")
    try:
        img = nib.Nifti1Image.from_bytes(raw)
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for broken files
        raise DecodeError(f"{path}: truncated or corrupt NIfTI ({exc}); re-export the file") from exc
    if arr.size == 0:
        raise DecodeError(f"{path}: zero-sized NIfTI volume {arr.shape}; re-export the file")
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[2] > 1 and arr.shape[3] <= MAX_CHANNELS)):
        raise DecodeError(f"{path}: NIfTI with shape {arr.shape}; only 2D images, 3D volumes and 4D volumes of up "
                          f"to {MAX_CHANNELS} channels (MR sequences, last axis) are supported")
    if arr.size == 0:
        raise DecodeError(f"{path}: zero-sized NIfTI volume {arr.shape}; re-export the file")
    return Decoded(np.ascontiguousarray(arr), "NIfTI", np.asarray(img.affine, dtype=np.float64))


def nifti_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """A NIfTI file's shape from its header; a broken header is a :class:`DecodeError`."""
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))  # header only; the data is read by the one loader
    except Exception as exc:  # nibabel raises several types for broken files
        raise DecodeError(f"{path}: truncated or corrupt NIfTI ({exc.__class__.__name__}); re-export the file"
                          ) from exc
    return tuple(int(s) for s in img.shape)


def write_nifti(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Write an array as NIfTI (``.nii`` or ``.nii.gz`` by name), atomically."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine)
    suffix = ".nii.gz" if str(path).lower().endswith(".gz") else ".nii"
    with atomic_path(path) as tmp:
        target = tmp.with_name(tmp.name + suffix)
        nib.save(img, str(target))
        os.replace(target, tmp)
