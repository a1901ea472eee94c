"""Peak memory of ingest, train and evaluate as the number of cases grows; disk-cache throughput.

Synthetic data is written procedurally as NIfTI volumes (``--slices`` slices of 256² each, 20 by default,
uint8 images and masks, uncompressed ``.nii``): one volume per "patient", each slice one case,
an ellipsoid tumour through some of the slices. 100k cases are 5,000 volume pairs (written in
a few minutes), which ingest expands into one manifest row per slice as it would for MRI.

Each stage runs in a fresh Python process, which reports its own peak RSS (``ru_maxrss``; for
ingest also its largest decode worker's), wall time, and for train the disk used by the cache.
Train runs a fixed number of steps (``--steps``, batch 8) of a small U-Net at 256², then
validates the whole val split once; evaluate scores the test split.

    python benchmarks/bench_memory.py --cases 2000 20000 100000            # memory table
    python benchmarks/bench_memory.py --throughput 4000 --repeat 3         # disk vs RAM img/s

Needs free disk: about 0.13 MB of data and 0.2 MB of cache per case (26 GB at 100k).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

SIZE = 256


def write_volumes(folder: Path, cases: int, slices: int, seed: int = 0) -> None:
    """``cases / slices`` NIfTI image/mask volume pairs under ``folder/images`` and ``folder/masks``."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    zz = np.arange(slices, dtype=np.float32)
    for v in range((cases + slices - 1) // slices):
        n = min(slices, cases - v * slices)
        cy, cx = rng.uniform(60, SIZE - 60, 2)
        cz = rng.uniform(0.2, 0.8) * n
        ry, rx, rz = rng.uniform(12, 40), rng.uniform(12, 40), rng.uniform(0.1, 0.3) * n
        d = (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)[:, :, None] + (((zz[:n] - cz) / rz) ** 2)[None, None]
        mask = (d <= 1.0).astype(np.uint8)
        noise = rng.integers(0, 60, size=(SIZE, SIZE, n), dtype=np.uint8)
        image = (noise + 40 + 120 * mask).astype(np.uint8)
        affine = np.eye(4)
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"patient_{v:05d}.nii")
        nib.save(nib.Nifti1Image(mask, affine), folder / "masks" / f"patient_{v:05d}.nii")


STAGE = r"""
import json, os, resource, sys, time, logging
logging.basicConfig(level=logging.WARNING)
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
out = {}
if args["stage"] == "ingest":
    import re
    from tumorseg import ingest
    from tumorseg.config import IngestConfig
    from tumorseg.errors import TumorsegError
    try:
        ingest.run(IngestConfig(**args["cfg"]))
    except TumorsegError as exc:  # a split without tumour: take the seed ingest suggests, as a user would
        seed = re.search(r"pass --seed (\d+)", str(exc))
        if seed is None:
            raise
        ingest.run(IngestConfig(**{**args["cfg"], "seed": int(seed.group(1))}))
elif args["stage"] == "train":
    from tumorseg import train
    from tumorseg.config import load_config, TrainConfig
    res = train.run(load_config(TrainConfig, None, args["sets"]))
    out["images_per_second"] = res.history[0]["images_per_second"] if res.history else 0.0
    out["val_dice"] = res.best_val_dice
else:
    from tumorseg import evaluate
    from tumorseg.config import EvaluateConfig
    evaluate.run(EvaluateConfig(**args["cfg"]))
out["seconds"] = time.perf_counter() - t0
out["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
out["child_rss_gib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
print("RESULT " + json.dumps(out))
"""


def stage(name: str, payload: dict) -> dict:
    """Run one stage in a fresh process; its peak RSS and timings."""
    proc = subprocess.run([sys.executable, "-c", STAGE, json.dumps({"stage": name, **payload})],
                          capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def train_sets(manifest: Path, out: Path, uri: str, steps: int, cache: str, name: str) -> list[str]:
    return [f"manifest={manifest}", f"out={out}", f"run_name={name}", f"cache={cache}", "plan=off",
            f"image_size=[{SIZE},{SIZE}]", "batch_size=8", f"max_steps={steps}", "epochs=1", "postprocess=none",
            "val_overlays=0", "log_model=false", "model.channels=[16,32,64,128]", "model.strides=[2,2,2]",
            "deterministic=true", f"tracking.uri={uri}"]


def memory_table(args: argparse.Namespace, work: Path) -> None:
    rows = []
    for n in args.cases:
        data = work / f"data{n}"
        t0 = time.perf_counter()
        write_volumes(data, n, args.slices)
        gen_s = time.perf_counter() - t0
        uri = f"sqlite:///{work}/mlflow{n}.db"
        man_root = work / "dm"
        ing = stage("ingest", {"cfg": {"images_dir": str(data / "images"), "masks_dir": str(data / "masks"),
                                       "name": f"m{n}", "out_dir": str(man_root), "workers": 2,
                                       "slice_axis": 2, "tracking": {"uri": uri}}})
        manifest = man_root / f"m{n}"
        for cache in args.modes:
            tr = stage("train", {"sets": train_sets(manifest, work / "runs", uri, args.steps, cache, f"{cache}{n}")})
            cache_gib = du(manifest / "cache") if (manifest / "cache").exists() else 0.0
            ev = stage("evaluate", {"cfg": {"model": str(work / "runs" / f"{cache}{n}" / "best.pt"),
                                            "manifest": str(manifest), "out": str(work / f"eval{cache}{n}"),
                                            "bootstrap": 0, "write_back": False, "tracking": {"uri": uri}}})
            rows.append((n, cache, gen_s, ing, tr, ev, cache_gib))
            shutil.rmtree(manifest / "cache", ignore_errors=True)
            print(f"{n} cases, cache={cache}: train {tr['rss_gib']:.2f} GiB, evaluate {ev['rss_gib']:.2f} GiB",
                  file=sys.stderr, flush=True)
        shutil.rmtree(data, ignore_errors=True)
    print("\n| cases | cache | ingest RSS GiB (worker) | ingest s | train RSS GiB | train s | train img/s | "
          "evaluate RSS GiB | evaluate s | cache on disk GiB | data written s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, cache, gen_s, ing, tr, ev, cache_gib in rows:
        print(f"| {n:,} | {cache} | {ing['rss_gib']:.2f} ({ing['child_rss_gib']:.2f}) | {ing['seconds']:.0f} | "
              f"{tr['rss_gib']:.2f} | {tr['seconds']:.0f} | {tr['images_per_second']:.1f} | {ev['rss_gib']:.2f} | "
              f"{ev['seconds']:.0f} | {cache_gib:.2f} | {gen_s:.0f} |")


def throughput(args: argparse.Namespace, work: Path) -> None:
    """Train img/s from the disk cache vs RAM on the same cases and steps, interleaved, best of ``--repeat``."""
    n = args.throughput
    data = work / "tp"
    write_volumes(data, n, args.slices)
    uri = f"sqlite:///{work}/tp.db"
    stage("ingest", {"cfg": {"images_dir": str(data / "images"), "masks_dir": str(data / "masks"), "name": "tp",
                             "out_dir": str(work / "dm"), "workers": 2, "slice_axis": 2,
                             "tracking": {"uri": uri}}})
    manifest = work / "dm" / "tp"
    best: dict[str, float] = {"ram": 0.0, "disk": 0.0}
    for r in range(args.repeat):
        for cache in ("disk", "ram") if r % 2 else ("ram", "disk"):
            res = stage("train", {"sets": train_sets(manifest, work / "runs", uri, args.steps, cache, f"tp{cache}{r}")})
            best[cache] = max(best[cache], res["images_per_second"])
            print(f"repeat {r} {cache}: {res['images_per_second']:.1f} img/s", file=sys.stderr, flush=True)
    print(f"\n| cases | steps | RAM img/s | disk img/s | disk / RAM |\n|---:|---:|---:|---:|---:|\n"
          f"| {n:,} | {args.steps} | {best['ram']:.1f} | {best['disk']:.1f} | {best['disk'] / best['ram']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, nargs="*", default=[2000, 20000])
    ap.add_argument("--modes", nargs="*", default=["auto"], help="train cache settings to measure (auto, ram, disk)")
    ap.add_argument("--slices", type=int, default=20, help="slices per volume (cases per patient)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--throughput", type=int, default=0, help="cases for the disk-vs-RAM throughput run (0: skip)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder, removed)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tumorseg-mem-"))
    try:
        if args.throughput:
            throughput(args, work)
        else:
            memory_table(args, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
