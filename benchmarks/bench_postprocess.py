"""Re-run the post-processing search on a finished run's best checkpoint (weights unchanged).

How the RESULTS.md rows "with / without the confidence rule" were made: the search of
``tumorseg.train.postprocess.choose`` on the run's val split, with the confidence levels of the
code at hand (``--no-confidence``: only 0, i.e. the search before the rule), scored per unit as training does
(``val_unit``: per case, or per group), with the volumetric candidates where val holds slice stacks
(``--flat``: without them, the search before those). It prints the time,
the choice and the best candidates; with ``--out DIR`` it writes a copy of the run (``best.pt``
with the new choice, ``config.yaml``) for ``tumorseg evaluate DIR``. The run is never modified.

    python benchmarks/bench_postprocess.py runs/busi-unet-... --out /tmp/repicked
    tumorseg evaluate /tmp/repicked --manifest data_manifest/busi --split test
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path


def main() -> None:
    from tumorseg import checkpoint
    from tumorseg.context import SliceStacks
    from tumorseg.inference import Segmenter, resolve_device
    from tumorseg.manifest import load_manifest, select_split
    from tumorseg.train import postprocess
    from tumorseg.train.inputs import load as load_inputs
    from tumorseg.train.runtime import Dist
    from tumorseg.train.validation import val_units

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder with best.pt")
    ap.add_argument("--out", type=Path, default=None, help="write the re-chosen checkpoint here")
    ap.add_argument("--no-confidence", action="store_true", help="search without the confidence rule")
    ap.add_argument("--flat", action="store_true", help="search without the volumetric (per-stack) candidates")
    ap.add_argument("--val-unit", choices=["case", "group"], default=None,
                    help="score per this unit instead of the run's (what rule 9 changes in the search)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    if args.no_confidence:
        postprocess.CONFIDENCES = (0.0,)
    ckpt = checkpoint.load(args.run / "best.pt")
    cfg = checkpoint.train_config(ckpt)
    if args.val_unit is not None:
        cfg.val_unit = args.val_unit
    assert cfg.manifest is not None
    info, df = load_manifest(cfg.manifest)
    source = str(Path(cfg.manifest) / "manifest.csv")
    device = resolve_device(args.device)
    inputs = load_inputs(cfg, info, select_split(df, "train", source), select_split(df, "val", source),
                         int(ckpt["in_channels"]), ckpt, Dist(), device, source)
    assert inputs.val is not None
    seg = Segmenter.from_checkpoint(args.run / "best.pt", device=args.device)
    start = time.perf_counter()
    val_df = select_split(df, "val", source)
    units, unit, _ = val_units(cfg, val_df, inputs.val.case_ids)
    stacks = [] if args.flat else SliceStacks.from_frame(val_df).positions(inputs.val.case_ids)
    print(f"val unit: {unit}; {len(stacks)} slice stacks")
    post, scores = postprocess.choose(seg.net, inputs.val, cfg, device, seg.classes, units, stacks)
    print(f"search: {time.perf_counter() - start:.1f} s; chosen {post.to_dict()}")
    print(f"val Dice (all cases): plain {scores['val_dice_plain']:.4f} -> {scores['val_dice_postprocessed']:.4f}")
    print("| candidate | val Dice |\n|---|---:|")
    for name, score in sorted(scores["candidates"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"| {name} | {score:.4f} |")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        ckpt["postprocess"] = post.to_dict()
        checkpoint.save(args.out / "best.pt", ckpt)
        shutil.copy2(args.run / "config.yaml", args.out / "config.yaml")


if __name__ == "__main__":
    main()
