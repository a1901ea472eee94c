"""The preprocessed on-disk cache: train and val at training size, memory flat in the number of cases.

One folder per split and preprocessing, ``<cache root>/<split>-<h>x<w>-<key>/``, where the key
hashes the manifest digest, the split's case ids, the training size, the channels and the
normalisation rule (see :func:`cache_key`); the default root is ``cache/`` in the manifest's folder.

* ``images.npy``: ``float16 (N, C, h, w)``, each case prescaled and divided by its own
  storage scale (``index.npz``), so any stored range fits float16;
* ``masks.npy``: ``uint8 (N, 1, h, w)`` training targets;
* ``original_masks.bin``: each case's mask at its original resolution, zlib-compressed
  (offsets and shapes in ``index.npz``), for scoring;
* ``meta.json``: the settings, case ids, the summed statistics and every file's size, written last.

Both arrays are ``.npy`` files (``np.load(mmap_mode="r")`` maps them), but batches are read
with ``os.pread`` into a (pinned) buffer rather than through a mapping: pages a mapping touches
count in the process's resident memory, which would then grow with every case read (see
``benchmarks/RESULTS.md``). A build writes into a ``.partial-*`` folder renamed into place only
when complete, so a killed build is never trusted; a folder whose files are missing or truncated
is detected on opening, logged, and rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tumorseg.data.maintenance import partial_suffix, prune_stale, remove_stale_partials
from tumorseg.data.split import Batch, Prepared, Split, Summary, build, pack_mask, unpack_mask
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_write_json
from tumorseg.intensity import SCALE_PERCENTILES, Stats, finish_tensor_, rule_tensors
from tumorseg.placement import Placement

if TYPE_CHECKING:
    import torch

    from tumorseg.data.reader import CaseReader

log = logging.getLogger(__name__)

FORMAT = 1
"""Bumped whenever the layout or the preprocessing changes, so older folders are not reused."""


def cache_key(digest: str, split: str, case_ids: list[str], size: tuple[int, ...], in_channels: int,
              mode: str, context: int = 0, crop: bool = False, target: tuple[float, ...] | None = None) -> str:
    """What a cache folder's contents depend on, hashed (the same inputs give the same folder)."""
    ids = hashlib.sha256("\n".join(case_ids).encode()).hexdigest()
    spec = {"format": FORMAT, "digest": digest, "split": split, "cases": ids, "size": list(size),
            "in_channels": in_channels, "normalize": mode,
            "percentiles": list(SCALE_PERCENTILES) if mode == "percentile" else None}
    if mode == "nonzero":  # the mask of the nonzero z-score has its holes filled (a cache built before is stale)
        spec["nonzero_mask"] = "holes filled"
    if context:  # neighbouring slices as channels (grey with one a side has as many channels as RGB)
        spec["slice_context"] = context
    if crop:  # volumes cut to their nonzero box (tumorseg.cropping)
        spec["crop_nonzero"] = True
    if target is not None:  # volumes resampled to a voxel size and placed in the grid (tumorseg.placement)
        spec["target_spacing"] = [float(t) for t in target]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def folder_name(split: str, size: tuple[int, ...], key: str) -> str:
    """The folder of one split and preprocessing: ``<split>-<h>x<w>-<key>`` (``<x>x<y>x<z>`` for volumes)."""
    return f"{split}-{'x'.join(str(s) for s in size)}-{key}"


@dataclass
class DiskSink:
    """Writes a build's cases sequentially (plain writes: no mapping, so no resident pages)."""

    folder: Path
    n: int
    channels: int
    size: tuple[int, ...]
    scale: np.ndarray = field(init=False)
    fg: np.ndarray = field(init=False)
    offsets: list[int] = field(default_factory=lambda: [0])
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    placed: list[tuple[int, ...]] = field(default_factory=list)  # offset + size of each placed volume
    _files: list[IO[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.scale = np.ones(self.n, dtype=np.float32)
        self.fg = np.zeros(self.n, dtype=np.int64)
        self.images = open(self.folder / "images.npy", "wb")  # noqa: SIM115 - closed in close()
        self.masks = open(self.folder / "masks.npy", "wb")  # noqa: SIM115
        self.originals = open(self.folder / "original_masks.bin", "wb")  # noqa: SIM115
        self._files = [self.images, self.masks, self.originals]
        np.lib.format.write_array_header_1_0(
            self.images, {"descr": "<f2", "fortran_order": False, "shape": (self.n, self.channels, *self.size)})
        np.lib.format.write_array_header_1_0(
            self.masks, {"descr": "|u1", "fortran_order": False, "shape": (self.n, 1, *self.size)})

    def put(self, i: int, p: Prepared) -> None:
        """Append case ``i`` (cases arrive in order)."""
        peak = float(np.abs(p.image).max()) if p.image.size else 0.0
        s = peak if np.isfinite(peak) and peak > 0 else 1.0
        self.scale[i] = s
        self.images.write(np.ascontiguousarray(p.image / s, dtype=np.float16).tobytes())
        self.masks.write(np.ascontiguousarray(p.mask, dtype=np.uint8).tobytes())
        self.fg[i] = int(np.count_nonzero(p.mask))
        packed = pack_mask(p.original_mask)
        self.originals.write(packed)
        self.offsets.append(self.offsets[-1] + len(packed))
        self.shapes.append(tuple(int(s) for s in p.original_mask.shape))
        if p.placement is not None:
            self.placed.append((*p.placement.offset, *p.placement.size))

    def close(self) -> None:
        """Flush the files to disk and write the index."""
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        np.savez(self.folder / "index.npz", scale=self.scale, fg=self.fg, offsets=np.asarray(self.offsets, np.int64),
                 shapes=np.asarray(self.shapes, np.int32).reshape(-1, len(self.size)),
                 placed=np.asarray(self.placed, np.int32).reshape(-1, 2 * len(self.size)))


class DiskSplit(Split):
    """A split read from its cache folder batch by batch (``rows`` selects a DDP rank's shard)."""

    streams = True

    def __init__(self, folder: Path, meta: dict[str, Any], rows: np.ndarray | None = None) -> None:
        self.folder, self.meta = folder, meta
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        # a shared lock for as long as this split is open: pruning and `cache clear` skip folders in use
        self._fds["meta.json"] = _open(folder / "meta.json")
        fcntl.flock(self._fds["meta.json"], fcntl.LOCK_SH)
        with np.load(folder / "index.npz") as index:
            self._scale, self._fg = index["scale"], index["fg"]
            self._offsets, self._shapes = index["offsets"], index["shapes"]
            self._placed = index["placed"] if "placed" in index.files else np.zeros((0, 0), np.int32)
        all_rows = np.arange(int(meta["n"]), dtype=np.int64)
        self.rows = all_rows if rows is None else np.asarray(rows, dtype=np.int64)
        self.case_ids = [meta["case_ids"][r] for r in self.rows]
        self.fg_pixels = self._fg[self.rows]
        self.channels, self.size = int(meta["channels"]), tuple(int(s) for s in meta["size"])
        self.pixels = int(np.prod(self.size))
        self._img_bytes = 2 * self.channels * self.pixels
        self._mask_bytes = self.pixels
        self._img_header = _npy_header_length(folder / "images.npy")
        self._mask_header = _npy_header_length(folder / "masks.npy")
        self.stats = None
        self._rule: tuple[torch.device, list[torch.Tensor | None]] | None = None  # the stats' tensors, on a device
        self.pin = False

    def subset(self, rows: np.ndarray) -> DiskSplit:
        """This split restricted to ``rows`` (positions in it)."""
        out = DiskSplit(self.folder, self.meta, self.rows[np.asarray(rows, dtype=np.int64)])
        out.stats, out.pin = self.stats, self.pin
        return out

    def normalise(self, stats: Stats | None) -> None:
        """Apply ``stats`` to every batch read from now on."""
        self.stats = stats
        self._rule = None

    def _fd(self, name: str) -> int:
        with self._lock:
            if name not in self._fds:
                self._fds[name] = _open(self.folder / name)
            return self._fds[name]

    def close(self) -> None:
        """Close the open files (reads reopen them)."""
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _read_rows(self, name: str, header: int, row_bytes: int, rows: np.ndarray, out: np.ndarray) -> None:
        """Rows into ``out`` (a uint8 view), one ``pread`` per run of consecutive rows."""
        fd = self._fd(name)
        flat = out.reshape(len(rows), row_bytes)
        j = 0
        while j < len(rows):
            k = j + 1
            while k < len(rows) and rows[k] == rows[k - 1] + 1:
                k += 1
            want = (k - j) * row_bytes
            got = os.preadv(fd, [flat[j:k].data], header + int(rows[j]) * row_bytes)
            if got != want:
                raise TumorsegError(f"{self.folder / name}: truncated (read {got} of {want} bytes); remove the cache "
                                    f"folder (tumorseg cache clear) and run again")
            j = k

    def read(self, idx: np.ndarray, masks: bool = True) -> Batch:
        """Rows ``idx`` as float16 images (and uint8 masks) with their storage scales."""
        import torch

        rows = self.rows[np.asarray(idx, dtype=np.int64)]
        b = len(rows)
        images = torch.empty((b, self.channels, *self.size), dtype=torch.float16, pin_memory=self.pin)
        self._read_rows("images.npy", self._img_header, self._img_bytes, rows, images.numpy().view(np.uint8))
        out_masks = None
        if masks:
            out_masks = torch.empty((b, 1, *self.size), dtype=torch.uint8, pin_memory=self.pin)
            self._read_rows("masks.npy", self._mask_header, self._mask_bytes, rows, out_masks.numpy())
        return Batch(images, out_masks, torch.from_numpy(self._scale[rows]))

    def to_device(self, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copy, widen to float32, undo the storage scale and normalise, on ``device``."""
        x = batch.images.to(device, non_blocking=True).float()
        assert batch.scale is not None
        x.mul_(batch.scale.to(device, non_blocking=True).view(-1, *([1] * (x.dim() - 1))))
        if self._rule is None or self._rule[0] != device:
            self._rule = (device, rule_tensors(self.stats, x.dim() - 2, device))
        finish_tensor_(x, self.stats, self._rule[1])
        y = batch.masks.to(device, non_blocking=True).float() if batch.masks is not None else None
        return x, y

    def original_mask(self, i: int) -> np.ndarray:
        """Case ``i``'s mask at its original resolution, decompressed."""
        r = int(self.rows[i])
        start, end = int(self._offsets[r]), int(self._offsets[r + 1])
        data = os.pread(self._fd("original_masks.bin"), end - start, start)
        if len(data) != end - start:
            raise TumorsegError(f"{self.folder / 'original_masks.bin'}: truncated; remove the cache folder (tumorseg "
                                "cache clear) and run again")
        return unpack_mask(data, tuple(int(s) for s in self._shapes[r]))

    def placement(self, i: int) -> Placement | None:
        """Where case ``i`` lies in the grid (``None``: stretched to it)."""
        if not len(self._placed):
            return None
        row, dims = self._placed[int(self.rows[i])], len(self.size)
        return Placement(tuple(int(v) for v in row[dims:]), tuple(int(v) for v in row[:dims]))


def _npy_header_length(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


def _expected_sizes(meta: dict[str, Any], header: dict[str, int]) -> dict[str, int]:
    n, c = int(meta["n"]), int(meta["channels"])
    pixels = int(np.prod([int(s) for s in meta["size"]]))
    return {"images.npy": header["images.npy"] + 2 * n * c * pixels, "masks.npy": header["masks.npy"] + n * pixels,
            "original_masks.bin": int(meta["original_bytes"])}


def check(folder: Path, key: str) -> tuple[dict[str, Any] | None, str]:
    """A cache folder's ``meta.json`` when every file is there at its full size, else ``(None, why)``."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None, "no meta.json (an interrupted build?)"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"meta.json unreadable ({exc})"
    if meta.get("key") != key or meta.get("format") != FORMAT:
        return None, "meta.json belongs to other settings"
    for name, size in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != int(size):
            return None, f"{name} is truncated or changed ({path.stat().st_size} bytes, expected {size})"
    if set(meta.get("files", {})) != {"images.npy", "masks.npy", "original_masks.bin", "index.npz"}:
        return None, "meta.json lists the wrong files"
    return meta, ""


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise TumorsegError(f"{path}: cache file gone ({exc.strerror}); was the cache cleared while a run used it? "
                            "Run again: the cache is rebuilt") from exc


def open_or_build(reader: CaseReader, rows: pd.DataFrame, root: Path, split: str, size: tuple[int, ...],
                  in_channels: int, mode: str, digest: str, build: bool = True,
                  target: tuple[float, ...] | None = None) -> tuple[DiskSplit, Summary]:
    """The split's cache folder under ``root``, built first when absent, incomplete or stale.

    ``build=False`` (DDP ranks other than 0, after rank 0 built it) only opens the folder. ``target``: the
    volumes' ``target_spacing`` (:mod:`tumorseg.placement`).
    """
    case_ids = [str(c) for c in rows["case_id"]]
    key = cache_key(digest, split, case_ids, size, in_channels, mode,
                    reader.context.k if reader.context is not None else 0, reader.crop, target)
    name = folder_name(split, size, key)
    folder = root / name
    meta, why = check(folder, key) if folder.exists() else (None, "")
    if meta is None and not build:
        raise TumorsegError(f"{folder}: cache folder not found or incomplete ({why or 'missing'}) after rank 0 built "
                            "it; is cache_dir on a filesystem every rank sees?")
    if meta is None:
        if folder.exists():
            log.warning("cache %s: %s; rebuilding it", folder, why)
            shutil.rmtree(folder, ignore_errors=True)
        meta = _build(reader, rows, root, name, key, case_ids, size, in_channels, mode, split, digest, target)
        meta_digest = {"manifest_path": meta.get("manifest_path"), "digest": digest}
        prune_stale(root, meta_digest)
    else:
        log.info("cache %s: reusing %d cases", folder, meta["n"])
    return DiskSplit(root / name, meta), Summary.from_json(meta["summary"])


def _build(reader: CaseReader, rows: pd.DataFrame, root: Path, name: str, key: str, case_ids: list[str],
           size: tuple[int, ...], in_channels: int, mode: str, split: str, digest: str,
           target: tuple[float, ...] | None = None) -> dict[str, Any]:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TumorsegError(f"{root}: cannot create the cache folder ({exc.strerror}); set cache_dir to a writable "
                            "folder (--set cache_dir=/scratch/tumorseg-cache)") from exc
    remove_stale_partials(root, name)
    tmp = root / f"{name}{partial_suffix()}"
    tmp.mkdir()
    try:
        sink = DiskSink(tmp, len(rows), in_channels, size)
        try:
            summary = build(reader, rows, size, in_channels, mode, sink, description=f"caching {split} on disk",
                            target=target)
        finally:
            sink.close()
        meta: dict[str, Any] = {"format": FORMAT, "key": key, "split": split, "n": len(rows), "channels": in_channels,
                "size": list(size), "normalize": mode, "case_ids": case_ids, "original_bytes": sink.offsets[-1],
                "summary": summary.to_json(), "digest": digest,
                "manifest_path": str(Path(reader.source).resolve().parent)}
        headers = {f: _npy_header_length(tmp / f) for f in ("images.npy", "masks.npy")}
        meta["files"] = {**_expected_sizes(meta, headers), "index.npz": (tmp / "index.npz").stat().st_size}
        atomic_write_json(tmp / "meta.json", meta)
        try:
            os.rename(tmp, root / name)
        except OSError:  # another process finished the same build first: use its folder
            shutil.rmtree(tmp, ignore_errors=True)
            done, why = check(root / name, key)
            if done is None:
                raise TumorsegError(f"{root / name}: could not be written ({why}); remove it and run again") from None
            return done
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    used = sum(int(v) for v in meta["files"].values())
    log.info("cache %s: built %d cases (%.1f MiB on disk)", root / name, len(rows), used / 2**20)
    return meta

