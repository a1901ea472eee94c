"""DICOM through pydicom: single-frame images, multi-frame files and series folders (one volume).

Stored values go through the modality LUT (RescaleSlope/Intercept: Hounsfield units for CT), and
MONOCHROME1 images (white is zero) are inverted so that bright means high everywhere. A series
folder is sorted by each slice's position along the normal of its orientation, as every viewer does,
and refused when a slice is missing or the slices do not share one orientation. Positions and
orientations are LPS+ (DICOM's); the grid's affine is RAS+ like NIfTI's.
"""

from __future__ import annotations

import io
import os
from functools import lru_cache
from typing import Any

import numpy as np

from tumorseg.imageio.base import Decoded, DecodeError, affine_from_lps, grid_from_zyx

EXTRA = "pip install 'tumorseg[dicom]'"
DICOM_EXTENSIONS = (".dcm", ".dicom")

DECODABLE_WITH_EXTRA = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",  # JPEG baseline / extended
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",  # JPEG lossless
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",  # JPEG-LS
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE
}
"""Compressed transfer syntaxes that pylibjpeg's plugins (the ``dicom`` extra) decode."""

GAP_TOLERANCE = 1.5
"""A step between sorted slice positions over this many times the median step is a missing slice."""


def _pydicom(path: str | os.PathLike[str]) -> Any:
    try:
        import pydicom
    except ImportError as exc:  # pragma: no cover - pydicom is a core dependency
        raise DecodeError(f"{path}: reading DICOM needs pydicom; {EXTRA}") from exc
    return pydicom


def _read(source: Any, path: str | os.PathLike[str], header_only: bool = False) -> Any:
    pydicom = _pydicom(path)
    try:
        return pydicom.dcmread(source, stop_before_pixels=header_only, force=True)
    except Exception as exc:  # pydicom raises several types for broken files
        raise DecodeError(f"{path}: truncated or corrupt DICOM ({exc}); re-export the file") from exc


def _pixels(ds: Any, path: str | os.PathLike[str]) -> np.ndarray:
    """The stored pixel values, with a one-line error for objects without pixels or undecodable syntaxes."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        what = str(getattr(ds, "Modality", "") or getattr(ds, "SOPClassUID", "") or "unknown")
        raise DecodeError(f"{path}: DICOM without pixel data ({what}: a structured report or other non-image "
                          "object); give the image files of the series")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        return np.asarray(ds.pixel_array)
    except Exception as exc:  # missing decoders raise RuntimeError/NotImplementedError, broken data others
        if ts is not None and ts.is_compressed:
            name = getattr(ts, "name", str(ts))
            if str(ts) in DECODABLE_WITH_EXTRA:
                raise DecodeError(f"{path}: compressed DICOM ({name}) and no decoder for it is installed; "
                                  f"{EXTRA} (pylibjpeg), or re-export uncompressed") from exc
            raise DecodeError(f"{path}: DICOM transfer syntax {name} ({ts}) is not an image compression tumorseg "
                              "can decode; re-export the images uncompressed") from exc
        raise DecodeError(f"{path}: truncated or corrupt DICOM pixel data ({exc}); re-export the file") from exc


def _values(ds: Any, arr: np.ndarray) -> np.ndarray:
    """Stored values -> modality values (RescaleSlope/Intercept or a modality LUT), MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        arr = apply_modality_lut(arr, ds)
        if photometric == "MONOCHROME1":  # white is 0: flip over the image's own range
            arr = arr.max() + arr.min() - arr
    return arr


def _spacing2d(ds: Any) -> tuple[float, float] | None:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, key, None)
        if value is not None and len(value) == 2 and float(value[0]) > 0 and float(value[1]) > 0:
            return float(value[0]), float(value[1])
    return None


def decode_dicom(data: bytes, path: str | os.PathLike[str]) -> Decoded:
    """A single DICOM file: a ``(C, H, W)`` image, or a grid for a multi-frame grey file."""
    ds = _read(io.BytesIO(data), path)
    arr = _pixels(ds, path)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    modality = str(getattr(ds, "Modality", "") or "OT")
    if frames > 1:
        if samples != 1:
            raise DecodeError(f"{path}: multi-frame colour DICOM ({frames} frames: a cine loop?); export the "
                              "frames as single images")
        return grid_from_zyx(_values(ds, arr), _multiframe_affine(ds), f"DICOM:{modality}", path)
    if samples == 1:
        arr = _values(ds, arr)[None]
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = np.ascontiguousarray(np.moveaxis(arr[:, :, :3], 2, 0))
    else:
        raise DecodeError(f"{path}: DICOM with {samples} samples per pixel and shape {arr.shape}; save grey or RGB")
    return Decoded(arr, f"DICOM:{modality}", pixel_spacing=_spacing2d(ds))


def _orientation(ds: Any) -> np.ndarray | None:
    value = getattr(ds, "ImageOrientationPatient", None)
    return np.asarray([float(v) for v in value], dtype=np.float64) if value is not None and len(value) == 6 else None


def _position(ds: Any) -> np.ndarray | None:
    value = getattr(ds, "ImagePositionPatient", None)
    return np.asarray([float(v) for v in value], dtype=np.float64) if value is not None and len(value) == 3 else None


def _frame_geometry(ds: Any) -> tuple[np.ndarray | None, np.ndarray | None, tuple[float, float] | None]:
    """Orientation, first position and in-plane spacing of a multi-frame file (shared or per-frame groups)."""
    iop, ipp, spacing = _orientation(ds), _position(ds), _spacing2d(ds)
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = getattr(ds, group, None)
        if not seq:
            continue
        item = seq[0]
        if iop is None and getattr(item, "PlaneOrientationSequence", None):
            iop = _orientation(item.PlaneOrientationSequence[0])
        if ipp is None and getattr(item, "PlanePositionSequence", None):
            ipp = _position(item.PlanePositionSequence[0])
        if spacing is None and getattr(item, "PixelMeasuresSequence", None):
            spacing = _spacing2d(item.PixelMeasuresSequence[0])
    return iop, ipp, spacing


def _multiframe_affine(ds: Any) -> np.ndarray:
    """The frames' grid (RAS+ affine).

    The step between frames comes from their own positions (signed: frames stored from head to feet go down),
    else from the slice spacing of the file or of its shared pixel measures (enhanced DICOM).
    """
    iop, ipp, spacing = _frame_geometry(ds)
    if iop is None:
        iop = np.array([1.0, 0, 0, 0, 1, 0])
    dy, dx = spacing or (1.0, 1.0)
    positions = _frame_positions(ds)
    if len(positions) > 1:
        step = float(np.dot((positions[-1] - positions[0]) / (len(positions) - 1), np.cross(iop[:3], iop[3:])))
        if abs(step) > 1e-6:
            return _affine(iop, positions[0], dx, dy, step)
    measures = [ds, *(g[0].PixelMeasuresSequence[0] for g in (getattr(ds, "SharedFunctionalGroupsSequence", None),)
                      if g and getattr(g[0], "PixelMeasuresSequence", None))]
    dz = next((float(v) for m in measures for key in ("SpacingBetweenSlices", "SliceThickness")
               if (v := getattr(m, key, None))), 1.0)
    return _affine(iop, ipp if ipp is not None else np.zeros(3), dx, dy, abs(dz))


def _frame_positions(ds: Any) -> list[np.ndarray]:
    """Each frame's ImagePositionPatient (per-frame functional groups), or ``[]`` where any frame lacks one."""
    out = []
    for item in getattr(ds, "PerFrameFunctionalGroupsSequence", None) or []:
        seq = getattr(item, "PlanePositionSequence", None)
        pos = _position(seq[0]) if seq else None
        if pos is None:
            return []
        out.append(pos)
    return out


def _affine(iop: np.ndarray, origin: np.ndarray, dx: float, dy: float, dz: float) -> np.ndarray:
    """RAS+ affine of a ``(X=column, Y=row, Z=slice)`` grid from DICOM's LPS+ geometry."""
    row_dir, col_dir = iop[:3], iop[3:]
    direction = np.stack([row_dir, col_dir, np.cross(row_dir, col_dir)], axis=1)
    return affine_from_lps(direction, np.array([dx, dy, dz]), origin)


# ----------------------------------------------------------------------------- series folders


def _is_dicom_name(name: str) -> bool:
    return name.lower().endswith(DICOM_EXTENSIONS)


def _has_preamble(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def series_files(folder: str | os.PathLike[str]) -> list[str]:
    """The DICOM files of a folder in name order (``*.dcm``/``*.dicom``, or extensionless with the DICM preamble)."""
    out = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            if _is_dicom_name(entry.name) or ("." not in entry.name and _has_preamble(entry.path)):
                out.append(entry.path)
    return sorted(out)


def is_series_folder(folder: str | os.PathLike[str]) -> bool:
    """True for a folder whose DICOM files are the slices of one series (one volume).

    Every file must be a single-frame slice with a position and orientation and all must share one
    SeriesInstanceUID; a folder of separate 2D DICOM images (ultrasound, X-ray exports) is not a series.
    """
    try:
        stat = os.stat(folder)
    except OSError:
        return False
    return _is_series(os.fspath(folder), stat.st_mtime_ns)


@lru_cache(maxsize=4096)
def _is_series(folder: str, _mtime_ns: int) -> bool:
    try:
        files = series_files(folder)
        names = [e.name for e in os.scandir(folder) if not e.name.startswith(".")]
    except OSError:
        return False
    if len(files) < 2 or any(os.path.isdir(os.path.join(folder, n)) for n in names):
        return False
    uids = set()
    for f in files:
        try:
            ds = _read(f, f, header_only=True)
        except DecodeError:
            continue  # a broken slice: decode_series names it
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 or _position(ds) is None:
            return False
        uids.add(str(getattr(ds, "SeriesInstanceUID", "")))
    return len(uids) == 1


def decode_series(folder: str | os.PathLike[str]) -> Decoded:
    """A series folder as one ``(X, Y, Z)`` grid sorted along the normal; gaps and mixed orientations refused."""
    files = series_files(folder)
    slices = [(f, _read(f, f)) for f in files]
    iops = [_orientation(ds) for _, ds in slices]
    if any(o is None for o in iops):
        bad = next(f for (f, _), o in zip(slices, iops, strict=True) if o is None)
        raise DecodeError(f"{bad}: slice without ImageOrientationPatient in series {folder}; re-export the series")
    ref = iops[0]
    assert ref is not None
    for (f, _), o in zip(slices, iops, strict=True):
        if o is None or not np.allclose(o, ref, atol=1e-3):
            raise DecodeError(f"{folder}: mixed orientations in one series ({os.path.basename(f)} differs from "
                              f"{os.path.basename(files[0])}); put each orientation's slices in its own folder")
    normal = np.cross(ref[:3], ref[3:])
    positions = [_position(ds) for _, ds in slices]
    along = np.array([float(np.dot(p, normal)) for p in positions if p is not None])
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if np.any(steps < 1e-4):
        i = int(np.argmin(steps))
        raise DecodeError(f"{folder}: two slices at one position ({os.path.basename(slices[order[i]][0])}, "
                          f"{os.path.basename(slices[order[i + 1]][0])}); keep one of them")
    median = float(np.median(steps))
    if np.any(steps > GAP_TOLERANCE * median):
        i = int(np.argmax(steps))
        raise DecodeError(f"{folder}: missing slice between {os.path.basename(slices[order[i]][0])} and "
                          f"{os.path.basename(slices[order[i + 1]][0])} ({steps[i]:.3g} mm apart, the series' step "
                          f"is {median:.3g} mm); restore the slice or export the whole series")
    planes = []
    shape = None
    for k in order:
        f, ds = slices[k]
        arr = _pixels(ds, f)
        if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1:
            raise DecodeError(f"{f}: colour slice in a series; volumes are grey")
        if shape is not None and arr.shape != shape:
            raise DecodeError(f"{f}: slice of {arr.shape[0]}x{arr.shape[1]} in a series of {shape[0]}x{shape[1]}")
        shape = arr.shape
        planes.append(_values(ds, arr).astype(np.float32))
    first = slices[order[0]][1]
    dy, dx = _spacing2d(first) or (1.0, 1.0)
    origin = positions[order[0]]
    assert origin is not None
    affine = _affine(ref, origin, dx, dy, median)
    return grid_from_zyx(np.stack(planes), affine, f"DICOM-series:{getattr(first, 'Modality', 'OT')}", folder)


def series_shape(folder: str | os.PathLike[str]) -> tuple[int, int, int]:
    """``(X, Y, Z)`` of a series folder from its headers."""
    files = series_files(folder)
    ds = _read(files[0], files[0], header_only=True)
    return int(ds.Columns), int(ds.Rows), len(files)


def dicom_shape(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    """``(X, Y, Z)`` of a multi-frame DICOM file from its header; ``None`` for a single frame."""
    ds = _read(path, path, header_only=True)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return (int(ds.Columns), int(ds.Rows), frames) if frames > 1 else None
