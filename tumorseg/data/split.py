"""Train's preprocessed splits: every case at training size, built once by streaming.

A split is built by streaming the manifest rows through the :class:`~tumorseg.data.reader.CaseReader`
(threads decode, prescale and resize ahead of the writer), so the decoded originals are never
all held at once, whatever the number of cases. Each case is stored *prescaled*
(:func:`tumorseg.intensity.prescale`: the per-image part of the normalisation); the dataset's
affine map (:func:`tumorseg.intensity.affine`) is applied when a batch is read, so the
training statistics can be summed in the same pass that writes the cases.

Two storages share one interface, :class:`Split`: :class:`RamSplit` (one tensor in RAM or
on the GPU, as before) and :class:`tumorseg.data.disk.DiskSplit` (files on disk read per
batch, memory flat in the number of cases).
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from tumorseg.intensity import (
    FOREGROUND_SAMPLES,
    SCALE_PERCENTILES,
    Stats,
    add_range,
    empty_range,
    finish_tensor_,
    foreground_per_case,
    foreground_sample,
    foreground_stats,
    prescale,
    prescaled_sums,
    raw_range,
)
from tumorseg.placement import Placement, placement, put
from tumorseg.progress import track

if TYPE_CHECKING:
    import torch

    from tumorseg.data.reader import Case, CaseReader

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """One case ready to store.

    Attributes:
        image: ``float32 (C, h, w)`` prescaled image at training size.
        mask: ``uint8 (1, h, w)`` training target at training size.
        original_mask: ``uint8 (H, W)`` mask at the original resolution (scoring).
        sums: ``(3, C)`` intensity sums of the prescaled original (the dataset statistics).
        raw_range: the raw 0.5/99.5 percentiles (the intensity fingerprint).
        foreground: ``(C, k)`` sampled foreground voxels (``normalize: ct`` only), else ``None``.
        placement: where the volume lies in the grid (``target_spacing``: :mod:`tumorseg.placement`), else ``None``.
    """

    image: np.ndarray
    mask: np.ndarray
    original_mask: np.ndarray
    sums: np.ndarray
    raw_range: tuple[float, float]
    foreground: np.ndarray | None = None
    placement: Placement | None = None


@dataclass
class Summary:
    """What a build pass summed over its cases (reducible across DDP ranks)."""

    sums: np.ndarray  # (3, C): count, sum, sum of squares of the prescaled originals
    range_sums: np.ndarray  # [sum p0.5, sum p99.5, n]
    range_max: np.ndarray  # [max p99.5, -min p99.5]
    # normalize: ct: the sampled foreground voxels (gathered across DDP ranks, not summed), or their
    # statistics once stored (a reused disk cache)
    foreground: list[np.ndarray] = field(default_factory=list)
    foreground_stored: Stats | None = None

    @classmethod
    def empty(cls, channels: int) -> Summary:
        """Nothing summed yet."""
        return cls(np.zeros((3, channels)), *empty_range())

    def add(self, p: Prepared) -> None:
        """Add one case."""
        self.sums += p.sums
        add_range(self.range_sums, self.range_max, *p.raw_range)
        if p.foreground is not None:
            self.foreground.append(p.foreground)

    def foreground_stats(self) -> Stats | None:
        """``normalize: ct``'s clip window and foreground mean/std (``None``: no foreground voxel was sampled)."""
        return foreground_stats(self.foreground) if self.foreground else self.foreground_stored

    def to_json(self) -> dict[str, Any]:
        """Plain lists (the disk cache's ``meta.json``)."""
        return {"sums": self.sums.tolist(), "range_sums": self.range_sums.tolist(),
                "range_max": self.range_max.tolist(), "foreground": self.foreground_stats()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Summary:
        """The inverse of :meth:`to_json`."""
        return cls(np.asarray(d["sums"], dtype=np.float64), np.asarray(d["range_sums"], dtype=np.float64),
                   np.asarray(d["range_max"], dtype=np.float64), foreground_stored=d.get("foreground"))


@dataclass
class Batch:
    """Rows read from a split, on its storage device (pinned RAM when streaming to a GPU)."""

    images: torch.Tensor  # (B, C, h, w): normalised float32 (RAM) or prescaled float16 (disk)
    masks: torch.Tensor | None  # uint8 (B, 1, h, w)
    scale: torch.Tensor | None = None  # float32 (B,): the per-case storage scale of float16 rows


class Split:
    """A preprocessed split: what the training loop, validation and the post-processing search read.

    Attributes:
        case_ids: the cases, in manifest order.
        fg_pixels: ``int64 (N,)`` tumour pixels of each case at training size.
        pixels: pixels of one case at training size.
        stats: the dataset normalisation applied on reading (``None``: per image).
        streams: True when batches come from disk (worth reading ahead in a thread).
    """

    case_ids: list[str]
    fg_pixels: np.ndarray
    pixels: int
    stats: Stats | None = None
    streams: bool = False

    def __len__(self) -> int:
        return len(self.case_ids)

    def read(self, idx: np.ndarray, masks: bool = True) -> Batch:
        """Rows ``idx`` (thread-safe: the training loop reads the next batch ahead)."""
        raise NotImplementedError

    def to_device(self, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised ``float32`` inputs and ``float32`` targets on ``device``."""
        raise NotImplementedError

    def original_mask(self, i: int) -> np.ndarray:
        """Case ``i``'s mask at its original resolution."""
        raise NotImplementedError

    def normalise(self, stats: Stats | None) -> None:
        """Apply the dataset's normalisation ``stats`` to everything read from now on."""
        raise NotImplementedError

    def placement(self, i: int) -> Placement | None:
        """Where case ``i`` lies in its grid (a volume resampled to ``target_spacing``), else ``None``: stretched."""
        return None

    def tumour(self) -> np.ndarray:
        """``bool (N,)``: which cases hold tumour at training size."""
        return np.asarray(self.fg_pixels) > 0


@dataclass
class RamSplit(Split):
    """A split held as one normalised tensor (RAM, or GPU memory), with the original masks as a list."""

    case_ids: list[str] = field(default_factory=list)
    images: Any = None  # torch.Tensor float32 (N, C, h, w), normalised
    masks: Any = None  # torch.Tensor uint8 (N, 1, h, w)
    masks_original: list[np.ndarray] = field(default_factory=list)
    fg_pixels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    pixels: int = 0
    stats: Stats | None = None
    placements: list[Placement | None] = field(default_factory=list)

    def read(self, idx: np.ndarray, masks: bool = True) -> Batch:
        """Rows ``idx``, indexed where the tensors live."""
        import torch

        t = torch.as_tensor(np.asarray(idx, dtype=np.int64), device=self.images.device)
        return Batch(self.images[t], self.masks[t] if masks else None)

    def to_device(self, batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Copy to ``device`` (the images are normalised already)."""
        x = batch.images.to(device, non_blocking=True)
        y = batch.masks.to(device, non_blocking=True).float() if batch.masks is not None else None
        return x, y

    def original_mask(self, i: int) -> np.ndarray:
        """Case ``i``'s mask at its original resolution."""
        return self.masks_original[i]

    def placement(self, i: int) -> Placement | None:
        """Where case ``i`` lies in the grid (``None``: stretched to it)."""
        return self.placements[i] if self.placements else None

    def normalise(self, stats: Stats | None) -> None:
        """Apply the dataset's clip and affine map in place (once, after the statistics are known)."""
        self.stats = stats
        finish_tensor_(self.images, stats)

    def place(self, device: torch.device, mode: str) -> None:
        """Move the tensors to the GPU when asked or when they fit, else pin them (CUDA machines only).

        ``auto`` uses the GPU when the tensors take under a quarter of its free memory.
        """
        import torch

        if device.type != "cuda":
            return
        nbytes = self.images.numel() * self.images.element_size() + self.masks.numel()
        free, _ = torch.cuda.mem_get_info(device)
        if mode == "gpu" or (mode == "auto" and nbytes < free / 4):
            self.images, self.masks = self.images.to(device), self.masks.to(device)
            log.info("cached %d cases on the GPU (%.1f MiB)", len(self), nbytes / 2**20)
        else:
            self.images, self.masks = self.images.pin_memory(), self.masks.pin_memory()
            log.info("cached %d cases in pinned RAM (%.1f MiB)", len(self), nbytes / 2**20)


# ----------------------------------------------------------------------------- building

RAM_LIMIT_BYTES = 2 * 2**30
"""``cache: auto`` keeps a split in RAM up to this size (or an eighth of the machine's memory, if less)."""


def storage_for(mode: str, n_cases: int, channels: int, size: tuple[int, ...]) -> str:
    """``ram``/``gpu`` or ``disk`` for ``cache: mode``: ``auto`` goes to disk above the RAM limit.

    The estimate is the normalised float32 images plus the masks at training size.
    """
    if mode != "auto":
        return mode
    need = n_cases * (4 * channels + 1) * int(np.prod(size))
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 8 * RAM_LIMIT_BYTES
    return "disk" if need > min(RAM_LIMIT_BYTES, phys // 8) else "auto"


def prepare(case: Case, size: tuple[int, ...], in_channels: int, mode: str,
            foreground: int = FOREGROUND_SAMPLES, target: tuple[float, ...] | None = None) -> Prepared:
    """Prescale, resize and sum one decoded case (runs in the decode threads).

    With ``target`` (a volume's ``target_spacing``) the case is resampled to that voxel size and placed in the
    ``size`` grid (:mod:`tumorseg.placement`), else stretched to it.
    """
    import torch

    from tumorseg.imageio import to_channels
    from tumorseg.inference import resize_image, resize_mask

    pre = prescale(to_channels(case.image, in_channels), mode, SCALE_PERCENTILES)
    where = None if target is None else placement(case.mask.shape, case.spacing or target, target, size)
    at = size if where is None else where.size
    image, mask = resize_image(pre, at), resize_mask(case.mask, at).to(torch.uint8)
    if where is not None:
        image, mask = put(image, where, size), put(mask, where, size)
    return Prepared(image.numpy(), mask.numpy(), case.mask, prescaled_sums(pre), raw_range(case.image),
                    foreground_sample(pre, case.mask, foreground) if mode == "ct" else None, where)


class Sink(Protocol):
    """Where a build puts its cases: RAM arrays or the disk cache's files."""

    def put(self, i: int, p: Prepared) -> None:
        """Store case ``i`` (cases arrive in order)."""


def build(reader: CaseReader, rows: pd.DataFrame, size: tuple[int, ...], in_channels: int, mode: str,
          sink: Sink, workers: int = 0, description: str = "caching",
          target: tuple[float, ...] | None = None) -> Summary:
    """Stream ``rows`` through ``prepare`` into ``sink`` in order; returns the summed statistics."""
    summary = Summary.empty(in_channels)
    per_case = foreground_per_case(len(rows))
    prepared = reader.map(lambda case: prepare(case, size, in_channels, mode, per_case, target), rows, workers)
    for i, p in enumerate(track(prepared, len(rows), description)):
        sink.put(i, p)
        summary.add(p)
    return summary


@dataclass
class RamSink:
    """Preallocated arrays the build fills (a :class:`RamSplit` when done)."""

    n: int
    channels: int
    size: tuple[int, ...]
    images: np.ndarray = field(init=False)
    masks: np.ndarray = field(init=False)
    fg: np.ndarray = field(init=False)
    originals: list[np.ndarray] = field(default_factory=list)
    placements: list[Placement | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.images = np.empty((self.n, self.channels, *self.size), dtype=np.float32)
        self.masks = np.empty((self.n, 1, *self.size), dtype=np.uint8)
        self.fg = np.zeros(self.n, dtype=np.int64)

    def put(self, i: int, p: Prepared) -> None:
        """Store case ``i``."""
        self.images[i], self.masks[i], self.fg[i] = p.image, p.mask, int(np.count_nonzero(p.mask))
        self.originals.append(p.original_mask)
        self.placements.append(p.placement)

    def split(self, case_ids: list[str]) -> RamSplit:
        """The filled arrays as a :class:`RamSplit` (prescaled, not yet normalised)."""
        import torch

        return RamSplit(case_ids=case_ids, images=torch.from_numpy(self.images), masks=torch.from_numpy(self.masks),
                        masks_original=self.originals, fg_pixels=self.fg, pixels=int(np.prod(self.size)),
                        placements=self.placements)


def in_ram(reader: CaseReader, rows: pd.DataFrame, size: tuple[int, ...], in_channels: int, mode: str,
           description: str, target: tuple[float, ...] | None = None) -> tuple[RamSplit, Summary]:
    """Build ``rows`` into RAM (prescaled; call :meth:`RamSplit.normalise` once the statistics are known)."""
    sink = RamSink(len(rows), in_channels, size)
    summary = build(reader, rows, size, in_channels, mode, sink, description=description, target=target)
    return sink.split([str(c) for c in rows["case_id"]]), summary


def pack_mask(mask: np.ndarray) -> bytes:
    """An original mask compressed for the disk cache (zlib: label maps are mostly runs)."""
    return zlib.compress(np.ascontiguousarray(mask, dtype=np.uint8).tobytes(), 1)


def unpack_mask(data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`pack_mask`."""
    return np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(shape)
