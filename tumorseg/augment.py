"""Seeded augmentation of whole batches, on the device the batch lives on.

MONAI's per-sample dictionary transforms cost 22% (128²) and 10% (256²) of a UNet
training step on a 2-core CPU (benchmarks/RESULTS.md), so the same augmentations are
applied here to the whole batch at once: random flips (along the axes the plan leaves
free: a dataset whose images share an orientation is not flipped along it) and 90° rotations by indexing,
a small random affine (rotation, scale, translation) through MONAI's batched
``AffineTransform`` layer (bilinear for images, nearest for masks), and random intensity
scale/shift. All randomness comes from one ``torch.Generator``, so an epoch seeded the
same way augments identically (exact resume).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from tumorseg.config import AugmentConfig

if TYPE_CHECKING:
    import torch


def _coin(n: int, p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    import torch

    return (torch.rand(n, generator=gen) < p).to(device)


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(N,)`` values shaped to broadcast over ``(N, C, *spatial)`` batches of ``ndim`` dims."""
    return v.reshape(-1, *([1] * (ndim - 1)))


def augment_batch(
    images: torch.Tensor, masks: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment ``images (N, C, *spatial)`` and ``masks (N, 1, *spatial)`` together (images or volumes).

    Each transform is applied to each sample with probability ``cfg.prob``. The
    generator lives on the CPU; masks stay binary. Volumes rotate about their third axis (in the
    plane of the first two, as nnU-Net's anisotropic data would) and scale isotropically.
    """
    import torch

    n, h, w = images.shape[0], images.shape[2], images.shape[3]
    nd = images.dim()
    dev = images.device
    p = cfg.prob
    if cfg.flip:
        for dim in range(2, nd):
            sel = _per_sample(_coin(n, p, gen, dev), nd)  # drawn for every axis: the same stream either way
            if dim in cfg.flip_dims:
                images = torch.where(sel, images.flip(dim), images)
                masks = torch.where(sel, masks.flip(dim), masks)
    if cfg.rotate90 and h == w and {2, 3} <= set(cfg.flip_dims):
        k = torch.randint(0, 4, (n,), generator=gen).to(dev)
        k = torch.where(_coin(n, p, gen, dev), k, torch.zeros_like(k))
        for turns in (1, 2, 3):
            sel = _per_sample(k == turns, nd)
            images = torch.where(sel, torch.rot90(images, turns, (2, 3)), images)
            masks = torch.where(sel, torch.rot90(masks, turns, (2, 3)), masks)
    if cfg.affine:
        images, masks = _random_affine(images, masks, p if cfg.affine_prob is None else cfg.affine_prob, gen,
                                       cfg.rotate_degrees, cfg.scale)
    if cfg.gamma:
        images = _random_gamma(images, p, gen)
    if cfg.noise:
        sigma = torch.rand(n, generator=gen) * 0.1 * (torch.rand(n, generator=gen) < p)
        noise = torch.randn(images.shape, generator=gen).to(images.device, images.dtype)
        images = images + noise * _per_sample(sigma.to(images.device, images.dtype), nd)
    if cfg.intensity:
        scale = 1.0 + (torch.rand(n, generator=gen) * 0.2 - 0.1)
        shift = torch.rand(n, generator=gen) * 0.2 - 0.1
        on = torch.rand(n, generator=gen) < p
        scale = torch.where(on, scale, torch.ones_like(scale)).to(dev, images.dtype)
        shift = torch.where(on, shift, torch.zeros_like(shift)).to(dev, images.dtype)
        images = images * _per_sample(scale, nd) + _per_sample(shift, nd)
    return images, masks


def _random_gamma(images: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """nnU-Net's gamma: rescale each image to [0, 1], raise to gamma in 0.7..1.5, rescale back."""
    import torch

    n = images.shape[0]
    on = torch.rand(n, generator=gen) < p
    gamma = torch.where(torch.rand(n, generator=gen) < 0.5, 0.7 + 0.3 * torch.rand(n, generator=gen),
                        1.0 + 0.5 * torch.rand(n, generator=gen))
    nd = images.dim()
    gamma = _per_sample(torch.where(on, gamma, torch.ones_like(gamma)).to(images.device, images.dtype), nd)
    flat = images.flatten(1)
    lo = _per_sample(flat.min(dim=1).values, nd)
    span = (_per_sample(flat.max(dim=1).values, nd) - lo).clamp_min(1e-6)
    return ((images - lo) / span).clamp(0, 1).pow(gamma) * span + lo


def _random_affine(
    images: torch.Tensor, masks: torch.Tensor, p: float, gen: torch.Generator, degrees: float = 15.0,
    scale_range: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation within ±``degrees``, scale within ±``scale_range``, translation within ±5%, per sample.

    Volumes rotate in the plane of their first two axes (about the third) and scale alike on every axis.
    """
    import torch
    from monai.networks.layers import AffineTransform

    n, sd = images.shape[0], images.dim() - 2
    on = torch.rand(n, generator=gen) < p
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    scale = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * scale_range
    shift = (torch.rand(n, sd, generator=gen) * 2 - 1) * 0.1  # normalised coords span 2
    if not bool(on.any()):
        return images, masks
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, sd, sd + 1)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    if sd == 3:
        theta[:, 2, 2] = 1.0 / scale
    theta[:, :, sd] = shift
    identity = torch.eye(sd, sd + 1).expand(n, sd, sd + 1)
    theta = torch.where(on[:, None, None], theta, identity).to(images.device, torch.float32)
    warp_img = AffineTransform(normalized=True, mode="bilinear", padding_mode="border", align_corners=False)
    warp_msk = AffineTransform(normalized=True, mode="nearest", padding_mode="zeros", align_corners=False)
    if sd == 3:  # volumes: one sampling grid for image and mask (a 3D warp costs ~a tenth of a training step)
        import torch.nn.functional as F

        # MONAI's layer reads theta in array-axis order; torch's affine_grid in reverse (x = the last axis)
        axes = torch.tensor([2, 1, 0], device=theta.device)
        flipped = theta[:, axes][:, :, torch.tensor([2, 1, 0, 3], device=theta.device)]
        grid = F.affine_grid(flipped, [images.shape[0], 1, *images.shape[2:]], align_corners=False)
        out_img = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
        out_msk = F.grid_sample(masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return out_img.to(images.dtype), out_msk.to(masks.dtype)
    out_img = warp_img(images.float(), theta).to(images.dtype)
    out_msk = warp_msk(masks.float(), theta).to(masks.dtype)
    return out_img, out_msk


def crop_batch(
    images: torch.Tensor, masks: torch.Tensor, patch: tuple[int, ...], oversample: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``patch`` crops of a batch; a share ``oversample`` of them centred on a tumour pixel.

    nnU-Net's foreground oversampling: without it, crops of large, mostly tumour-free images
    rarely show tumour. A sample without tumour gets a uniform crop either way. Where a label map
    holds several classes, one of them is drawn first, each alike, then one of its pixels (nnU-Net's
    ``DataLoader``): a small class next to a large one is centred as often. A region-based set draws
    among its label values, not its regions (nnU-Net draws regions). All choices come from ``gen``
    (exact resume); a sample of one class draws exactly as a binary one.
    """
    import torch

    n, full = images.shape[0], tuple(int(s) for s in images.shape[2:])
    size = tuple(min(int(p), s) for p, s in zip(patch, full, strict=True))
    if size == full:
        return images, masks
    coins = torch.rand(n, generator=gen)
    corner = torch.rand(n, len(full), generator=gen)
    out_x, out_y = [], []
    for i in range(n):
        start = [int(corner[i, a] * (full[a] - size[a] + 1)) for a in range(len(full))]
        if float(coins[i]) < oversample:
            fg = _class_pixels(masks[i, 0].cpu(), gen)
            if len(fg):
                centre = fg[int(torch.randint(0, len(fg), (1,), generator=gen))]
                start = [min(max(int(centre[a]) - size[a] // 2, 0), full[a] - size[a]) for a in range(len(full))]
        window: tuple[slice, ...] = tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))
        out_x.append(images[i][(slice(None), *window)])
        out_y.append(masks[i][(slice(None), *window)])
    return torch.stack(out_x), torch.stack(out_y)


def _class_pixels(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Coordinates of the tumour pixels of ``mask`` (class indices); of one class drawn alike where it has several."""
    import torch

    fg = torch.nonzero(mask > 0)
    values = mask[tuple(fg.T)]
    present = torch.unique(values)
    if len(present) < 2:
        return fg
    return fg[values == present[int(torch.randint(0, len(present), (1,), generator=gen))]]
