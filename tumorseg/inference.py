"""Inference: pre/post-processing, device choice and the :class:`Segmenter`.

Train's validation, ``evaluate``, ``predict`` and the MLflow pyfunc model all predict
through the functions here, so they share one preprocessing and one resize-back rule:
the network sees the image normalised (:func:`tumorseg.intensity.normalize`) and resized to ``image_size``;
its logits are resized back (bilinear) to the original size before the sigmoid and threshold. A volume model
with ``crop_nonzero`` sees each volume's nonzero box and its prediction is pasted back (:mod:`tumorseg.cropping`);
one with ``target_spacing`` sees each volume at that voxel size, placed in the grid (:mod:`tumorseg.placement`).

The normalisation rules live in :mod:`tumorseg.intensity`; they travel in the checkpoint
(``intensity``), so every stage applies the rule the model was trained with.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import replace
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg import checkpoint
from tumorseg.config import TrainConfig
from tumorseg.cropping import Box, box_shape, nonzero_box, paste
from tumorseg.errors import TumorsegError
from tumorseg.imageio import to_channels
from tumorseg.intensity import Fingerprint, Stats, finish, legacy_fingerprint, prescale_for, range_message
from tumorseg.labels import Classes
from tumorseg.placement import inference_size, padding, spacing_problem, spacings, tiling  # noqa: F401
from tumorseg.postprocessing import (  # noqa: F401  (re-exported: where callers have always found them)
    Postprocess,
    component_confidence,
    component_means,
    component_peaks,
    components,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def preprocess(
    image: np.ndarray, size: tuple[int, ...], in_channels: int, stats: Stats | None = None
) -> torch.Tensor:
    """``(C, H, W)`` image (or ``(C, X, Y, Z)`` volume) -> ``float32 (in_channels, *size)`` network input."""
    import torch

    pre = prescale_for(to_channels(image, in_channels), stats)
    return torch.from_numpy(finish(resize_image(pre, size).numpy(), stats))


def resize_image(image: np.ndarray, size: tuple[int, ...]) -> torch.Tensor:
    """``float32 (C, *spatial)`` -> ``(C, *size)`` tensor; as is when the size matches.

    Images: bilinear, antialiased. Volumes: trilinear, after an area (box) filter on the axes that shrink
    (torch antialiases only 2D), so a coarser grid averages its voxels instead of skipping them.
    """
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    if tuple(t.shape[2:]) == tuple(size):
        return t[0]
    if len(size) == 2:
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    shrink = tuple(min(int(s), int(n)) for s, n in zip(size, t.shape[2:], strict=True))
    if shrink != tuple(t.shape[2:]):
        t = F.interpolate(t, size=shrink, mode="area")
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0]


def resize_mask(mask: np.ndarray, size: tuple[int, ...]) -> torch.Tensor:
    """``(H, W)`` mask (or ``(X, Y, Z)`` label volume) -> ``float32 (1, *size)`` training target.

    A ``{0, 1}`` mask is area-resampled and kept where at least half covered; a label map (class
    indices above 1) gets each pixel's majority class: its one-hot planes area-resampled, then the
    argmax (so no class is invented at a border, as nearest-neighbour or bilinear would do).
    """
    import torch
    import torch.nn.functional as F

    if tuple(mask.shape) == tuple(size):
        return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
    idx = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8 if mask.dtype == np.uint8 else np.int64))
    k = int(idx.max()) + 1 if idx.numel() else 1
    if k <= 2:
        t = F.interpolate(idx.float()[None, None], size=size, mode="area")
        return (t >= 0.5).float()[0]
    # one class at a time (a volume's one-hot planes at once would take K float copies of it); ties keep the
    # lowest class, as argmax does
    best = torch.full(tuple(size), -1.0)
    arg = torch.zeros(tuple(size), dtype=torch.int64)
    for c in range(k):
        share = F.interpolate((idx == c).float()[None, None], size=size, mode="area")[0, 0]
        better = share > best
        best, arg = torch.where(better, share, best), torch.where(better, c, arg)
    return arg[None].float()


def logits_to_original(logits: torch.Tensor, shape: tuple[int, ...], softmax: bool = True) -> torch.Tensor:
    """Logits -> probabilities at the original size (``(H, W)``, or ``(K, H, W)`` for K classes; volumes alike).

    ``(1, h, w)`` logits give tumour probabilities (sigmoid); the ``(K, h, w)`` logits of a
    multi-class network give class probabilities (``softmax``), those of a region-based one region
    probabilities (a sigmoid each, ``softmax=False``).
    """
    import torch
    import torch.nn.functional as F

    x = logits.float()[None]
    if tuple(x.shape[2:]) != tuple(shape):
        x = F.interpolate(x, size=shape, mode="bilinear" if len(shape) == 2 else "trilinear", align_corners=False)
    if x.shape[1] == 1:
        return torch.sigmoid(x)[0, 0]
    return torch.softmax(x, dim=1)[0] if softmax else torch.sigmoid(x)[0]


# ----------------------------------------------------------------------------- device


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present else CPU; asking for CUDA without one is an error."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise TumorsegError("device=cuda but no CUDA GPU is visible; run on the CPU: --set device=cpu (train) or "
                            "--device cpu (plan, evaluate, predict), or auto")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The autocast dtype of a device, or ``None`` (fp32) when disabled or not worth it.

    CUDA: bf16 where supported, else fp16. CPU: bf16 where the CPU computes it natively (AVX512-BF16 or
    AMX; a UNet trains 1.4-1.8x faster on a 2-core EPYC, benchmarks/RESULTS.md), else fp32 (emulated bf16
    would be slower).
    """
    import torch

    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_bf16():
        return torch.bfloat16
    return None


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


# ----------------------------------------------------------------------------- inference


def network_logits(net: torch.nn.Module, batch: torch.Tensor, patch_size: tuple[int, ...] | None = None,
                   tta: bool = False, mirror: tuple[int, ...] = (2, 3),
                   multiple: tuple[int, ...] | None = None) -> torch.Tensor:
    """Logits ``(N, K, *spatial)`` of a preprocessed batch, whole or by sliding window, optionally mirrored.

    With ``patch_size`` other than the batch's images' size, MONAI's ``sliding_window_inference``
    tiles them with half-patch overlap and Gaussian blending (as nnU-Net), padding any axis shorter than the patch
    (a volume at its own size, :mod:`tumorseg.placement`). With ``multiple``, one pass over the whole batch,
    zero-padded at the end of each axis to a multiple of it (the network's downsampling), the padding cut off.
    With ``tta`` the logits are averaged over every mirroring of the ``mirror`` dims (nnU-Net's mirroring; the
    training config's ``augment.flip_dims``): four for both axes, two for one.
    """
    import torch

    from tumorseg.model import main_output

    def forward(x: torch.Tensor) -> torch.Tensor:
        if multiple is not None:
            import torch.nn.functional as F

            spatial = [int(s) for s in x.shape[2:]]
            pad = padding(spatial, multiple)
            whole = main_output(net(F.pad(x, [v for p in reversed(pad) for v in (0, p)]) if any(pad) else x), x.dim())
            return whole[(slice(None), slice(None), *(slice(0, s) for s in spatial))].float()
        if patch_size is not None and tuple(int(s) for s in x.shape[2:]) != tuple(patch_size):
            from monai.inferers import sliding_window_inference

            out = sliding_window_inference(x, patch_size, max(1, x.shape[0]), lambda t: main_output(net(t), t.dim()),
                                           overlap=0.5, mode="gaussian")
            return torch.as_tensor(out).float()
        return main_output(net(x), x.dim()).float()

    mirror = tuple(d for d in mirror if d < batch.dim())
    logits = forward(batch)
    if tta and mirror:
        axes = sorted(mirror, reverse=True)
        flips = [dims for r in range(1, len(axes) + 1) for dims in combinations(axes, r)]
        for dims in flips:
            logits = logits + torch.flip(forward(torch.flip(batch, dims=dims)), dims=dims)
        logits = logits / (len(flips) + 1)
    return logits


def volume_logits(net: torch.nn.Module, batch: torch.Tensor, cfg: TrainConfig, tta: bool) -> torch.Tensor:
    """Logits of one placed volume at its own size (:func:`tumorseg.placement.tiling`): validation and Segmenter."""
    patch, multiple = tiling(cfg, tuple(int(s) for s in batch.shape[2:]))
    return network_logits(net, batch, patch, tta, cfg.augment.flip_dims, multiple)


class Segmenter:
    """A trained network plus everything needed to predict on images of any size.

    Args:
        net: the network (eval mode is set here).
        config: the training config (image size, patch size, model).
        in_channels: channels the network takes (images are converted to match).
        device: where to run.
        stats: the normalisation rule and statistics (the checkpoint's ``intensity``; see the module docstring).
        post: the post-processing chosen after training (default: the config's threshold).
        fingerprint: the training images' raw range (the checkpoint's ``intensity_fingerprint``); older
            checkpoints get an estimate from ``stats`` (:func:`legacy_fingerprint`) or none.
        classes: the label set the network predicts (binary by default).
    """

    def __init__(
        self, net: torch.nn.Module, config: TrainConfig, in_channels: int, device: torch.device,
        stats: Stats | None = None, post: Postprocess | None = None, fingerprint: Fingerprint | None = None,
        classes: Classes | None = None,
    ) -> None:
        self.net = net.to(device).eval()
        self.classes = classes or Classes()
        self.stats = stats
        self.fingerprint = fingerprint or legacy_fingerprint(stats)
        self.config = config
        self.in_channels = in_channels
        self.device = device
        self.post = post or Postprocess(threshold=config.threshold, tta=config.tta)
        self._amp = amp_dtype(device, config.amp)
        self.checkpoint_meta: dict[str, Any] = {}
        if config.channels_last:
            from tumorseg.model import channels_last

            self.net = channels_last(self.net)

    @property
    def threshold(self) -> float:
        """The probability threshold in use."""
        return self.post.threshold

    @property
    def context(self) -> int:
        """Neighbouring slices a side the network takes as extra channels (0: a plain 2D model)."""
        return int(self.config.slice_context)

    @property
    def base_channels(self) -> int:
        """Channels of one input plane (``in_channels`` of a 2.5D model counts every slice of the window)."""
        return self.in_channels // (2 * self.context + 1)

    def batch_for(self, requested: int) -> int:
        """Inputs per forward pass: ``requested`` images, but at most two volumes and never more than training's batch.

        A whole volume's activations (and a sliding window's full-size buffers) are those of a training batch
        of patches or more, so evaluate, predict and the MLflow model hold nnU-Net's 3D batch (2) at the most.
        """
        if self.config.spatial_dims == 2:
            return max(1, requested)
        return max(1, min(requested, int(self.config.batch_size), 2))

    def stack(self, planes: list[np.ndarray]) -> list[np.ndarray]:
        """The network's inputs for an ordered stack of ``(C, H, W)`` planes: each with its neighbours (2.5D).

        A plain 2D model takes the planes as they are.
        """
        if self.context == 0:
            return planes
        from tumorseg.context import stack_planes

        return stack_planes(planes, self.context, self.base_channels)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> Segmenter:
        """Load a checkpoint written by ``tumorseg train`` (``best.pt``, ``last.pt`` or a model's ``model.pt``).

        Raises:
            TumorsegError: missing, corrupt or foreign checkpoint (one line naming the file).
        """
        from pydantic import ValidationError

        ckpt = checkpoint.load(path)
        try:
            cfg = checkpoint.train_config(ckpt)
            from tumorseg.model import build_model

            net = build_model(cfg.model, int(ckpt["in_channels"]), checkpoint.classes(ckpt).out_channels,
                              spatial_dims=cfg.spatial_dims)
            net.load_state_dict(ckpt["model"])
        except ValidationError as exc:
            raise TumorsegError(f"{path}: checkpoint config is not a valid tumorseg TrainConfig "
                                f"({exc.error_count()} problem(s)); it was written by another version or tool"
                                ) from exc
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            detail = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
            raise TumorsegError(f"{path}: corrupt or foreign checkpoint ({detail}); "
                                "use a best.pt/last.pt written by tumorseg train") from exc
        seg = cls(net, cfg, int(ckpt["in_channels"]), resolve_device(device), ckpt.get("intensity"),
                  Postprocess.from_checkpoint(ckpt, cfg), ckpt.get("intensity_fingerprint"), checkpoint.classes(ckpt))
        seg.checkpoint_meta = {k: ckpt.get(k) for k in checkpoint.META_KEYS}
        return seg

    def intensity_outside_training(self, image: np.ndarray) -> str | None:
        """Why an image's (or volume's) stored intensities are far from the training images', else ``None``."""
        return range_message(image, self.fingerprint, self.stats)

    def predict_proba(self, images: list[np.ndarray], tta: bool | None = None,
                      spacings: list[tuple[float, ...] | None] | None = None) -> list[np.ndarray]:
        """Tumour probabilities ``float32 (H, W)`` for ``(C, H, W)`` images of any sizes.

        A multi-class model gives ``(K, H, W)``, one plane per class.

        ``tta`` (default: the model's choice) averages over mirrored inputs. ``spacings``: each volume's voxel
        size (canonical axes), which a model with ``target_spacing`` resamples from (unknown: ``input_spacing``).
        """
        import torch

        if not images:
            return []
        bare = next((img for img in images if self.context and img.shape[0] == self.base_channels), None)
        if bare is not None and self.base_channels != self.in_channels:
            raise TumorsegError(f"a {bare.shape[0]}-channel image given to a model with slice context "
                                f"{self.context}: pass the slices of a stack through Segmenter.stack first")
        size = tuple(int(s) for s in self.config.image_size)
        odd = next((img for img in images if img.ndim != len(size) + 1), None)
        if odd is not None:
            raise TumorsegError(f"a {odd.ndim - 1}D input given to a {len(size)}D model (trained on "
                                f"{'volumes' if len(size) == 3 else 'images'}); "
                                + ("predict volumes slice by slice with a 2D model" if len(size) == 2
                                   else "a 3D model needs (C, X, Y, Z) volumes"))
        boxes = [self.box(img) for img in images]
        crops = [img[(slice(None), *box)] if box else img for img, box in zip(images, boxes, strict=True)]
        sizes = [inference_size(self.config, c.shape[1:], sp)
                 for c, sp in zip(crops, spacings or [None] * len(images), strict=True)]
        use_tta = self.post.tta if tta is None else tta
        if all(at is None for at in sizes):
            batch = torch.stack([preprocess(c, size, self.in_channels, self.stats) for c in crops])
            logits = list(self._logits(batch, use_tta))
        else:  # each volume whole at the target spacing, at its own size (tumorseg.placement)
            logits = [self._logits(preprocess(c, at or size, self.in_channels, self.stats)[None], use_tta)[0]
                      for c, at in zip(crops, sizes, strict=True)]
        out = []
        for i, (img, box) in enumerate(zip(images, boxes, strict=True)):
            shape = tuple(int(s) for s in img.shape[1:])
            prob = logits_to_original(logits[i], box_shape(box) if box else shape, self.classes.softmax)
            out.append(prob.cpu().numpy().astype(np.float32))
            if box:
                out[-1] = paste(out[-1], box, shape, self.classes.softmax)
        return out

    def _logits(self, batch: torch.Tensor, tta: bool) -> torch.Tensor:
        """The network's logits of a preprocessed batch (whole, or by sliding window over the training patch)."""
        import torch

        batch = batch.to(self.device)
        if self.config.channels_last:
            from tumorseg.model import channels_last

            batch = channels_last(batch)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self._amp or torch.float32,
                                                    enabled=self._amp is not None):
            if spacings(self.config) is not None:  # a placed volume, at its own size
                return volume_logits(self.net, batch, self.config, tta)
            return network_logits(self.net, batch, self.config.patch_size, tta, self.config.augment.flip_dims)

    def box(self, image: np.ndarray) -> Box | None:
        """The part of a volume the network sees: its nonzero box where the model crops (``crop_nonzero``)."""
        if not self.config.crop_nonzero or image.ndim != 4:
            return None
        return nonzero_box(image)

    def mask(self, prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """The model's post-processing applied to one probability map (``threshold`` overrides its own)."""
        post = self.post if threshold is None else replace(self.post, threshold=threshold)
        return post.mask(prob, self.classes)

    def stack_masks(self, probs: list[np.ndarray], threshold: float | None = None) -> list[np.ndarray]:
        """The masks of an ordered stack of slices' probabilities (:meth:`Postprocess.stack_masks`).

        One component rule over the whole stack where the post-processing is volumetric, else slice by slice.
        """
        post = self.post if threshold is None else replace(self.post, threshold=threshold)
        return post.stack_masks(probs, self.classes)

    def predict_masks(self, images: list[np.ndarray], tta: bool | None = None, threshold: float | None = None,
                      spacings: list[tuple[float, ...] | None] | None = None) -> list[np.ndarray]:
        """``uint8 (H, W)`` masks (binary, or class indices): probabilities, threshold and component filtering.

        ``images`` are one ordered stack of slices when the post-processing is volumetric (:meth:`stack_masks`).
        """
        return self.stack_masks(self.predict_proba(images, tta=tta, spacings=spacings), threshold)


def channels_compatible(image_channels: int, model_channels: int, volumes: bool = False) -> bool:
    """Whether images with ``image_channels`` can feed a model taking ``model_channels``.

    Equal counts always work; grey and RGB convert into each other (:func:`tumorseg.imageio.to_channels`).
    Volumes (``volumes``): only equal counts: their channels are MR sequences, not colours.
    """
    if volumes:
        return image_channels == model_channels
    return image_channels == model_channels or (image_channels in (1, 3) and model_channels in (1, 3))
