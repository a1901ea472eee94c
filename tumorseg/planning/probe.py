"""The throughput probe: a few seconds of real training steps on the device the run will use.

Measured figures are cached (``$XDG_CACHE_HOME/tumorseg/throughput.json``) by device, torch
version, network, input size and batch, so planning the same manifest on the same device
again gives the same plan, and costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.config import LossConfig, ModelConfig
from tumorseg.fsutil import atomic_write_json
from tumorseg.inference import amp_dtype

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Throughput:
    """What one probe measured.

    Attributes:
        train_images_per_second: optimiser steps x batch / seconds (augmentation excluded).
        infer_images_per_second: forward passes in eval mode x batch / seconds.
        bytes_per_image: peak CUDA memory per training image (0 on the CPU).
    """

    train_images_per_second: float
    infer_images_per_second: float
    bytes_per_image: float = 0.0


def cache_path() -> Path:
    """Where measured throughputs are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tumorseg" / "throughput.json"


def device_label(device: torch.device) -> str:
    """``cuda:NVIDIA H200`` or ``cpu:2 threads``."""
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"cpu:{torch.get_num_threads()} threads"


def _key(model: ModelConfig, loss: LossConfig, in_channels: int, size: tuple[int, ...], batch: int,
         device: torch.device, amp: bool) -> str:
    import torch

    blob = json.dumps({"model": model.model_dump(mode="json"), "loss": loss.model_dump(mode="json"),
                       "in": in_channels, "size": list(size), "batch": batch, "device": device_label(device),
                       "torch": torch.__version__, "amp": amp, "dtype": str(amp_dtype(device, amp)),
                       "channels_last": True}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def measure(model: ModelConfig, loss: LossConfig, in_channels: int, size: tuple[int, ...], batch: int,
            device: torch.device, amp: bool = True, seconds: float = 2.0, use_cache: bool = True) -> Throughput:
    """Train and infer for about ``seconds`` each on random data of the run's shape; cached."""
    key = _key(model, loss, in_channels, size, batch, device, amp)
    path = cache_path()
    cache: dict[str, Any] = {}
    if use_cache:
        try:
            cache = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return Throughput(**cache[key])
    result = _run(model, loss, in_channels, size, batch, device, amp, seconds)
    log.info("probe %s %s batch %d on %s: %.1f train img/s, %.1f infer img/s", model.name, "x".join(map(str, size)),
             batch, device_label(device), result.train_images_per_second, result.infer_images_per_second)
    if use_cache:
        cache[key] = asdict(result)
        try:
            atomic_write_json(path, cache)
        except OSError as exc:  # a read-only home: the plan is still right, only not cached
            log.debug("throughput cache not written: %s", exc)
    return result


def _run(model: ModelConfig, loss_cfg: LossConfig, in_channels: int, size: tuple[int, ...], batch: int,
         device: torch.device, amp: bool, seconds: float) -> Throughput:
    import torch

    from tumorseg.model import build_loss, build_model, channels_last, main_output

    gen = torch.Generator().manual_seed(0)
    net = build_model(model, in_channels, spatial_dims=len(size)).to(device)
    net = channels_last(net)  # as train runs
    loss_fn = build_loss(loss_cfg)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.9)
    x = channels_last(torch.randn(batch, in_channels, *size, generator=gen).to(device))
    y = (torch.rand(batch, 1, *size, generator=gen) > 0.9).float().to(device)
    dtype = amp_dtype(device, amp)
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(step: Any, budget: float) -> float:
        step()  # warm-up, untimed: allocations, cudnn autotune, oneDNN primitives on the CPU
        sync()
        n, t0 = 0, time.perf_counter()
        while True:
            step()
            n += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= budget or n >= 200:
                return n * batch / elapsed

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast:
            value = loss_fn(net(x), y)
        value.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    net.train()
    train_ips = timed(train_step, seconds)
    peak = float(torch.cuda.max_memory_allocated(device)) / batch if device.type == "cuda" else 0.0
    net.eval()

    def infer_step() -> None:
        with torch.inference_mode(), autocast:
            main_output(net(x), x.dim())

    infer_ips = timed(infer_step, seconds / 2)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Throughput(train_ips, infer_ips, peak)
