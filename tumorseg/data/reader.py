"""From manifest rows to arrays: the one case reader.

:class:`CaseReader` reads each image and mask through :mod:`tumorseg.imageio` and checks its
SHA-256 against the manifest (a changed or missing file stops the stage with its name);
train, evaluate and the planner all read cases through it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from tumorseg.errors import TumorsegError
from tumorseg.fsutil import sha256_bytes
from tumorseg.imageio import (
    Decoded,
    DecodeError,
    binarize_decoded_mask,
    decode,
    label_decoded_mask,
    plane_spacing,
    read_bytes,
    slice_of,
    union_masks,
)
from tumorseg.imageio.volume import canonical_spacing, stack_channels, to_canonical, volume_of
from tumorseg.manifest import MASK_SEP, ManifestInfo, combine_hashes
from tumorseg.streaming import prefetch

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Case:
    """One decoded case at its original resolution.

    Attributes:
        index: the row's position in the frame it was read from.
        case_id: the manifest's case id.
        group: the patient (group) it belongs to.
        image: ``float32 (C, H, W)``; a volume case (``manifest.json`` ``dims: 3``): ``(C, X, Y, Z)`` in
            canonical RAS+ axis order (:mod:`tumorseg.imageio.volume`).
        mask: ``uint8 (H, W)`` (or ``(X, Y, Z)``) in ``{0, 1}`` or class indices (several files merged by union).
        spacing: pixel size ``(dy, dx)`` from a NIfTI image's affine (usually mm), ``(dx, dy, dz)`` of a volume
            case; ``None`` for PNG/TIFF.
    """

    index: int
    case_id: str
    group: str
    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, ...] | None = None


class CaseReader:
    """Turns manifest rows into :class:`Case` arrays: the one reader of train and evaluate.

    Every file is read through :mod:`tumorseg.imageio` and its SHA-256 checked against the
    manifest, so a file changed since ingest stops the stage with its name instead of being
    used silently. A NIfTI volume is decoded once for its consecutive slice rows (its mask
    binarised once, as a whole, the rule ingest validated) and kept in a small LRU, so
    memory stays bounded whatever the number of rows. A reader belongs to one stage call:
    a new call makes a new reader and sees the files as they are now.

    Args:
        info: the manifest's ``manifest.json``.
        source: the manifest path named in error messages.
        volumes: how many decoded NIfTI volumes to keep.
        context: the slice context to add to each image (2.5D models), or ``None``.
        crop: volume cases come cropped to the box of their nonzero voxels (training's ``crop_nonzero``, the
            box inference cuts too: :mod:`tumorseg.cropping`); other readers see whole volumes.
    """

    def __init__(self, info: ManifestInfo, source: str, volumes: int = 4,
                 context: SliceContext | None = None, crop: bool = False) -> None:
        self.info, self.source = info, source
        self.context = context
        self.crop = crop and info.dims == 3
        self._volumes: OrderedDict[tuple[str, str], tuple[str, Decoded]] = OrderedDict()
        self._max_volumes = max(1, volumes)
        self._lock = threading.Lock()

    def _read(self, path: Path, role: str, volume: bool) -> tuple[str, Decoded]:
        """(SHA-256 of the bytes, decoded file); masks come back binarised."""
        key = (str(path), role)
        if volume:
            with self._lock:
                hit = self._volumes.get(key)
                if hit is not None:
                    self._volumes.move_to_end(key)
                    return hit
        try:
            data = read_bytes(path)
        except DecodeError as exc:
            raise TumorsegError(f"{path}: listed in {self.source} but missing or unreadable; restore it or re-run "
                                "tumorseg ingest") from exc
        decoded = decode(data, path, "mask" if role == "mask" else "image")
        if role == "mask":
            labels = self.info.label_set
            if labels:
                decoded = label_decoded_mask(decoded, path, labels)
            else:
                decoded = binarize_decoded_mask(decoded, path, self.info.mask_threshold)
        out = (sha256_bytes(data), decoded)
        if volume:
            with self._lock:
                self._volumes[key] = out
                while len(self._volumes) > self._max_volumes:
                    self._volumes.popitem(last=False)
        return out

    def _image(self, row: Mapping[Any, Any]) -> tuple[Decoded, np.ndarray]:
        """A row's decoded file (hash checked) and its ``float32 (C, H, W)`` plane (or canonical volume)."""
        slice_index = int(row["slice_index"])
        paths = [Path(self.info.data_root) / p for p in str(row["image"]).split(MASK_SEP)]
        img_path = paths[0]
        if len(paths) == 1:
            img_sha, img = self._read(img_path, "image", slice_index >= 0)
        else:  # one file per channel (nnU-Net's naming): one volume
            read = [self._read(p, "image", False) for p in paths]
            img_sha = combine_hashes([sha for sha, _ in read])
            try:
                img = stack_channels([dec for _, dec in read], [str(p) for p in paths])
            except DecodeError as exc:
                raise TumorsegError(f"{exc}; re-run tumorseg ingest") from exc
        if img_sha != row["image_sha256"]:
            raise TumorsegError(f"{img_path}: changed since ingest (sha256 differs); re-run tumorseg ingest")
        if self.info.dims == 3:
            return img, volume_of(img, str(img_path))
        return img, slice_of(img, slice_index, self.info.slice_axis).astype(np.float32)

    def read(self, row: Mapping[Any, Any], index: int = 0) -> Case:
        """One manifest row's image and merged mask, with their hashes and shapes checked.

        With slice context the image holds the row's window of neighbouring slices (:mod:`tumorseg.context`).
        """
        root = Path(self.info.data_root)
        slice_index, axis = int(row["slice_index"]), self.info.slice_axis
        volume = slice_index >= 0 or self.info.dims == 3
        img_path = root / str(row["image"]).split(MASK_SEP)[0]
        img, image = self._image(row)
        if self.context is not None:
            image = self.context.image(str(row["case_id"]), image, lambda r: self._image(r)[1])
        mask_files = [root / p for p in str(row["mask"]).split(MASK_SEP)]
        masks = [self._read(p, "mask", volume) for p in mask_files]
        if combine_hashes([sha for sha, _ in masks]) != row["mask_sha256"]:
            raise TumorsegError(f"{mask_files[0]}: changed since ingest (sha256 differs); re-run tumorseg ingest")
        if self.info.dims == 3:
            assert img.affine is not None  # volume_of checked it is a grid
            mask = union_masks([to_canonical(m.array, img.affine) for _, m in masks])
            spacing: tuple[float, ...] | None = canonical_spacing(img.affine)
        else:
            mask = union_masks([slice_of(m, slice_index, axis)[0] for _, m in masks])
            spacing = plane_spacing(img, slice_index, axis)
        if tuple(image.shape[1:]) != tuple(mask.shape):
            shapes = "x".join(str(s) for s in image.shape[1:]), "x".join(str(s) for s in mask.shape)
            raise TumorsegError(f"{img_path}: image {shapes[0]} but mask {shapes[1]}; re-run tumorseg ingest")
        if self.crop:
            from tumorseg.cropping import nonzero_box

            box = nonzero_box(image)
            cut = np.ascontiguousarray(mask[box])
            lost = int(np.count_nonzero(mask)) - int(np.count_nonzero(cut))
            if lost:  # nnU-Net drops them too; evaluate, on the whole volume, counts them as missed
                log.warning("%s: %d labelled voxels lie outside the image's nonzero box; training and its val "
                            "score see the box only", img_path, lost)
            image, mask = np.ascontiguousarray(image[(slice(None), *box)]), cut
        return Case(index, str(row["case_id"]), str(row["group"]), image, mask, spacing)

    def stream(self, df: pd.DataFrame, workers: int = 0, ahead: int = 32) -> Iterator[Case]:
        """Cases of ``df`` in order, decoded by ``workers`` threads at most ``ahead`` rows in advance."""
        return prefetch(lambda ir: self.read(ir[1], ir[0]), enumerate(_records(df)), workers, ahead)

    def map(self, fn: Callable[[Case], T], df: pd.DataFrame, workers: int = 0) -> Iterator[T]:
        """``fn(case)`` for the cases of ``df`` in order, decoded and run by ``workers`` threads.

        Decoders and torch release the GIL, so the threads overlap; ``workers=0``: one per core, at most 8.
        """
        n = workers or min(8, os.cpu_count() or 1)
        if n <= 1 or len(df) < 4:
            n = 0
        return prefetch(lambda ir: fn(self.read(ir[1], ir[0])), enumerate(_records(df)), n, max(2 * n, 1))

    def read_all(self, df: pd.DataFrame, workers: int = 0) -> list[Case]:
        """All cases of ``df`` in manifest order."""
        return list(self.map(lambda case: case, df, workers))


@dataclass(frozen=True)
class SliceContext:
    """What a reader needs to give each case its neighbouring slices (:mod:`tumorseg.context`).

    Attributes:
        k: neighbours a side.
        channels: the base channels each plane is converted to (the image's own: 1 or 3).
        windows: case id -> the manifest rows of its window (``2k + 1``, the case at the middle); cases in
            no stack repeat their own plane.
    """

    k: int
    channels: int
    windows: dict[str, list[dict[str, Any]]]

    @classmethod
    def of(cls, df: pd.DataFrame, k: int, channels: int, missing: str | None = None) -> SliceContext:
        """The windows of every case of a manifest frame (neighbours come from the whole manifest).

        Raises:
            TumorsegError: ``missing`` (the one-line message), when given and the frame holds no ordered stack.
        """
        from tumorseg.context import SliceStacks

        stacks = SliceStacks.from_frame(df)
        if missing is not None and not stacks.runs:
            raise TumorsegError(missing)
        rows = {str(r["case_id"]): r for r in _records(df)}
        windows = {cid: [rows[n] for n in ids] for cid, ids in stacks.neighbours(k).items()}
        return cls(k, channels, windows)

    def image(self, case_id: str, plane: np.ndarray, read: Callable[[dict[str, Any]], np.ndarray]) -> np.ndarray:
        """``(channels * (2k + 1), H, W)``: the case's window, each neighbour read once with ``read``."""
        from tumorseg.context import window_image

        rows = self.windows.get(case_id)
        if rows is None:  # in no stack: the plane is its own neighbour
            return window_image([plane] * (2 * self.k + 1), self.channels)
        planes: dict[str, np.ndarray] = {case_id: plane}
        for r in rows:
            cid = str(r["case_id"])
            if cid not in planes:
                planes[cid] = read(r)
        sizes = {cid: p.shape[1:] for cid, p in planes.items()}
        odd = next((cid for cid, size in sizes.items() if size != plane.shape[1:]), None)
        if odd is not None:
            raise TumorsegError(f"{case_id}: its neighbouring slice {odd} is {sizes[odd][0]}x{sizes[odd][1]}, the "
                                f"case {plane.shape[1]}x{plane.shape[2]}; slices of one stack must share a size "
                                "(train without slice context: --set slice_context=0)")
        return window_image([planes[str(r["case_id"])] for r in rows], self.channels)


def _records(df: pd.DataFrame) -> Iterator[dict[str, Any]]:
    """The rows of ``df`` as dicts, one at a time (``to_dict("records")`` would hold them all)."""
    columns = list(df.columns)
    return (dict(zip(columns, values, strict=True)) for values in df.itertuples(index=False, name=None))


def infer_in_channels(df: pd.DataFrame) -> int:
    """3 if any case is colour, else 1; multi-channel volumes (MR sequences): their channel count."""
    channels = df["channels"].astype(int)
    most = int(channels.max()) if len(channels) else 1
    return most if most not in (1, 3) else (3 if (channels == 3).any() else 1)
