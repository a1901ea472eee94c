"""A budget run refits its planned steps to the measured speed; the plan's early-stopping patience keeps its share."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tumorseg.config import ModelConfig, TrainConfig
from tumorseg.planning.rules import patience
from tumorseg.train.loop import State, TrainContext, _refine_steps
from tumorseg.train.runtime import Dist


def context(refine_patience: bool, tmp_path: Path) -> TrainContext:
    import torch

    cfg = TrainConfig(image_size=(32, 32), model=ModelConfig(channels=[8, 16, 32]), plan="off", batch_size=8,
                      epochs=30, max_steps=300, early_stopping_patience=10)
    net = torch.nn.Linear(1, 1)
    return TrainContext(cfg=cfg, net=net, loss_fn=torch.nn.MSELoss(), opt=torch.optim.SGD(net.parameters(), lr=0.1),
                        sched=None, scaler=None, device=torch.device("cpu"), dist=Dist(), in_channels=1, stats=None,
                        manifest_digest="", manifest_name="", run_dir=tmp_path,
                        deadline=time.perf_counter() + 1000.0, val_seconds=0.0, finish_seconds=0.0,
                        refine_steps=True, refine_patience=refine_patience)


def test_patience_rule() -> None:
    assert [patience(e) for e in (1, 30, 31, 69, 111)] == [10, 10, 10, 23, 37]


@pytest.mark.parametrize("refine_patience", [True, False])
def test_a_longer_refitted_run_keeps_the_plans_share_of_patience(refine_patience: bool, tmp_path: Path) -> None:
    ctx = context(refine_patience, tmp_path)
    # 80 images in 1 s (10 steps of 8): ~1000 s left buy ~9,500 more steps, i.e. ~950 epochs of 10 steps
    _refine_steps(ctx, train_seconds=1.0, seen=80, state=State(epoch=1, global_step=10))
    assert ctx.cfg.max_steps is not None and ctx.cfg.max_steps > 9000
    assert ctx.cfg.epochs == -(-ctx.cfg.max_steps // 10)
    # a patience the user set (--set early_stopping_patience=10) is theirs: only the plan's is refitted
    assert ctx.cfg.early_stopping_patience == (patience(ctx.cfg.epochs) if refine_patience else 10)
