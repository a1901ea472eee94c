"""Networks, losses, pre/post-processing and the :class:`Segmenter` used for inference.

Train's validation, ``evaluate``, ``predict`` and the MLflow pyfunc model all predict
through :class:`Segmenter`, so they share one preprocessing and one resize-back rule:
the network sees the image resized to ``image_size`` and z-scored per channel; its logits
are resized back (bilinear) to the original size before the sigmoid and threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import LossConfig, ModelConfig, TrainConfig
from tumorseg.errors import TumorsegError
from tumorseg.manifest import to_channels

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "tumorseg-checkpoint-v1"


def build_model(cfg: ModelConfig, in_channels: int) -> torch.nn.Module:
    """A 2D MONAI network with one output channel (tumour logits)."""
    from monai.networks import nets

    strides = cfg.strides or [2] * (len(cfg.channels) - 1)
    if cfg.name == "unet":
        return nets.UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,
            channels=cfg.channels,
            strides=strides,
            num_res_units=cfg.num_res_units,
            norm=cfg.norm,
            dropout=cfg.dropout,
        )
    if cfg.name == "basic_unet":
        # The classic U-Net: two 3x3 convs per level, max-pooling, transposed-conv upsampling.
        if len(cfg.channels) != 5:
            raise TumorsegError("model.channels: basic_unet needs exactly 5 entries, e.g. [64, 128, 256, 512, 1024]")
        return nets.BasicUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=1,
            features=(*cfg.channels, cfg.channels[0]),
            norm=_norm_arg(cfg.norm),
            act="relu",
            dropout=cfg.dropout,
        )
    if cfg.name == "attention_unet":
        return nets.AttentionUnet(
            spatial_dims=2, in_channels=in_channels, out_channels=1, channels=cfg.channels, strides=strides,
            dropout=cfg.dropout,
        )
    if cfg.name == "segresnet":
        return nets.SegResNet(
            spatial_dims=2, init_filters=cfg.init_filters, in_channels=in_channels, out_channels=1,
            dropout_prob=cfg.dropout or None,
        )
    if cfg.name == "flexible_unet":
        net = nets.FlexibleUNet(
            in_channels=in_channels, out_channels=1, backbone=cfg.backbone, pretrained=False, spatial_dims=2,
            dropout=cfg.dropout,
        )
        if cfg.pretrained_weights is not None:
            load_encoder_weights(net, cfg.pretrained_weights)
        return net
    raise TumorsegError(f"model.name: unknown model {cfg.name!r}")  # pragma: no cover - pydantic guards it


def init_output_bias(net: torch.nn.Module, prior: float) -> None:
    """Start the output layer at the foreground prior: bias = logit(prior).

    With a zero bias every pixel starts at probability 0.5, and Dice loss pulls the
    (mostly background) pixels down only weakly: the network spends hundreds of steps
    predicting ~0.45 everywhere. Starting from the tumour fraction of the training set
    (the prior-probability initialisation of RetinaNet) removes that phase.
    """
    import torch

    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)
            and m.out_channels == 1 and m.bias is not None]
    if not last:
        return
    p = min(max(prior, 1e-3), 0.5)
    bias = last[-1].bias
    assert bias is not None
    with torch.no_grad():
        bias.fill_(float(np.log(p / (1 - p))))


def _norm_arg(norm: str) -> Any:
    if norm == "group":
        return ("group", {"num_groups": 8})
    if norm == "instance":
        return ("instance", {"affine": True})
    return norm


def load_encoder_weights(net: torch.nn.Module, path: Path) -> None:
    """Load pretrained encoder weights from a local file (torchvision-style state dict).

    Keys may carry a ``encoder.`` or ``module.`` prefix; keys that do not match the encoder
    (e.g. the classifier ``fc``) are ignored. No weights are ever downloaded.
    """
    import torch

    if not Path(path).is_file():
        raise TumorsegError(f"{path}: model.pretrained_weights not found; give a local .pt/.pth state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TumorsegError(f"{path}: cannot read pretrained weights ({exc.__class__.__name__}); "
                            "save them with torch.save(model.state_dict(), path)") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    encoder: torch.nn.Module = net.encoder  # type: ignore[assignment]
    own = encoder.state_dict()
    matched = {}
    for key, value in state.items():
        k = key.removeprefix("module.").removeprefix("encoder.")
        if k in own and own[k].shape == value.shape:
            matched[k] = value
    if not matched:
        raise TumorsegError(f"{path}: no tensor matches the {type(encoder).__name__} encoder; "
                            "check model.backbone matches the weights")
    encoder.load_state_dict(matched, strict=False)
    log.info("loaded %d/%d encoder tensors from %s", len(matched), len(own), path)


def build_loss(cfg: LossConfig) -> torch.nn.Module:
    """MONAI Dice-family loss on sigmoid outputs (binary, one channel)."""
    from monai import losses

    kw: dict[str, Any] = {"sigmoid": True, "batch": cfg.batch, "smooth_nr": cfg.smooth, "smooth_dr": cfg.smooth}
    if cfg.name == "dice":
        return losses.DiceLoss(**kw)
    if cfg.name == "dice_ce":
        return losses.DiceCELoss(**kw)
    if cfg.name == "dice_focal":
        return losses.DiceFocalLoss(**kw)
    raise TumorsegError(f"loss.name: unknown loss {cfg.name!r}")  # pragma: no cover


# ----------------------------------------------------------------------------- pre/post-processing


Stats = dict[str, list[float]]
"""Per-channel intensity statistics ``{"mean": [...], "std": [...]}`` of a training split."""


def normalize(image: np.ndarray, stats: Stats | None = None) -> np.ndarray:
    """Z-score a ``(C, H, W)`` float image per channel.

    With ``stats`` (the training split's mean/std, the default ``normalize: dataset``) every
    image is scaled the same way, so a tumour-free image's faint noise stays faint. Without,
    each image is z-scored by its own statistics (``normalize: image``; constant images -> 0).
    """
    img = image.astype(np.float32, copy=False)
    if stats is not None:
        mean = np.asarray(stats["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(stats["std"], dtype=np.float32)[:, None, None]
        return (img - mean) / np.where(std > 1e-8, std, 1.0)
    mean = img.mean(axis=(1, 2), keepdims=True)
    std = img.std(axis=(1, 2), keepdims=True)
    return (img - mean) / np.where(std > 1e-8, std, 1.0)


def intensity_sums(images: list[np.ndarray], in_channels: int) -> np.ndarray:
    """``(3, C)`` float64 per-channel pixel count, sum and sum of squares (reducible across ranks)."""
    out = np.zeros((3, in_channels), dtype=np.float64)
    for image in images:
        img = to_channels(image, in_channels).astype(np.float64)
        out[0] += img.shape[1] * img.shape[2]
        out[1] += img.sum(axis=(1, 2))
        out[2] += np.square(img).sum(axis=(1, 2))
    return out


def stats_from_sums(sums: np.ndarray) -> Stats:
    """Mean and std per channel from :func:`intensity_sums`."""
    n = np.maximum(sums[0], 1.0)
    mean = sums[1] / n
    std = np.sqrt(np.maximum(sums[2] / n - mean**2, 0.0))
    return {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def preprocess(
    image: np.ndarray, size: tuple[int, int], in_channels: int, stats: Stats | None = None
) -> torch.Tensor:
    """``(C, H, W)`` image -> ``float32 (in_channels, *size)`` network input."""
    import torch
    import torch.nn.functional as F

    arr = normalize(to_channels(image, in_channels), stats)
    t = torch.from_numpy(np.ascontiguousarray(arr))[None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    return t[0]


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``{0, 1} (H, W)`` mask -> ``float32 (1, *size)`` training target (area-resampled, >= 0.5)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = (F.interpolate(t, size=size, mode="area") >= 0.5).float()
    return t[0]


def logits_to_original(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(1, h, w)`` logits -> ``(H, W)`` probabilities at the original size."""
    import torch
    import torch.nn.functional as F

    x = logits.float()[None]
    if tuple(x.shape[-2:]) != tuple(shape):
        x = F.interpolate(x, size=shape, mode="bilinear", align_corners=False)
    return torch.sigmoid(x)[0, 0]


# ----------------------------------------------------------------------------- device


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present else CPU; asking for CUDA without one is an error."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise TumorsegError("device=cuda but no CUDA GPU is visible; use --set device=cpu (or auto)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """bf16 where supported, else fp16 on CUDA; ``None`` (fp32) on CPU or when disabled."""
    import torch

    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


# ----------------------------------------------------------------------------- inference


class Segmenter:
    """A trained network plus everything needed to predict on images of any size.

    Args:
        net: the network (eval mode is set here).
        config: the training config (image size, model, threshold).
        in_channels: channels the network takes (images are converted to match).
        device: where to run.
    """

    def __init__(
        self, net: torch.nn.Module, config: TrainConfig, in_channels: int, device: torch.device,
        stats: Stats | None = None,
    ) -> None:
        self.net = net.to(device).eval()
        self.stats = stats
        self.config = config
        self.in_channels = in_channels
        self.device = device
        self.threshold = config.threshold
        self._amp = amp_dtype(device, config.amp)
        if device.type == "cuda" and config.channels_last:
            import torch

            self.net = self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> Segmenter:
        """Load a ``best.pt``/``last.pt`` written by ``tumorseg train``."""
        ckpt = load_checkpoint(path)
        cfg = TrainConfig.model_validate(ckpt["config"])
        dev = resolve_device(device)
        net = build_model(cfg.model, int(ckpt["in_channels"]))
        net.load_state_dict(ckpt["model"])
        seg = cls(net, cfg, int(ckpt["in_channels"]), dev, ckpt.get("intensity"))
        seg.checkpoint_meta = {k: ckpt.get(k) for k in ("manifest_digest", "manifest_name", "mlflow_run_id",
                                                          "epoch", "best_val_dice", "checkpoint_sha256")}
        return seg

    checkpoint_meta: dict[str, Any] = {}

    def predict_proba(self, images: list[np.ndarray], tta: bool = False) -> list[np.ndarray]:
        """Tumour probabilities ``float32 (H, W)`` for ``(C, H, W)`` images of any sizes.

        With ``tta`` the prediction is averaged over horizontal and vertical flips.
        """
        import torch

        if not images:
            return []
        size = (int(self.config.image_size[0]), int(self.config.image_size[1]))
        batch = torch.stack([preprocess(img, size, self.in_channels, self.stats) for img in images]).to(self.device)
        if self.device.type == "cuda" and self.config.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._amp or torch.float32,
                                                    enabled=self._amp is not None):
            logits = self.net(batch).float()
            if tta:
                logits = logits + torch.flip(self.net(torch.flip(batch, dims=(3,))).float(), dims=(3,))
                logits = logits + torch.flip(self.net(torch.flip(batch, dims=(2,))).float(), dims=(2,))
                logits = logits / 3.0
        out = []
        for i, img in enumerate(images):
            prob = logits_to_original(logits[i], (int(img.shape[1]), int(img.shape[2])))
            out.append(prob.cpu().numpy().astype(np.float32))
        return out

    def predict_masks(self, images: list[np.ndarray], tta: bool = False,
                      threshold: float | None = None) -> list[np.ndarray]:
        """Binary ``uint8 (H, W)`` masks (probability > threshold)."""
        t = self.threshold if threshold is None else threshold
        return [(p > t).astype(np.uint8) for p in self.predict_proba(images, tta=tta)]


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a tumorseg checkpoint with ``weights_only=True``; corrupt or foreign files are one-line errors."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise TumorsegError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TumorsegError(f"{p}: corrupt or not a tumorseg checkpoint ({exc.__class__.__name__}); "
                            "use a best.pt/last.pt written by tumorseg train") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TumorsegError(f"{p}: not a tumorseg checkpoint; use a best.pt/last.pt written by tumorseg train")
    return ckpt
