"""Ingest throughput: ``tumorseg.ingest.run`` vs a bare read + hash + decode loop.

Both sides do the unavoidable work on the same synthetic pairs with the same number of
worker processes:

  (a) ingest: the real ``tumorseg.ingest.run`` (discovery, decoding and validation of every
      image and mask, splits, the three output files, MLflow run). Reported with and without
      the time spent in MLflow logging (``_track``), measured separately;
  (b) bare: a ``multiprocessing.Pool`` loop that reads each image and mask, hashes the bytes
      with SHA-256 and decodes them with Pillow - nothing else.

Each side runs ``--repeat`` times, alternating, and the best time counts (the machine is
shared). Target: ingest without MLflow >= 0.8x the bare loop.

    python benchmarks/bench_ingest.py --n 1000 --workers 2
"""

from __future__ import annotations

import argparse
import hashlib
import io
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _bare_one(paths: tuple[str, str]) -> tuple[str, str, tuple[int, ...]]:
    import numpy as np
    from PIL import Image

    out = []
    shape: tuple[int, ...] = ()
    for p in paths:
        with open(p, "rb") as fh:
            data = fh.read()
        out.append(hashlib.sha256(data).hexdigest())
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            shape = np.asarray(img).shape
    return out[0], out[1], shape


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the pool workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def bare_loop(pairs: list[tuple[str, str]], workers: int) -> tuple[float, float]:
    """Wall and CPU seconds for the bare read + sha256 + decode of every pair in a pool of ``workers``."""
    t0, c0 = time.perf_counter(), _cpu()
    chunk = max(1, min(32, len(pairs) // (workers * 8)))  # the chunking ingest uses
    with mp.get_context("fork").Pool(workers) as pool:
        n = sum(1 for _ in pool.imap(_bare_one, pairs, chunksize=chunk))
    assert n == len(pairs)
    return time.perf_counter() - t0, _cpu() - c0


def ingest_once(cfg: Any) -> tuple[float, float, float, float, int]:
    """Wall and CPU seconds for ``ingest.run``, the same spent inside MLflow logging, and the case count."""
    from tumorseg import ingest

    spent = {"wall": 0.0, "cpu": 0.0}
    real_track = ingest._track

    def timed_track(*args: Any, **kwargs: Any) -> str:
        t, c = time.perf_counter(), time.process_time()  # MLflow runs in this process
        try:
            return real_track(*args, **kwargs)
        finally:
            spent["wall"] += time.perf_counter() - t
            spent["cpu"] += time.process_time() - c

    ingest._track = timed_track  # type: ignore[assignment]
    try:
        t0, c0 = time.perf_counter(), _cpu()
        res = ingest.run(cfg)
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
    finally:
        ingest._track = real_track  # type: ignore[assignment]
    return wall, cpu, spent["wall"], spent["cpu"], res.n_cases


def main() -> None:
    from tumorseg import synth
    from tumorseg.config import IngestConfig, TrackingConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="synthetic image/mask pairs")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="processes on both sides")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the best counts")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_ingest_"))
    uri = f"sqlite:///{tmp}/mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = uri  # never ./mlflow.db
    try:
        t0 = time.perf_counter()
        syn = synth.run(tmp / "data", n=args.n, size=args.size, seed=0)
        t_synth = time.perf_counter() - t0
        pairs = sorted(
            (str(p), str(syn.masks_dir / p.name)) for p in syn.images_dir.iterdir() if p.suffix == ".png"
        )
        cfg = IngestConfig(images_dir=syn.images_dir, masks_dir=syn.masks_dir, name="bench", out_dir=tmp / "dm",
                           group_pattern=synth.GROUP_PATTERN, workers=args.workers,
                           tracking=TrackingConfig(uri=uri, experiment="bench_ingest"))
        # one-off costs that are not ingest's: importing mlflow and creating the SQLite schema
        t0 = time.perf_counter()
        import mlflow

        mlflow.MlflowClient(uri).search_experiments()
        t_mlflow_setup = time.perf_counter() - t0

        bare: list[tuple[float, float]] = []
        runs: list[tuple[float, float, float, float]] = []
        n_cases = 0
        for _ in range(args.repeat):  # alternate, so both sides see the same machine load
            bare.append(bare_loop(pairs, args.workers))
            *times, n_cases = ingest_once(cfg)
            runs.append((times[0], times[1], times[2], times[3]))
        assert n_cases == len(pairs), (n_cases, len(pairs))

        n = len(pairs)
        rows = {
            "bare read+sha256+decode": (min(w for w, _ in bare), min(c for _, c in bare)),
            "ingest (no MLflow)": (min(w - tw for w, _, tw, _ in runs), min(c - tc for _, c, _, tc in runs)),
            "ingest (with MLflow)": (min(w for w, _, _, _ in runs), min(c for _, c, _, _ in runs)),
        }
        bw, bc = rows["bare read+sha256+decode"]
        print(f"{n} pairs at {args.size}x{args.size}, {args.workers} worker(s), best of {args.repeat}; "
              f"cpu_count={os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; synth took {t_synth:.1f} s, "
              f"mlflow import+db {t_mlflow_setup:.1f} s")
        print(f"{'method':<26}{'wall s':>8}{'pairs/s':>9}{'vs bare':>9}{'cpu s':>8}{'pairs/cpu-s':>13}{'vs bare':>9}")
        for label, (w, c) in rows.items():
            print(f"{label:<26}{w:>8.2f}{n / w:>9.0f}{bw / w:>8.2f}x{c:>8.2f}{n / c:>13.0f}{bc / c:>8.2f}x")
        print(f"MLflow logging inside ingest: {min(r[2] for r in runs):.2f} s wall; every run (wall s): bare "
              f"{[round(w, 2) for w, _ in bare]}, ingest {[round(r[0], 2) for r in runs]}, "
              f"of which MLflow {[round(r[2], 2) for r in runs]}")
        wall_ratio, cpu_ratio = bw / rows["ingest (no MLflow)"][0], bc / rows["ingest (no MLflow)"][1]
        verdict = "meets" if wall_ratio >= 0.8 else "MISSES"
        print(f"ingest/bare throughput without MLflow: {wall_ratio:.2f} wall ({verdict} the 0.8 target), "
              f"{cpu_ratio:.2f} per CPU second")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
