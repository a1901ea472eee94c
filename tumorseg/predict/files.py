"""The files of ``tumorseg predict``: inputs, their decoding, their outputs and the writing of masks.

A 2.5D model's 2D inputs also get their neighbouring slices here (:func:`file_neighbours`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import PredictConfig
from tumorseg.errors import TumorsegError
from tumorseg.imageio import DecodeError, image_format, nonfinite
from tumorseg.imageio.volume import from_canonical, volume_of
from tumorseg.labels import Classes

if TYPE_CHECKING:
    from tumorseg.imageio import Decoded

log = logging.getLogger(__name__)


@dataclass
class Item:
    """One input image and where its outputs go."""

    index: int
    path: Path
    rel: Path
    """Path relative to the input folder it was found in (its name for a file input)."""
    mask_out: Path = Path()
    prob_out: Path | None = None
    channels: tuple[Path, ...] = ()
    """The files of channels 1, 2, ... where the input is one file per channel (nnU-Net's naming; ``path``
    holds channel 0)."""


def join_channel_files(items: list[Item], channels: int) -> list[Item]:
    """For a model of ``channels`` input channels: nnU-Net's ``case_0000`` ... files as one input each.

    Files of one folder named ``<case>_0000`` up to ``<case>_{channels-1:04d}`` become one input named
    ``<case>`` (its mask ``<case>.nii.gz``, as nnU-Net names its predictions), where ``<case>_0000`` is a
    one-channel volume; other files stay as they are (``sub_0001``, ``sub_0002`` as cases numbered in a name,
    4D files ending in ``_0000``).

    Raises:
        TumorsegError: a case whose channel files are not exactly ``_0000`` to the model's last channel.
    """
    from tumorseg.imageio import split_ext, volume_shape
    from tumorseg.imageio.volume import CHANNEL_FILE

    def one_channel_volume(path: Path) -> bool:
        try:
            shape = volume_shape(path)
        except DecodeError:
            return False  # said by the decoder, naming the file, when it is read
        return shape is not None and all(s == 1 for s in shape[3:])

    sets: dict[tuple[Path, str, str], dict[int, Item]] = {}
    for it in items:
        stem, ext = split_ext(it.path.name)
        m = CHANNEL_FILE.match(stem)
        if m:
            sets.setdefault((it.path.parent, m["base"], ext), {})[int(m["channel"])] = it
    joined: dict[int, Item] = {}
    dropped: set[int] = set()
    for (folder, base, ext), found in sets.items():
        if 0 not in found or not one_channel_volume(found[0].path):
            continue
        if sorted(found) != list(range(channels)):
            have = ", ".join(f"_{c:04d}" for c in sorted(found))
            raise TumorsegError(f"{folder / base}_0000{ext}: the model takes {channels} channels, one file per "
                                f"channel (_0000 to _{channels - 1:04d}), but this case has {have}; give every "
                                "channel file of each case, or one multi-channel (4D) file")
        first = found[0]
        joined[first.index] = Item(first.index, first.path, first.rel.with_name(f"{base}{ext}"),
                                   channels=tuple(found[c].path for c in range(1, channels)))
        dropped.update(found[c].index for c in range(1, channels))
    out = [joined.get(it.index, it) for it in items if it.index not in dropped]
    for i, it in enumerate(out):
        it.index = i
    if joined:
        log.info("%d input(s) given as one file per channel (nnU-Net's _0000 naming), joined", len(joined))
    return out


@dataclass
class Loaded:
    """A decoded input cut into the 2D planes the network sees (a 3D model's: the one canonical volume)."""

    item: Item
    planes: list[np.ndarray]
    decoded: Decoded
    volume_shape: tuple[int, ...] | None = None
    canonical: bool = False  # planes[0] is the whole volume in RAS+ order (:mod:`tumorseg.imageio.volume`)


def write_outputs(loaded: Loaded, probs: list[np.ndarray], masks: list[np.ndarray],
                  cfg: PredictConfig, classes: Classes | None = None) -> int:
    """Write the mask (and probability map) of one input; returns the tumour pixel count.

    ``masks`` are its planes' masks (the model's threshold and component rules, applied by the caller:
    volumetric rules span a stack). A multi-class model's masks are label maps of the declared values and its
    probabilities hold one channel per class, last (NIfTI) or first (a float32 TIFF beside a PNG mask).
    """
    from tumorseg.imageio import write_mask_png, write_nifti, write_png

    item = loaded.item
    dec = loaded.decoded
    multi = classes is not None and classes.multiclass
    if loaded.canonical:  # a 3D model's volume, back onto the file's own axes
        assert dec.affine is not None
        probs = [from_canonical(probs[0], dec.affine)]
        masks = [from_canonical(masks[0], dec.affine)]
    planes = [np.moveaxis(p, 0, -1) for p in probs] if multi else probs  # (H, W, K): the class axis last
    if loaded.canonical:
        prob, mask = planes[0], masks[0]
    elif dec.is_volume:
        prob = np.stack(planes, axis=cfg.slice_axis)
        mask = np.stack(masks, axis=cfg.slice_axis)
    else:
        prob = planes[0]
        mask = masks[0]
    if multi:
        assert classes is not None
        mask = classes.to_values(mask)
    if item.mask_out.name.lower().endswith(".nii.gz"):
        affine = dec.affine if dec.is_grid else None
        shape = loaded.volume_shape
        if shape is not None and int(np.prod(shape)) == mask.size:
            mask_arr = mask.reshape(shape)
            prob_arr = prob.reshape((*shape, -1) if multi else shape)
        else:
            mask_arr, prob_arr = mask, prob
        write_nifti(item.mask_out, mask_arr, affine)
        if item.prob_out is not None:
            write_nifti(item.prob_out, prob_arr.astype(np.float32), affine)
    elif multi:
        write_png(item.mask_out, mask)
        if item.prob_out is not None:
            write_tiff(item.prob_out, np.moveaxis(prob, -1, 0).astype(np.float32))
    else:
        write_mask_png(item.mask_out, mask)
        if item.prob_out is not None:
            write_png(item.prob_out, np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8))
    return int(np.count_nonzero(mask))


def write_tiff(path: Path, array: np.ndarray) -> None:
    """Write a ``(K, H, W)`` float32 array as a multi-page TIFF (one page per class), atomically."""
    import tifffile

    from tumorseg.fsutil import atomic_path

    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, array, photometric="minisblack")


def load_item(item: Item, slice_axis: int, volumes: bool = False) -> Loaded:
    """Decode one input into ``float32 (C, H, W)`` planes (one per slice for a volume).

    ``volumes`` (a 3D model): the input must be a volume, given whole in canonical order (:func:`volume_of`).
    """
    from tumorseg.imageio import decode, read_bytes, slice_of
    from tumorseg.imageio.nifti import nifti_shape

    decoded = decode(read_bytes(item.path), item.path, "image")
    if item.channels:
        from tumorseg.imageio.volume import stack_channels

        paths = [item.path, *item.channels]
        decoded = stack_channels([decoded, *(decode(read_bytes(p), p, "image") for p in item.channels)],
                                 [str(p) for p in paths])
    if bad := nonfinite(decoded.array):  # as ingest rejects it
        raise DecodeError(f"{item.path}: {bad} and predict again")
    if volumes:
        if not decoded.is_volume:
            raise DecodeError(f"{item.path}: a 2D image given to a 3D model (trained on volumes); predict volumes "
                              "with it, or 2D images with a 2D model")
        planes = [volume_of(decoded, str(item.path))]
    elif decoded.array.ndim == 4:
        raise DecodeError(f"{item.path}: a multi-channel volume given to a 2D model; a 3D model trained on such "
                          "volumes predicts it")
    elif decoded.is_volume:
        n = decoded.array.shape[slice_axis]
        planes = [slice_of(decoded, i, slice_axis).astype(np.float32) for i in range(n)]
    else:
        planes = [slice_of(decoded, -1, slice_axis).astype(np.float32)]
    # a NIfTI mask keeps its input's header shape (trailing 1s included); other grids their decoded shape
    shape = (nifti_shape(item.path) if image_format(item.path) == "nifti"
             else tuple(decoded.array.shape) if decoded.is_grid else None)
    return Loaded(item, planes, decoded, shape, canonical=volumes)


def file_stacks(items: list[Item]) -> list[list[int]]:
    """The ordered stacks among the 2D input files (item indices in slice order).

    As :func:`tumorseg.context.path_stacks` finds them: same folder, consecutive trailing slice numbers.
    """
    from tumorseg.context import path_stacks
    from tumorseg.imageio import volume_shape

    def flat(it: Item) -> bool:
        try:
            return volume_shape(it.path) is None and image_format(it.path) != "dicom-series"
        except DecodeError:
            return False

    files = [it for it in items if flat(it)]
    return [[files[pos].index for pos in run] for run in path_stacks([it.path for it in files])]


def file_neighbours(items: list[Item], k: int, slice_axis: int) -> Any:
    """For a 2.5D model: ``loaded -> the planes of its window`` among the input files.

    Stacks as :func:`tumorseg.context.path_stacks` finds them among the 2D inputs (same folder, consecutive
    trailing slice numbers); a file in no stack is its own neighbour. Decoded neighbours are kept in a small
    cache (the inputs are sorted, so a stack's files come one after another).
    """
    from tumorseg.context import window

    windows: dict[int, list[int]] = {}
    for run in file_stacks(items):
        for i, index in enumerate(run):
            windows[index] = [run[j] for j in window(len(run), i, k)]
    if windows:
        log.info("slice context: %d of %d inputs are slices of numbered stacks (their neighbours are the files "
                 "numbered next to them); the others are their own neighbours", len(windows), len(items))
    by_index = {it.index: it for it in items}
    cache: OrderedDict[int, np.ndarray] = OrderedDict()

    def plane(j: int) -> np.ndarray:
        if j not in cache:
            cache[j] = load_item(by_index[j], slice_axis).planes[0]
            while len(cache) > 4 * k + 2:
                cache.popitem(last=False)
        return cache[j]

    def planes(loaded: Loaded) -> list[np.ndarray]:
        own = loaded.item.index
        ids = windows.get(own, [own] * (2 * k + 1))
        read = {j: loaded.planes[0] if j == own else plane(j) for j in set(ids)}
        for j, p in read.items():
            if p.shape[1:] != loaded.planes[0].shape[1:]:
                raise TumorsegError(f"{by_index[j].path}: a neighbouring slice of {loaded.item.path} but of "
                                    "another size; slices of one stack must share a size")
        return [read[j] for j in ids]

    return planes
