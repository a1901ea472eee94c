"""Planning rules for volumes as cases (3D): nnU-Net's ``ExperimentPlanner``, fitted to a time budget.

Used when the manifest's cases are whole volumes (``manifest.json`` ``dims: 3``); :mod:`.rules` plans 2D.
Every choice and its reason goes into ``plan.json``, as there.

V0. **Crop to the nonzero region.** Every volume is cut to the box of its voxels nonzero in any channel before
    anything else, and its prediction pasted back (nnU-Net; :mod:`tumorseg.cropping`): a skull-stripped brain
    fills about half of its stored volume, and the grid, the patches and the budget then go to the anatomy.
    The rules below use the cropped median shape (the fingerprint's ``shape_median_cropped``).
V1. **2D or 3D.** Volumes train a 3D network: it sees the anatomy across slices (nnU-Net's 3D full-resolution
    U-Net is its usual winner). Only where the volumes are too thin for it (fewer than ``MIN_SLICES_3D`` voxels
    along an axis at the target spacing, e.g. a handful of thick slices) does the plan refuse 3D and say to
    ingest with ``--slice-axis`` for a 2D model (:func:`dims_rule`).
V2. **Target spacing.** The median voxel size per axis; where the data are anisotropic (the coarsest median
    spacing over ``ANISOTROPY`` times the finest), the coarse axis takes the 10th percentile of its spacings
    instead (nnU-Net), so the volumes with thin slices keep them (:func:`target_spacing`).
V3. **Spacing, grid and budget.** Every volume is resampled to one voxel size (nnU-Net), the target spacing unless
    the budget cannot buy the wanted samples (``TARGET_EPOCHS_3D`` passes over the train volumes, within
    ``MIN_SAMPLES_3D..MAX_SAMPLES_3D``): then a coarser one, the finest axes coarsened first (nnU-Net's
    low-resolution stage), never below the tumour floor (the median tumour ``MIN_TUMOUR_DIAMETER_3D`` voxels across,
    the 5th percentile ``MIN_SMALL_TUMOUR_DIAMETER_3D``; of a label map, its smallest class). The grid holds the
    95th percentile of the volumes' extent in mm at that spacing; each volume is centred in it, zeros around
    (``target_spacing``, :mod:`tumorseg.placement`), so a structure spans the same voxels in every volume whatever
    its field of view, and the predictions go back onto each volume's own voxels. Inference takes every volume whole
    at the spacing (the 5% larger than the grid too, by sliding window where needed); only training's cache shrinks
    them.
V4. **Network.** MONAI ``UNet`` with instance norm and per-axis strides: at each level an axis is halved while
    its spacing is at most twice the finest and its size stays at least ``MIN_FEATURE`` voxels (nnU-Net's
    ``get_pool_and_conv_props``), at most ``MAX_DOWNSAMPLINGS`` levels. Its widths are nnU-Net's (32..320,
    :data:`WIDE_CHANNELS_3D`) where their measured throughput buys the wanted samples at the target spacing (small
    volumes: a 30-minute budget then buys hundreds of epochs) and fit the same patch in memory, else 16..256: the
    budget goes to resolution and context first, then to width (as 2D rule 3). nnU-Net's own DynUNet trains 6x
    slower per volume on a 2-core CPU (benchmarks/RESULTS.md), so it is not the CPU default.
V5. **Patches.** The network trains on random patches the size of the median volume (nnU-Net's patch, rounded
    up to the network's downsampling), a third centred on tumour, smaller where that holds more voxels than fit
    (``MAX_PATCH_VOXELS_CPU`` on a CPU; 40% of the free GPU memory at the measured memory per volume); the whole
    grid where the volumes share one size.
    Inference takes each volume at its own size, by sliding window with Gaussian blending where it is larger
    than a patch.
V6. **Batch, steps, loss.** Batch 2 (nnU-Net's 3D batch); steps from the measured throughput; Dice + CE.
V7. **Intensities.** CT-like data (stored values reaching -500 and below: Hounsfield units) keep their
    physical scale: clipped to the 0.5/99.5 percentiles of the training split's foreground voxels, then
    z-scored by the foreground's mean/std (nnU-Net's ``CTNormalization``, ``normalize: ct``); other modalities
    (MRI) a z-score per volume (nnU-Net), over its nonzero voxels only where the crop (V0) leaves the median
    volume under ``NONZERO_NORM_SHARE`` of its voxels (``normalize: nonzero``, nnU-Net's ``use_mask_for_norm``:
    the zero background of a masked scan is not tissue and would shift each volume's mean by its share).
V8. **Augmentation.** Mirroring along all three axes (nnU-Net): the canonical orientation makes them comparable;
    only not along an axis on which a label map's classes lie in one order (2D rule 8: the hippocampus's head and
    tail, a left and a right kidney; a mirrored view swaps them, nnU-Net's no-mirroring trainer for such labels);
    rotation about the third axis and scaling on a fifth of the samples (nnU-Net's ``AFFINE_PROB_3D``: a 3D warp
    costs about a tenth of a CPU training step, benchmarks/RESULTS.md); intensity scale and shift.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tumorseg.config import LossConfig, ModelConfig
from tumorseg.errors import TumorsegError
from tumorseg.planning.fingerprint import AXIS_NAMES, Fingerprint, smallest_structure
from tumorseg.planning.probe import Throughput
from tumorseg.planning.rules import FINISH_SECONDS, MAX_DOWNSAMPLINGS, MIN_FEATURE, patience, unordered_axes

Probe = Callable[[ModelConfig, tuple[int, ...], int], Throughput]

ANISOTROPY = 3.0
"""nnU-Net's anisotropy threshold: the coarsest median spacing over this many times the finest."""
MIN_SLICES_3D = 8
"""V1: fewer voxels than this along an axis at the target spacing is too thin for a 3D network."""
TARGET_EPOCHS_3D = 100
MIN_SAMPLES_3D = 2_000
MAX_SAMPLES_3D = 50_000
MIN_TUMOUR_DIAMETER_3D = 24.0
MIN_SMALL_TUMOUR_DIAMETER_3D = 8.0
MAX_PATCH_VOXELS_CPU = 128 * 128 * 128
BATCH_3D = 2
SIZE_STEP_3D = 8
AFFINE_PROB_3D = 0.2
"""V8: nnU-Net's per-sample probability of rotation and scaling; a 3D warp costs about a tenth of a CPU step."""
CT_BELOW = -500.0
"""V7: a train split whose mean 0.5th percentile reaches this is stored in Hounsfield units (air is -1000)."""
NONZERO_NORM_SHARE = 0.75
"""V7: nnU-Net z-scores only the nonzero voxels where cropping leaves less than this share of a median volume."""
SEARCH_PASSES = 10.0
"""Val passes the post-processing search costs in 3D: a plain pass, one per mirroring of three axes (7) and the
filters' re-scoring (about 2)."""
CHANNELS_3D = [16, 32, 64, 128, 256, 256]
"""Widths per level (a sixth level, where the grid allows five downsamplings, stays at 256)."""
WIDE_CHANNELS_3D = [32, 64, 128, 256, 320, 320]
"""V4: nnU-Net's 3D widths (capped at 320), where the budget buys the wanted samples with them."""


def median_shape(fp: Fingerprint) -> tuple[int, int, int]:
    """V0: the median volume's shape in voxels after cropping to the nonzero box (as stored, where unmeasured)."""
    shape = fp.shape_median_cropped or fp.shape_median
    assert shape is not None
    return shape


def target_spacing(fp: Fingerprint) -> tuple[tuple[float, float, float], str]:
    """V2: the spacing every volume is resampled to (before the budget's coarsening), with its reason."""
    assert fp.spacing_median is not None and fp.spacing_p10 is not None
    med = list(fp.spacing_median)
    coarse = max(range(3), key=lambda a: med[a])
    if med[coarse] > ANISOTROPY * min(med):
        med[coarse] = float(fp.spacing_p10[coarse])
        why = (f"anisotropic ({fp.spacing_median[coarse]:g} mm against {min(fp.spacing_median):g} mm): the median "
               f"spacing, the coarse axis {coarse} at its 10th percentile {med[coarse]:g} mm (nnU-Net)")
    else:
        why = "the median voxel size per axis (nnU-Net)"
    return (med[0], med[1], med[2]), why


def coarsened(target: tuple[float, ...], factor: float) -> tuple[float, float, float]:
    """V3: the target spacing coarsened by ``factor``, the finest axes first (up to the coarsest, then all)."""
    finest = min(target)
    out = [max(t, finest * factor) for t in target]
    return out[0], out[1], out[2]


def extent(fp: Fingerprint) -> tuple[float, float, float]:
    """V3: the extent (mm per axis) the grid holds whole: the 95th percentile of the (cropped) volumes'."""
    assert fp.spacing_median is not None
    mm = fp.extent_p95_cropped or fp.extent_p95
    if mm is None:  # a fingerprint from before it was measured: the median volume
        mm = tuple(n * s for n, s in zip(median_shape(fp), fp.spacing_median, strict=True))  # type: ignore[assignment]
    assert mm is not None
    return mm[0], mm[1], mm[2]


def grid(fp: Fingerprint, spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """The median volume's size at ``spacing``, rounded up to :data:`SIZE_STEP_3D` (made divisible by the strides).

    Up, as nnU-Net pads its patch to the network's downsampling: a patch the size of the median volume holds it whole.
    """
    assert fp.spacing_median is not None
    out = [max(SIZE_STEP_3D, math.ceil(n * s / t / SIZE_STEP_3D - 1e-6) * SIZE_STEP_3D)
           for n, s, t in zip(median_shape(fp), fp.spacing_median, spacing, strict=True)]
    return out[0], out[1], out[2]


def storage(fp: Fingerprint, spacing: tuple[float, ...], median: tuple[int, ...]) -> tuple[int, int, int]:
    """V3: the grid at ``spacing`` that holds the :func:`extent` (95% of the volumes whole), at least ``median``.

    Each axis rounded up to :data:`SIZE_STEP_3D` (made divisible by the strides later).
    """
    out = [max(m, math.ceil(e / t / SIZE_STEP_3D - 1e-6) * SIZE_STEP_3D)
           for e, m, t in zip(extent(fp), median, spacing, strict=True)]
    return out[0], out[1], out[2]


def strides_for(size: tuple[int, ...], spacing: tuple[float, ...]) -> list[list[int]]:
    """V4: per-level, per-axis strides (nnU-Net's pooling rule); at least two levels."""
    cur_size, cur_spacing = list(size), list(spacing)
    levels: list[list[int]] = []
    while len(levels) < MAX_DOWNSAMPLINGS:
        finest = min(cur_spacing)
        step = [2 if cur_spacing[a] <= 2 * finest and cur_size[a] // 2 >= MIN_FEATURE and cur_size[a] % 2 == 0
                else 1 for a in range(3)]
        if not any(s == 2 for s in step):
            break
        levels.append(step)
        cur_size = [n // s for n, s in zip(cur_size, step, strict=True)]
        cur_spacing = [sp * s for sp, s in zip(cur_spacing, step, strict=True)]
    while len(levels) < 2:
        levels.append([1, 1, 1])
    return levels


def network(size: tuple[int, ...], spacing: tuple[float, ...], widths: list[int] = CHANNELS_3D) -> ModelConfig:
    """V4: the 3D U-Net for a grid of ``size`` at ``spacing``, ``widths`` per level."""
    strides = strides_for(size, spacing)
    channels = list(widths[: len(strides) + 1])
    return ModelConfig(name="unet", channels=channels, strides=[list(s) for s in strides], norm="instance")


def fit_to_strides(size: tuple[int, ...], strides: list[list[int]]) -> tuple[int, int, int]:
    """``size`` rounded up on each axis to a multiple of its total downsampling."""
    out = []
    for axis, n in enumerate(size):
        f = math.prod(s[axis] for s in strides)
        out.append(max(f, -(-n // f) * f))
    return out[0], out[1], out[2]


def dims_rule(fp: Fingerprint) -> tuple[int, str]:
    """V1: ``(3 | 2, reason)``."""
    spacing, _ = target_spacing(fp)
    assert fp.spacing_median is not None
    native = [n * s / t for n, s, t in zip(median_shape(fp), fp.spacing_median, spacing, strict=True)]
    thin = min(range(3), key=lambda a: native[a])
    size = "x".join(str(n) for n in median_shape(fp))
    sp = "x".join(f"{s:g}" for s in fp.spacing_median)
    if native[thin] < MIN_SLICES_3D:
        return 2, (f"2D: the median volume ({size} voxels of {sp} mm) has {native[thin]:.0f} voxels along axis {thin} "
                   f"at the target spacing, too few for a 3D network (under {MIN_SLICES_3D}); ingest with "
                   f"--slice-axis {thin} and train a 2D model on its slices")
    return 3, (f"3D: the cases are volumes (median {size} voxels of {sp} mm); a 3D U-Net sees the anatomy across "
               "slices, nnU-Net's usual winner on volumes")


def crop_reason(fp: Fingerprint) -> str:
    """V0's reason, with what the crop leaves of the median volume."""
    if fp.nonzero_share is None or fp.shape_median_cropped is None:
        return "each volume cut to the box of its nonzero voxels, the prediction pasted back (nnU-Net)"
    shape = "x".join(str(n) for n in fp.shape_median_cropped)
    return (f"each volume cut to the box of its nonzero voxels, the prediction pasted back (nnU-Net): the median "
            f"sampled volume keeps {fp.nonzero_share:.0%} of its voxels, a median of {shape}")


def intensity_rule(fp: Fingerprint) -> tuple[str, str]:
    """V7: ``(normalize, reason)``: ``ct`` for Hounsfield-like values, else a z-score per volume."""
    if fp.intensity and min(s["p0_5"] for s in fp.intensity) <= CT_BELOW:
        return "ct", (f"CT-like values (down to {CT_BELOW:g} and below): clipped to the train foreground's 0.5/99.5 "
                      "percentiles, then its mean/std (nnU-Net's CT rule)")
    if fp.nonzero_share is not None and fp.nonzero_share < NONZERO_NORM_SHARE:
        return "nonzero", (f"a z-score per volume over its nonzero voxels, the zero background left at 0: the crop "
                           f"keeps {fp.nonzero_share:.0%} of the median volume, under {NONZERO_NORM_SHARE:.0%} "
                           "(nnU-Net's mask for normalisation)")
    return "image", "a z-score per volume (MRI and other non-CT modalities; nnU-Net)"


def floor_factor(fp: Fingerprint) -> float:
    """V3: the largest coarsening that keeps the tumours (each class of a label map) visible (1.0: none)."""
    d = smallest_structure(fp)[1]
    room = [d["median"] / MIN_TUMOUR_DIAMETER_3D if d["median"] else math.inf,
            d["p5"] / MIN_SMALL_TUMOUR_DIAMETER_3D if d["p5"] else math.inf]
    return max(1.0, min(room)) if all(math.isfinite(r) for r in room) else 1.0


def choose(fp: Fingerprint, budget: float, n_val: int, probe: Probe, device_type: str,
           free_memory: float = 0.0, crop: bool = True) -> dict[str, Any]:
    """Apply V0-V8; returns the training settings, the estimates and the reasons (as :func:`.rules.choose`).

    ``crop=False`` (the user's ``crop_nonzero: false``): V0 off, the rules plan the stored volumes.

    Raises:
        TumorsegError: the volumes are too thin for 3D (V1), with the fix.
    """
    if not crop:
        fp = fp.model_copy(update={"shape_median_cropped": None, "nonzero_share": None, "extent_p95_cropped": None})
    dims, why_dims = dims_rule(fp)
    if dims == 2:
        raise TumorsegError(f"{fp.manifest_name}: {why_dims}")
    reasons: dict[str, str] = {"dims": why_dims, "crop_nonzero": crop_reason(fp) if crop else
                               "off (crop_nonzero: false): the rules plan the volumes as stored"}
    target, reasons["target_spacing"] = target_spacing(fp)
    want = int(min(MAX_SAMPLES_3D, max(MIN_SAMPLES_3D, TARGET_EPOCHS_3D * fp.n_train)))
    top = floor_factor(fp)
    batch = BATCH_3D

    def settle(factor: float, widths: list[int] = CHANNELS_3D) -> tuple[
            tuple[float, float, float], tuple[int, int, int], ModelConfig, tuple[int, int, int]]:
        spacing = coarsened(target, factor)
        median = grid(fp, spacing)
        model = network(median, spacing, widths)
        median = fit_to_strides(median, _axis_strides(model))
        return spacing, fit_to_strides(storage(fp, spacing, median), _axis_strides(model)), model, median

    def cap(thr: Throughput, size: tuple[int, ...]) -> float:
        if device_type == "cuda" and thr.bytes_per_image > 0 and free_memory > 0:
            return 0.4 * free_memory / (batch * thr.bytes_per_image) * math.prod(size)
        return float(MAX_PATCH_VOXELS_CPU)

    def buys(thr: Throughput, train_voxels: float, grid_voxels: float, probed_voxels: float) -> float:
        train_vps = thr.train_images_per_second * probed_voxels / train_voxels
        infer_vps = thr.infer_images_per_second * probed_voxels / grid_voxels
        finish = FINISH_SECONDS + SEARCH_PASSES * n_val / infer_vps
        per_epoch = fp.n_train / train_vps + n_val / infer_vps
        return max(0.0, budget - finish) / per_epoch * fp.n_train

    def measure(chosen: tuple[Any, ...]) -> tuple[tuple[int, int, int], Throughput, tuple[int, int, int], float]:
        """The probe's size, its throughput, the patch it allows and the training volumes the budget buys."""
        _, _, model, median = chosen
        probe_size = _fit_patch(median, model, cap(Throughput(1.0, 1.0), median))
        thr = probe(model, probe_size, batch)
        patch = _fit_patch(median, model, cap(thr, probe_size))
        return probe_size, thr, patch, buys(thr, math.prod(patch), math.prod(median), math.prod(probe_size))

    factor, chosen = 1.0, settle(1.0)
    while True:  # V3: the finest grid (coarsened by 1.15x steps) whose throughput buys the samples
        probe_size, thr, patch, got = measure(chosen)
        if got >= want or factor * 1.15 > top:
            break
        factor *= 1.15
        chosen = settle(factor)
    why_width = (f"the budget does not buy the {want} wanted volumes at the target spacing at this width: "
                 "resolution comes before width (V3)")
    if factor == 1.0 and got >= want:  # V4: nnU-Net's widths where they too buy the samples at the target spacing
        wide = settle(1.0, WIDE_CHANNELS_3D)
        wide_probe, wide_thr, wide_patch, wide_got = measure(wide)
        bought = f"{wide_got:.0f} training volumes in the budget at the target spacing ({want} wanted)"
        if wide_got < want:
            why_width = f"nnU-Net's widths (32..320) would buy only {bought}"
        elif math.prod(wide_patch) < math.prod(patch):
            why_width = (f"nnU-Net's widths (32..320) fit only {'x'.join(map(str, wide_patch))} patches in memory "
                         "against this width's larger ones: context before width")
        else:
            chosen, probe_size, thr, patch, got = wide, wide_probe, wide_thr, wide_patch, wide_got
            why_width = f"nnU-Net's widths (32..320) buy {bought}"
    spacing, size, model, median = chosen
    sp = "x".join(f"{s:.3g}" for s in spacing)
    if got < want:
        name, d = smallest_structure(fp)
        reasons["image_size"] = (f"the tumour floor: {sp} mm keeps the median {name} at "
                                 f"{d['median'] / factor:.0f} voxels across; the budget buys "
                                 f"{got:.0f} of the {want} wanted volumes")
    elif factor == 1.0:
        reasons["image_size"] = f"the target spacing ({sp} mm) fits the budget"
    else:
        reasons["image_size"] = (f"coarsened {factor:.2f}x to {sp} mm (the finest axes first): the finest grid whose "
                                 f"measured throughput buys {want} training volumes in the budget")
    mm = "x".join(f"{e:.0f}" for e in extent(fp))
    reasons["image_size"] += (f"; each volume resampled to {sp} mm and centred in a {'x'.join(map(str, size))} grid "
                              f"that holds {mm} mm, 95% of the volumes whole (larger ones shrunk alike on every axis "
                              "for training only: inference takes every volume whole; nnU-Net resamples to one "
                              "spacing: a structure spans the same voxels in every volume)")
    patch_size = patch if tuple(patch) != tuple(size) else None
    if patch_size is not None:
        why = ("the median volume" if tuple(patch) == tuple(median) else
               f"the median volume ({'x'.join(map(str, median))}) holds more voxels than fit")
        reasons["patch_size"] = (f"{why}: random {'x'.join(map(str, patch_size))} patches of the grid, a third "
                                 "centred on tumour (nnU-Net); inference on each volume at its own size, by sliding "
                                 "window (Gaussian blending) where it is larger than a patch")
    infer_vps = thr.infer_images_per_second * math.prod(probe_size) / math.prod(median)
    train_ips = thr.train_images_per_second * math.prod(probe_size) / math.prod(patch)
    finish = FINISH_SECONDS + SEARCH_PASSES * n_val / infer_vps
    epochs = max(1.0, (budget - finish) / (fp.n_train / train_ips + n_val / infer_vps))
    steps = max(1, int(0.92 * epochs * fp.n_train / batch))
    planned_epochs = max(1, math.ceil(steps / max(1, fp.n_train // batch)))
    reasons["steps"] = (f"{train_ips:.2f} train volumes/s measured at {'x'.join(map(str, patch))}, batch {batch}: "
                        f"{steps} steps ({planned_epochs} epochs) fit the budget after validation "
                        f"({n_val / infer_vps:.1f} s/epoch) and the post-processing search ({finish:.0f} s)")
    strides = model.strides or []
    reasons["network"] = (f"MONAI UNet {model.channels[0]}..{model.channels[-1]}, instance norm, strides {strides} "
                          f"(an axis is halved while its spacing is at most twice the finest; nnU-Net); {why_width}")
    normalize, reasons["normalize"] = intensity_rule(fp)
    reasons["loss"] = "Dice + cross-entropy (nnU-Net)"
    reasons["postprocess"] = "threshold and 3D component filtering chosen on val, kept only if val Dice rises"
    flips, ordered = unordered_axes(fp, list(AXIS_NAMES))
    mirrored = ("all three axes" if not ordered else "no axis" if not flips else
                f"the {' and '.join(flips)} ax{'es' if len(flips) > 1 else 'is'}")
    reasons["flip_axes"] = (f"{mirrored} of the canonical (RAS+) orientation (nnU-Net mirrors every axis"
                            f"{'; not where ' + '; '.join(ordered) if ordered else ''}); rotation and scaling on "
                            f"{AFFINE_PROB_3D:.0%} of the samples (nnU-Net)")
    in_channels = 1 if fp.grey_as_rgb else fp.channels
    train = {
        "image_size": list(size),
        "patch_size": list(patch_size) if patch_size else None,
        "oversample_foreground": 0.33,
        "batch_size": batch,
        "max_steps": steps,
        "epochs": planned_epochs,
        "early_stopping_patience": patience(planned_epochs),
        "normalize": normalize,
        "crop_nonzero": crop,
        "target_spacing": [round(s, 4) for s in spacing],
        "input_spacing": list(fp.spacing_median or spacing),
        "model": {**model.model_dump(mode="json"), "in_channels": in_channels},
        "loss": LossConfig(name="dice_ce", batch=False).model_dump(mode="json"),
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "poly",
                  "warmup_steps": min(200, steps // 20)},
        "augment": {"flip": True, "flip_axes": flips, "rotate90": False,
                    "affine": True, "affine_prob": AFFINE_PROB_3D, "intensity": True, "prob": 0.5},
        "tta": False,
        "postprocess": "auto",
        "slice_context": 0,
    }
    estimates = {"steps": steps, "epochs": planned_epochs, "samples_target": want, "floor_scale": round(1 / top, 4),
                 "scale": round(1 / factor, 4), "target_spacing": [round(s, 4) for s in target],
                 "spacing": [round(s, 4) for s in spacing], "val_seconds_per_epoch": round(n_val / infer_vps, 2),
                 "finish_seconds": round(finish, 1), "train_images_per_second": round(train_ips, 3),
                 "infer_images_per_second": round(infer_vps, 3)}
    return {"train": train, "estimates": estimates, "reasons": reasons}


def _fit_patch(size: tuple[int, ...], model: ModelConfig, max_voxels: float) -> tuple[int, int, int]:
    """The grid itself when it fits ``max_voxels``, else the largest patch of the same proportions that does."""
    strides = _axis_strides(model)
    if math.prod(size) <= max_voxels:
        return size[0], size[1], size[2]
    shrink = (max_voxels / math.prod(size)) ** (1 / 3)
    out = []
    for axis, n in enumerate(size):
        f = math.prod(s[axis] for s in strides)
        out.append(min(n, max(f, int(n * shrink) // f * f)))
    return out[0], out[1], out[2]


def _axis_strides(model: ModelConfig) -> list[list[int]]:
    """A 3D model's strides, each level as three per-axis factors."""
    return [[s] * 3 if isinstance(s, int) else list(s) for s in model.strides or []]
