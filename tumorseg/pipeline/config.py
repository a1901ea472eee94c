"""The pipeline YAML: one validated config whose sections become the stages' configs.

Every section is checked before any work starts, so a typo fails in a second with one
line naming the file and the key (``pipelines/x.yaml: train.epochs: ...``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from tumorseg.config import (
    EvaluateConfig,
    IngestConfig,
    StrictModel,
    TrackingConfig,
    TrainConfig,
    build_config,
    deep_merge,
    read_yaml,
)
from tumorseg.errors import TumorsegError

log = logging.getLogger(__name__)

# Keys of the stage sections that the pipeline sets itself.
_RESERVED = {
    "data": {"tracking": "set tracking at the top level of the pipeline file"},
    "train": {
        "manifest": "the pipeline trains on the manifest it ingests",
        "out": "training runs go to WORK_DIR/runs",
        "tracking": "set tracking at the top level of the pipeline file",
    },
    "evaluate": {
        "model": "the pipeline evaluates the model it trains",
        "manifest": "the pipeline evaluates on the manifest it ingests",
        "out": "evaluation outputs go to WORK_DIR/eval",
        "tracking": "set tracking at the top level of the pipeline file",
    },
}


class SynthSpec(StrictModel):
    """Generate the built-in synthetic dataset before ingest, when its folder is missing or empty."""

    n: int = Field(160, ge=1)
    size: int = Field(128, ge=16)
    seed: int = 0
    classes: int = Field(1, ge=1, le=20, description="tumour classes; > 1 writes label maps (ingest with labels)")
    dims: int = Field(2, ge=2, le=3, description="2: PNG images; 3: NIfTI volumes (size^3) ingested as volumes")
    out_dir: Path | None = Field(None, description="default: the parent of data.images_dir")


class RegistrySpec(StrictModel):
    """The registered model each trained model becomes a version of."""

    model_name: str
    margin: float = Field(0.0, ge=0.0, le=1.0, description="Dice the challenger must gain to be promoted")

    @field_validator("model_name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v):
            raise ValueError("use letters, digits, '_', '.' and '-' (e.g. tumorseg-unet)")
        return v


class PipelineConfig(StrictModel):
    """A pipeline YAML (``pipelines/*.yaml``).

    ``data`` takes the options of ``tumorseg ingest`` (:class:`~tumorseg.config.IngestConfig`;
    ``out_dir`` defaults to ``WORK_DIR/manifests``), ``train`` the settings of a training
    config (:class:`~tumorseg.config.TrainConfig`), applied over ``train_config`` when given,
    and ``evaluate`` the options of ``tumorseg evaluate``. All relative paths resolve against
    the current working directory.
    """

    name: str | None = Field(None, description="label of the pipeline's runs; default: the YAML file's stem")
    work_dir: Path
    synth: SynthSpec | None = None
    data: dict[str, Any]
    train_config: Path | None = None
    train: dict[str, Any] = Field(default_factory=dict)
    evaluate: dict[str, Any] = Field(default_factory=dict)
    registry: RegistrySpec
    tracking: TrackingConfig = TrackingConfig()

    # -- the stage configs, built from the sections

    def ingest_config(self, tracking: TrackingConfig | None = None, source: str = "pipeline") -> IngestConfig:
        """Build the ingest stage's config."""
        data = {"out_dir": self.work_dir / "manifests", **self.data, "tracking": tracking or self.tracking}
        return build_config(IngestConfig, data, source, section="data")

    def train_settings(self, source: str = "pipeline") -> dict[str, Any]:
        """``train_config`` (if any) with the ``train`` section merged over it."""
        base: dict[str, Any] = {}
        if self.train_config is not None:
            base = read_yaml(self.train_config)
            for key in _RESERVED["train"]:
                if base.pop(key, None) is not None:
                    log.debug("%s: %s is set by the pipeline; ignoring the file's value", self.train_config, key)
        return deep_merge(base, self.train)

    def train_cfg(
        self,
        manifest: Path | None,
        out: Path,
        tracking: TrackingConfig | None = None,
        source: str = "pipeline",
    ) -> TrainConfig:
        """Build the train stage's config."""
        data = deep_merge(
            self.train_settings(source),
            {
                "manifest": None if manifest is None else str(manifest),
                "out": str(out),
                "tracking": (tracking or self.tracking).model_dump(),
            },
        )
        return build_config(TrainConfig, data, source, section="train")

    def evaluate_cfg(
        self,
        model: str,
        manifest: Path,
        out: Path | None,
        tracking: TrackingConfig | None = None,
        source: str = "pipeline",
        **overrides: Any,
    ) -> EvaluateConfig:
        """Build the evaluate stage's config for one model."""
        data = {
            **self.evaluate,
            **overrides,
            "model": model,
            "manifest": str(manifest),
            "out": None if out is None else str(out),
            "tracking": (tracking or self.tracking).model_dump(),
        }
        return build_config(EvaluateConfig, data, source, section="evaluate")

    def check_data(self, source: str) -> None:
        """The data to ingest exist (or ``synth`` writes them): checked when a run starts, not when a file loads."""
        icfg = self.ingest_config(source=source)
        given = icfg.pairs or icfg.images_dir
        if self.synth is None and given is not None and not given.exists():
            raise TumorsegError(f"{source}: data.{'pairs' if icfg.pairs else 'images_dir'}: {given} not found "
                                f"(relative paths resolve against the current folder, {Path.cwd()})")

    def synth_dir(self) -> Path | None:
        """Where ``synth`` writes ``images/`` and ``masks/``; ``None`` without a synth section."""
        if self.synth is None:
            return None
        return self.synth.out_dir or Path(self.data.get("images_dir", ".")).parent

    def check(self, source: str) -> None:
        """Validate every section now, so a typo fails before any work (one-line error)."""
        for section, reserved in _RESERVED.items():
            values: Mapping[str, Any] = getattr(self, section)
            for key, why in reserved.items():
                if key in values:
                    raise TumorsegError(f"{source}: {section}.{key}: set by the pipeline ({why}); remove it")
        self.ingest_config(source=source)
        if self.train_config is not None and not self.train_config.is_file():
            raise TumorsegError(
                f"{source}: train_config: {self.train_config} not found (relative paths resolve "
                f"against the current folder, {Path.cwd()})"
            )
        train = self.train_cfg(None, self.work_dir / "runs", source=source)
        if not train.log_model:
            raise TumorsegError(f"{source}: train.log_model: must be true: the pipeline registers the logged model")
        self.evaluate_cfg("check", self.work_dir, None, source=source)
        if self.synth is not None:
            out = self.synth_dir()
            assert out is not None
            images, masks = Path(self.data["images_dir"]), self.data.get("masks_dir")
            if images != out / "images" or (masks is not None and Path(masks) != out / "masks"):
                raise TumorsegError(
                    f"{source}: synth writes {out / 'images'} and {out / 'masks'}; point "
                    "data.images_dir and data.masks_dir there (or set synth.out_dir)"
                )


def load(path: str | os.PathLike[str], tracking_uri: str | None = None) -> PipelineConfig:
    """Read and fully validate a pipeline YAML.

    Args:
        path: the YAML file.
        tracking_uri: overrides ``tracking.uri`` (the CLI's ``--tracking-uri``).

    Raises:
        TumorsegError: missing file, bad YAML, an unknown key or an invalid value (one line).
    """
    path = Path(path)
    cfg = build_config(PipelineConfig, read_yaml(path), str(path))
    if cfg.name is None:
        cfg.name = path.stem
    if tracking_uri:
        cfg.tracking = TrackingConfig(uri=tracking_uri, experiment=cfg.tracking.experiment)
    cfg.check(str(path))
    return cfg
