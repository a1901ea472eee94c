"""Volumes at one voxel size: nnU-Net's resampling to the target spacing, inside the training grid.

A 3D model with ``target_spacing`` sees every volume resampled to that voxel size, so an organ or a tumour
spans as many voxels in a volume with a small field of view as in one with a large one (stretching each volume
to one grid would scale each by its own factor, differently per axis). The resampled volume is centred in the
training grid (``image_size``, planned to hold 95% of the training volumes whole) with zeros around it; a volume
that would not fit is shrunk by one factor on every axis, so it is smaller but not distorted. Its prediction
is cut back out of the grid and resampled onto the volume's own voxels.

Training's cache (:func:`tumorseg.data.split.prepare`), validation and inference
(:class:`tumorseg.inference.Segmenter`) all place volumes with :func:`placement`, after the crop to the
nonzero box (:mod:`tumorseg.cropping`). A model without ``target_spacing`` (2D models, and 3D checkpoints from
before) stretches each case to the grid.
"""

from __future__ import annotations

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


def placement(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...],
              grid: tuple[int, ...]) -> Placement:
    """The placement of a ``shape`` volume of voxels ``spacing`` resampled to ``target`` in a ``grid``.

    Each axis keeps its length in mm: ``round(shape * spacing / target)`` voxels; where that exceeds the grid on
    some axis, every axis is scaled by the one factor that makes it fit.
    """
    scaled = [n * s / t for n, s, t in zip(shape, spacing, target, strict=True)]
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


def window(cfg: TrainConfig) -> tuple[int, ...] | None:
    """The sliding window inference tiles with: the training patch; a placed volume's, the grid if no patch.

    A volume at the target spacing is predicted at its own size (not in the whole grid): padded to the window
    where it is smaller, tiled where larger.
    """
    if cfg.patch_size is not None:
        return tuple(int(p) for p in cfg.patch_size)
    return tuple(int(s) for s in cfg.image_size) if cfg.target_spacing is not None else None
