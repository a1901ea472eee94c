"""Evaluate throughput: ``tumorseg.evaluate.run`` vs bare batched inference on pre-decoded images.

Both sides score the same synthetic test split with the same untrained network (speed does
not depend on the weights):

  (a) evaluate: the real ``tumorseg.evaluate.run`` - load the manifest and checkpoint, decode
      every image and mask (thread pool, overlapped with the network), batched inference,
      per-case metrics, CSVs, summary with bootstrap CI, gallery and Dice plot, MLflow run with
      artifacts. Its inner loop (decode + predict + score) is also reported on its own;
  (b) bare: ``Segmenter.predict_proba`` over batches of images already decoded in memory
      (preprocessing, network, resize back to the original size) - nothing else;
  (c) network only: the network's forward pass on pre-processed tensors, for reference.

Imports (torch, MONAI, MLflow) and the SQLite store's creation happen before timing, as they
would for a long-lived process; the CLI additionally pays ~10 s of imports. Each side runs
``--repeat`` times, alternating, and the best time counts (the machine is shared).
Target: evaluate <= 1.2x bare.

    python benchmarks/bench_evaluate.py --n 400 --size 256 --image-size 128
    python benchmarks/bench_evaluate.py ... --write   # update the "## evaluate" section of RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

RESULTS = Path(__file__).with_name("RESULTS.md")


def prepare(root: Path, n: int, size: int, image_size: int, channels: list[int], uri: str) -> tuple[Path, Path]:
    """Synthetic pairs -> a manifest whose test split holds ~90% of them -> an untrained checkpoint."""
    import torch

    from tumorseg import checkpoint, ingest, synth
    from tumorseg.config import IngestConfig, ModelConfig, TrackingConfig, TrainConfig
    from tumorseg.errors import TumorsegError
    from tumorseg.model import build_model

    synth.run(root / "data", n=n, size=size, seed=0)
    tracking = TrackingConfig(uri=uri, experiment="bench-evaluate")
    seed = 0
    for _ in range(5):
        try:
            res = ingest.run(IngestConfig(images_dir=root / "data" / "images", masks_dir=root / "data" / "masks",
                                          name="bench", out_dir=root / "manifests", group_pattern=synth.GROUP_PATTERN,
                                          fractions=(0.05, 0.05, 0.9), seed=seed, tracking=tracking))
            break
        except TumorsegError as exc:
            m = re.search(r"pass --seed (\d+)", str(exc))
            if not m:
                raise
            seed = int(m.group(1))
    model = ModelConfig(channels=channels)
    torch.manual_seed(0)
    net = build_model(model, 1)
    cfg = TrainConfig(image_size=(image_size, image_size), model=model)
    ckpt = root / "bench.pt"
    checkpoint.save(ckpt, checkpoint.build_payload(net, cfg, 1, manifest_digest=res.dataset_digest,
                                                   manifest_name="bench"))
    return res.manifest_dir, ckpt


def bare(manifest: Path, ckpt: Path, batch_size: int, device: str) -> dict[str, float]:
    """Seconds for predict_proba over pre-decoded images, and for the network alone."""
    import torch

    from tumorseg.imageio import load_image
    from tumorseg.inference import Segmenter, preprocess
    from tumorseg.manifest import image_path, load_manifest, select_split

    info, df = load_manifest(manifest)
    rows = select_split(df, "test", manifest).to_dict("records")
    images = [load_image(image_path(info, r)) for r in rows]
    seg = Segmenter.from_checkpoint(ckpt, device=device)
    seg.predict_proba(images[:batch_size])  # warm-up, as evaluate's first batch pays it too
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(images), batch_size):
        seg.predict_proba(images[i : i + batch_size])
    t_proba, c_proba = time.perf_counter() - t0, time.process_time() - c0
    size = (int(seg.config.image_size[0]), int(seg.config.image_size[1]))
    batches = [torch.stack([preprocess(im, size, 1) for im in images[i : i + batch_size]]).to(seg.device)
               for i in range(0, len(images), batch_size)]
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for b in batches:
            seg.net(b)
    if seg.device.type == "cuda":
        torch.cuda.synchronize()
    t_net, c_net = time.perf_counter() - t0, time.process_time() - c0
    return {"n": len(images), "bare": t_proba, "net": t_net, "bare_cpu": c_proba, "net_cpu": c_net}


def evaluate_once(manifest: Path, ckpt: Path, out: Path, batch_size: int, workers: int, device: str,
                  uri: str) -> dict[str, float]:
    """Wall seconds of one full evaluate.run and of its phases."""
    from tumorseg import evaluate
    from tumorseg.config import EvaluateConfig, TrackingConfig

    shutil.rmtree(out, ignore_errors=True)
    cfg = EvaluateConfig(model=str(ckpt), manifest=manifest, split="test", out=out, batch_size=batch_size,
                         workers=workers, device=device, write_back=False,  # type: ignore[arg-type]
                         tracking=TrackingConfig(uri=uri, experiment="bench-evaluate"))
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate.run(cfg)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"total": total, "total_cpu": cpu, **{k: v for k, v in res.timings.items() if k != "total"}}


def write_section(text: str) -> None:
    """Replace (or append) the ``## evaluate`` section of RESULTS.md, leaving other sections alone."""
    old = RESULTS.read_text(encoding="utf-8") if RESULTS.is_file() else "# Benchmark results\n"
    pattern = re.compile(r"^## evaluate\n.*?(?=^## |\Z)", re.S | re.M)
    section = text.rstrip("\n") + "\n\n"
    new = pattern.sub(lambda _: section, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(new.rstrip("\n") + "\n", encoding="utf-8")


def main() -> None:
    """Run the benchmark and print (optionally record) a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="synthetic pairs (~90%% land in the test split)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--image-size", type=int, default=128, help="network input side (TrainConfig.image_size)")
    ap.add_argument("--channels", type=str, default="16,32,64,128,256", help="UNet channels")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2, help="decode threads of evaluate")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    ap.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = ap.parse_args()

    import mlflow
    import torch

    import tumorseg.evaluate  # noqa: F401  (imports before timing)
    from tumorseg.inference import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    channels = [int(c) for c in args.channels.split(",")]
    root = Path(tempfile.mkdtemp(prefix="bench-evaluate-"))
    try:
        uri = f"sqlite:///{root / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        manifest, ckpt = prepare(root, args.n, args.size, args.image_size, channels, uri)
        runs_b: list[dict[str, float]] = []
        runs_e: list[dict[str, Any]] = []
        for _ in range(args.repeat):
            runs_b.append(bare(manifest, ckpt, args.batch_size, args.device))
            runs_e.append(evaluate_once(manifest, ckpt, root / "eval", args.batch_size, args.workers, args.device,
                                        uri))
        n = int(runs_b[0]["n"])
        t_bare = min(r["bare"] for r in runs_b)
        t_net = min(r["net"] for r in runs_b)
        best = min(runs_e, key=lambda r: r["total"])
        t_loop = min(r["predict_score"] for r in runs_e)
        c_bare = min(r["bare_cpu"] for r in runs_b)
        c_net = min(r["net_cpu"] for r in runs_b)
        c_eval = min(r["total_cpu"] for r in runs_e)
        load = os.getloadavg()[0]
        device = str(resolve_device(args.device))
        lines = [
            "## evaluate",
            "",
            f"`python benchmarks/bench_evaluate.py --n {args.n} --size {args.size} --image-size {args.image_size} "
            f"--channels {args.channels} --batch-size {args.batch_size} --workers {args.workers} "
            f"--repeat {args.repeat}" + (f" --threads {args.threads}" if args.threads else "") + "`",
            "",
            f"{n} test cases of {args.size}x{args.size} PNG, UNet channels ({args.channels}) at "
            f"{args.image_size}x{args.image_size}, batch {args.batch_size}, device {device}, "
            f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()} (load average {load:.1f} when "
            f"done), best of {args.repeat}. CPU s = this process's CPU time (all its threads): steadier than wall "
            "time on a shared machine.",
            "",
            "| what | wall s | cases/s | wall vs bare | CPU s | CPU vs bare |",
            "|---|---:|---:|---:|---:|---:|",
            f"| network forward only, pre-processed tensors | {t_net:.2f} | {n / t_net:.1f} | "
            f"{t_net / t_bare:.2f}x | {c_net:.2f} | {c_net / c_bare:.2f}x |",
            f"| **bare**: `predict_proba` on pre-decoded images | {t_bare:.2f} | {n / t_bare:.1f} | 1.00x | "
            f"{c_bare:.2f} | 1.00x |",
            f"| evaluate inner loop (decode + predict + score) | {t_loop:.2f} | {n / t_loop:.1f} | "
            f"{t_loop / t_bare:.2f}x | | |",
            f"| **evaluate.run** total | {best['total']:.2f} | {n / best['total']:.1f} | "
            f"{best['total'] / t_bare:.2f}x | {c_eval:.2f} | {c_eval / c_bare:.2f}x |",
            "",
            f"evaluate.run phases (best run): load manifest + model {best['load']:.2f} s, decode + predict + score "
            f"{best['predict_score']:.2f} s, CSVs + summary + plots {best['write']:.2f} s, MLflow logging and the "
            f"rest {best['total'] - best['load'] - best['predict_score'] - best['write']:.2f} s.",
        ]
        text = "\n".join(lines)
        print(text)
        if args.write:
            write_section(text)
            print(f"\nrecorded in {RESULTS}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
