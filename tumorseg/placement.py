"""Volumes at one voxel size: nnU-Net's resampling to the target spacing, inside the training grid.

A 3D model with ``target_spacing`` sees every volume resampled to that voxel size, so an organ or a tumour
spans as many voxels in a volume with a small field of view as in one with a large one (stretching each volume
to one grid would scale each by its own factor, differently per axis). The resampled volume is centred in the
training grid (``image_size``, planned to hold 95% of the training volumes whole) with zeros around it; a volume
that would not fit is shrunk by one factor on every axis, so it is smaller but not distorted. Its prediction
is cut back out of the grid and resampled onto the volume's own voxels.

Training's cache (:func:`tumorseg.data.split.prepare`) and so validation place volumes with :func:`placement`,
after the crop to the nonzero box (:mod:`tumorseg.cropping`). Inference (:class:`tumorseg.inference.Segmenter`)
needs no grid: it takes every volume whole at the target spacing (:func:`inference_size`), never shrunk, as
nnU-Net does. Training samples patches of the grid; validation and inference take each volume at its own size,
in one pass or by sliding window (:func:`tiling`). A model without ``target_spacing`` (2D models, and 3D
checkpoints from before) stretches each case to the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tumorseg.config import TrainConfig


@dataclass(frozen=True)
class Placement:
    """Where a resampled volume lies in the grid.

    Attributes:
        size: its size in voxels at the target spacing (shrunk to fit the grid where larger).
        offset: the grid index of its first voxel on each axis (centred: the rest of the grid is zeros).
    """

    size: tuple[int, ...]
    offset: tuple[int, ...]

    @property
    def region(self) -> tuple[slice, ...]:
        """The grid's slices that hold the volume (spatial axes only)."""
        return tuple(slice(o, o + s) for o, s in zip(self.offset, self.size, strict=True))


def resampled_size(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> list[float]:
    """A ``shape`` volume of voxels ``spacing`` in voxels of ``target``: each axis keeps its length in mm."""
    return [n * s / t for n, s, t in zip(shape, spacing, target, strict=True)]


def placement(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...],
              grid: tuple[int, ...]) -> Placement:
    """The placement of a ``shape`` volume of voxels ``spacing`` resampled to ``target`` in a ``grid``.

    Each axis keeps its length in mm: ``round(shape * spacing / target)`` voxels; where that exceeds the grid on
    some axis, every axis is scaled by the one factor that makes it fit.
    """
    scaled = resampled_size(shape, spacing, target)
    fit = min([1.0] + [g / v for g, v in zip(grid, scaled, strict=True) if v > g])
    size = tuple(max(1, min(g, int(round(v * fit)))) for g, v in zip(grid, scaled, strict=True))
    offset = tuple((g - n) // 2 for g, n in zip(grid, size, strict=True))
    return Placement(size, offset)


def put(array: torch.Tensor, where: Placement, grid: tuple[int, ...]) -> torch.Tensor:
    """``(C, *where.size)`` -> ``(C, *grid)``: the array at its place, zeros around it."""
    import torch

    if tuple(array.shape[1:]) == tuple(grid):
        return array
    out = torch.zeros((array.shape[0], *grid), dtype=array.dtype)
    out[(slice(None), *where.region)] = array
    return out


def spacings(cfg: TrainConfig) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(target, assumed)`` of a volume model with ``target_spacing``, else ``None`` (stretched to the grid).

    ``assumed``: the voxel size taken for volumes given without one (``input_spacing``, else the target).
    """
    if cfg.target_spacing is None or len(cfg.image_size) != 3:  # images ignore it
        return None
    return tuple(cfg.target_spacing), tuple(cfg.input_spacing or cfg.target_spacing)


SPACING_RATIO = 20.0
"""A voxel size this many times finer or coarser than the reference on an axis is a header's unit, not a scan:
metres or micrometres written as millimetres (resampled, it becomes a voxel, or terabytes)."""


def implausible_spacing(spacing: tuple[float, ...], reference: tuple[float, ...], what: str) -> str | None:
    """Why ``spacing`` (mm) cannot be the voxel size of a scan like ``what`` of ``reference`` mm, else ``None``."""
    ratios = [s / r for s, r in zip(spacing, reference, strict=True) if r > 0 and s > 0]  # (0: refused on reading)
    worst = max(ratios, key=lambda q: max(q, 1 / q), default=1.0)
    if 1 / SPACING_RATIO < worst < SPACING_RATIO:
        return None
    shown = "x".join(f"{v:g}" for v in spacing)
    return (f"voxel size {shown} mm is {worst:.3g} times {what} ({'x'.join(f'{v:g}' for v in reference)} mm): a "
            "header in metres or micrometres? fix the file's voxel size")


def spacing_problem(cfg: TrainConfig, spacing: tuple[float, ...] | None) -> str | None:
    """Why a volume of ``spacing`` mm cannot be a scan for a model of ``cfg`` (a header in metres), else ``None``."""
    rule = spacings(cfg)
    if spacing is None or rule is None:
        return None
    return implausible_spacing(spacing, rule[0], "the model's target spacing")


def padding(spatial: list[int], multiple: tuple[int, ...]) -> list[int]:
    """Voxels added at the end of each axis: up to a multiple of the network's downsampling, and two at least.

    The deepest level then holds more than one voxel (instance norm needs two: a tiny volume or nonzero box).
    """
    return [max((-s) % m, 2 * m - s) for s, m in zip(spatial, multiple, strict=True)]


def inference_size(cfg: TrainConfig, shape: tuple[int, ...], spacing: tuple[float, ...] | None
                   ) -> tuple[int, ...] | None:
    """The size in voxels a volume of ``shape`` voxels of ``spacing`` (``None``: the assumed one) is predicted at.

    The whole volume at the model's target spacing, never shrunk: only training's fixed grid needs the largest
    volumes to fit; inference tiles them by sliding window (nnU-Net). ``None`` where the model stretches its inputs
    to the grid (images, or no ``target_spacing``).
    """
    rule = spacings(cfg)
    if rule is None or len(shape) != 3:
        return None
    known = spacing if spacing is not None and len(spacing) == 3 else None
    return tuple(max(1, int(round(v))) for v in resampled_size(tuple(int(s) for s in shape), known or rule[1], rule[0]))


def divisor(cfg: TrainConfig) -> tuple[int, ...]:
    """The network's total downsampling per axis (an input's size must divide by it)."""
    strides = cfg.model.strides or [2] * (len(cfg.model.channels) - 1)
    dims = len(cfg.image_size)
    return tuple(math.prod(s if isinstance(s, int) else s[axis] for s in strides) for axis in range(dims))


def tiling(cfg: TrainConfig, size: tuple[int, ...]) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """How a placed volume of ``size`` voxels is predicted: ``(window, multiple)``, one of them ``None``.

    In one pass, zero-padded to a ``multiple`` of the network's downsampling, while it holds at most a training
    batch of patches (``batch_size`` times the patch's voxels: the memory training used, there with gradients);
    beyond, by a sliding ``window`` of the training patch (the grid where none).
    """
    patch = tuple(int(p) for p in (cfg.patch_size or cfg.image_size))
    if math.prod(size) <= max(1, int(cfg.batch_size)) * math.prod(patch):
        return None, divisor(cfg)
    return patch, None
