"""``tumorseg train``: a MONAI U-Net with Dice loss on the manifest's train split.

Each epoch trains, then validates on ``val`` (per-case Dice at the original resolution,
with the counts and empty-mask rule of :mod:`tumorseg.metrics`); mean val Dice drives the
best checkpoint, early stopping and the LR schedule. ``last.pt`` (every epoch) and
``best.pt`` are written atomically (:mod:`tumorseg.checkpoint`) and hold everything needed
for an exact resume. Under ``torchrun`` the model is wrapped in DDP (NCCL on CUDA, gloo on
CPU), each rank trains on its shard and rank 0 alone validates, logs, checkpoints and prints.

Modules: :mod:`.stage` (set-up and the entry points), :mod:`.loop` (epochs, steps,
validation), :mod:`.runtime` (ranks, seeds, RNG state, optimiser and schedule).
"""

from tumorseg.train.stage import TrainResult, resume, run

__all__ = ["TrainResult", "resume", "run"]
