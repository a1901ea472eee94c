"""Networks and losses, built from the config.

Everything that runs a trained network (pre/post-processing, devices, the ``Segmenter``)
is in :mod:`tumorseg.inference`; the checkpoint format is in :mod:`tumorseg.checkpoint`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import LossConfig, ModelConfig
from tumorseg.errors import TumorsegError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def build_model(cfg: ModelConfig, in_channels: int, out_channels: int = 1, *,
                load_weights: bool = False, spatial_dims: int = 2) -> torch.nn.Module:
    """A 2D (or, with ``spatial_dims=3``, 3D) MONAI network: one output channel (tumour logits), or one per class.

    ``load_weights`` loads ``cfg.pretrained`` into a ``flexible_unet``'s encoder (a new training run
    does; a network about to receive a checkpoint's weights, or a throughput probe, does not).
    """
    from monai.networks import nets

    strides = cfg.strides or [2] * (len(cfg.channels) - 1)
    if cfg.name == "unet":
        return nets.UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=cfg.channels,
            strides=strides,  # type: ignore[arg-type]  # per-axis strides (lists) work: MONAI's convs take them
            num_res_units=cfg.num_res_units,
            norm=cfg.norm,
            dropout=cfg.dropout,
        )
    if cfg.name == "basic_unet":
        # The classic U-Net: two 3x3 convs per level, max-pooling, transposed-conv upsampling.
        if len(cfg.channels) != 5:
            raise TumorsegError("model.channels: basic_unet needs exactly 5 entries, e.g. [64, 128, 256, 512, 1024]")
        return nets.BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            features=(*cfg.channels, cfg.channels[0]),
            norm=_norm_arg(cfg.norm),
            act="relu",
            dropout=cfg.dropout,
        )
    if cfg.name == "attention_unet":
        return nets.AttentionUnet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, channels=cfg.channels,
            strides=strides,  # type: ignore[arg-type]
            dropout=cfg.dropout,
        )
    if cfg.name == "segresnet":
        return nets.SegResNet(
            spatial_dims=spatial_dims, init_filters=cfg.init_filters, in_channels=in_channels,
            out_channels=out_channels, dropout_prob=cfg.dropout or None,
        )
    if cfg.name == "dynunet":
        # nnU-Net's network: 3x3 kernels, first level at full resolution, stride-2 downsampling.
        return nets.DynUNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            kernel_size=[3] * len(cfg.channels), strides=[1, *strides], upsample_kernel_size=strides,
            filters=cfg.channels, norm_name=_norm_arg(cfg.norm), dropout=cfg.dropout or None,
            deep_supervision=cfg.deep_supervision, deep_supr_num=max(1, min(2, len(cfg.channels) - 2)),
        )
    if cfg.name == "flexible_unet":
        from tumorseg import encoders

        if cfg.backbone in encoders.TORCHVISION_BACKBONES:
            encoders.register()
        net = _padded_flexible_unet_type()(
            in_channels=in_channels, out_channels=out_channels, backbone=cfg.backbone, pretrained=False, spatial_dims=2,
            dropout=cfg.dropout,
        )
        if load_weights:
            encoders.load_pretrained(net, cfg.backbone, cfg.pretrained)
        return net
    raise TumorsegError(f"model.name: unknown model {cfg.name!r}")  # pragma: no cover - pydantic guards it


def init_output_bias(net: torch.nn.Module, prior: float | list[float], softmax: bool | None = None) -> None:
    """Start the output layer at the class priors.

    With a zero bias every pixel starts at probability 0.5 (or 1/K), and Dice loss pulls the
    (mostly background) pixels down only weakly: the network spends hundreds of steps
    predicting ~0.45 everywhere. Starting from the tumour fraction of the training set
    (the prior-probability initialisation of RetinaNet) removes that phase. Sigmoid channels (one,
    or one per region): bias = logit(prior). Softmax channels (``prior`` one fraction per class,
    background first; the default for several priors): bias_k = log(prior_k), so the softmax starts
    at the class frequencies.
    """
    import torch

    priors = [prior] if isinstance(prior, float | int) else list(prior)
    k = len(priors)
    def heads(root: torch.nn.Module) -> list[torch.nn.Module]:
        kinds = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Conv3d, torch.nn.ConvTranspose3d)
        return [m for m in root.modules() if isinstance(m, kinds)
                and m.out_channels == k and m.bias is not None]

    # DynUNet registers its deep-supervision heads after its output block: every head starts at the prior
    output = getattr(net, "output_block", None)
    last = (heads(output) + [h for m in getattr(net, "deep_supervision_heads", []) for h in heads(m)]
            if isinstance(output, torch.nn.Module) else heads(net)[-1:])
    if not last:
        return
    if not (k > 1 if softmax is None else softmax):
        clipped = [min(max(float(p), 1e-3), 0.5) for p in priors]
        values = [float(np.log(p / (1 - p))) for p in clipped]
    else:
        # a class absent from the training split still gets a small prior (the softmax must be able to reach it)
        values = [float(np.log(min(max(float(p), 1e-3), 1.0))) for p in priors]
    with torch.no_grad():
        for head in last:
            bias = head.bias
            assert isinstance(bias, torch.Tensor)
            bias.copy_(torch.tensor(values, dtype=bias.dtype))


def _norm_arg(norm: str) -> Any:
    if norm == "group":
        return ("group", {"num_groups": 8})
    if norm == "instance":
        return ("instance", {"affine": True})
    return norm


ENCODER_STRIDE = 32
"""FlexibleUNet's encoders downsample five times: inputs are padded to a multiple of this."""


@functools.cache
def _padded_flexible_unet_type() -> type:
    import torch.nn.functional as F
    from monai.networks.nets import FlexibleUNet

    class PaddedFlexibleUNet(FlexibleUNet):  # type: ignore[misc]
        """MONAI's ``FlexibleUNet`` for any 2D size.

        The input is zero-padded (bottom, right) to a multiple of :data:`ENCODER_STRIDE` and the output
        cropped back.
        FlexibleUNet's own ``is_pad`` evens out one pixel per level, which is not enough where strided
        convolutions round up (ResNet, MobileNet at 48x80: a 2-pixel map upsampled against a 3-pixel skip).
        Same parameters and state-dict keys as ``FlexibleUNet``, so older checkpoints load.
        """

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            h, w = int(inputs.shape[-2]), int(inputs.shape[-1])
            ph, pw = -h % ENCODER_STRIDE, -w % ENCODER_STRIDE
            if not (ph or pw):
                return super().forward(inputs)  # type: ignore[no-any-return]
            out = super().forward(F.pad(inputs, (0, pw, 0, ph)))
            return out[..., :h, :w]  # type: ignore[no-any-return]

    return PaddedFlexibleUNet


def encoder_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of a ``flexible_unet``'s encoder (a DDP wrapper is looked through); empty for other nets."""
    encoder = getattr(getattr(net, "module", net), "encoder", None)
    return list(encoder.parameters()) if encoder is not None else []


def load_encoder_weights(net: torch.nn.Module, path: Path) -> None:
    """Load pretrained encoder weights from a local state-dict file (:func:`tumorseg.encoders.load_encoder_weights`).

    No weights are ever downloaded here; a missing, unreadable or mismatched file is a one-line error.
    """
    from tumorseg import encoders

    encoders.load_encoder_weights(net, encoders.read_weights_file(Path(path)), str(path))


def build_loss(cfg: LossConfig, multiclass: bool = False, regions: list[list[int]] | None = None) -> torch.nn.Module:
    """MONAI Dice-family loss: sigmoid on one channel (binary), or softmax over the classes.

    Multi-class targets are ``(N, 1, H, W)`` class indices, one-hot encoded by the loss; the Dice
    leaves the background out (nnU-Net) while the cross-entropy, where used, covers every class.
    With ``regions`` (the class indices each region unites) the targets become one channel per region
    and each channel is a sigmoid (nnU-Net's region-based training).

    Networks with deep supervision (``dynunet`` in training mode) return their heads stacked
    on dim 1; the loss then weighs the heads with MONAI's ``DeepSupervisionLoss`` (halving per
    level, as nnU-Net).
    """
    from monai import losses

    kw: dict[str, Any] = {"batch": cfg.batch, "smooth_nr": cfg.smooth, "smooth_dr": cfg.smooth}
    if multiclass and not regions:
        kw.update(softmax=True, to_onehot_y=True, include_background=False)
    else:
        kw["sigmoid"] = True
    if cfg.name == "dice":
        base: torch.nn.Module = losses.DiceLoss(**kw)
    elif cfg.name == "dice_ce" and regions:
        # MONAI's DiceCELoss takes the softmax cross-entropy for several channels; regions overlap: BCE each
        base = _dice_bce_type()(losses.DiceLoss(**kw))
    elif cfg.name == "dice_ce":
        base = losses.DiceCELoss(**kw)
    elif cfg.name == "dice_focal":
        base = losses.DiceFocalLoss(**kw)
    else:  # pragma: no cover - pydantic guards it
        raise TumorsegError(f"loss.name: unknown loss {cfg.name!r}")
    if regions:
        base = _regions_loss_type()(base, regions)
    return _HeadsLoss(base, losses.DeepSupervisionLoss(base, weight_mode="exp"))  # type: ignore[arg-type]


def _dice_bce_type() -> type:
    import torch

    class DiceBCE(torch.nn.Module):
        """Dice plus binary cross-entropy on every channel (independent sigmoids)."""

        def __init__(self, dice: torch.nn.Module) -> None:
            super().__init__()
            self.dice, self.bce = dice, torch.nn.BCEWithLogitsLoss()

        def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self.dice(out, target) + self.bce(out.float(), target)

    return DiceBCE


def _regions_loss_type() -> type:
    import torch

    class RegionTargets(torch.nn.Module):
        """Class-index targets ``(N, 1, H, W)`` -> one channel per region, then the wrapped loss."""

        def __init__(self, base: torch.nn.Module, regions: list[list[int]]) -> None:
            super().__init__()
            self.base = base
            # class -> its regions; the last row (all zero) stands for every class in no region
            lut = torch.zeros(max(i for r in regions for i in r) + 2, len(regions))
            for j, r in enumerate(regions):
                lut[r, j] = 1.0
            self.lut = lut

        def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if self.lut.device != target.device:
                self.lut = self.lut.to(target.device)
            lut = self.lut
            idx = target[:, 0].round().long().clamp_max(lut.shape[0] - 1)
            return self.base(out, torch.movedim(lut[idx], -1, 1))  # (N, *spatial, R) -> (N, R, *spatial)

    return RegionTargets


def _heads_loss_type() -> type:
    import torch

    class HeadsLoss(torch.nn.Module):
        def __init__(self, base: torch.nn.Module, deep: torch.nn.Module) -> None:
            super().__init__()
            self.base, self.deep = base, deep

        def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if out.dim() == target.dim() + 1:  # (N, heads, C, H, W): deep supervision
                return self.deep(list(torch.unbind(out, dim=1)), target)
            return self.base(out, target)

    return HeadsLoss


def _HeadsLoss(base: torch.nn.Module, deep: torch.nn.Module) -> torch.nn.Module:  # noqa: N802
    return _heads_loss_type()(base, deep)  # type: ignore[no-any-return]


def main_output(out: torch.Tensor, target_dim: int = 4) -> torch.Tensor:
    """The full-resolution head of a network's output (deep-supervision heads are dropped).

    ``target_dim``: the dims of one output, ``(N, C, *spatial)``: 4 for images, 5 for volumes.
    """
    return out[:, 0] if out.dim() == target_dim + 1 else out


def channels_last(x: Any) -> Any:
    """A batch (or a network) in the channels-last layout of its dimensionality (``channels_last_3d`` for volumes).

    A tensor's layout follows its rank; a network's follows its first convolution's weights.
    """
    import torch

    dim = x.dim() if isinstance(x, torch.Tensor) else next(
        (p.dim() for p in x.parameters() if p.dim() >= 4), 4)
    fmt = torch.channels_last_3d if dim == 5 else torch.channels_last
    return x.contiguous(memory_format=fmt) if isinstance(x, torch.Tensor) else x.to(memory_format=fmt)
