"""Recipe ablation at equal budget: each training component measured on a real manifest's val and test.

Every variant trains with the same wall-time budget (``--budget``), one after another on the
same machine, through the real ``tumorseg train`` (a subprocess each, so imports and caches do
not leak between variants), then ``tumorseg evaluate`` scores the best checkpoint on ``val``
and ``test``. Printed per variant: mean Dice over the cases with tumour, mean Dice over all
scored cases (a false positive on a tumour-free image scores 0), the false-positive rate on
tumour-free images, epochs run and wall time.

The planned variants share one ``plan.json`` made first (``tumorseg plan --budget``), so every
variant trains at the same resolution and steps and only the named component changes.

    python benchmarks/bench_recipe.py data_manifest/busi --budget 4m --out /tmp/ablation
    python benchmarks/bench_recipe.py data_manifest/busi --budget 30m --only full   # one variant
    python benchmarks/bench_recipe.py data_manifest/la2d --budget 30m --only full select-by-case context-1

``*_dice_group`` is the mean over groups of the Dice of each group's pooled counts (``per_group.csv``): the
per-patient (volumetric) Dice of slice stacks; it equals the per-case mean where every group holds one case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

OLD_RECIPE = ["loss.name=dice", "optim.name=adam", "optim.schedule=plateau", "optim.warmup_steps=0",
              "postprocess=none"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "old-defaults": ("previous defaults: UNet 16..256 at 128x128, Dice, Adam, plateau", ["plan=off"]),
    "planned-size": ("planned size and network, previous recipe", ["PLAN", *OLD_RECIPE]),
    "dice-ce": ("+ Dice + cross-entropy (batch Dice)", ["PLAN", "optim.name=adam", "optim.schedule=plateau",
                                                        "optim.warmup_steps=0", "postprocess=none"]),
    "adamw-poly": ("+ AdamW, poly LR over the planned steps, warm-up", ["PLAN", "postprocess=none"]),
    "full": ("+ threshold, mirroring, components chosen on val", ["PLAN"]),
    "deep-supervision": ("full, DynUNet (nnU-Net) with deep supervision at the planned width",
                         ["PLAN", "model.name=dynunet", "model.deep_supervision=true"]),
    "nnunet-augment": ("full, nnU-Net-like augmentation: rotation 180, scale 30%, gamma, noise",
                       ["PLAN", "augment.rotate_degrees=180", "augment.scale=0.3", "augment.gamma=true",
                        "augment.noise=true"]),
    "no-augment": ("full, augmentation off", ["PLAN", "augment.flip=false", "augment.rotate90=false",
                                              "augment.affine=false", "augment.intensity=false"]),
    # issue #23's rules, each against "full" (the plan as it is) at the same budget
    "select-by-case": ("full, the best checkpoint by mean per-case val Dice (rule 9 off)", ["PLAN", "val_unit=case"]),
    "select-by-group": ("full, the best checkpoint by per-group val Dice (rule 9 forced)", ["PLAN", "val_unit=group"]),
    # planned afresh (the shared plan.json was made without it; the probe's cached throughput keeps the rest equal)
    "patches-for-time": ("full, crops when whole images cannot buy the samples (rule 5)", ["patches_for_time=true"]),
    "context-1": ("full, one neighbouring slice a side as channels (2.5D, rule 10)", ["PLAN", "slice_context=1"]),
    "context-1-by-case": ("context-1, the best checkpoint and post-processing by mean per-case val Dice (rule 9 off)",
                          ["PLAN", "slice_context=1", "val_unit=case"]),
}


def tumorseg(*args: str, log: Path) -> float:
    """Run the CLI; returns wall seconds (raises with the log's tail on failure)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, "-m", "tumorseg", *args], stdout=fh, stderr=subprocess.STDOUT,
                              check=False)
    if proc.returncode:
        raise SystemExit(f"tumorseg {' '.join(args)} failed; see {log}:\n" + log.read_text()[-2000:])
    return time.perf_counter() - t0


def scores(eval_dir: Path) -> dict[str, float]:
    pc = pd.read_csv(eval_dir / "per_case.csv")
    tumour = pc[~pc["gt_empty"]]
    empty = pc[pc["gt_empty"]]
    pg = pd.read_csv(eval_dir / "per_group.csv")  # counts pooled per group: per-patient (volumetric) Dice
    return {"dice_tumour": float(tumour["dice"].mean()), "dice_all": float(pc["dice"].mean()),
            "dice_group": float(pg["dice"].mean()),
            "fp_rate_empty": float((~empty["pred_empty"]).mean()) if len(empty) else float("nan"),
            "n_tumour": len(tumour), "n_empty": len(empty)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--budget", default="4m")
    ap.add_argument("--out", type=Path, default=Path("ablation"))
    ap.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    ap.add_argument("--plan", type=Path, default=None, help="reuse this plan.json instead of planning")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    plan = args.plan
    if plan is None:
        tumorseg("plan", str(args.manifest), "--budget", args.budget, "--out", str(out), "--tracking-uri", uri,
                 log=out / "plan.log")
        plan = out / "plan.json"
    print(f"plan: {plan}  budget {args.budget}  machine: {os.cpu_count()} CPU cores")
    rows = []
    for name in args.only or list(VARIANTS):
        label, sets = VARIANTS[name]
        sets = [f"plan={plan}" if s == "PLAN" else s for s in sets]
        run_dir = out / "runs" / name
        if not (run_dir / "result.json").is_file():
            train_args = ["train", str(args.manifest), "--out", str(out / "runs"), "--budget", args.budget,
                          "--tracking-uri", uri, "--set", f"run_name={name}", "--set", "log_model=false"]
            for s in sets:
                train_args += ["--set", s]
            wall = tumorseg(*train_args, log=out / f"{name}.train.log")
            (run_dir / "wall.json").write_text(json.dumps({"wall_seconds": wall}))
        wall = json.loads((run_dir / "wall.json").read_text())["wall_seconds"]
        result = json.loads((run_dir / "result.json").read_text())
        row = {"variant": name, "what": label, "epochs": result["epochs_run"], "wall_s": round(wall)}
        for split in ("val", "test"):
            ev = out / "eval" / name / split
            if not (ev / "per_case.csv").is_file():
                tumorseg("evaluate", str(run_dir), "--manifest", str(args.manifest), "--split", split, "--out",
                         str(ev), "--tracking-uri", uri, log=out / f"{name}.{split}.log")
            s = scores(ev)
            row[f"{split}_dice_tumour"] = round(s["dice_tumour"], 4)
            row[f"{split}_dice_group"] = round(s["dice_group"], 4)
            row[f"{split}_fp_empty"] = round(s["fp_rate_empty"], 3)
        rows.append(row)
        print(row, flush=True)
    table = pd.DataFrame(rows)
    print()
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for _, r in table.iterrows():
        print("| " + " | ".join(str(v) for v in r) + " |")
    table.to_csv(out / "ablation.csv", index=False)


if __name__ == "__main__":
    main()
