"""Checkpoints: the one format ``train`` writes and everything else reads.

A checkpoint is a plain dict saved with ``torch.save`` and loaded with
``weights_only=True`` (tensors, numbers, strings, lists and dicts only, so loading never
runs code). :func:`build_payload` is the one place that assembles it; train, the MLflow
model, tests and benchmarks all use it rather than writing the keys by hand.

Keys: ``format`` (:data:`CHECKPOINT_FORMAT`), ``model`` (state dict), ``config`` (the
resolved :class:`~tumorseg.config.TrainConfig`), ``in_channels``, ``intensity`` (the
normalisation rule: the training split's per-channel mean/std, with ``percentiles`` when each
image is percentile-scaled first, or ``None`` for per-image z-score; see :mod:`tumorseg.inference`),
``input_normalization`` (where ``intensity`` came from, in words: the training split, per image, or the
pretrained encoder's ImageNet statistics; absent in older checkpoints),
``intensity_fingerprint`` (the raw range of the training images, for out-of-range warnings;
absent in checkpoints written before it existed), the
training state (``epoch``, ``global_step``, ``best_val_dice``, ``best_epoch``,
``bad_epochs``, ``history``, ``stopped_reason``), the data identity (``manifest_digest``,
``manifest_name``), ``labels`` (the declared ``{value: name}`` of a multi-class model, values as
strings; ``None`` or absent: binary), ``regions`` (``[name, [values]]`` pairs of a region-based model, in
painting order) and the run identity (``mlflow_run_id``, ``tracking_uri``). A full
checkpoint (``last.pt``/``best.pt``) adds ``optimizer``, ``scheduler``, ``scaler`` and
``rng`` for an exact resume; a slim one (the MLflow model's ``model.pt``) leaves them out.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.config import TrainConfig
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_path
from tumorseg.labels import Classes

if TYPE_CHECKING:
    import torch

CHECKPOINT_FORMAT = "tumorseg-checkpoint-v1"
RESUME_KEYS = ("optimizer", "scheduler", "scaler", "rng")
"""What a full checkpoint holds beyond what inference needs."""
META_KEYS = ("manifest_digest", "manifest_name", "mlflow_run_id", "epoch", "best_val_dice")
"""The identity a loaded model reports (:attr:`tumorseg.inference.Segmenter.checkpoint_meta`)."""


def build_payload(
    net: torch.nn.Module,
    cfg: TrainConfig,
    in_channels: int,
    intensity: Mapping[str, list[float]] | None = None,
    *,
    fingerprint: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
    regions: Mapping[str, list[int]] | None = None,
    state: Mapping[str, Any] | None = None,
    manifest_digest: str = "",
    manifest_name: str = "",
    mlflow_run_id: str = "",
    tracking_uri: str = "",
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a checkpoint dict.

    Args:
        net: the network (a DDP wrapper is unwrapped); its weights are copied to the CPU.
        cfg: the training config the network was built from.
        in_channels: channels the network takes.
        intensity: per-channel ``{"mean": [...], "std": [...]}`` of the training split (plus
            ``"percentiles"`` for per-image percentile scaling first), or ``None``.
        fingerprint: the raw intensity range of the training images (:data:`tumorseg.inference.Fingerprint`).
        labels: the label set of a multi-class model (:meth:`tumorseg.labels.Classes.to_json`); ``None``: binary.
        regions: the regions of a region-based model (``{name: [values]}``), or ``None``.
        state: training state (``epoch``, ``global_step``, ``best_val_dice``, ``best_epoch``,
            ``bad_epochs``, ``history``, ``stopped_reason``); missing keys get neutral values.
        manifest_digest: digest of the manifest trained on.
        manifest_name: its name.
        mlflow_run_id: the training run.
        tracking_uri: where that run lives.
        resume: ``optimizer``/``scheduler``/``scaler``/``rng`` states for a full checkpoint.

    Returns:
        The dict :func:`save` writes and :func:`load` returns.
    """
    module = getattr(net, "module", net)
    st = dict(state or {})
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "config": cfg.model_dump(mode="json"),
        "in_channels": int(in_channels),
        "intensity": None if intensity is None else {k: v if isinstance(v, (bool, int, float, str)) else list(v)
                                                      for k, v in intensity.items()},
        "input_normalization": input_normalization(cfg, intensity),
        "intensity_fingerprint": None if fingerprint is None else {k: float(v) for k, v in fingerprint.items()},
        "labels": None if labels is None else {str(k): str(v) for k, v in labels.items()},
        "regions": None if not regions else [[str(k), [int(x) for x in v]] for k, v in regions.items()],
        "epoch": int(st.get("epoch", 0)),
        "global_step": int(st.get("global_step", 0)),
        "best_val_dice": float(st.get("best_val_dice", -1.0)),
        "best_epoch": int(st.get("best_epoch", 0)),
        "bad_epochs": int(st.get("bad_epochs", 0)),
        "history": list(st.get("history", [])),
        "stopped_reason": str(st.get("stopped_reason", "")),
        "manifest_digest": manifest_digest,
        "manifest_name": manifest_name,
        "mlflow_run_id": mlflow_run_id,
        "tracking_uri": tracking_uri,
    }
    if resume is not None:
        payload.update({k: resume.get(k) for k in RESUME_KEYS})
    return payload


def input_normalization(cfg: TrainConfig, intensity: Mapping[str, Any] | None) -> str:
    """What a checkpoint's ``intensity`` is, in words (it is applied the same way whatever its source)."""
    if intensity is None:
        return "image: each image z-scored by its own mean/std"
    if str(cfg.model.pretrained) != "none":
        return (f"pretrained: the {cfg.model.backbone} encoder's ImageNet mean/std, after scaling each image by its "
                "own 0.5/99.5 percentiles to [0, 1]")
    if intensity.get("nonzero"):
        return "nonzero: each volume z-scored by its own nonzero voxels' mean/std, the rest 0"
    if intensity.get("percentiles"):
        return "percentile: each image scaled by its own 0.5/99.5 percentiles, then the training split's mean/std"
    if intensity.get("clip"):
        return ("ct: each channel clipped to the training split's foreground 0.5/99.5 percentiles "
                f"{intensity['clip']}, then the foreground's mean/std (nnU-Net's CT rule)")
    return "dataset: the training split's mean/std in stored units"


def save(path: str | Path, payload: Mapping[str, Any]) -> None:
    """``torch.save`` to a temp file, then rename: a crash never leaves half a checkpoint."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(dict(payload), tmp)


def load(path: str | Path) -> dict[str, Any]:
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


def write_slim(source: str | Path, dest: str | Path) -> Path:
    """Copy a checkpoint without its resume state (what inference needs), verified loadable."""
    ckpt = load(source)
    for key in RESUME_KEYS:
        ckpt.pop(key, None)
    save(dest, ckpt)
    load(dest)  # fail here, not at serving time
    return Path(dest)


def classes(ckpt: Mapping[str, Any]) -> Classes:
    """The label set a checkpoint's network predicts (binary for checkpoints without one)."""
    return Classes.from_json(ckpt.get("labels"), ckpt.get("regions"))


def train_config(ckpt: Mapping[str, Any]) -> TrainConfig:
    """The training config stored in a checkpoint."""
    return TrainConfig.model_validate(ckpt["config"])
