"""Training throughput: tumorseg's loop vs a MONAI-tutorial loop vs one batch in memory.

Same model (UNet 16..256, 2 residual units), same data, same image size, batch size and
number of optimiser steps in all three:

  (a) tumorseg: the real ``train_one_epoch`` on the decoded cache with batched augmentation
      (AMP + channels_last on CUDA, as ``tumorseg train`` runs);
  (b) tutorial: MONAI's 2D segmentation tutorial style, ``LoadImaged`` per step through a
      ``DataLoader`` (workers), ``ScaleIntensityd`` + ``Resized`` + ``RandRotate90d``, fp32;
  (c) limit: the same steps on one batch already on the device (no data work at all).

Prints images/s, ratios and the share of step time spent waiting for data.

    python benchmarks/bench_train.py --size 256 --steps 40 --n 64
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _sync(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    import torch

    from tumorseg import data as datamod
    from tumorseg import ingest, synth
    from tumorseg.config import IngestConfig, TrackingConfig, TrainConfig
    from tumorseg.inference import amp_dtype, resolve_device
    from tumorseg.manifest import load_manifest, select_split
    from tumorseg.model import build_loss, build_model
    from tumorseg.train.loop import State, TrainContext, train_one_epoch, train_step
    from tumorseg.train.runtime import Dist, build_optimizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=64, help="synthetic image/mask pairs")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the tutorial loop")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats; best of each loop is kept")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    synth.run(tmp / "data", n=args.n, size=args.size, seed=0)
    icfg = IngestConfig(images_dir=tmp / "data/images", masks_dir=tmp / "data/masks", name="bench",
                        out_dir=tmp / "dm", fractions=(1.0, 0.0, 0.0), workers=2,
                        tracking=TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db"))
    mdir = ingest.run(icfg).manifest_dir
    info, df = load_manifest(mdir)
    train_df = select_split(df, "train", "bench")
    cfg = TrainConfig(manifest=mdir, image_size=(args.size, args.size), batch_size=args.batch,
                      max_steps=args.steps, device=args.device)
    device = resolve_device(cfg.device)
    dtype = amp_dtype(device, cfg.amp)
    print(f"device {device}  torch threads {torch.get_num_threads()}  image {args.size}²  batch {args.batch}  "
          f"steps {args.steps}  amp {dtype}")

    def fresh():  # noqa: ANN202
        torch.manual_seed(0)
        net = build_model(cfg.model, 1).to(device)
        if device.type == "cuda":
            net = net.to(memory_format=torch.channels_last)
        return net, build_optimizer(cfg, net.parameters()), build_loss(cfg.loss)

    # (a) tumorseg
    from tumorseg.data.split import in_ram

    cached, _ = in_ram(datamod.CaseReader(info, "bench"), train_df, cfg.image_size, 1, "image", "bench")
    cached.normalise(None)
    cached.place(device, "auto")
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def context(c: TrainConfig, net: Any, opt: Any, loss_fn: Any) -> TrainContext:
        return TrainContext(cfg=c, net=net, loss_fn=loss_fn, opt=opt, sched=None, scaler=scaler, device=device,
                            dist=Dist(), in_channels=1, stats=None, manifest_digest="", manifest_name="bench",
                            run_dir=tmp)

    def loop_a(c: TrainConfig = cfg) -> float:
        net, opt, loss_fn = fresh()
        train_one_epoch(context(c.model_copy(update={"max_steps": 3}), net, opt, loss_fn), cached, State())
        state, steps_done = State(), 0
        _sync(device)
        t0 = time.perf_counter()
        while steps_done < args.steps:
            state.global_step = 0
            rest = c.model_copy(update={"max_steps": args.steps - steps_done})
            train_one_epoch(context(rest, net, opt, loss_fn), cached, state)
            steps_done += state.global_step
            state.epoch += 1
        _sync(device)
        return time.perf_counter() - t0

    no_aug = cfg.model_copy(update={"augment": cfg.augment.model_copy(
        update={"flip": False, "rotate90": False, "affine": False, "intensity": False})})

    # (b) MONAI tutorial loop
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandRotate90d, Resized, ScaleIntensityd

    files = [{"img": str(Path(info.data_root) / r["image"]), "seg": str(Path(info.data_root) / r["mask"])}
             for _, r in train_df.iterrows()]
    tf = Compose([LoadImaged(keys=["img", "seg"]), EnsureChannelFirstd(keys=["img", "seg"]),
                  ScaleIntensityd(keys=["img", "seg"]),
                  Resized(keys=["img", "seg"], spatial_size=(args.size, args.size), mode=("bilinear", "nearest")),
                  RandRotate90d(keys=["img", "seg"], prob=0.5, spatial_axes=[0, 1])])
    loader = DataLoader(Dataset(files, tf), batch_size=args.batch, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0)
    wait_b = [0.0]

    def loop_b() -> float:
        net, opt, loss_fn = fresh()
        it = iter(loader)

        def next_batch() -> dict:
            nonlocal it
            try:
                return next(it)
            except StopIteration:
                it = iter(loader)
                return next(it)

        for _ in range(3):
            next_batch()
        step, wait = 0, 0.0
        _sync(device)
        t0 = time.perf_counter()
        while step < args.steps:
            tw = time.perf_counter()
            batch = next_batch()
            x, y = batch["img"].to(device), batch["seg"].to(device)
            wait += time.perf_counter() - tw
            opt.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            opt.step()
            step += 1
        _sync(device)
        wait_b[0] = wait
        return time.perf_counter() - t0

    # (c) limit: one batch in memory, same steps, same precision as (a)
    def loop_c() -> float:
        net, opt, loss_fn = fresh()
        x = cached.images[: args.batch].to(device)
        y = cached.masks[: args.batch].to(device).float()
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)

        def limit_step() -> None:
            train_step(net, x, y, loss_fn, opt, scaler, device, dtype)

        for _ in range(3):
            limit_step()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            limit_step()
        _sync(device)
        return time.perf_counter() - t0

    best = {"a": float("inf"), "a0": float("inf"), "b": float("inf"), "c": float("inf")}
    for _ in range(args.repeat):  # interleaved, best of N: machine noise hits every loop alike
        best["a"] = min(best["a"], loop_a())
        best["a0"] = min(best["a0"], loop_a(no_aug))
        best["b"] = min(best["b"], loop_b())
        best["c"] = min(best["c"], loop_c())
    t_a, t_a0, t_b, t_c = best["a"], best["a0"], best["b"], best["c"]
    wait = wait_b[0]
    data_a = _data_time_tumorseg(cached, cfg, device, args.steps)

    imgs = args.steps * args.batch
    rows = [("(a) tumorseg train loop", t_a, data_a / t_a), ("(a') same, augmentation off", t_a0, float("nan")),
            ("(b) MONAI tutorial loop (fp32)", t_b, wait / t_b), ("(c) limit: one batch in memory", t_c, 0.0)]
    print("\n| loop | images/s | vs tutorial | vs limit | data wait share |\n|---|---|---|---|---|")
    for name, t, share in rows:
        print(f"| {name} | {imgs / t:.1f} | {t_b / t:.2f}x | {t_c / t:.3f} | {share:.1%} |")


def _data_time_tumorseg(cached, cfg, device, steps: int) -> float:  # noqa: ANN001
    """Time of the data part of (a) alone: batch indexing, copy and augmentation."""
    import torch

    from tumorseg.augment import augment_batch
    from tumorseg.train import epoch_generator

    gen = epoch_generator(0, 0)
    n = len(cached)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[: cfg.batch_size]
        x = cached.images[idx.to(cached.images.device)].to(device, non_blocking=True)
        y = cached.masks[idx.to(cached.masks.device)].to(device, non_blocking=True).float()
        augment_batch(x, y, cfg.augment, gen)
    _sync(device)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
