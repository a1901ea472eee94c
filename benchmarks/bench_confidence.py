"""Post-processing rules and ensembling on finished runs, chosen on val, scored on test (weights unchanged).

How the RESULTS.md tables on the component-confidence measure were made. Each run's best checkpoint
predicts val and test (plainly and, where the model flips, mirrored); then, for each way of measuring a
component's confidence, the (mirroring, threshold, confidence) that maximises mean val Dice over all val
cases (the post-processing search's objective) is applied to test. Measures: ``mean`` (the mean
probability of the component cut at the threshold, the rule until 802b90f), ``peak`` (its highest
probability: hysteresis thresholding, the rule since) and ``core`` (the mean over its pixels above 0.5,
independent of the threshold). With several runs, the mean of their probabilities (an ensemble) is scored
the same way.

Choosing the measure without test data: ``--halves N`` also splits val into random halves N times,
chooses each measure's setting on one half and scores it on the other (mean held-out val Dice over all
cases), so the measure that generalises better is seen on val alone.

    python benchmarks/bench_confidence.py runs/busi-unet-A runs/busi-unet-B --manifest data_manifest/busi
"""

from __future__ import annotations

import argparse
from itertools import product
from pathlib import Path

import numpy as np

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
CONFIDENCES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
MEASURES = ("mean", "peak", "core")

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
    from tumorseg.inference import component_confidence, components
    from tumorseg.metrics import confusion, dice

    prob = prob.astype(np.float32)
    core = (prob > 0.5).astype(np.float32)
    out = {}
    for t in THRESHOLDS:
        labels, sizes = components(prob > t)
        core_n = np.bincount(labels.ravel(), weights=core.ravel(), minlength=sizes.size)
        core_mean = np.bincount(labels.ravel(), weights=(prob * core).ravel(), minlength=sizes.size)
        conf = {"mean": component_confidence(labels, sizes, prob, "mean"),
                "peak": component_confidence(labels, sizes, prob, "peak"),
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


def scores_of(cases: Cases, ttas: tuple[bool, ...]) -> dict[bool, list[dict[tuple[str, float, float], float]]]:
    """Per mirroring: every case's Dice under every (measure, threshold, confidence)."""
    return {tta: [case_scores(m if tta and m is not None else p, g) for p, m, g in cases] for tta in ttas}


def held_out(sv: dict[bool, list[dict[tuple[str, float, float], float]]], halves: int) -> dict[str, float]:
    """Per measure: mean Dice (all cases) on one random half of val of the setting chosen on the other half."""
    keys = [(tta, k) for tta in sv for k in sv[tta][0]]
    table = np.array([[case[k] for case in sv[tta]] for tta, k in keys])  # settings x cases
    rng = np.random.default_rng(0)
    got: dict[str, list[float]] = {m: [] for m in MEASURES}
    n = table.shape[1]
    for _ in range(halves):
        order = rng.permutation(n)
        choose_on, score_on = np.nanmean(table[:, order[: n // 2]], 1), np.nanmean(table[:, order[n // 2 :]], 1)
        for measure in MEASURES:
            rows = [i for i, (_, k) in enumerate(keys) if k[0] == measure]
            got[measure].append(float(score_on[rows[int(np.nanargmax(choose_on[rows]))]]))
    return {m: float(np.mean(v)) for m, v in got.items()}


def report(name: str, val: Cases, test: Cases, halves: int = 0) -> None:
    """Print one row per measure (and the plain prediction): chosen on val, scored on test."""
    ttas = (False, True) if val[0][1] is not None else (False,)
    sv, st = scores_of(val, ttas), scores_of(test, ttas)
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
    if halves:
        print(f"| {name} | held-out val Dice (all), {halves} random halves: "
              + ", ".join(f"{m} {v:.4f}" for m, v in held_out(sv, halves).items()) + " | | | | | | |", flush=True)


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
    ap.add_argument("--halves", type=int, default=0, help="random val halves for the held-out choice (e.g. 500)")
    args = ap.parse_args()
    print("| run | post-processing (chosen on val) | val Dice (all) | val Dice (tumour) | val FP | "
          "test Dice (all) | test Dice (tumour) | test FP |\n|---|---|---:|---:|---:|---:|---:|---:|")
    preds = []
    for run in args.runs:
        val, test = predict(run, args.manifest, "val"), predict(run, args.manifest, "test")
        report(run.name, val, test, args.halves)
        preds.append((val, test))
    if len(preds) > 1:
        report(f"mean of {len(preds)} runs", mean_of([v for v, _ in preds]), mean_of([t for _, t in preds]),
               args.halves)


if __name__ == "__main__":
    main()
