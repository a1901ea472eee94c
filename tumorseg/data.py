"""Decoded, cached training and validation data.

Each image and mask is read once through :mod:`tumorseg.imageio`, its SHA-256 checked
against the manifest (a changed or missing file stops training with its name), then
normalised, resized to ``image_size`` and kept as one tensor (RAM, or GPU memory when it
fits), so no file is decoded again during training.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tumorseg.errors import TumorsegError
from tumorseg.fsutil import sha256_bytes
from tumorseg.imageio import DecodeError, binarize_mask, decode, mask_plane, read_bytes, slice_of
from tumorseg.manifest import MASK_SEP, ManifestInfo
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


def _read_checked(path: Path, expected: str | None, source: str) -> bytes:
    try:
        data = read_bytes(path)
    except DecodeError as exc:
        raise TumorsegError(f"{path}: listed in {source} but missing or unreadable; restore it or re-run "
                            "tumorseg ingest") from exc
    return data


def load_case(info: ManifestInfo, row: Any, source: str, verify: bool = True) -> Case:
    """Read one manifest row's image and (merged) mask, checking their hashes."""
    root = Path(info.data_root)
    img_path = root / str(row["image"])
    data = _read_checked(img_path, row["image_sha256"], source)
    if verify and sha256_bytes(data) != row["image_sha256"]:
        raise TumorsegError(f"{img_path}: changed since ingest (sha256 differs); re-run tumorseg ingest")
    slice_index, axis = int(row["slice_index"]), info.slice_axis
    image = slice_of(decode(data, img_path, "image"), slice_index, axis).astype(np.float32)
    mask_files = [root / p for p in str(row["mask"]).split(MASK_SEP)]
    blobs = [_read_checked(p, None, source) for p in mask_files]
    hashes = [sha256_bytes(b) for b in blobs]
    combined = hashes[0] if len(hashes) == 1 else sha256_bytes("\n".join(hashes).encode())
    if verify and combined != row["mask_sha256"]:
        raise TumorsegError(f"{mask_files[0]}: changed since ingest (sha256 differs); re-run tumorseg ingest")
    mask: np.ndarray | None = None
    for path, blob in zip(mask_files, blobs, strict=True):
        dec = decode(blob, path, "mask")
        if dec.mode == "NIfTI":
            binary, _ = binarize_mask(dec.array, path, info.mask_threshold)
            plane = slice_of(type(dec)(binary, dec.mode, dec.affine), slice_index, axis)[0]
        else:
            plane, _ = binarize_mask(mask_plane(dec.array, path), path, info.mask_threshold)
        mask = plane if mask is None else np.maximum(mask, plane)
    assert mask is not None
    return Case(str(row["case_id"]), str(row["group"]), image, mask.astype(np.uint8))


def load_cases(info: ManifestInfo, df: pd.DataFrame, source: str, workers: int = 0) -> list[Case]:
    """Decode all rows in parallel threads (decoders release the GIL), in manifest order."""
    rows = [r for _, r in df.iterrows()]
    n = workers or min(8, os.cpu_count() or 1)
    if n <= 1 or len(rows) < 4:
        return [load_case(info, r, source) for r in rows]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda r: load_case(info, r, source), rows))


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
