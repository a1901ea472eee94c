"""Volumes as cases (3D): training memory against the number of volumes, and training speed against compute.

Memory (``--memory 200 2000``): N synthetic 64³ volumes (uint8 NIfTI, an ellipsoid tumour each) are ingested as
volumes and trained for a fixed number of steps of a 3D U-Net on the on-disk cache, each stage in a fresh
process reporting its peak RSS (``ru_maxrss``). The goal: peak RSS flat in N (2,000 against 200: at most 1.3x).

Speed (``--speed``): the same 3D U-Net, batch and grid, stepped (a) by tumorseg's ``train_one_epoch`` on the
cached volumes (reading, normalising, augmenting in 3D, cropping when patches are set) and (c) on one batch
already in memory (compute only). Prints volumes/s, voxels/s and (a)/(c); the goal on the CPU is at least 0.9.

    python benchmarks/bench_volumes.py --memory 200 2000
    python benchmarks/bench_volumes.py --speed --size 64 --steps 30 [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from bench_memory import du, stage  # noqa: E402

SIDE = 64
NET = ["model.channels=[16,32,64,128]", "model.strides=[2,2,2]", "model.norm=instance", "normalize=image"]


def write_volumes(folder: Path, n: int, side: int = SIDE, seed: int = 0) -> None:
    """``n`` uint8 NIfTI volume pairs of ``side``³ voxels (1 mm) under ``folder/images`` and ``folder/masks``."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    grid = np.indices((side, side, side), dtype=np.float32)
    for v in range(n):
        c = rng.uniform(0.3, 0.7, 3) * side
        r = rng.uniform(0.08, 0.2, 3) * side
        mask = ((((grid - c[:, None, None, None]) / r[:, None, None, None]) ** 2).sum(axis=0) <= 1).astype(np.uint8)
        image = (rng.integers(0, 60, size=mask.shape, dtype=np.uint8) + 40 + 120 * mask).astype(np.uint8)
        nib.save(nib.Nifti1Image(image, np.eye(4)), folder / "images" / f"vol_{v:05d}.nii")
        nib.save(nib.Nifti1Image(mask, np.eye(4)), folder / "masks" / f"vol_{v:05d}.nii")


def memory_table(cases: list[int], steps: int, work: Path) -> None:
    rows = []
    for n in cases:
        data = work / f"data{n}"
        write_volumes(data, n)
        uri = f"sqlite:///{work}/mlflow{n}.db"
        ing = stage("ingest", {"cfg": {"images_dir": str(data / "images"), "masks_dir": str(data / "masks"),
                                       "name": f"v{n}", "out_dir": str(work / "dm"), "workers": 2,
                                       "fractions": [0.9, 0.1, 0.0], "tracking": {"uri": uri}}})
        manifest = work / "dm" / f"v{n}"
        sets = [f"manifest={manifest}", f"out={work / 'runs'}", f"run_name=v{n}", "cache=disk", "plan=off",
                f"image_size=[{SIDE},{SIDE},{SIDE}]", "batch_size=2", f"max_steps={steps}", "epochs=1",
                "postprocess=none", "val_overlays=0", "log_model=false", f"tracking.uri={uri}", *NET]
        tr = stage("train", {"sets": sets})
        cache = du(manifest / "cache")
        rows.append((n, ing["rss_gib"], tr["rss_gib"], tr["seconds"], cache))
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(manifest / "cache", ignore_errors=True)
    base = rows[0][2]
    print(f"\n3D memory: {SIDE}³ volumes, disk cache, {steps} steps of batch 2, then validation of 10% of them")
    print("| volumes | ingest peak RSS GiB | train peak RSS GiB | train / first | train s | cache GiB |")
    print("|---|---|---|---|---|---|")
    for n, ing_rss, tr_rss, secs, cache in rows:
        print(f"| {n} | {ing_rss:.2f} | {tr_rss:.2f} | {tr_rss / base:.2f}x | {secs:.0f} | {cache:.2f} |")


def speed_table(size: int, steps: int, batch: int, device_name: str, repeat: int, work: Path) -> None:
    import torch

    from tumorseg import ingest, synth
    from tumorseg.config import IngestConfig, TrackingConfig, TrainConfig, load_config
    from tumorseg.data import CaseReader
    from tumorseg.data.split import in_ram
    from tumorseg.inference import amp_dtype, resolve_device
    from tumorseg.manifest import load_manifest, select_split
    from tumorseg.model import build_loss, build_model, channels_last
    from tumorseg.train.loop import State, TrainContext, train_one_epoch, train_step
    from tumorseg.train.runtime import Dist, build_optimizer

    synth.run(work / "data", n=16, size=size, seed=0, dims=3)
    mdir = ingest.run(IngestConfig(images_dir=work / "data/images", masks_dir=work / "data/masks", name="speed",
                                   out_dir=work / "dm", fractions=(1.0, 0.0, 0.0), workers=2,
                                   tracking=TrackingConfig(uri=f"sqlite:///{work}/mlflow.db"))).manifest_dir
    info, df = load_manifest(mdir)
    train_df = select_split(df, "train", "speed")
    cfg = load_config(TrainConfig, None, [f"image_size=[{size},{size},{size}]", f"batch_size={batch}",
                                          f"device={device_name}", "augment.flip_axes=[vertical,horizontal,depth]",
                                          "augment.affine_prob=0.2", "augment.rotate90=false",
                                          *NET], base={"manifest": str(mdir)})
    device = resolve_device(cfg.device)
    dtype = amp_dtype(device, cfg.amp)
    cached, _ = in_ram(CaseReader(info, "speed"), train_df, cfg.image_size, 1, "image", "speed")
    cached.normalise(None)
    cached.place(device, "auto")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def fresh() -> tuple:
        torch.manual_seed(0)
        net = channels_last(build_model(cfg.model, 1, spatial_dims=3).to(device))
        return net, build_optimizer(cfg, net.parameters()), build_loss(cfg.loss)

    def loop_a() -> float:
        net, opt, loss_fn = fresh()
        ctx = TrainContext(cfg=cfg.model_copy(update={"max_steps": steps + 2}), net=net, loss_fn=loss_fn, opt=opt,
                           sched=None, scaler=scaler, device=device, dist=Dist(), in_channels=1, stats=None,
                           manifest_digest="", manifest_name="speed", run_dir=work)
        state = State()
        state.global_step = 0
        ctx.cfg = cfg.model_copy(update={"max_steps": 2})
        train_one_epoch(ctx, cached, state)  # warm-up
        ctx.cfg = cfg.model_copy(update={"max_steps": steps + 2})
        done = state.global_step
        t0 = time.perf_counter()
        while state.global_step < steps + 2:
            state.epoch += 1
            train_one_epoch(ctx, cached, state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / (state.global_step - done)

    def loop_c() -> float:
        net, opt, loss_fn = fresh()
        x = channels_last(cached.images[:batch].to(device))
        y = cached.masks[:batch].to(device).float()
        for _ in range(2):
            train_step(net, x, y, loss_fn, opt, scaler, device, dtype)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(net, x, y, loss_fn, opt, scaler, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t0) / steps

    a = c = float("inf")
    for _ in range(repeat):  # interleaved, best of N
        a, c = min(a, loop_a()), min(c, loop_c())
    vox = size**3
    print(f"\n3D speed on {device} ({torch.get_num_threads()} threads): UNet 16..128, {size}³ grid, batch {batch}, "
          f"{steps} steps, amp {dtype}, best of {repeat}")
    print("| loop | volumes/s | Mvoxels/s | vs compute-only |\n|---|---|---|---|")
    for name, t in (("(a) tumorseg train loop (3D augmentation on)", a), ("(c) compute only: one batch in memory", c)):
        print(f"| {name} | {batch / t:.2f} | {batch * vox / t / 1e6:.2f} | {c / t:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", type=int, nargs="*", default=None, help="numbers of volumes, e.g. 200 2000")
    ap.add_argument("--memory-steps", type=int, default=20)
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_volumes_"))
    try:
        if args.memory:
            memory_table(args.memory, args.memory_steps, work)
        if args.speed:
            speed_table(args.size, args.steps, args.batch, args.device, args.repeat, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
