"""The planning rules: from a fingerprint, a device and a time budget to training settings.

The rules, in order (each choice and its reason is written into ``plan.json``):

1. **Resolution floor.** Never shrink the median tumour below ``MIN_TUMOUR_DIAMETER`` pixels nor the small (5th
   percentile) tumours below ``MIN_SMALL_TUMOUR_DIAMETER`` (in a label map, of its smallest class): that sets the
   smallest scale allowed, whatever the budget. Why 64: Dice is scored at the original resolution, and a boundary
   known to half a training pixel costs about ``2 * 0.5 / r`` of a tumour of radius ``r``: 3% at a 64-pixel
   diameter, 12% for a 16-pixel small one. **A starved budget** (even the fastest of ``NETWORKS`` buys under
   ``STARVED`` of rule 2's samples at that floor) halves both floors (``*_STARVED``: 32 / 8 px): a tenth of the
   epochs costs more than twice the boundary. BUSI shrunk onto 512x512 canvases at a 5-minute budget, two seeds
   (benchmarks/RESULTS.md): tumours 74 px across (1.7% of the image, the hidden 512^2 set's), 448x448 -> 224x224:
   test Dice +0.109; tumours 44 px, the small ones 15 px, 512x512 -> 384x384: +0.058. Where it cost: the
   left-atrium slice stacks at 10 minutes, 192x128 -> 96x64, two seeds: -0.004 (128x96 won: +0.003).
2. **Samples the budget must buy.** A U-Net needs to see each training image many times with a decaying learning
   rate: ``TARGET_EPOCHS`` epochs, but at least ``MIN_SAMPLES`` and at most ``MAX_SAMPLES`` images in all. Why 80:
   on BUSI val, at an equal 30-minute budget, 49 epochs at 288x320 were still improving at the end (val Dice over
   tumour cases 0.735) and 66 epochs at 224x256 scored higher (0.749) (benchmarks/RESULTS.md).
3. **Network.** The largest of ``NETWORKS`` (nnU-Net's DynUNet with deep supervision first, then MONAI U-Nets of
   decreasing width) whose measured throughput buys those samples at the floor resolution; else the fastest, and where
   even that buys under ``STARVED`` (a quarter) of them, a narrower U-Net of 8..128 channels (:data:`STARVED_NETWORK`):
   epochs, not width, are then what is short (BUSI held at native size, 7 epochs at 16..256: val +0.028 over three
   seeds; the left-atrium slice stacks, where 16..256 buys 41%: -0.004, 27-30%: -0.004 and 15%: level, two seeds each;
   benchmarks/RESULTS.md). Depth: downsample until the feature map is about ``MIN_FEATURE`` pixels (at most
   ``MAX_DOWNSAMPLINGS`` times). Before them come the U-Nets on an ImageNet-pretrained encoder (``PRETRAINED``, largest
   first), but only for a small set of natural-looking images (:func:`pretrained_allowed`: 2D 8-bit grey or RGB files,
   photographs or ultrasound, at most ``PRETRAINED_MAX_TRAIN`` train cases, where ImageNet features help most) and only
   those whose weights are already on this machine (torch's hub cache; planning never downloads). The throughput decides
   among them as among the others. Their order is by size; no equal-budget benchmark has ranked them against DynUNet yet
   (``benchmarks/bench_backbones.py`` does).
4. **Resolution.** The largest scale up to native (the median image size) whose throughput still buys the samples,
   never below the floor. Sizes are multiples of 32.
5. **Patches.** When the training size holds more pixels than fit (``MAX_PATCH_PIXELS_CPU`` on a CPU; from the
   probe's memory per image on a GPU), train on random crops of the largest size that fits, a third of them centred
   on tumour (nnU-Net's foreground oversampling), and predict with a sliding window. **Patches for time** (nnU-Net's
   memory rule applied to the budget): when even the floor resolution cannot buy the samples of rule 2 with whole
   images (or the crops memory allows: large images with small tumours, a slow CPU), train on the largest crop whose
   measured throughput buys them, never smaller than ``PATCH_TUMOURS`` median tumour diameters (the tumour and its
   surroundings) nor than the network's smallest input; validation and inference stay whole-image (sliding window)
   at the training scale. **Not a default** (``patches_for_time: true`` asks for it): at equal budget it was level
   on the left-atrium slice stacks (128x128 crops for 192x128 slices: per-volume val -0.002, test +0.001) and lower
   on BUSI held at native size (288x288 crops for 448x544 images, 12-13 epochs against 7: val -0.017 over three
   seeds); benchmarks/RESULTS.md.
6. **Loss.** Dice + cross-entropy, the Dice per image rather than pooled over the batch (nnU-Net's 2D batch Dice):
   the score is the mean of per-case Dice, and a pooled Dice lets a batch's large tumours outvote its small ones. On
   BUSI at an equal 30-minute budget, per-image Dice raised val Dice over tumour cases from 0.724 to 0.761 (test
   0.708 to 0.748), at the price of more false positives on tumour-free images (val 1/22 to 6/22) that the
   post-processing search weighs.
7. **Steps.** Measured images per second at the chosen size x the budget left after validation, post-processing and
   model logging; the LR schedule (poly, with warm-up) spans exactly those steps.
8. **Mirroring.** Flip (in training and in mirroring TTA) only along the axes on which the images have no shared
   orientation: where at least ``ORIENTED`` of the sampled train images agree on which way up they are (the
   fingerprint's ``orientation``: ultrasound with the probe at the top, slices in a canonical radiological
   orientation), every image the network will be asked about has that orientation too, and upside-down training
   views spend the budget on a case that never occurs. Random orientations (the synthetic data: about 0.4) keep both
   flips. Nor along an axis on which a label map's classes lie in one order in ``ORIENTED`` of the sampled cases
   (the fingerprint's ``label_order``: a head and a tail, a left and a right organ): a mirrored view swaps them
   (nnU-Net's advice: its no-mirroring trainer for such labels). Volumes follow this part too (V8).
9. and 10., the rules for groups and slice stacks (the selection unit, 2.5D slice context), are in
   :mod:`tumorseg.planning.stacks`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tumorseg.config import LossConfig, ModelConfig
from tumorseg.planning.fingerprint import AXIS_NAMES, Fingerprint, smallest_structure
from tumorseg.planning.probe import Throughput
from tumorseg.planning.stacks import STACK_SHARE, slice_context

MIN_TUMOUR_DIAMETER = 64.0
MIN_TUMOUR_DIAMETER_STARVED = 32.0
MIN_SMALL_TUMOUR_DIAMETER = 16.0
MIN_SMALL_TUMOUR_DIAMETER_STARVED = 8.0
TARGET_EPOCHS = 80
MIN_SAMPLES = 20_000
MAX_SAMPLES = 500_000
MIN_FEATURE = 4
"""nnU-Net's smallest feature map edge (``unet_featuremap_min_edge_length``). Was 8: on BUSI val, at
224x256 and an equal 30-minute budget, 4 downsamplings (14 px bottleneck) scored 0.69 against 0.75 for 5
(7 px): the receptive field must span the tumour (benchmarks/RESULTS.md)."""
MAX_DOWNSAMPLINGS = 5
MAX_PATCH_PIXELS_CPU = 512 * 512
PATCH_TUMOURS = 2.0
"""A patch for time spans at least this many median tumour diameters (rule 5): the tumour and its context."""
MIN_PATCH_SIDE = 64
CPU_BATCH = 8
GPU_BATCH_MAX = 32
SIZE_STEP = 32
ORIENTED = 0.9
"""The share of train images agreeing on an axis's orientation above which it is not flipped (rule 8). BUSI:
1.0 up-down, 0.48 left-right; the synthetic data: 0.40 and 0.33."""
FINISH_SECONDS = 10.0
"""Fixed cost after the last step: learning curve, overlays, logging the model."""

PRETRAINED: list[tuple[str, dict[str, Any]]] = [
    ("FlexibleUNet on an ImageNet-pretrained VGG16-BN encoder", {"name": "flexible_unet", "backbone": "vgg16_bn"}),
    ("FlexibleUNet on an ImageNet-pretrained VGG16 encoder", {"name": "flexible_unet", "backbone": "vgg16"}),
    ("FlexibleUNet on an ImageNet-pretrained MobileNetV3-large encoder",
     {"name": "flexible_unet", "backbone": "mobilenet_v3_large"}),
    ("FlexibleUNet on an ImageNet-pretrained MobileNetV2 encoder",
     {"name": "flexible_unet", "backbone": "mobilenet_v2"}),
]
"""Pretrained candidates of rule 3, largest first (each tried only where its ImageNet weights are cached)."""
PRETRAINED_MAX_TRAIN = 5000
"""At most this many train cases for a pretrained encoder (the Oxford pets trimaps: 3,680; BUSI: ~550)."""

NETWORKS: list[tuple[str, dict[str, Any]]] = [
    ("nnU-Net DynUNet, 32..512 channels, deep supervision",
     {"name": "dynunet", "base": 32, "cap": 512, "deep_supervision": True}),
    ("MONAI UNet, 32..512 channels, 2 residual units", {"name": "unet", "base": 32, "cap": 512}),
    ("MONAI UNet, 16..256 channels, 2 residual units", {"name": "unet", "base": 16, "cap": 256}),
]
STARVED_NETWORK: tuple[str, dict[str, Any]] = (
    "MONAI UNet, 8..128 channels, 2 residual units", {"name": "unet", "base": 8, "cap": 128})
"""Rule 3's network when even the fastest of :data:`NETWORKS` buys under :data:`STARVED` of the samples."""
STARVED = 0.25
"""The share of rule 2's samples under which a budget is starved (rule 3): fewer than 20 of the 80 epochs."""

Probe = Callable[[ModelConfig, tuple[int, int], int], Throughput]
"""``probe(model, size, batch) -> Throughput`` on the run's device."""


def round_size(h: float, w: float) -> tuple[int, int]:
    """Nearest multiples of :data:`SIZE_STEP` (at least one step)."""
    return (max(SIZE_STEP, int(round(h / SIZE_STEP)) * SIZE_STEP),
            max(SIZE_STEP, int(round(w / SIZE_STEP)) * SIZE_STEP))


def patience(epochs: int) -> int:
    """Early-stopping patience of a run of ``epochs``: a third of it, at least 10.

    A budget run that refits its length keeps the share, so a poly schedule still in its decay is not cut short.
    """
    return max(10, epochs // 3)


def floor_scale(fp: Fingerprint, median_px: float = MIN_TUMOUR_DIAMETER,
                small_px: float = MIN_SMALL_TUMOUR_DIAMETER) -> float:
    """The smallest scale that keeps the tumours visible (rule 1); 1.0 when tumours are already small.

    ``median_px`` / ``small_px``: the median and small tumours' floors (halved for a starved budget).
    """
    d = smallest_structure(fp)[1]
    need = [median_px / d["median"] if d["median"] else 1.0,
            small_px / d["p5"] if d["p5"] else 1.0]
    return min(1.0, max(need))


def target_samples(n_train: int) -> int:
    """Images the run should see (rule 2)."""
    return int(min(MAX_SAMPLES, max(MIN_SAMPLES, TARGET_EPOCHS * n_train)))


def pretrained_allowed(fp: Fingerprint) -> str | None:
    """Why the data rule out a pretrained encoder (rule 3), or ``None`` when they allow one."""
    if not fp.natural:
        return "the images are not all 2D 8-bit grey or RGB files (NIfTI, 16-bit or other channels)"
    if fp.n_train > PRETRAINED_MAX_TRAIN:
        return f"{fp.n_train} train cases (a pretrained encoder is tried up to {PRETRAINED_MAX_TRAIN})"
    return None


def network(spec: dict[str, Any], size: tuple[int, int], norm: str = "batch") -> ModelConfig:
    """The network of ``spec`` sized for ``size`` (rule 3's depth)."""
    if spec["name"] == "flexible_unet":  # the encoder fixes its depth (five stride-2 stages) and widths
        return ModelConfig(name="flexible_unet", backbone=spec["backbone"], pretrained="imagenet", norm=norm)  # type: ignore[arg-type]
    depth = 0
    while depth < MAX_DOWNSAMPLINGS and min(size) / 2 ** (depth + 1) >= MIN_FEATURE:
        depth += 1
    depth = max(depth, 2)
    channels = [min(spec["cap"], spec["base"] * 2**i) for i in range(depth + 1)]
    return ModelConfig(name=spec["name"], channels=channels, strides=[2] * depth, norm=norm,  # type: ignore[arg-type]
                       deep_supervision=bool(spec.get("deep_supervision", False)))


def patch_for(size: tuple[int, int], max_pixels: float) -> tuple[int, int] | None:
    """The crop size when ``size`` holds more than ``max_pixels`` (rule 5); ``None`` for whole images."""
    if size[0] * size[1] <= max_pixels:
        return None
    side = max(SIZE_STEP, int(math.sqrt(max_pixels)) // SIZE_STEP * SIZE_STEP)
    return (min(size[0], side), min(size[1], side))


def samples_in(budget: float, thr: Throughput, n_train: int, n_val: int, scale_px: float = 1.0,
               infer_px: float | None = None) -> float:
    """Training images (or patches) a budget buys, after per-epoch validation and the post-processing search.

    ``scale_px`` rescales the measured throughput to another training size (cost ~ pixels); ``infer_px`` to
    another validation size (default: the training size; patches train small but validate whole images).
    """
    train_ips = thr.train_images_per_second / scale_px
    infer_ips = thr.infer_images_per_second / (scale_px if infer_px is None else infer_px)
    finish = FINISH_SECONDS + 5.0 * n_val / infer_ips  # val with and without mirroring, then filters
    per_epoch = n_train / train_ips + n_val / infer_ips
    epochs = max(0.0, budget - finish) / per_epoch
    return epochs * n_train


def time_patch(fp: Fingerprint, image_size: tuple[int, int], current: tuple[int, int], scale: float,
               floor_size: tuple[int, int], thr_floor: Throughput, budget: float, n_val: int, want: int
               ) -> tuple[int, int] | None:
    """The crop that buys the samples ``current`` inputs cannot (rule 5, patches for time).

    ``current`` is what training takes otherwise: whole images (``image_size``) or the crop memory allows.
    ``None`` when those buy ``want`` samples. Else the largest smaller crop (sides multiples of
    :data:`SIZE_STEP`) whose measured throughput buys them, not below :data:`PATCH_TUMOURS` median tumour
    diameters at the training scale nor :data:`MIN_PATCH_SIDE`; the smallest such crop when none buys them
    (``None`` when ``current`` is already that small). Validation stays at ``image_size``.
    """
    floor_px = floor_size[0] * floor_size[1]
    image_px = image_size[0] * image_size[1] / floor_px

    def buys(size: tuple[int, int]) -> bool:
        return samples_in(budget, thr_floor, fp.n_train, n_val, size[0] * size[1] / floor_px, image_px) >= want

    if buys(current):
        return None
    tumour = fp.tumour_diameter["median"] * scale * PATCH_TUMOURS
    smallest = max(MIN_PATCH_SIDE, math.ceil(tumour / SIZE_STEP) * SIZE_STEP)
    side = max(current) - SIZE_STEP
    best: tuple[int, int] | None = None
    while side >= smallest:
        best = (min(current[0], side), min(current[1], side))
        if buys(best):
            return best
        side -= SIZE_STEP
    return best


def flip_axes(fp: Fingerprint, reasons: dict[str, str]) -> list[str]:
    """The axes to flip along (rule 8); the reason goes into ``reasons["flip_axes"]`` when one is held fixed."""
    axes = [axis for axis in ("vertical", "horizontal") if fp.orientation.get(axis, 0.0) < ORIENTED]
    fixed = [f"{fp.orientation[axis]:.0%} of the sampled train images share one "
             f"{'up-down' if axis == 'vertical' else 'left-right'} orientation"
             for axis in ("vertical", "horizontal") if axis not in axes]
    axes, why = unordered_axes(fp, axes)
    if fixed or why:
        held = [f"{'; '.join(fixed)}, so test images have it too"] if fixed else []
        reasons["flip_axes"] = (f"{' and '.join(axes) or 'no'} flips: {'; '.join(held + why)} (mirroring TTA "
                                "follows)")
    return axes


def unordered_axes(fp: Fingerprint, axes: list[str]) -> tuple[list[str], list[str]]:
    """``axes`` less those along which the label map's classes lie in one order (rule 8), and why each went."""
    ordered = [axis for axis in axes if fp.label_order.get(axis, 0.0) >= ORIENTED]
    names = dict(zip(AXIS_NAMES, ("x, left-right", "y, back-front", "z, foot-head"), strict=True)) \
        if fp.dims == 3 else {}
    return ([axis for axis in axes if axis not in ordered],
            [f"the classes lie in one order along the {axis}{f' (RAS {names[axis]})' if names else ''} axis in "
             f"{fp.label_order[axis]:.0%} of the sampled train cases holding two of them (a mirrored view swaps "
             "them)" for axis in ordered])


def choose(fp: Fingerprint, budget: float, n_val: int, probe: Probe, device_type: str,
           free_memory: float = 0.0, pretrained: tuple[str, ...] = (), patches_for_time: bool = False
           ) -> dict[str, Any]:
    """Apply rules 1-8; returns the training settings, the estimates and the reasons.

    ``pretrained``: the backbones whose ImageNet weights are on this machine (rule 3 may pick one of them).
    ``patches_for_time``: apply rule 5's patches for time (off by default: not kept, see rule 5).
    """
    native = (float(fp.size_median[0]), float(fp.size_median[1]))
    lo = floor_scale(fp)
    want = target_samples(fp.n_train)
    reasons: dict[str, str] = {}
    floor_size = round_size(native[0] * lo, native[1] * lo)
    batch = CPU_BATCH

    def patch_cap(thr: Throughput) -> float:
        if device_type == "cuda" and thr.bytes_per_image > 0 and free_memory > 0:
            return 0.5 * free_memory / (batch * thr.bytes_per_image) * floor_size[0] * floor_size[1]
        return MAX_PATCH_PIXELS_CPU

    # rule 3: the largest network that buys the samples at the floor resolution
    ruled_out = pretrained_allowed(fp)
    candidates = [(n, s) for n, s in PRETRAINED if s["backbone"] in pretrained] if ruled_out is None else []
    if ruled_out is not None:
        reasons["pretrained"] = f"no pretrained encoder: {ruled_out}"
    elif not candidates:
        reasons["pretrained"] = ("no pretrained encoder: none of their ImageNet weights is in torch's hub cache "
                                 "(planning never downloads; model.pretrained=imagenet fetches them once)")

    def largest(size: tuple[int, int]) -> tuple[tuple[str, dict[str, Any]], Throughput, float]:
        """The largest network that buys the samples at ``size``, else the fastest; its throughput and samples."""
        for name, spec in [*candidates, *NETWORKS]:
            thr = probe(network(spec, size), size, batch)
            bought = samples_in(budget, thr, fp.n_train, n_val)
            if bought >= want:
                return (name, spec), thr, bought
        return NETWORKS[-1], thr, bought

    chosen, thr_floor, bought = largest(floor_size)
    half = floor_scale(fp, MIN_TUMOUR_DIAMETER_STARVED, MIN_SMALL_TUMOUR_DIAMETER_STARVED)
    half_size = round_size(native[0] * half, native[1] * half)
    if bought < STARVED * want and half_size != floor_size:  # rule 1: a starved budget halves the floors
        starved_at = f"{floor_size[0]}x{floor_size[1]} ({bought:.0f} of the {want} training images)"
        lo, floor_size = half, half_size
        chosen, thr_floor, bought = largest(floor_size)
        reasons["floor"] = (f"starved at the floor size {starved_at}: the floors of the median and small tumours "
                            f"halved to {MIN_TUMOUR_DIAMETER_STARVED:g} and {MIN_SMALL_TUMOUR_DIAMETER_STARVED:g} px "
                            "(rule 1)")
    at_floor = f"at the floor size {floor_size[0]}x{floor_size[1]}"
    if bought >= want:
        reasons["network"] = (f"{chosen[0]}: the largest network whose measured throughput buys {want} training "
                              f"images within the budget {at_floor}")
    elif bought >= STARVED * want:
        reasons["network"] = (f"{chosen[0]}: the fastest network; it buys {bought:.0f} of the {want} training images "
                              f"within the budget {at_floor}")
    else:
        chosen = STARVED_NETWORK
        thr_floor = probe(network(chosen[1], floor_size), floor_size, batch)
        reasons["network"] = (f"{chosen[0]}: even {NETWORKS[-1][0]} buys {bought:.0f} of the {want} training images "
                              f"{at_floor} (under {STARVED:.0%}): a budget this short lacks epochs more than width")

    # rule 4: the largest scale that still buys the samples
    scale = lo
    s = 1.0
    while s > lo:
        size = round_size(native[0] * s, native[1] * s)
        px = (size[0] * size[1]) / (floor_size[0] * floor_size[1])
        if samples_in(budget, thr_floor, fp.n_train, n_val, px) >= want:
            scale = s
            break
        s *= 0.9
    image_size = round_size(native[0] * scale, native[1] * scale)
    if scale >= 1.0 and (lo < 1.0 or bought >= want):  # (a floor at native is the floor's reason, below)
        reasons["image_size"] = f"native: the median image {fp.size_median[0]}x{fp.size_median[1]} fits the budget"
    elif scale <= lo:
        name, d = smallest_structure(fp)
        reasons["image_size"] = (f"the tumour floor: scale {scale:.2f} keeps the median {name} at "
                                 f"{d['median'] * scale:.0f} px and the small ones at {d['p5'] * scale:.0f} px across")
    else:
        reasons["image_size"] = (f"scale {scale:.2f} of the median image: the largest size whose throughput buys "
                                 f"{want} training images in the budget")
    memory = patch_for(image_size, patch_cap(thr_floor))
    for_time = time_patch(fp, image_size, memory or image_size, scale, floor_size, thr_floor, budget, n_val,
                          want) if patches_for_time else None
    patch = for_time or memory
    train_size = patch or image_size
    if device_type == "cuda" and thr_floor.bytes_per_image > 0 and free_memory > 0:
        # memory per image grows with its pixels; keep 60% of the free memory for everything else
        per_image = thr_floor.bytes_per_image * (train_size[0] * train_size[1]) / (floor_size[0] * floor_size[1])
        batch = int(max(2, min(GPU_BATCH_MAX, 0.4 * free_memory / per_image)))
        reasons["batch_size"] = f"{batch}: 40% of the free GPU memory at the measured memory per image"
    model = network(chosen[1], train_size)
    thr = probe(model, train_size, batch)
    if for_time is not None:
        whole = "whole images" if memory is None else f"the {memory[0]}x{memory[1]} crops memory allows"
        reasons["patch_size"] = (f"{whole} at {image_size[0]}x{image_size[1]} buy fewer than {want} training "
                                 f"samples in the budget: random {for_time[0]}x{for_time[1]} crops (at least "
                                 f"{PATCH_TUMOURS:g} median tumour diameters), a third centred on tumour, "
                                 "sliding-window inference on whole images")
    elif patch is not None:
        reasons["patch_size"] = (f"{image_size[0]}x{image_size[1]} images hold more pixels than fit; random "
                                 f"{patch[0]}x{patch[1]} crops, a third centred on tumour, sliding-window inference")
    # rule 7: steps from the measured throughput at the chosen size
    val_px = (image_size[0] * image_size[1]) / (train_size[0] * train_size[1])
    infer_ips = thr.infer_images_per_second / val_px
    finish = FINISH_SECONDS + 5.0 * n_val / infer_ips
    per_epoch = fp.n_train / thr.train_images_per_second + n_val / infer_ips
    epochs = max(1.0, (budget - finish) / per_epoch)
    steps = max(1, int(0.92 * epochs * fp.n_train / batch))  # 8% slack for decoding and logging
    steps_per_epoch = max(1, fp.n_train // batch)
    planned_epochs = max(1, math.ceil(steps / steps_per_epoch))
    reasons["steps"] = (f"{thr.train_images_per_second:.1f} train img/s measured at {train_size[0]}x{train_size[1]}"
                        f", batch {batch}: {steps} steps ({planned_epochs} epochs) fit the budget after validation "
                        f"({n_val / infer_ips:.1f} s/epoch) and the post-processing search ({finish:.0f} s)")
    # nnU-Net samples a third of its patches around tumour; whole images of a mostly tumour-free set likewise
    oversample = 0.33 if patch is not None or fp.empty_share > 0.5 else 0.0
    if oversample and patch is None:
        reasons["oversample_foreground"] = (f"{fp.empty_share:.0%} of the train cases are tumour-free: a third of "
                                            "the samples are drawn from cases with tumour")
    in_channels = 1 if fp.grey_as_rgb else fp.channels
    flips = flip_axes(fp, reasons)
    context, reasons["slice_context"] = slice_context(fp)
    train = {
        "image_size": list(image_size),
        "patch_size": list(patch) if patch else None,
        "oversample_foreground": oversample,
        "batch_size": batch,
        "max_steps": steps,
        "epochs": planned_epochs,
        "early_stopping_patience": patience(planned_epochs),
        "model": {**model.model_dump(mode="json"), "in_channels": in_channels},
        "loss": LossConfig(name="dice_ce", batch=False).model_dump(mode="json"),
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "poly",
                  "warmup_steps": min(200, steps // 20)},
        "augment": {"flip": True, "flip_axes": flips, "rotate90": True, "affine": True, "intensity": True,
                    "prob": 0.5},
        "tta": False,
        "postprocess": "auto",
        "slice_context": context,
    }
    if fp.grey_as_rgb:
        reasons["in_channels"] = "colour images whose three channels are equal: trained as grey"
    reasons["loss"] = ("Dice + cross-entropy with per-image Dice: each case's Dice weighs the same in the loss as in "
                       "the score (mean Dice over cases), so small tumours are not outvoted by large ones in a batch; "
                       "cross-entropy keeps tumour-free images in the loss (BUSI, benchmarks/RESULTS.md)")
    reasons["postprocess"] = "threshold, mirroring and component filtering chosen on val, kept only if val Dice rises"
    if float(fp.slice_stacks.get("share_in_stacks", 0.0)) >= STACK_SHARE:
        reasons["postprocess"] += ("; the component rules also over each slice stack's 3D components (a speck on a "
                                   "tumour-free slice is a component of its own)")
    estimates = {"steps": steps, "epochs": planned_epochs, "samples_target": want, "floor_scale": round(lo, 4),
                 "scale": round(scale, 4), "val_seconds_per_epoch": round(n_val / infer_ips, 2),
                 "finish_seconds": round(finish, 1),
                 "train_images_per_second": round(thr.train_images_per_second, 2),
                 "infer_images_per_second": round(thr.infer_images_per_second, 2)}
    return {"train": train, "estimates": estimates, "reasons": reasons}
