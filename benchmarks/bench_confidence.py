"""Post-processing rules and ensembling on finished runs, chosen on val, scored on test (weights unchanged).

How the RESULTS.md table "what post-processing and ensembling can still buy" was made. Each run's best
checkpoint predicts val and test (plainly and, where the model flips, mirrored); then, for each way of
measuring a component's confidence, the (mirroring, threshold, confidence) that maximises mean val Dice
over all val cases (the post-processing search's objective) is applied to test. Measures: ``mean`` (the
product's rule: the mean probability of the component cut at the threshold), ``max`` (its peak
probability) and ``core`` (the mean over its pixels above 0.5, so independent of the threshold). With
several runs, the mean of their probabilities (an ensemble) is scored the same way.

    python benchmarks/bench_confidence.py runs/busi-unet-A runs/busi-unet-B --manifest data_manifest/busi
"""

from __future__ import annotations

import argparse
from itertools import product
from pathlib import Path

import numpy as np

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
CONFIDENCES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MEASURES = ("mean", "max", "core")

Cases = list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]
"""Per case: plain probabilities, mirrored ones (``None``: the model does not flip), the true mask."""


def predict(run: Path, manifest: Path, split: str) -> Cases:
    """A run's best checkpoint on one split of ``manifest``, at the original resolution (float16)."""
    from tumorseg import checkpoint
    from tumorseg.inference import Segmenter, resolve_device
    from tumorseg.manifest import load_manifest, select_split
    from tumorseg.train.inputs import load as load_inputs
    from tumorseg.train.runtime import Dist
    from tumorseg.train.validation import val_probabilities

    ckpt = checkpoint.load(run / "best.pt")
    cfg = checkpoint.train_config(ckpt).model_copy(update={"cache": "ram", "manifest": manifest})
    info, df = load_manifest(manifest)
    source = str(manifest / "manifest.csv")
    device = resolve_device("cpu")
    data = load_inputs(cfg, info, select_split(df, "train", source), select_split(df, split, source),
                       int(ckpt["in_channels"]), ckpt, Dist(), device, source).val
    assert data is not None
    seg = Segmenter.from_checkpoint(run / "best.pt", device="cpu")
    plain = [p.astype(np.float16) for p in val_probabilities(seg.net, data, cfg, device)]
    mirrored: list[np.ndarray | None] = [None] * len(plain)
    if cfg.augment.flip_dims:
        mirrored = [p.astype(np.float16) for p in val_probabilities(seg.net, data, cfg, device, tta=True)]
    return [(p, m, data.original_mask(i) > 0) for i, (p, m) in enumerate(zip(plain, mirrored, strict=True))]


def case_scores(prob: np.ndarray, gt: np.ndarray) -> dict[tuple[str, float, float], float]:
    """Dice of one case under every (measure, threshold, confidence); NaN where both masks are empty."""
    from tumorseg.inference import component_means, components
    from tumorseg.metrics import confusion, dice

    prob = prob.astype(np.float32)
    core = (prob > 0.5).astype(np.float32)
    out = {}
    for t in THRESHOLDS:
        labels, sizes = components(prob > t)
        peak = np.zeros(sizes.size)
        np.maximum.at(peak, labels.ravel(), prob.ravel())
        core_n = np.bincount(labels.ravel(), weights=core.ravel(), minlength=sizes.size)
        core_mean = np.bincount(labels.ravel(), weights=(prob * core).ravel(), minlength=sizes.size)
        conf = {"mean": component_means(labels, sizes, prob), "max": peak,
                "core": core_mean / np.maximum(core_n, 1)}
        for measure, c in product(MEASURES, CONFIDENCES):
            alive = conf[measure] >= c
            alive[0] = False
            out[(measure, t, c)] = dice(confusion(alive[labels], gt))
    return out


def summary(scores: list[dict[tuple[str, float, float], float]], has_tumour: np.ndarray,
            key: tuple[str, float, float]) -> tuple[float, float, int]:
    """(mean Dice over all scored cases, mean over cases with tumour, false positives on tumour-free cases)."""
    v = np.array([s[key] for s in scores])
    fp = int(np.sum(~has_tumour & (v == 0)))
    return float(np.nanmean(v)), float(np.nanmean(np.where(has_tumour, v, np.nan))), fp


def report(name: str, val: Cases, test: Cases) -> None:
    """Print one row per measure (and the plain prediction): chosen on val, scored on test."""
    ttas = (False, True) if val[0][1] is not None else (False,)
    sv = {tta: [case_scores(m if tta and m is not None else p, g) for p, m, g in val] for tta in ttas}
    st = {tta: [case_scores(m if tta and m is not None else p, g) for p, m, g in test] for tta in ttas}
    hv = np.array([g.any() for _, _, g in val])
    ht = np.array([g.any() for _, _, g in test])
    rows = [("plain t 0.5", False, ("mean", 0.5, 0.0))]
    for measure in MEASURES:
        cands = [(tta, k) for tta in ttas for k in sv[tta][0] if k[0] == measure]
        tta, key = max(cands, key=lambda c: summary(sv[c[0]], hv, c[1])[0])
        rows.append((f"{measure}: t {key[1]}, conf {key[2]}{', mirrored' if tta else ''}", tta, key))
    for label, tta, key in rows:
        va, vt, vf = summary(sv[tta], hv, key)
        ta, tt, tf = summary(st[tta], ht, key)
        print(f"| {name} | {label} | {va:.3f} | {vt:.3f} | {vf}/{int((~hv).sum())} | {ta:.3f} | {tt:.3f} | "
              f"{tf}/{int((~ht).sum())} |", flush=True)


def mean_of(runs: list[Cases]) -> Cases:
    """The ensemble: per case, the mean of the runs' probabilities."""
    out: Cases = []
    for cases in zip(*runs, strict=True):
        plain = np.mean([c[0].astype(np.float32) for c in cases], axis=0)
        mirrored = None if cases[0][1] is None else np.mean([np.asarray(c[1], np.float32) for c in cases], axis=0)
        out.append((plain, mirrored, cases[0][2]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run folders with best.pt")
    ap.add_argument("--manifest", type=Path, required=True)
    args = ap.parse_args()
    print("| run | post-processing (chosen on val) | val Dice (all) | val Dice (tumour) | val FP | "
          "test Dice (all) | test Dice (tumour) | test FP |\n|---|---|---:|---:|---:|---:|---:|---:|")
    preds = []
    for run in args.runs:
        val, test = predict(run, args.manifest, "val"), predict(run, args.manifest, "test")
        report(run.name, val, test)
        preds.append((val, test))
    if len(preds) > 1:
        report(f"mean of {len(preds)} runs", mean_of([v for v, _ in preds]), mean_of([t for _, t in preds]))


if __name__ == "__main__":
    main()
