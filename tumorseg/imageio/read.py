"""From a path to a decoded file: each format's decoder chosen by the path, and the bytes an image is made of."""

from __future__ import annotations

import os
from typing import Literal

from tumorseg.imageio import dicom, itk, nifti, pillow, tiff
from tumorseg.imageio.base import EXTENSIONS, FORMATS_TEXT, Decoded, DecodeError, Format, read_file, split_ext


def image_format(path: str | os.PathLike[str]) -> Format | None:
    """The format of a path by its extension (a DICOM series folder by its files), or ``None`` if unsupported."""
    fmt = EXTENSIONS.get(split_ext(os.path.basename(os.fspath(path)))[1])
    if fmt is None and os.path.isdir(path):
        return "dicom-series" if dicom.is_series_folder(path) else None
    return fmt


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The bytes that make up an image: what its SHA-256 is taken of.

    A plain file's bytes; an MHD header followed by its data file; a DICOM series folder's files
    in name order, each behind its name. A missing or empty file raises :class:`DecodeError`.
    """
    fmt = image_format(path)
    if fmt == "dicom-series":
        return b"".join(os.path.basename(f).encode() + b"\0" + read_file(f) for f in dicom.series_files(path))
    data = read_file(path)
    if fmt == "itk" and split_ext(os.fspath(path))[1] == ".mhd":
        extra = itk.mhd_data_file(data, path)
        if extra is not None:
            data += b"\0" + read_file(extra)
    return data


def source_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of :func:`read_bytes` (what ingest records); a plain file is hashed as it streams."""
    from tumorseg.fsutil import sha256_bytes, sha256_file

    fmt = image_format(path)
    if fmt == "dicom-series" or (fmt == "itk" and split_ext(os.fspath(path))[1] == ".mhd"):
        return sha256_bytes(read_bytes(path))
    return sha256_file(path)


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
        return pillow.decode_pillow(data, path, role, fmt)
    if fmt == "tiff":
        return tiff.decode_tiff(data, path)
    if fmt == "nifti":
        return nifti.decode_nifti(data, path)
    if fmt == "dicom":
        return dicom.decode_dicom(data, path)
    if fmt == "dicom-series":
        return dicom.decode_series(path)
    if fmt == "itk":
        return itk.decode_itk(path)
    raise DecodeError(f"{path}: unsupported format; use {FORMATS_TEXT}")


def volume_shape(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """The ``(X, Y, Z)`` shape of a volume file from its header alone; ``None`` for a 2D image.

    Cheap (headers only, no pixel data), so predict can plan its outputs before it decodes anything.
    """
    fmt = image_format(path)
    if fmt == "nifti":
        shape = nifti.nifti_shape(path)
        return shape if any(s != 1 for s in shape[2:]) else None
    if fmt == "itk":
        return itk.itk_shape(path)
    if fmt == "dicom-series":
        return dicom.series_shape(path)
    if fmt == "dicom":
        return dicom.dicom_shape(path)
    if fmt == "tiff":  # the page rules live with the decoder; TIFF stacks are small next to the network's work
        decoded = decode(read_bytes(path), path)
        return tuple(decoded.array.shape) if decoded.is_volume else None
    return None


