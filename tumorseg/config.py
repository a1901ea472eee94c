"""Configuration of every stage: pydantic models, validated at the boundary.

Unknown keys are rejected (``extra="forbid"``). Configs load from YAML and take
``--set key=value`` overrides with dotted keys for nested settings. This module
imports nothing heavy, so the CLI and the pipeline can validate configs instantly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tumorseg.configio import (  # noqa: F401 - the config API, re-exported
    Budget,
    C,
    build_config,
    deep_merge,
    dump_config,
    load_config,
    parse_duration,
    parse_overrides,
    read_yaml,
    validation_message,
)

DEFAULT_EXPERIMENT = "tumorseg"


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrackingConfig(StrictModel):
    """Where MLflow runs go.

    ``uri`` wins; else ``MLFLOW_TRACKING_URI``; else ``sqlite:///<cwd>/mlflow.db``.
    """

    uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT


# ----------------------------------------------------------------------------- ingest

class IngestConfig(StrictModel):
    """Options of ``tumorseg ingest``: image/mask folders, or a pairs list (``pairs``) instead."""

    images_dir: Path | None = None
    masks_dir: Path | None = None
    pairs: Path | None = Field(default=None, description="CSV with columns image,mask[,group][,split]; paths "
                               "relative to the CSV's folder")
    name: str
    out_dir: Path = Path("data_manifest")
    mask_suffix: str = "_mask"
    recursive: bool = False
    group_pattern: str | None = None
    group_by: Literal["auto", "case", "folder"] = "auto"  # auto: case, numbered slice stacks one group each
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 0
    folds: int = 0
    mask_threshold: float | None = None
    labels: dict[int, str] | None = Field(default=None, description="label value -> class name (multi-class)")
    regions: dict[str, list[int]] | None = Field(default=None, description="region name -> label values")
    slice_axis: int | None = Field(default=None, ge=0, le=2, description="cut volumes into 2D slices along this "
                                   "axis (slice mode); default: each volume is one case")
    strict: bool = False
    workers: int = Field(default=0, ge=0, description="decode processes; 0 = one per CPU core (at most 8)")
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, v: str) -> str:
        if not v or "/" in v or v in (".", "..") or v.startswith("."):
            raise ValueError("must be a plain folder name (no '/', not starting with '.')")
        return v

    @field_validator("fractions")
    @classmethod
    def _fractions_sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6 or v[0] <= 0:
            raise ValueError("train,val,test fractions must be >= 0, train > 0, and sum to 1 (e.g. 0.7,0.15,0.15)")
        return v

    @model_validator(mode="after")
    def _folder_groups_need_recursion(self) -> IngestConfig:
        if (self.images_dir is None) == (self.pairs is None):
            raise ValueError("give IMAGES_DIR [MASKS_DIR] or --pairs pairs.csv (one of them)")
        if self.pairs is not None and self.masks_dir is not None:
            raise ValueError("--pairs lists the masks itself; drop MASKS_DIR")
        if self.group_by == "folder" and not self.recursive and not self.group_pattern and self.pairs is None:
            raise ValueError("--group-by folder needs --recursive (one subfolder per patient)")
        return self

    @property
    def source(self) -> Path:
        """What the cases come from: the pairs list or the images folder (named in messages)."""
        source = self.pairs if self.pairs is not None else self.images_dir
        assert source is not None
        return source

    @field_validator("folds")
    @classmethod
    def _folds_valid(cls, v: int) -> int:
        if v == 1 or v < 0:
            raise ValueError("folds must be 0 (none) or at least 2")
        return v


# ----------------------------------------------------------------------------- train


BACKBONES = re.compile(r"^(resnet(10|18|34|50|101|152|200)|efficientnet-(b[0-8]|l2)|vgg16(_bn)?|mobilenet_v2"
                       r"|mobilenet_v3_large)$")
"""``flexible_unet``'s encoders: MONAI's ResNets and EfficientNets, torchvision's VGG16 and MobileNets."""


class ModelConfig(StrictModel):
    """Network architecture.

    ``unet`` is MONAI ``UNet`` (strided convolutions, residual units); the classic
    Ronneberger U-Net (two 3x3 convs per level, max-pooling) is MONAI ``BasicUNet``:
    ``name=basic_unet, channels=[64,128,256,512,1024], norm=batch``.
    ``dynunet`` is MONAI ``DynUNet``, nnU-Net's architecture (two 3x3 conv blocks per level,
    strided downsampling, optional deep supervision); ``tumorseg plan`` sizes it from the patch.
    ``flexible_unet`` is MONAI ``FlexibleUNet`` on a ResNet/EfficientNet encoder, or on torchvision's
    VGG16 or MobileNetV2/V3 (``backbone``; :mod:`tumorseg.encoders`). ``pretrained`` loads its encoder
    weights: ``imagenet`` (torchvision's weight API and cache), a local state-dict file, or ``none``; the
    weights then bring their own input normalisation (ImageNet's mean/std, stored in the checkpoint).
    ``freeze_encoder`` keeps the encoder fixed for that share of the run's first steps. The key
    ``pretrained_weights`` of older configs is read as ``pretrained``.
    """

    name: Literal["unet", "basic_unet", "attention_unet", "segresnet", "flexible_unet", "dynunet"] = "unet"
    in_channels: int | Literal["auto"] = "auto"
    channels: list[int] = [16, 32, 64, 128, 256]
    strides: list[int | list[int]] | None = Field(default=None, description="each level's downsampling: 2, or "
                                                   "one factor per axis (anisotropic volumes, e.g. [2, 2, 1])")
    num_res_units: int = 2
    norm: Literal["instance", "batch", "group"] = "batch"
    dropout: float = 0.0
    deep_supervision: bool = Field(default=False, description="dynunet: extra loss heads at lower resolutions")
    backbone: str = Field(default="resnet34", description="flexible_unet's encoder: resnet10..200, efficientnet-b0.."
                          "b8/l2, vgg16, vgg16_bn, mobilenet_v2, mobilenet_v3_large")
    pretrained: Literal["imagenet", "none"] | Path = Field(
        default="none", description="flexible_unet's encoder weights: imagenet, a local state-dict file, or none")
    freeze_encoder: float = Field(default=0.0, ge=0, lt=1, description="share of the run's steps (from the start) "
                                  "during which the encoder's weights are not updated, e.g. 0.1")
    init_filters: int = 16

    @model_validator(mode="before")
    @classmethod
    def _legacy_pretrained_weights(cls, data: Any) -> Any:
        # configs and checkpoints written before `pretrained` named a local file `pretrained_weights`
        if isinstance(data, dict) and "pretrained_weights" in data:
            data = dict(data)
            old = data.pop("pretrained_weights")
            if old is not None and data.get("pretrained") in (None, "none"):
                data["pretrained"] = old
        return data

    @field_validator("pretrained", mode="before")
    @classmethod
    def _pretrained_yaml(cls, v: Any) -> Any:
        return "none" if v is None or v is False else "imagenet" if v is True else v

    @model_validator(mode="after")
    def _strides_match(self) -> ModelConfig:
        if self.strides is not None and len(self.strides) != len(self.channels) - 1:
            raise ValueError(f"model.strides needs {len(self.channels) - 1} entries (one fewer than channels)")
        if len(self.channels) < 2:
            raise ValueError("model.channels needs at least 2 entries")
        if not BACKBONES.match(self.backbone):
            raise ValueError(f"unknown backbone {self.backbone!r}; use resnet18/34/50/101/152, efficientnet-b0..b7, "
                             "vgg16, vgg16_bn, mobilenet_v2 or mobilenet_v3_large")
        if self.name != "flexible_unet" and (str(self.pretrained) != "none" or self.freeze_encoder):
            raise ValueError("pretrained encoder weights (model.pretrained, model.freeze_encoder) need "
                             "model.name=flexible_unet and a model.backbone")
        return self


class LossConfig(StrictModel):
    """Loss: MONAI ``DiceLoss`` (sigmoid) or its CE/focal combinations.

    ``batch=True`` (nnU-Net's batch Dice) pools the Dice over the whole batch. Per-sample
    Dice gives a tumour-free image a loss of ~1 whatever is predicted on it, so nothing
    teaches the network to keep empty images clean (measured: 0 of 7 empty val images
    clean per-sample vs 7 of 7 with batch Dice; see benchmarks/RESULTS.md).
    """

    name: Literal["dice", "dice_ce", "dice_focal"] = "dice"
    batch: bool = True
    smooth: float = 1e-5


class OptimConfig(StrictModel):
    """Optimiser and learning-rate schedule."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    momentum: float = 0.9
    schedule: Literal["none", "cosine", "plateau", "poly"] = Field(
        default="plateau", description="cosine/poly decay per step over the run's planned steps; plateau per epoch")
    warmup_steps: int = Field(default=0, ge=0, description="linear LR warm-up steps (cosine/poly)")
    plateau_patience: int = 5
    plateau_factor: float = 0.5
    min_lr: float = 1e-6


class AugmentConfig(StrictModel):
    """Seeded MONAI augmentations, each with its own switch."""

    flip: bool = True
    flip_axes: tuple[Literal["vertical", "horizontal", "depth"], ...] = Field(
        default=("vertical", "horizontal"), description="axes flipped in training and in mirroring TTA (depth: the "
        "third axis of a volume)")
    rotate90: bool = Field(default=True, description="90-degree turns (square images, both axes in flip_axes)")
    affine: bool = True
    intensity: bool = True
    prob: float = Field(default=0.5, ge=0, le=1)
    affine_prob: float | None = Field(default=None, ge=0, le=1, description="the affine's own per-sample "
                                      "probability (default: prob; the 3D plan: nnU-Net's 0.2)")
    rotate_degrees: float = Field(default=15.0, ge=0, le=180, description="affine rotation range (+-)")
    scale: float = Field(default=0.1, ge=0, lt=1, description="affine scale range (+-, as a fraction)")
    gamma: bool = Field(default=False, description="random gamma 0.7..1.5 on the image's own range (nnU-Net)")
    noise: bool = Field(default=False, description="additive Gaussian noise, sigma up to 0.1 (nnU-Net)")

    @property
    def flip_dims(self) -> tuple[int, ...]:
        """Dims of ``(N, C, H, W[, D])`` batches that ``flip_axes`` names (H vertical, W horizontal, D depth).

        TTA mirrors them; ``depth`` exists only in volumes (2D batches ignore it).
        """
        return tuple(dim for dim, axis in ((2, "vertical"), (3, "horizontal"), (4, "depth")) if axis in self.flip_axes)


class TrainConfig(StrictModel):
    """Options of ``tumorseg train``."""

    manifest: Path | None = None
    out: Path = Path("runs")
    run_name: str | None = None
    budget: Budget = Field(default=None, description="wall-time budget, e.g. 30m, 2h, 90s; plans the steps")
    plan: str = Field(default="auto", description="auto (plan from the data), off, or a plan.json path")
    epochs: int = Field(default=40, ge=1)
    batch_size: int = Field(default=8, ge=1)
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimiser steps")
    image_size: tuple[int, int] | tuple[int, int, int] = Field(
        default=(128, 128), description="the grid every case is resampled to: (H, W) images, or (X, Y, Z) volumes "
        "(a 3D network; the manifest must hold volumes as cases)")
    patch_size: tuple[int, int] | tuple[int, int, int] | None = Field(
        default=None, description="train on random crops of this size; predict with a sliding window")
    oversample_foreground: float = Field(default=0.0, ge=0, le=1, description="share of crops centred on tumour")
    tta: bool = Field(default=False, description="mirroring test-time augmentation in validation and inference")
    postprocess: Literal["none", "auto"] = Field(default="none", description="auto: choose threshold and component "
                                                 "filtering on val after training (kept only if val Dice improves)")
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cuda", "cpu"] = "auto"
    amp: bool = Field(default=True, description="bf16 (fp16) on CUDA, bf16 on CPUs with native bf16, else fp32")
    channels_last: bool = True
    cache: Literal["auto", "ram", "disk", "gpu"] = Field(
        default="auto", description="auto: RAM (or the GPU) up to 2 GiB of preprocessed cases, else the disk cache")
    cache_dir: Path | None = Field(default=None, description="on-disk cache folder (default: cache/ in the manifest's)")
    normalize: Literal["percentile", "dataset", "ct", "image", "nonzero"] = Field(
        default="percentile", description="percentile: each image scaled by its own 0.5/99.5 percentiles, then the "
        "training split's mean/std (robust to the stored bit depth); dataset: the training split's mean/std in stored "
        "units; ct: clipped to the train foreground's 0.5/99.5 percentiles, then its mean/std (nnU-Net's CT rule); "
        "image: per-image z-score; nonzero: per-volume z-score over its nonzero voxels, the rest 0 (nnU-Net)")
    crop_nonzero: bool = Field(default=False, description="volumes: each cut to the box of its nonzero voxels "
                               "before resampling, predictions pasted back (nnU-Net; tumorseg.cropping)")
    target_spacing: tuple[float, float, float] | None = Field(default=None, description="volumes: each resampled "
        "to this voxel size (mm, RAS+ axes): in training centred in image_size (shrunk alike on every axis where "
        "larger), in inference whole (nnU-Net; tumorseg.placement); unset: each stretched to image_size. "
        "Images ignore it")
    input_spacing: tuple[float, float, float] | None = Field(default=None, description="the voxel size assumed for "
        "volumes given without one (MLflow arrays); default: target_spacing. The 3D plan: the training median")
    early_stopping_patience: int | None = Field(default=15, ge=1)
    patches_for_time: bool = Field(
        default=False, description="plan: train on crops when whole images cannot buy the planned samples "
        "(planning rule 5; not a default: it did not help on the dev sets)")
    slice_context: int = Field(
        default=0, ge=0, le=3, description="2.5D: neighbouring slices a side given as extra input channels, for "
        "cases that are slices of ordered stacks (tumorseg.context); predict and the pyfunc model then need them")
    val_unit: Literal["auto", "case", "group"] = Field(
        default="auto", description="what val Dice averages over for the best checkpoint, early stopping and "
        "post-processing: per case, or per group with counts pooled (volumetric Dice per patient); auto: per group "
        "when groups hold several cases (tumorseg.planning.stacks.selection_unit)")
    val_window: int | None = Field(default=None, ge=1, description="epochs the val Dice is averaged over (a moving "
                                   "average) to pick the best checkpoint and stop early; default: a tenth of epochs")
    val_overlays: int = Field(default=4, ge=0)
    threshold: float = Field(default=0.5, gt=0, lt=1)
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    tracking: TrackingConfig = TrackingConfig()
    log_model: bool = True

    @field_validator("image_size", "patch_size")
    @classmethod
    def _size_divisible(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and len(v) == 2 and (min(v) < 16 or any(s % 16 for s in v)):
            raise ValueError("sizes must be multiples of 16 and at least 16 (e.g. [256, 256])")
        if v is not None and len(v) == 3 and (min(v) < 8 or any(s % 8 for s in v)):
            raise ValueError("volume sizes must be multiples of 8 and at least 8 (e.g. [96, 96, 64])")
        return v

    @model_validator(mode="after")
    def _patch_dims(self) -> TrainConfig:
        if len(self.image_size) == 3 or (self.model.strides and any(isinstance(s, list) for s in self.model.strides)):
            self._check_divisible()
        if self.patch_size is not None and len(self.patch_size) != len(self.image_size):
            raise ValueError(f"patch_size {list(self.patch_size)} and image_size {list(self.image_size)} need as many "
                             "dimensions (2 for images, 3 for volumes)")
        if len(self.image_size) == 3 and (self.model.name == "flexible_unet" or self.slice_context):
            raise ValueError("a 3D model (3 image_size values) takes neither model.name=flexible_unet (2D encoders) "
                             "nor slice_context (2.5D is for 2D models of slice stacks)")
        if min([min(s) for s in (self.target_spacing, self.input_spacing) if s is not None] or [1.0]) <= 0:
            raise ValueError("target_spacing and input_spacing are voxel sizes in mm: three positive numbers")
        return self

    def _check_divisible(self) -> None:
        """Each axis of the grid (and patch) must divide by the product of its strides (per axis, for volumes)."""
        strides = self.model.strides or [2] * (len(self.model.channels) - 1)
        dims = len(self.image_size)
        for name, size in (("image_size", self.image_size), ("patch_size", self.patch_size)):
            for axis, n in enumerate(size or ()):
                factor = math.prod(s if isinstance(s, int) else s[axis] for s in strides)
                if any(isinstance(s, list) and len(s) != dims for s in strides):
                    raise ValueError(f"model.strides {strides}: per-axis strides need {dims} factors each, one per "
                                     f"axis of image_size {list(self.image_size)} (3D: --set image_size=[D,H,W])")
                if n % factor:
                    raise ValueError(f"{name} {list(size or ())}: axis {axis} ({n}) is not divisible by its total "
                                     f"downsampling {factor} (model.strides {strides})")

    @property
    def spatial_dims(self) -> int:
        """2 for an image model, 3 for a volume model (the length of ``image_size``)."""
        return len(self.image_size)

    @model_validator(mode="after")
    def _pretrained_normalisation(self) -> TrainConfig:
        if str(self.model.pretrained) != "none" and self.normalize != "percentile":
            raise ValueError(f"model.pretrained brings ImageNet's input normalisation (each image scaled to its "
                             f"own range, then ImageNet's mean/std), which normalize: {self.normalize} would "
                             "replace; use normalize: percentile or model.pretrained: none")
        return self

    @field_validator("plan", mode="before")
    @classmethod
    def _plan_value(cls, v: Any) -> Any:
        v = {False: "off", True: "auto"}.get(v, v) if isinstance(v, bool) else v  # YAML reads a bare off/on as a bool
        if isinstance(v, str) and v not in ("auto", "off") and not v.endswith(".json"):
            raise ValueError("plan must be auto, off or the path of a plan.json written by tumorseg plan")
        return v

    @property
    def budget_seconds(self) -> float | None:
        """The budget in seconds, or ``None`` without one."""
        return None if self.budget is None else parse_duration(self.budget)


class PlanConfig(StrictModel):
    """Options of ``tumorseg plan``."""

    manifest: Path
    budget: Budget = Field(default=None, description="wall-time budget of the training run, e.g. 30m")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    out: Path | None = Field(default=None, description="folder for plan.json; default: the manifest folder")
    amp: bool = True
    tracking: TrackingConfig = TrackingConfig()


# ----------------------------------------------------------------------------- evaluate / predict


class EvaluateConfig(StrictModel):
    """Options of ``tumorseg evaluate``."""

    model: str
    manifest: Path
    split: Literal["train", "val", "test"] = "test"
    out: Path | None = None
    empty_both: Literal["nan", "1"] = "nan"
    surface: bool = False
    hd95_empty: Literal["nan", "diagonal"] = Field(default="nan", description="HD95 of a missed tumour or a false "
        "positive on a tumour-free image: nan (left out of the mean, counted) or diagonal (the image diagonal, the "
        "challenge convention); both empty stays nan")
    batch_size: int = Field(default=16, ge=1)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    gallery_k: int = Field(default=4, ge=1)
    bootstrap: int = Field(default=1000, ge=0)
    seed: int = 0
    workers: int = Field(default=2, ge=0)
    write_back: bool = True
    tracking: TrackingConfig = TrackingConfig()


class PredictConfig(StrictModel):
    """Options of ``tumorseg predict``."""

    model: str
    inputs: list[Path]
    output_dir: Path = Path("predictions")
    recursive: bool = False
    format: Literal["png", "nifti"] = "png"
    probabilities: bool = False
    tta: bool | None = Field(default=None, description="mirroring TTA; default: what the model chose on val")
    batch_size: int = Field(default=16, ge=1)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    threshold: float | None = Field(default=None, gt=0, lt=1, description="a probability; default: the model's")
    slice_axis: int = Field(default=2, ge=0, le=2)
    tracking: TrackingConfig = TrackingConfig()
