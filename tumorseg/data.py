"""Decoded, cached training and validation data.

Each image and mask is read once through :mod:`tumorseg.imageio`, its SHA-256 checked
against the manifest (a changed or missing file stops training with its name), then
normalised, resized to ``image_size`` and kept as one tensor (RAM, or GPU memory when it
fits), so no file is decoded again during training.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tumorseg.errors import TumorsegError
from tumorseg.fsutil import sha256_bytes
from tumorseg.imageio import Decoded, DecodeError, binarize_decoded_mask, decode, read_bytes, slice_of, union_masks
from tumorseg.manifest import MASK_SEP, ManifestInfo, combine_hashes
from tumorseg.model import Stats, preprocess, resize_mask

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Case:
    """One decoded case at its original resolution."""

    case_id: str
    group: str
    image: np.ndarray  # float32 (C, H, W)
    mask: np.ndarray  # uint8 (H, W) in {0, 1}


@dataclass
class CachedSplit:
    """A split ready for the network: inputs at ``image_size`` plus the original masks."""

    case_ids: list[str]
    images: torch.Tensor  # float32 (N, C, h, w), normalised
    masks: torch.Tensor  # uint8 (N, 1, h, w) at image_size (training targets)
    original_masks: list[np.ndarray]  # uint8 (H, W) at the original resolution (scoring)
    originals: list[np.ndarray] | None = None  # float32 (C, H, W), kept only when asked

    def __len__(self) -> int:
        return len(self.case_ids)


class _Reader:
    """Reads, hashes and decodes files for one :func:`load_cases` call.

    A NIfTI volume is read once for all its slice rows (its mask binarised once, as a
    whole); 2D files are not kept.
    """

    def __init__(self, info: ManifestInfo, source: str, threshold: float | None) -> None:
        self.info, self.source, self.threshold = info, source, threshold
        self._volumes: dict[tuple[str, str], tuple[str, Decoded]] = {}
        self._lock = threading.Lock()

    def read(self, path: Path, role: str, keep: bool) -> tuple[str, Decoded]:
        """(SHA-256 of the bytes, decoded file); masks come back binarised."""
        key = (str(path), role)
        if keep:
            with self._lock:
                hit = self._volumes.get(key)
            if hit is not None:
                return hit
        try:
            data = read_bytes(path)
        except DecodeError as exc:
            raise TumorsegError(f"{path}: listed in {self.source} but missing or unreadable; restore it or re-run "
                                "tumorseg ingest") from exc
        decoded = decode(data, path, "mask" if role == "mask" else "image")
        if role == "mask":
            decoded = binarize_decoded_mask(decoded, path, self.threshold)
        out = (sha256_bytes(data), decoded)
        if keep:
            with self._lock:
                self._volumes[key] = out
        return out

    def case(self, row: Any, verify: bool = True) -> Case:
        """One manifest row's image and merged mask, with their hashes checked."""
        root = Path(self.info.data_root)
        slice_index, axis = int(row["slice_index"]), self.info.slice_axis
        volume = slice_index >= 0
        img_path = root / str(row["image"])
        img_sha, img = self.read(img_path, "image", volume)
        if verify and img_sha != row["image_sha256"]:
            raise TumorsegError(f"{img_path}: changed since ingest (sha256 differs); re-run tumorseg ingest")
        mask_files = [root / p for p in str(row["mask"]).split(MASK_SEP)]
        masks = [self.read(p, "mask", volume) for p in mask_files]
        if verify and combine_hashes([sha for sha, _ in masks]) != row["mask_sha256"]:
            raise TumorsegError(f"{mask_files[0]}: changed since ingest (sha256 differs); re-run tumorseg ingest")
        image = slice_of(img, slice_index, axis).astype(np.float32)
        mask = union_masks([slice_of(m, slice_index, axis)[0] for _, m in masks])
        return Case(str(row["case_id"]), str(row["group"]), image, mask)


def load_case(info: ManifestInfo, row: Any, source: str, verify: bool = True) -> Case:
    """Read one manifest row's image and (merged) mask, checking their hashes."""
    return _Reader(info, source, info.mask_threshold).case(row, verify)


def load_cases(info: ManifestInfo, df: pd.DataFrame, source: str, workers: int = 0) -> list[Case]:
    """Decode all rows in parallel threads (decoders release the GIL), in manifest order."""
    reader = _Reader(info, source, info.mask_threshold)
    rows = [r for _, r in df.iterrows()]
    n = workers or min(8, os.cpu_count() or 1)
    if n <= 1 or len(rows) < 4:
        return [reader.case(r) for r in rows]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(reader.case, rows))


def cache_split(
    cases: list[Case], size: tuple[int, int], in_channels: int, keep_originals: bool = False,
    stats: Stats | None = None,
) -> CachedSplit:
    """Preprocess decoded cases into stacked tensors at ``size``."""
    import torch

    images = torch.stack([preprocess(c.image, size, in_channels, stats) for c in cases])
    masks = torch.stack([resize_mask(c.mask, size) for c in cases]).to(torch.uint8)
    return CachedSplit(
        case_ids=[c.case_id for c in cases],
        images=images,
        masks=masks,
        original_masks=[c.mask for c in cases],
        originals=[c.image for c in cases] if keep_originals else None,
    )


def place(split: CachedSplit, device: torch.device, mode: str) -> CachedSplit:
    """Move the cached tensors to the GPU when asked, or when ``auto`` and they fit.

    ``auto`` uses the GPU when the tensors take less than a quarter of the free memory.
    On the CPU (or when they stay in RAM on a CUDA machine) tensors are pinned for
    asynchronous copies.
    """
    import torch

    if device.type != "cuda":
        return split
    nbytes = split.images.numel() * split.images.element_size() + split.masks.numel()
    free, _ = torch.cuda.mem_get_info(device)
    if mode == "gpu" or (mode == "auto" and nbytes < free / 4):
        split.images = split.images.to(device)
        split.masks = split.masks.to(device)
        log.info("cached %d cases on the GPU (%.1f MiB)", len(split), nbytes / 2**20)
    else:
        split.images = split.images.pin_memory()
        split.masks = split.masks.pin_memory()
        log.info("cached %d cases in pinned RAM (%.1f MiB)", len(split), nbytes / 2**20)
    return split


def infer_in_channels(df: pd.DataFrame) -> int:
    """3 if any case is colour, else 1."""
    return 3 if (df["channels"].astype(int) == 3).any() else 1
