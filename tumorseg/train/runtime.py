"""The run-time context of training: distributed ranks, seeding, RNG state, optimiser and schedule."""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import TrainConfig

if TYPE_CHECKING:
    import torch


@dataclass
class Dist:
    """The distributed context (a single process is rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the rank that logs, checkpoints and prints."""
        return self.rank == 0


def init_distributed(cfg: TrainConfig) -> Dist:
    """Join the torchrun process group when launched by torchrun."""
    import torch
    import torch.distributed as td

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not td.is_initialized():
        use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
        td.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; in deterministic mode also MONAI's set_determinism."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        from monai.utils import set_determinism

        set_determinism(seed=seed)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The generator for one epoch's shuffle and augmentation."""
    import torch

    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + epoch * 7919 + rank * 104_729) % 2**63)
    return g


def rng_states() -> dict[str, Any]:
    """Python, numpy and torch RNG states as weights_only-loadable values."""
    import torch

    py = random.getstate()
    np_state: Any = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    import torch

    py = states["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    meta = states["numpy_meta"]
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), meta[0], meta[1], meta[2]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def build_optimizer(cfg: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD from the config."""
    import torch

    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True)


def total_steps(cfg: TrainConfig, n_train: int, world: int = 1) -> int:
    """Optimiser steps the run will take: epochs x steps per epoch, capped by ``max_steps``."""
    per_rank = math.ceil(n_train / world)
    per_epoch = per_rank // cfg.batch_size if per_rank >= cfg.batch_size else 1
    steps = cfg.epochs * per_epoch
    return min(steps, cfg.max_steps) if cfg.max_steps is not None else steps


def build_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps: int) -> Any:
    """Plateau on val Dice (stepped per epoch); cosine or poly decay over ``steps`` (per step); or none.

    Cosine and poly start with ``warmup_steps`` of linear warm-up and end at ``min_lr``.
    """
    import torch

    o = cfg.optim
    if o.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max", factor=o.plateau_factor, patience=o.plateau_patience, min_lr=o.min_lr
        )
    if o.schedule in ("cosine", "poly"):
        span = [steps]  # the run's length; a budget run refines it after its first epoch (set_span)
        warm, floor = min(o.warmup_steps, max(0, steps - 1)), o.min_lr / o.lr

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / (warm + 1)
            t = min(1.0, (step - warm) / max(1, span[0] - warm))
            decay = 0.5 * (1 + math.cos(math.pi * t)) if o.schedule == "cosine" else (1 - t) ** 0.9
            return floor + (1 - floor) * decay

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        sched.span = span  # type: ignore[attr-defined]
        return sched
    return None


def set_span(sched: Any, steps: int) -> None:
    """Stretch or shrink a cosine/poly schedule to end at ``steps`` (no-op for other schedules)."""
    span = getattr(sched, "span", None)
    if span is not None:
        span[0] = steps


def steps_per_step(cfg: TrainConfig) -> bool:
    """Whether the schedule steps after every optimiser step (else after every epoch)."""
    return cfg.optim.schedule in ("cosine", "poly")
