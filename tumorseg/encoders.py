"""Encoders of ``flexible_unet``: torchvision's VGG16 and MobileNets in MONAI's register, and pretrained weights.

MONAI's ``FlexibleUNet`` takes any encoder in its register (``FLEXUNET_BACKBONE``) that returns five
feature maps at strides 2, 4, 8, 16 and 32. :class:`TorchvisionEncoder` registers torchvision's
``vgg16``, ``vgg16_bn``, ``mobilenet_v2`` and ``mobilenet_v3_large`` there: it keeps torchvision's own
``features`` module (so torchvision's state dicts load by name) and taps it at the last layer of each
resolution, found by tracing the module on the meta device rather than by a copied list of layer
indices (VGG: the blocks before each max-pool and the last pool; MobileNets: the last inverted-residual
block of each stride, as segmentation_models.pytorch). VGG's full-resolution block is not a skip:
FlexibleUNet's decoder reaches full resolution by upsampling, as smp's VGG U-Net does.

Pretrained encoder weights (``model.pretrained``) are ``imagenet`` (torchvision's weight API and its
cache for torchvision's networks and MONAI's ResNet-50/101/152, whose layer names are torchvision's;
MONAI's own URLs for EfficientNet-B0..B7), or a local state-dict file. The file must hold every encoder
tensor with its shape (a first convolution for another channel count is adapted: summed over RGB for
one channel, as smp does); anything else is a one-line :class:`~tumorseg.errors.TumorsegError` naming the
file. Nothing is downloaded at import, and a planner asks :func:`imagenet_cached` (the cache only).

ImageNet weights expect ImageNet's input normalisation: :func:`pretrained_stats` gives it as the
intensity statistics every stage already applies (:mod:`tumorseg.intensity`), so evaluate, predict, the
pyfunc model and ``serve`` use it through the checkpoint with no code of their own.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.errors import TumorsegError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

TORCHVISION_BACKBONES = ("vgg16", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_large")
"""Backbones built from torchvision's networks (:class:`TorchvisionEncoder`)."""
TORCHVISION_RESNETS = ("resnet50", "resnet101", "resnet152")
"""MONAI ResNets whose layers are torchvision's (projection shortcuts), so torchvision's ImageNet weights fit.
MONAI's ResNet-10/18/34/200 use MedicalNet's parameter-free shortcuts: torchvision's weights do not fit them."""
MONAI_EFFICIENTNETS = tuple(f"efficientnet-b{i}" for i in range(8))
"""EfficientNets with ImageNet weights at MONAI's URLs."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
"""ImageNet's RGB normalisation (torchvision's ``ImageClassification`` preset; EfficientNet's too)."""
STRIDES = (2, 4, 8, 16, 32)
"""The feature-map strides FlexibleUNet's decoder expects, in order."""

_ops_fix: Any = None


def import_torchvision() -> Any:
    """``import torchvision``, also where its compiled ops cannot load.

    PyPI's torchvision is a CUDA build; beside a CPU-only torch its ``_C`` extension does not load,
    and torchvision 0.28 then fails at import on an unguarded ``register_fake("torchvision::nms")``
    (pytorch/vision#9085). Its networks and weight API are plain Python, so the two operator schemas
    it needs are declared (without kernels: ``torchvision.ops.nms`` stays unusable) and the import
    retried. Where torchvision imports, nothing is changed.
    """
    global _ops_fix
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _ops_fix = torch.library.Library("torchvision", "FRAGMENT")  # kept: the schemas live as long as it
        for op in ("nms", "qnms"):
            _ops_fix.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
        log.debug("torchvision imported without its compiled ops (CPU torch beside a CUDA torchvision)")
    return torchvision


def _features(arch: str) -> torch.nn.Module:
    """The ``features`` of torchvision's ``arch(weights=None)``, initialised as torchvision initialises them.

    The network is built on the meta device and only ``features`` is materialised: VGG16's classifier
    alone holds 120M parameters (0.5 GB and over a second to initialise) that the encoder never uses.
    torchvision initialises these four networks' convolutions with He-normal (fan out) weights and zero
    biases, and their batch norms to 1 and 0; that is redone here on the CPU.
    """
    import torch

    tv = import_torchvision()
    if torch.get_default_device().type == "meta":
        return getattr(tv.models, arch)(weights=None).features  # type: ignore[no-any-return]
    with torch.device("meta"):
        feats: torch.nn.Module = getattr(tv.models, arch)(weights=None).features
    feats = feats.to_empty(device="cpu")
    for m in feats.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)):
            raise TumorsegError(f"model.backbone {arch}: torchvision's network holds a {type(m).__name__}, "
                                "which tumorseg does not know how to initialise")  # pragma: no cover
    return feats


def _trace_stages(arch: str) -> tuple[list[int], list[int]]:
    """Index of the last layer at each of :data:`STRIDES` in ``features``, and its output channels.

    Traced on the meta device (no memory, no arithmetic): a 64x64 input through each layer in turn.
    """
    import torch

    with torch.device("meta"):
        feats = _features(arch).eval()
        x = torch.zeros(1, 3, 64, 64)
        last: dict[int, tuple[int, int]] = {}
        for i, layer in enumerate(list(feats.children())):
            x = layer(x)
            last[64 // int(x.shape[-1])] = (i, int(x.shape[1]))
    missing = [s for s in STRIDES if s not in last]
    if missing:  # pragma: no cover - a torchvision change
        raise TumorsegError(f"model.backbone {arch}: torchvision's network has no stride-{missing[0]} stage")
    return [last[s][0] for s in STRIDES], [last[s][1] for s in STRIDES]


_STAGES: dict[str, tuple[list[int], list[int]]] = {}


def stages(arch: str) -> tuple[list[int], list[int]]:
    """:func:`_trace_stages`, once per process."""
    if arch not in _STAGES:
        _STAGES[arch] = _trace_stages(arch)
    return _STAGES[arch]


def _encoder_type() -> type:
    import torch
    from monai.networks.blocks import BaseEncoder

    class TorchvisionEncoder(torch.nn.Module, BaseEncoder):  # type: ignore[misc]
        """A torchvision network's ``features``, returning the last map of each stride (2..32).

        Args:
            arch: ``vgg16``, ``vgg16_bn``, ``mobilenet_v2`` or ``mobilenet_v3_large``.
            spatial_dims: must be 2.
            in_channels: input channels; the first convolution is rebuilt for them.
            pretrained: must be ``False``: tumorseg loads weights itself (:func:`load_encoder_weights`).
        """

        def __init__(self, arch: str, spatial_dims: int = 2, in_channels: int = 3, pretrained: bool = False) -> None:
            super().__init__()
            if spatial_dims != 2:
                raise TumorsegError(f"model.backbone {arch}: torchvision encoders are 2D only")
            if pretrained:  # pragma: no cover - build_model never asks
                raise ValueError("TorchvisionEncoder loads no weights itself; use tumorseg.encoders")
            self.features = _features(arch)
            self.taps = stages(arch)[0]
            if in_channels != 3:
                _replace_first_conv(self.features, in_channels)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            out = []
            for i, layer in enumerate(list(self.features.children())):
                x = layer(x)
                if i in self.taps:
                    out.append(x)
                if i == self.taps[-1]:
                    break
            return out

        @classmethod
        def get_encoder_parameters(cls) -> list[dict[str, Any]]:
            return [{"arch": a, "spatial_dims": 2, "in_channels": 3, "pretrained": False}
                    for a in TORCHVISION_BACKBONES]

        @classmethod
        def num_channels_per_output(cls) -> list[tuple[int, ...]]:
            return [tuple(stages(a)[1]) for a in TORCHVISION_BACKBONES]

        @classmethod
        def num_outputs(cls) -> list[int]:
            return [len(STRIDES)] * len(TORCHVISION_BACKBONES)

        @classmethod
        def get_encoder_names(cls) -> list[str]:
            return list(TORCHVISION_BACKBONES)

    return TorchvisionEncoder


def register() -> None:
    """Put the torchvision encoders into MONAI's ``FLEXUNET_BACKBONE`` (once; MONAI's own stay)."""
    from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE

    if all(name in FLEXUNET_BACKBONE.register_dict for name in TORCHVISION_BACKBONES):
        return
    FLEXUNET_BACKBONE.register_class(_encoder_type())


def _replace_first_conv(module: torch.nn.Module, in_channels: int) -> None:
    """Rebuild the first ``Conv2d`` of ``module`` for ``in_channels`` (same kernel, stride, padding, bias)."""
    import torch

    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Conv2d):
                setattr(parent, name, torch.nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride,  # type: ignore[arg-type]
                    child.padding, child.dilation, child.groups, child.bias is not None,  # type: ignore[arg-type]
                    child.padding_mode))
                return
    raise TumorsegError("encoder has no convolution")  # pragma: no cover


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """An RGB convolution kernel ``(O, 3, k, k)`` for ``in_channels`` inputs (segmentation_models.pytorch's rule).

    One channel: the kernel summed over RGB (a grey image through it gives what the RGB kernel gives on
    the grey image copied to three channels). Other counts: RGB repeated in turn, scaled by ``3 / C``.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    idx = [i % weight.shape[1] for i in range(in_channels)]
    return weight[:, idx] * (weight.shape[1] / in_channels)


# ----------------------------------------------------------------------------- pretrained weights


def imagenet_source(backbone: str) -> str | None:
    """Where ``imagenet`` weights for ``backbone`` come from (a torchvision weights name or a URL), else None."""
    if backbone in TORCHVISION_BACKBONES or backbone in TORCHVISION_RESNETS:
        tv = import_torchvision()
        return str(tv.models.get_model_weights(backbone).DEFAULT)
    if backbone in MONAI_EFFICIENTNETS:
        from monai.networks.nets.efficientnet import url_map

        return str(url_map[backbone])
    return None


def _url(backbone: str) -> str | None:
    if backbone in TORCHVISION_BACKBONES or backbone in TORCHVISION_RESNETS:
        tv = import_torchvision()
        return str(tv.models.get_model_weights(backbone).DEFAULT.url)
    if backbone in MONAI_EFFICIENTNETS:
        from monai.networks.nets.efficientnet import url_map

        return str(url_map[backbone])
    return None


def imagenet_cached(backbone: str) -> Path | None:
    """The ImageNet weights file of ``backbone`` in torch's hub cache, if already there (never downloads)."""
    import torch

    url = _url(backbone)
    if url is None:
        return None
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return path if path.is_file() else None


def imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision's weight API (torch's hub cache; downloads once when online).

    Raises:
        TumorsegError: no ImageNet weights for this backbone, or they could not be fetched (offline).
    """
    source = imagenet_source(backbone)
    if source is None:
        known = ", ".join((*TORCHVISION_BACKBONES, *TORCHVISION_RESNETS, *MONAI_EFFICIENTNETS))
        raise TumorsegError(f"model.pretrained: imagenet: no ImageNet weights for backbone {backbone} ({known} "
                            "have them); pass a local file (model.pretrained=/path/weights.pth) or none")
    try:
        if backbone in MONAI_EFFICIENTNETS:
            import torch

            state = torch.hub.load_state_dict_from_url(source, progress=False, map_location="cpu")
        else:
            tv = import_torchvision()
            state = tv.models.get_model_weights(backbone).DEFAULT.get_state_dict(progress=False)
    except Exception as exc:  # noqa: BLE001 - offline, a proxy, a truncated download: one line
        cached = imagenet_cached(backbone)
        where = f" (cache: {cached})" if cached else ""
        raise TumorsegError(f"model.pretrained: imagenet: the {backbone} weights ({source}) could not be fetched"
                            f"{where}: {exc.__class__.__name__}; on a machine without internet pass a local file: "
                            f"model.pretrained=/path/{backbone}.pth") from exc
    return dict(state)


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file (a bare state dict, or one under ``state_dict``/``model``)."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise TumorsegError(f"{p}: pretrained weights file not found; give a local .pt/.pth state dict, "
                            "model.pretrained=imagenet or none")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise TumorsegError(f"{p}: cannot read pretrained weights ({exc.__class__.__name__}); save them with "
                            "torch.save(model.state_dict(), path)") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise TumorsegError(f"{p}: not a state dict of tensors; save one with torch.save(model.state_dict(), path)")
    return dict(state)


def load_encoder_weights(net: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> int:
    """Copy a state dict's encoder tensors into ``net.encoder``; returns how many were loaded.

    Keys may carry ``module.`` or ``encoder.`` prefixes; keys outside the encoder's submodules (a
    classifier: ``fc``, ``classifier``) are ignored. Every encoder tensor must be in ``state`` with its
    shape, and every key under the encoder's submodules must be one of them (torchvision's ResNet-18
    file for MONAI's ResNet-18, whose shortcuts differ, is refused). A first convolution saved for RGB
    is adapted to the encoder's input channels (:func:`adapt_first_conv`).

    Raises:
        TumorsegError: one line naming ``source``, the first tensor at fault and the fix.
    """
    encoder: torch.nn.Module = net.encoder  # type: ignore[assignment]
    own = encoder.state_dict()
    tops = {k.split(".", 1)[0] for k in own}
    matched: dict[str, torch.Tensor] = {}
    fix = "check that model.backbone matches the weights"
    for key, value in state.items():
        k = key.removeprefix("module.").removeprefix("encoder.")
        if k.split(".", 1)[0] not in tops:
            continue
        if k not in own:
            raise TumorsegError(f"{source}: holds {k}, which the {_name(net)} encoder does not have; {fix}")
        want = own[k].shape
        if value.shape != want and value.dim() == 4 and value.shape[1] == 3 and value.shape[0] == want[0] \
                and value.shape[2:] == want[2:]:
            value = adapt_first_conv(value, int(want[1]))
        if value.shape != want:
            raise TumorsegError(f"{source}: {k} has shape {tuple(value.shape)}, the {_name(net)} encoder's is "
                                f"{tuple(want)}; {fix}")
        matched[k] = value
    missing = [k for k in own if k not in matched]
    if missing:
        raise TumorsegError(f"{source}: holds {len(own) - len(missing)} of the {len(own)} tensors of the "
                            f"{_name(net)} encoder (first missing: {missing[0]}); {fix}")
    encoder.load_state_dict(matched, strict=True)
    log.info("loaded %d encoder tensors from %s", len(matched), source)
    return len(matched)


def _name(net: torch.nn.Module) -> str:
    return str(getattr(net, "backbone", type(getattr(net, "encoder", net)).__name__))


def load_pretrained(net: torch.nn.Module, backbone: str, pretrained: str | Path) -> None:
    """Load ``model.pretrained`` (``imagenet`` or a file) into ``net``'s encoder."""
    if str(pretrained) == "none":
        return
    if str(pretrained) == "imagenet":
        load_encoder_weights(net, imagenet_state_dict(backbone), f"ImageNet weights {imagenet_source(backbone)}")
    else:
        load_encoder_weights(net, read_weights_file(Path(pretrained)), str(pretrained))


def pretrained_stats(backbone: str, in_channels: int,
                     percentiles: tuple[float, float] | list[float] = (0.5, 99.5)) -> dict[str, list[float]]:
    """The input normalisation pretrained encoder weights expect, as :mod:`tumorseg.intensity` statistics.

    Each image is scaled by its own ``percentiles`` (the intensity module's ``SCALE_PERCENTILES``) to
    about [0, 1] (what torchvision's ``ToTensor`` does for an 8-bit image, robust to the stored bit
    depth), then by ImageNet's mean/std (read from torchvision's weights where they come from there).
    Grey images take the means of the RGB values (their first convolution is summed over RGB); other
    channel counts repeat RGB in turn.
    """
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if backbone in TORCHVISION_BACKBONES or backbone in TORCHVISION_RESNETS:
        preset = import_torchvision().models.get_model_weights(backbone).DEFAULT.transforms()
        mean, std = tuple(preset.mean), tuple(preset.std)
    if in_channels == 1:
        means, stds = [sum(mean) / 3], [sum(std) / 3]
    else:
        means = [mean[i % 3] for i in range(in_channels)]
        stds = [std[i % 3] for i in range(in_channels)]
    return {"mean": [float(m) for m in means], "std": [float(s) for s in stds],
            "percentiles": [float(p) for p in percentiles]}
