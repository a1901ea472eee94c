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

``--formats`` adds a row per file format: the same pairs converted to JPEG (JPEG masks too), BMP,
TIFF, DICOM, NRRD and MHA, ingested, against a bare read + SHA-256 + decode loop of the library that
format goes through (Pillow, tifffile, pydicom, SimpleITK).

    python benchmarks/bench_ingest.py --n 1000 --workers 2
    python benchmarks/bench_ingest.py --n 500 --workers 2 --formats
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


def _bare_format(paths: tuple[str, str]) -> int:
    """The bare loop for any format: read, SHA-256, decode with that format's own library."""
    import numpy as np

    size = 0
    for p in paths:
        with open(p, "rb") as fh:
            data = fh.read()
        hashlib.sha256(data).hexdigest()
        ext = os.path.splitext(p)[1].lower()
        if ext in (".png", ".jpg", ".bmp"):
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                img.load()
                size += np.asarray(img).size
        elif ext == ".tif":
            import tifffile

            size += tifffile.imread(io.BytesIO(data)).size
        elif ext == ".dcm":
            import pydicom

            size += pydicom.dcmread(io.BytesIO(data)).pixel_array.size
        else:
            import SimpleITK as sitk

            size += sitk.GetArrayFromImage(sitk.ReadImage(p)).size
    return size


FORMATS = ("png", "jpg", "bmp", "tif", "dcm", "nrrd", "mha")


def convert(pairs: list[tuple[str, str]], fmt: str, out: Path) -> tuple[Path, Path, list[tuple[str, str]]]:
    """The pairs written again as ``fmt`` (images and masks alike) into ``out/images`` and ``out/masks``."""
    import numpy as np
    from PIL import Image

    images, masks = out / "images", out / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    converted = []
    for img_path, mask_path in pairs:
        stem = Path(img_path).stem
        pair = []
        for src, folder in ((img_path, images), (mask_path, masks)):
            with Image.open(src) as im:
                arr = np.asarray(im.convert("L"))
            dst = folder / f"{stem}.{fmt}"
            if fmt in ("png", "jpg", "bmp"):
                Image.fromarray(arr).save(dst, quality=90) if fmt == "jpg" else Image.fromarray(arr).save(dst)
            elif fmt == "tif":
                import tifffile

                tifffile.imwrite(dst, arr)
            elif fmt == "dcm":
                from pydicom.dataset import Dataset, FileMetaDataset
                from pydicom.uid import ExplicitVRLittleEndian, generate_uid

                meta = FileMetaDataset()
                meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # ultrasound image storage
                meta.MediaStorageSOPInstanceUID = generate_uid()
                meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds = Dataset()
                ds.file_meta = meta
                ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, generate_uid(), "US"
                ds.Rows, ds.Columns = arr.shape
                ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
                ds.BitsAllocated = ds.BitsStored = 8
                ds.HighBit, ds.PixelRepresentation = 7, 0
                ds.PixelData = arr.tobytes()
                ds.save_as(dst, enforce_file_format=True)
            else:
                import SimpleITK as sitk

                sitk.WriteImage(sitk.GetImageFromArray(arr), str(dst))
            pair.append(str(dst))
        converted.append((pair[0], pair[1]))
    return images, masks, converted


def format_rows(pairs: list[tuple[str, str]], tmp: Path, workers: int, repeat: int, uri: str) -> None:
    """One row per format: ingest (no MLflow) against the bare loop of the format's own library."""
    from tumorseg import synth
    from tumorseg.config import IngestConfig, TrackingConfig

    print(f"\nper format: {len(pairs)} pairs (grey), {workers} worker(s), best of {repeat}")
    print(f"{'format':<8}{'bare pairs/s':>14}{'ingest pairs/s':>16}{'ingest/bare':>13}{'MB on disk':>12}")
    for fmt in FORMATS:
        images, masks, converted = convert(pairs, fmt, tmp / f"fmt_{fmt}")
        mb = sum(os.path.getsize(p) for pair in converted for p in pair) / 1e6
        cfg = IngestConfig(images_dir=images, masks_dir=masks, name=f"bench_{fmt}", out_dir=tmp / "dm",
                           group_pattern=synth.GROUP_PATTERN, workers=workers,
                           tracking=TrackingConfig(uri=uri, experiment="bench_ingest"))
        bare, ing = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            with mp.get_context("fork").Pool(workers) as pool:
                list(pool.imap(_bare_format, converted, chunksize=max(1, min(32, len(converted) // (workers * 8)))))
            bare.append(time.perf_counter() - t0)
            wall, _, track_wall, _, n_cases = ingest_once(cfg)
            assert n_cases == len(converted), (fmt, n_cases)
            ing.append(wall - track_wall)
        b, i = min(bare), min(ing)
        n = len(converted)
        print(f"{fmt:<8}{n / b:>14.0f}{n / i:>16.0f}{b / i:>12.2f}x{mb:>12.1f}")


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
    from tumorseg.ingest import stage as ingest

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
    ap.add_argument("--formats", action="store_true", help="also a row per file format (JPEG, BMP, TIFF, DICOM, "
                    "NRRD, MHA)")
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
        if args.formats:
            format_rows(pairs, tmp, args.workers, args.repeat, uri)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
