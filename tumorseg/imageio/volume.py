"""Volumes as cases: a grid in the one canonical orientation (RAS+), and back onto its own grid.

A volume case is read as nnU-Net and MONAI's ``Orientationd`` do: its axes permuted and flipped
(never resampled) into RAS+ order: axis 0 points Right, axis 1 Anterior, axis 2 Superior. Networks
then see one orientation whatever the scanner wrote; predictions go back through the inverse
permutation and flips onto the file's own grid (:func:`from_canonical`), so masks open over their
image in ITK-SNAP or 3D Slicer.
"""

from __future__ import annotations

import re

import numpy as np

from tumorseg.imageio.base import Decoded, DecodeError


def orientation(affine: np.ndarray) -> np.ndarray:
    """Nibabel's ``(3, 2)`` orientation of a grid: for each stored axis, its RAS axis and direction."""
    import nibabel as nib

    return np.asarray(nib.orientations.io_orientation(affine), dtype=np.float64)


def axcodes(affine: np.ndarray) -> str:
    """The stored orientation's letters, e.g. ``"LPS"`` (DICOM's) or ``"RAS"`` (canonical)."""
    import nibabel as nib

    return "".join(nib.orientations.ornt2axcodes(orientation(affine)))


def canonical_axes(codes: str) -> tuple[int, int, int]:
    """For each canonical (R, A, S) axis, the stored axis it comes from, given the stored letters (``"LPS"``)."""
    out = [0, 0, 0]
    for stored, letter in enumerate(codes):
        out["LRPAIS".index(letter) // 2] = stored
    return out[0], out[1], out[2]


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size of each stored axis (mm): the affine's column norms."""
    zooms = np.sqrt(np.square(np.asarray(affine, dtype=np.float64)[:3, :3]).sum(axis=0))
    return float(zooms[0]), float(zooms[1]), float(zooms[2])


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size along the canonical (RAS) axes."""
    stored = spacing_of(affine)
    out = [0.0, 0.0, 0.0]
    for axis, (ras, _) in enumerate(orientation(affine)):
        out[int(ras)] = stored[axis]
    return out[0], out[1], out[2]


def to_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A stored ``(X, Y, Z)`` grid (or ``(C, X, Y, Z)``) in RAS+ axis order (permuted and flipped, not resampled)."""
    import nibabel as nib

    ornt = orientation(affine)
    if array.ndim == 4:
        return np.stack([to_canonical(a, affine) for a in array])
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, ornt))


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_canonical`: a RAS+ ordered grid (or ``(K, X, Y, Z)``) back on the file's axes."""
    import nibabel as nib

    if array.ndim == 4:
        return np.stack([from_canonical(a, affine) for a in array])
    back = nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]], dtype=np.float64), orientation(affine))
    return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def volume_of(decoded: Decoded, path: str) -> np.ndarray:
    """A decoded grid as the ``float32 (C, X, Y, Z)`` canonical image of a volume case (C: a 4D file's channels).

    Raises:
        DecodeError: a 2D file where a volume is expected (one line naming it).
    """
    if not decoded.is_volume:
        raise DecodeError(f"{path}: a 2D image in a set of 3D volumes; ingest it on its own, or ingest the set "
                          "with --slice-axis 2 to train on slices")
    assert decoded.affine is not None
    arr = decoded.array
    channels = np.moveaxis(arr, -1, 0) if arr.ndim == 4 else arr[None]  # (C, X, Y, Z): MR sequences first
    return to_canonical(channels, decoded.affine).astype(np.float32, copy=False)


CHANNEL_FILE = re.compile(r"^(?P<base>.+)_(?P<channel>\d{4})$")
"""nnU-Net's one-file-per-channel naming: ``<case>_0000``, ``<case>_0001``, ... (the stem, extension removed)."""


def stack_channels(files: list[Decoded], paths: list[str]) -> Decoded:
    """One multi-channel volume from one volume file per channel (nnU-Net's ``case_0000``, ``case_0001``, ...).

    Raises:
        DecodeError: a file that is not a one-channel volume, or one on another grid than the first (naming both).
    """
    first = files[0]
    for dec, path in zip(files, paths, strict=True):
        if not dec.is_volume or dec.array.ndim != 3:
            raise DecodeError(f"{path}: a channel file must be a one-channel 3D volume (got shape {dec.array.shape})")
        assert dec.affine is not None and first.affine is not None
        if dec.array.shape != first.array.shape or not np.allclose(dec.affine, first.affine, atol=1e-3):
            raise DecodeError(f"{path}: on another grid than {paths[0]} (shape {dec.array.shape} vs "
                              f"{first.array.shape}, or another affine); the channels of a case share one grid")
    return Decoded(np.stack([d.array for d in files], axis=-1), first.mode, first.affine)
