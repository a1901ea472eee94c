"""Backbones at equal budget (issue #22): the notebooks' networks against the planned one, on one manifest.

Every variant trains with the same wall-time budget (``--budget``), one after another on the same
machine, through the real ``tumorseg train`` (a subprocess each, so imports and caches do not leak),
from one shared ``plan.json`` (same resolution, recipe and schedule; each run refits its steps to its
own measured speed after the first epoch), with only the network changed. ``tumorseg evaluate`` then
scores the best checkpoint on ``test``. Printed per variant: epochs run, training images per second,
mean test Dice over the cases with tumour, the false-positive rate on tumour-free cases, pixel accuracy
and wall time.

Variants: ``planned`` (the plan's own network), ``classic`` (the notebooks' U-Net: BasicUNet 64..1024,
batch norm) and ``flexible_unet`` on each backbone in ``--backbones``. ``--pretrained imagenet`` loads
ImageNet weights through torchvision's cache (a connected machine), ``--pretrained DIR`` from
``DIR/<backbone>.pth`` files, ``none`` trains from scratch.

    python benchmarks/bench_backbones.py data_manifest/busi --budget 30m --pretrained imagenet --out /tmp/bb
    python benchmarks/bench_backbones.py data_manifest/demo --budget 20s --pretrained none --only mobilenet_v2
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from bench_recipe import tumorseg  # noqa: E402 - the one CLI runner of the benchmarks (a sibling script)

BACKBONES = ["vgg16", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_large", "resnet34"]
CLASSIC = ["model.name=basic_unet", "model.channels=[64,128,256,512,1024]", "model.norm=batch"]


def variants(backbones: list[str], pretrained: str) -> dict[str, list[str]]:
    """Variant name -> the ``--set`` overrides on top of the shared plan."""
    out: dict[str, list[str]] = {"planned": [], "classic": CLASSIC}
    for b in backbones:
        weights = pretrained if pretrained in ("imagenet", "none") else str(Path(pretrained) / f"{b}.pth")
        out[b] = ["model.name=flexible_unet", f"model.backbone={b}", f"model.pretrained={weights}"]
    return out


def row(name: str, run_dir: Path, eval_dir: Path, seconds: float) -> dict[str, object]:
    import torch

    last = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    history = last["history"]
    ips = [float(h["images_per_second"]) for h in history if h.get("images_per_second")]
    model = last["config"]["model"]
    net = model["name"] if model["name"] != "flexible_unet" else f"flexible_unet/{model['backbone']}"
    pc = pd.read_csv(eval_dir / "per_case.csv")
    tumour, empty = pc[~pc["gt_empty"]], pc[pc["gt_empty"]]
    summary = json.loads((eval_dir / "summary.json").read_text())
    return {"variant": name, "network": net, "pretrained": str(model.get("pretrained", "none")).rsplit("/", 1)[-1],
            "epochs": len(history), "img/s": round(sum(ips) / len(ips), 1) if ips else float("nan"),
            "test Dice (tumour)": round(float(tumour["dice"].mean()), 4) if len(tumour) else float("nan"),
            "FP rate (tumour-free)": round(float((~empty["pred_empty"]).mean()), 3) if len(empty) else float("nan"),
            "pixel acc": round(float(summary.get("pixel_accuracy") or float("nan")), 4),
            "n tumour/empty": f"{len(tumour)}/{len(empty)}", "wall s": round(seconds)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--budget", default="30m", help="each variant's wall-time budget")
    ap.add_argument("--out", type=Path, default=Path("bench-backbones"))
    ap.add_argument("--backbones", nargs="*", default=BACKBONES)
    ap.add_argument("--pretrained", default="imagenet", help="imagenet, none, or a folder of <backbone>.pth files")
    ap.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    ap.add_argument("--plan", type=Path, default=None, help="reuse this plan.json instead of planning")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="another override for every variant")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    track = ["--tracking-uri", uri]
    manifest = str(args.manifest.resolve())
    plan = args.plan
    if plan is None:
        tumorseg("plan", manifest, "--budget", args.budget, "--out", str(out), *track, log=out / "plan.log")
        plan = out / "plan.json"
    rows = []
    for name, sets in variants(args.backbones, args.pretrained).items():
        if args.only and name not in args.only:
            continue
        run_dir = out / "runs" / name
        overrides = [f"--set={s}" for s in [*sets, *args.extra, f"out={out / 'runs'}", f"run_name={name}"]]
        seconds = tumorseg("train", manifest, "--budget", args.budget, "--plan", str(plan), *overrides, *track,
                           log=out / f"train-{name}.log")
        eval_dir = out / "eval" / name
        tumorseg("evaluate", str(run_dir), "--manifest", manifest, "--split", "test", "--out", str(eval_dir),
                 *track, log=out / f"eval-{name}.log")
        rows.append(row(name, run_dir, eval_dir, seconds))
        print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "backbones.csv", index=False)
    print()
    print(table.to_markdown(index=False) if _has_tabulate() else table.to_string(index=False))


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
