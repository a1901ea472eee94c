"""The plan of a training run: made (or loaded), applied under the user's settings, written, shown."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.config import TrainConfig
from tumorseg.train.runtime import Dist

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def planned(cfg: TrainConfig, info: Any, df: Any, device: torch.device, dist: Dist,
             run_dir: Path) -> tuple[TrainConfig, Any]:
    """Plan (or load the plan given), apply it under the user's settings, write it into the run folder.

    Under DDP rank 0 plans and the others receive its plan, so every rank trains the same way.
    """
    from tumorseg import planning

    source = str(Path(str(cfg.manifest)) / "manifest.csv")
    plan = fp = None
    if dist.main:
        if cfg.plan == "auto":
            plan, fp = planning.make(cfg, info, df, device, source)
        else:
            plan = planning.load(Path(cfg.plan), info)
    if dist.world > 1:
        import torch.distributed as td

        box = [plan.model_dump_json() if plan is not None else None]
        td.broadcast_object_list(box, src=0)
        plan = planning.Plan.model_validate_json(str(box[0]))
    assert plan is not None
    merged, overrides = planning.apply(cfg, plan)
    plan = plan.model_copy(update={"overrides": overrides})
    if dist.main:
        if fp is None:
            from tumorseg.manifest import select_split
            from tumorseg.planning.fingerprint import compute

            fp = compute(info, select_split(df, "train", source), source)
        planning.write(run_dir, plan, fp)
        show(plan)
    return merged, plan


def show(plan: Any) -> None:
    """The plan as a short table on a terminal, as log lines otherwise."""
    from tumorseg import planning
    from tumorseg.progress import is_interactive

    rows = planning.summary_rows(plan)
    if not is_interactive():
        for key, value in rows:
            log.info("plan: %s: %s", key, value)
        return
    from tumorseg.report import print_rows

    print_rows(f"plan for {plan.manifest_name}", rows, stderr=True)
