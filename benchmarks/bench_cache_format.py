"""How to store the training cache: read speed, resident memory and disk of candidate formats.

The same ``--cases`` float16 images (256², ultrasound-like: smooth structure plus speckle, the
way the cache holds them, scaled to [-1, 1]) and uint8 masks are written in each format, then
read back as training reads them: ``--batches`` random batches of 8. Each format is read in a
fresh process, which reports the read rate and how much its resident memory grew (pages a
memory mapping touches count in RSS).

Formats: ``npy+pread`` (what tumorseg uses: ``.npy`` files, rows read with ``os.pread`` into a
buffer), ``npy+memmap`` (the same files through ``np.load(mmap_mode="r")``), and, when the
package is installed, ``blosc2`` (one compressed chunk per case; not a tumorseg dependency).

    python benchmarks/bench_cache_format.py --cases 20000 --batches 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 256

READ = r"""
import json, os, resource, sys, time
import numpy as np
fmt, folder, n, batches = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(1)
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 2**20
base = rss()
row = 2 * 256 * 256
if fmt == "npy+pread":
    fd = os.open(os.path.join(folder, "images.npy"), os.O_RDONLY)
    with open(os.path.join(folder, "images.npy"), "rb") as f:
        np.lib.format.read_magic(f); np.lib.format.read_array_header_1_0(f); header = f.tell()
    def read(idx):
        out = np.empty((len(idx), 1, 256, 256), np.float16)
        flat = out.view(np.uint8).reshape(len(idx), row)
        for j, i in enumerate(idx):
            os.preadv(fd, [flat[j].data], header + int(i) * row)
        return out
elif fmt == "npy+memmap":
    arr = np.load(os.path.join(folder, "images.npy"), mmap_mode="r")
    def read(idx):
        return np.ascontiguousarray(arr[np.sort(idx)])
else:
    import blosc2
    arr = blosc2.open(os.path.join(folder, "images.b2nd"))
    def read(idx):
        return np.stack([arr[int(i)] for i in idx])
t0 = time.perf_counter()
total = 0.0
for _ in range(batches):
    total += float(read(rng.integers(0, n, 8))[:, 0, 0, 0].astype(np.float32).sum())
dt = time.perf_counter() - t0
print(json.dumps({"images_per_second": 8 * batches / dt, "rss_growth_gib": rss() - base}))
"""


def write(folder: Path, n: int, fmt: str) -> tuple[float, float]:
    """Write ``n`` cases in ``fmt``; (seconds, GiB on disk)."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if fmt.startswith("npy"):
        with open(folder / "images.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False,
                                                     "shape": (n, 1, SIZE, SIZE)})
            for _ in range(n):
                f.write(_case(rng, yy, xx).tobytes())
    else:
        import blosc2

        arr = blosc2.empty((n, 1, SIZE, SIZE), dtype=np.float16, chunks=(1, 1, SIZE, SIZE),
                           blocks=(1, 1, 64, SIZE), urlpath=str(folder / "images.b2nd"), mode="w")
        for i in range(n):
            arr[i] = _case(rng, yy, xx)
    seconds = time.perf_counter() - t0
    return seconds, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**30


def _case(rng, yy, xx):  # type: ignore[no-untyped-def]
    import numpy as np

    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.2)
    smooth = 0.4 + 0.3 * np.sin(6 * yy + rng.uniform(0, 6)) * np.cos(4 * xx) - 0.3 * (
        ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
    speckle = rng.rayleigh(0.15, size=(SIZE, SIZE)).astype(np.float32)
    return np.clip(smooth * speckle * 3, -1, 1).astype(np.float16)[None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tumorseg-fmt-"))
    formats = ["npy+pread", "npy+memmap"]
    try:
        import blosc2  # noqa: F401

        formats.append("blosc2")
    except ImportError:
        print("blosc2 not installed: not measured", file=sys.stderr)
    rows = []
    try:
        npy_written = None
        for fmt in formats:
            folder = work / ("blosc2" if fmt == "blosc2" else "npy")
            if fmt.startswith("npy") and npy_written is not None:
                written = npy_written
            else:
                written = write(folder, args.cases, fmt)
                if fmt.startswith("npy"):
                    npy_written = written
            subprocess.run(["sync"], check=False)
            best = None
            for _ in range(2):  # the second pass reads from the page cache, as later epochs do
                proc = subprocess.run([sys.executable, "-c", READ, fmt, str(folder), str(args.cases),
                                       str(args.batches)], capture_output=True, text=True, check=True)
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                best = res if best is None or res["images_per_second"] > best["images_per_second"] else best
            rows.append((fmt, *written, best))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.cases:,} cases of 256² float16, {args.batches} random batches of 8 read per run\n")
    print("| format | write s | disk GiB | read img/s | RSS growth while reading GiB |")
    print("|---|---:|---:|---:|---:|")
    for fmt, seconds, gib, res in rows:
        print(f"| {fmt} | {seconds:.0f} | {gib:.2f} | {res['images_per_second']:.0f} | "
              f"{res['rss_growth_gib']:.2f} |")


if __name__ == "__main__":
    main()
