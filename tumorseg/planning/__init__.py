"""``tumorseg plan``: configure training from the data, the device and a time budget.

As nnU-Net plans from a dataset fingerprint, tumorseg fingerprints the train split
(:mod:`.fingerprint`), measures the device (:mod:`.probe`) and applies written-down rules
(:mod:`.rules`) to choose the training resolution, patches, network, batch, steps and recipe.
The plan is a pydantic model written as ``plan.json`` with ``fingerprint.json`` beside it;
``tumorseg train`` makes one itself when it is given none. Settings the user gives (YAML,
``--set``) always win over the plan and are recorded as overrides.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from tumorseg.config import PlanConfig, TrainConfig, deep_merge
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_write_text
from tumorseg.planning.fingerprint import Fingerprint

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from tumorseg.manifest import ManifestInfo

log = logging.getLogger(__name__)

PLAN_FORMAT = "tumorseg-plan-v1"
DEFAULT_BUDGET = {"cuda": "15m", "cpu": "30m"}
"""The budget of a plan made without ``--budget``, by device type."""


class Plan(BaseModel):
    """``plan.json``.

    Attributes:
        format: :data:`PLAN_FORMAT`.
        manifest_name: the manifest planned for.
        manifest_digest: its digest (a plan is refused for another manifest).
        device: the device measured (``cuda:NVIDIA H200``, ``cpu:2 threads``).
        budget: the time budget as given (``30m``), and ``budget_seconds``.
        train: the training settings chosen (keys of :class:`~tumorseg.config.TrainConfig`).
        overrides: settings the user gave that replaced the plan's.
        estimates: steps, epochs, measured throughput, scales.
        reasons: why each setting was chosen.
    """

    model_config = ConfigDict(extra="forbid")

    format: str = PLAN_FORMAT
    manifest_name: str
    manifest_digest: str
    device: str
    budget: str
    budget_seconds: float
    train: dict[str, Any]
    overrides: dict[str, Any] = {}
    estimates: dict[str, Any]
    reasons: dict[str, str]


def make(cfg: TrainConfig, info: ManifestInfo, df: pd.DataFrame, device: torch.device, source: str,
         use_cache: bool = True) -> tuple[Plan, Fingerprint]:
    """Fingerprint the train split, probe ``device`` and choose the settings for ``cfg.budget``."""
    import torch

    from tumorseg.config import parse_duration
    from tumorseg.manifest import select_split
    from tumorseg.planning import fingerprint, probe, rules

    train = select_split(df, "train", source)
    n_val = int((df["split"] == "val").sum())
    fp = fingerprint.compute(info, train, source)
    budget = cfg.budget or DEFAULT_BUDGET["cuda" if device.type == "cuda" else "cpu"]
    seconds = parse_duration(budget)
    in_channels = 1 if fp.grey_as_rgb else fp.channels
    loss = TrainConfig().loss.model_copy(update={"name": "dice_ce"})

    def measure(model: Any, size: tuple[int, ...], batch: int) -> probe.Throughput:
        return probe.measure(model, loss, in_channels, size, batch, device, cfg.amp, use_cache=use_cache)

    free = float(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 0.0
    if info.dims == 3:
        from tumorseg.planning import volumes

        crop = cfg.crop_nonzero or "crop_nonzero" not in cfg.model_fields_set  # V0 unless the user turned it off
        chosen = volumes.choose(fp, seconds, n_val, measure, device.type, free, crop=crop)
    else:
        chosen = rules.choose(fp, seconds, n_val, measure, device.type, free, cached_encoders(cfg, fp),
                              patches_for_time=cfg.patches_for_time)
    plan = Plan(manifest_name=info.name, manifest_digest=info.dataset_digest, device=probe.device_label(device),
                budget=budget, budget_seconds=seconds, train=chosen["train"], estimates=chosen["estimates"],
                reasons=chosen["reasons"])
    return plan, fp


def cached_encoders(cfg: TrainConfig, fp: Fingerprint) -> tuple[str, ...]:
    """The pretrained backbones rule 3 may pick: their ImageNet weights in torch's hub cache (never downloaded).

    None where the data rule them out, or where the user's ``normalize`` would replace their normalisation.
    """
    from tumorseg.planning.rules import PRETRAINED, pretrained_allowed

    if pretrained_allowed(fp) is not None or cfg.normalize != "percentile":
        return ()
    from tumorseg.encoders import imagenet_cached

    return tuple(spec["backbone"] for _, spec in PRETRAINED if imagenet_cached(spec["backbone"]) is not None)


def apply(cfg: TrainConfig, plan: Plan) -> tuple[TrainConfig, dict[str, Any]]:
    """The config to train with: the plan's settings, then every setting the user gave.

    Returns:
        The merged config and the user's settings that replaced planned ones (dotted keys).
    """
    user = cfg.model_dump(mode="json", exclude_unset=True)
    planned = dict(plan.train)
    model = user.get("model", {})
    if "channels" in model and "strides" not in model and \
            len(planned.get("model", {}).get("strides") or []) != len(model["channels"]) - 1:
        # another depth than the plan's: its strides (per axis for volumes) do not fit; the same depth keeps them
        planned["model"] = {k: v for k, v in planned.get("model", {}).items() if k != "strides"}
    if user.get("model", {}).get("name", planned.get("model", {}).get("name")) != planned.get("model", {}).get("name"):
        # another network than the plan's: its pretrained encoder does not come along
        planned["model"] = {k: v for k, v in planned.get("model", {}).items()
                            if k not in ("backbone", "pretrained", "freeze_encoder")}
    merged = deep_merge(planned, user)
    merged["plan"] = "off"  # resolved: the run folder's config.yaml reproduces the run without planning again
    merged.setdefault("budget", plan.budget)
    if merged.get("patch_size") and merged.get("image_size"):
        ps, im = merged["patch_size"], merged["image_size"]
        if len(ps) == len(im) and all(p >= i for p, i in zip(ps, im, strict=True)):
            merged["patch_size"] = None
    out = TrainConfig.model_validate(merged)
    overrides = {k: v for k, v in _flat(user).items() if k in _flat(plan.train) and _flat(plan.train)[k] != v}
    return out, overrides


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load(path: Path, info: ManifestInfo) -> Plan:
    """Read a ``plan.json``; a plan made for another manifest is a one-line error."""
    try:
        plan = Plan.model_validate_json(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise TumorsegError(f"{path}: plan not found; make one with tumorseg plan data_manifest/NAME") from exc
    except ValueError as exc:
        raise TumorsegError(f"{path}: not a tumorseg plan ({exc.__class__.__name__}); make one with tumorseg plan"
                            ) from exc
    if plan.manifest_digest != info.dataset_digest:
        raise TumorsegError(f"{path}: planned for another manifest (digest {plan.manifest_digest[:12]} vs "
                            f"{info.dataset_digest[:12]}); plan again with tumorseg plan")
    return plan


def write(folder: Path, plan: Plan, fp: Fingerprint) -> tuple[Path, Path]:
    """Write ``plan.json`` and ``fingerprint.json`` into ``folder`` atomically."""
    plan_path, fp_path = folder / "plan.json", folder / "fingerprint.json"
    atomic_write_text(plan_path, plan.model_dump_json(indent=2) + "\n")
    atomic_write_text(fp_path, fp.model_dump_json(indent=2) + "\n")
    return plan_path, fp_path


def summary_rows(plan: Plan) -> list[tuple[str, str]]:
    """The short table shown on the terminal: setting, value."""
    t, e = plan.train, plan.estimates
    model = t["model"]
    size = "x".join(str(s) for s in t["image_size"])
    unit = "volume" if len(t["image_size"]) == 3 else "image"
    rows = [
        ("device / budget", f"{plan.device} / {plan.budget}"),
        ("training size", f"{size} (scale {e['scale']:.2f} of the median {unit}; floor {e['floor_scale']:.2f})"),
        ("patches", "x".join(str(s) for s in t["patch_size"]) + f", {t['oversample_foreground']:.0%} on tumour"
         if t.get("patch_size") else "whole images"),
        ("network", f"{model['name']} on an ImageNet-pretrained {model['backbone']} encoder"
         if model.get("pretrained", "none") != "none" else
         f"{model['name']} {model['channels'][0]}..{model['channels'][-1]} "
         f"({len(model['channels']) - 1} downsamplings){' + deep supervision' * model['deep_supervision']}"),
        ("batch / steps", f"{t['batch_size']} / {t['max_steps']} (~{t['epochs']} epochs, "
                          f"{e['train_images_per_second']:.1f} img/s measured)"),
        ("loss / optimiser", f"{t['loss']['name']} ({'batch' if t['loss'].get('batch', True) else 'per-image'} Dice)"
                             f" / {t['optim']['name']} lr {t['optim']['lr']:g}, "
                             f"{t['optim']['schedule']} + {t['optim']['warmup_steps']} warm-up steps"),
        ("flips", ", ".join(t["augment"].get("flip_axes", ["vertical", "horizontal"])) or "none"),
        ("post-processing", "chosen on val" if t.get("postprocess") == "auto" else "none"),
        ("slice context", f"{t['slice_context']} a side (2.5D)" if t.get("slice_context")
         else "none" + (" (2.5D offered: ordered slice stacks)" if "offered" in plan.reasons.get("slice_context", "")
                        else "")),
    ]
    rows += [(f"override {k}", str(v)) for k, v in plan.overrides.items()]
    return rows


def log_to(run: Any, plan: Plan, plan_path: Path, fp_path: Path) -> None:
    """Log a plan to a tracking run: its choices and estimates as params, both files as artifacts."""
    run.log_params({f"plan.{k}": v for k, v in _flat({"train": plan.train, "estimates": plan.estimates}).items()})
    run.log_params({"plan.device": plan.device, "plan.budget": plan.budget})
    run.log_artifact(plan_path, "plan")
    run.log_artifact(fp_path, "plan")


def run(cfg: PlanConfig) -> tuple[Plan, Path]:
    """``tumorseg plan``: write ``plan.json`` and ``fingerprint.json`` (default: into the manifest folder).

    Returns:
        The plan and the path of ``plan.json``.
    """
    from tumorseg import tracking
    from tumorseg.inference import resolve_device
    from tumorseg.manifest import load_manifest, resolve_manifest_dir

    mdir = resolve_manifest_dir(cfg.manifest)
    info, df = load_manifest(mdir)
    device = resolve_device(cfg.device)
    tcfg = TrainConfig(manifest=mdir, budget=cfg.budget, device=cfg.device, amp=cfg.amp)
    plan, fp = make(tcfg, info, df, device, str(mdir / "manifest.csv"))
    plan_path, fp_path = write(cfg.out or mdir, plan, fp)
    tags = {"tumorseg.manifest": info.name, "tumorseg.dataset_digest": info.dataset_digest}
    with tracking.start_run(cfg.tracking, "plan", run_name=f"plan-{info.name}-{plan.budget}", tags=tags) as trk:
        log_to(trk, plan, plan_path, fp_path)
    return plan, plan_path
