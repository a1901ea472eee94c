"""Helpers shared by several test modules (real files, real processes; no fixtures here)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from tumorseg.config import IngestConfig, TrackingConfig
from tumorseg.errors import TumorsegError


def ingest_synth(images: Path, masks: Path, out_dir: Path, name: str, tracking: TrackingConfig | None = None,
                 slice_axis: int | None = None) -> Path:
    """Ingest by patient, retrying with the seed ingest suggests when a split lacks tumour cases.

    ``slice_axis``: cut volumes into slices along it (slice mode); default: each volume one case.
    """
    from tumorseg import ingest

    seed = 3
    for _ in range(3):
        try:
            res = ingest.run(IngestConfig(images_dir=images, masks_dir=masks, name=name, out_dir=out_dir,
                                          group_pattern=r"(patient_\d+)", seed=seed, workers=1,
                                          tracking=tracking or TrackingConfig(), slice_axis=slice_axis))
            return res.manifest_dir
        except TumorsegError as exc:
            m = re.search(r"pass --seed (\d+)", str(exc))
            if not m:
                raise
            seed = int(m.group(1))
    raise AssertionError("ingest kept refusing the suggested seed")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a server's PID, wait, SIGKILL if needed; then any worker it left, by PID."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for child in children:
        try:
            child.terminate()
            child.wait(timeout=10)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            child.kill()


def kill_at_epoch(proc: subprocess.Popen[bytes], last: Path, epoch: int, timeout: float) -> int:
    """SIGKILL a training process once its ``last.pt`` records ``epoch`` (or later); the epoch it was killed at."""
    from tumorseg.checkpoint import load as load_checkpoint

    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists() and load_checkpoint(last)["epoch"] >= epoch:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return int(load_checkpoint(last)["epoch"])
