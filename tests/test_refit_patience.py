"""A budget run refits its planned steps to the measured speed; the plan's early-stopping patience keeps its share."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
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


@pytest.mark.parametrize(("image_size", "axes", "passes"), [
    ((32, 32), ["vertical", "horizontal"], 5.0),  # plain + 4 mirrorings
    ((32, 32), ["vertical"], 3.0),
    ((32, 32), ["vertical", "depth"], 3.0),  # an image has no depth to mirror
    ((16, 16, 16), ["vertical", "horizontal", "depth"], 9.0),  # plain + 8: a volume's mirrorings
    ((32, 32), [], 1.0),
])
def test_the_search_is_reserved_one_validation_per_network_pass(image_size: tuple[int, ...], axes: list[str],
                                                                passes: float) -> None:
    from tumorseg.config import AugmentConfig
    from tumorseg.train.postprocess import search_passes

    cfg = TrainConfig(image_size=image_size, model=ModelConfig(channels=[8, 16, 32]), plan="off",
                      augment=AugmentConfig(flip_axes=axes))  # type: ignore[arg-type]
    assert search_passes(cfg) == passes


def test_the_search_scoring_is_timed_on_a_val_case_with_tumour(monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidates' scoring is measured on the first val case holding tumour (the labelling's real cost)."""
    import torch

    from tumorseg.data import RamSplit
    from tumorseg.labels import Classes
    from tumorseg.train import postprocess

    masks = [np.zeros((40, 40), np.uint8), np.zeros((40, 40), np.uint8)]
    masks[1][5:15, 5:15] = 1
    val = RamSplit(case_ids=["empty", "tumour"], images=torch.zeros(2, 1, 16, 16), masks=torch.zeros(2, 1, 16, 16,
                   dtype=torch.uint8), masks_original=masks, fg_pixels=np.array([0, 16]), pixels=256)
    cfg = TrainConfig(image_size=(16, 16), model=ModelConfig(channels=[8, 16, 32]), plan="off")
    scored: list[np.ndarray] = []
    real = postprocess.flat_counts

    def spy(grid: list, plain: np.ndarray, mirrored: np.ndarray, gt: np.ndarray, classes: Classes) -> list:
        scored.append(gt)
        assert len(grid) == len(postprocess.candidates(cfg, classes, 100))  # the search's whole grid
        return real(grid, plain, mirrored, gt, classes)

    monkeypatch.setattr(postprocess, "flat_counts", spy)
    seconds = postprocess.scoring_seconds(val, cfg, Classes())
    assert seconds > 0 and len(scored) == 1 and scored[0] is masks[1]
    # slice stacks: the volumetric candidates are timed on the first stack, once
    stacked: list[list[int]] = []
    real_stack = postprocess.stack_counts

    def stack_spy(grid: list, group: list, classes: Classes) -> np.ndarray:
        stacked.append([case for case, _ in group])
        assert grid and all(post.volumetric for _, _, post in grid)
        return real_stack(grid, group, classes)

    monkeypatch.setattr(postprocess, "stack_counts", stack_spy)
    assert postprocess.scoring_seconds(val, cfg, Classes(), [[0, 1]]) > 0 and stacked == [[0, 1]]
