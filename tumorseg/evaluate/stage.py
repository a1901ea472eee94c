"""``tumorseg evaluate``: score a trained model on one split of a manifest.

Every case is predicted at its original resolution (the :class:`~tumorseg.inference.Segmenter`
resizes logits back) and compared with its original mask, both read by the one case reader
(:class:`tumorseg.data.CaseReader`, hashes checked against the manifest). Cases are decoded
by a thread pool, a bounded number ahead, while the network runs on the previous batch.
Scores come from :mod:`tumorseg.metrics` (the one place for the empty-mask rule). Outputs, in ``--out``:

* ``per_case.csv``: counts, emptiness and scores per case (+ ``hd95``, ``assd`` with ``--surface``, in
  pixels, or in mm from the voxel spacing for NIfTI; :data:`tumorseg.metrics.HD95_DEFINITION`);
* ``per_group.csv``: counts summed per group (patient) and the volumetric scores they give;
* ``summary.json``: distribution of the scores, bootstrap CI, pooled and per-group Dice,
  false-positive rate on empty cases, the empty rule, pixel accuracy (overall and per class, beside Dice
  and IoU: :func:`tumorseg.metrics.pixel_accuracy`), model and manifest identity; with ``--surface``
  also the HD95 definition, its unit, its empty-mask rule and the count of cases left out of ``hd95_mean``;
* ``gallery.png`` (worst and best cases) and ``dice.png`` (histogram and box plot);
* ``config.yaml``: the resolved options.

A multi-class model (its label set must be the manifest's) gets one ``per_case.csv`` row per case and
tumour class (``label`` column; per region for a region-based model), per-group rows per class, a
summary per class with the mean over the classes at the top, a pixel confusion matrix of the labels
(``confusion.csv``, ``confusion.png``), and a gallery drawing each class in its own colour.

The same files, the summary as ``{split}_*`` metrics and the manifest as a dataset input go
to an MLflow run of stage ``evaluate``; the headline metrics are also written back to the
training run when it is known.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg import tracking
from tumorseg.config import EvaluateConfig, dump_config
from tumorseg.errors import TumorsegError
from tumorseg.evaluate.scoring import (
    PER_CASE_COLUMNS,
    SURFACE_COLUMNS,
    Gallery,
    _csv_bytes,
    _json_safe,
    confusion_table,
    per_group_table,
    pixel_accuracy_summary,
    summarize,
    summarize_classes,
)
from tumorseg.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from tumorseg.imageio import image_format
from tumorseg.labels import Classes
from tumorseg.manifest import (
    ManifestInfo,
    image_path,
    image_paths,
    load_manifest,
    mask_paths,
    require_same_dims,
    require_same_labels,
    resolve_manifest_dir,
    select_split,
)
from tumorseg.metrics import confusion, confusion_matrix, scores_from_counts, surface_distances

if TYPE_CHECKING:
    import pandas as pd

    from tumorseg.inference import Segmenter
    from tumorseg.modelref import ModelRef

log = logging.getLogger(__name__)

HEADLINE = ("dice_mean", "dice_mean_tumour", "dice_median", "iou_mean", "dice_global", "dice_group_mean",
            "fp_rate_empty", "dice_ci_low", "dice_ci_high", "pixel_accuracy")
"""Summary keys written back to the training run as ``{split}_{key}``."""

FILES = {
    "per_case": "per_case.csv",
    "per_group": "per_group.csv",
    "summary": "summary.json",
    "gallery": "gallery.png",
    "dice_plot": "dice.png",
    "config": "config.yaml",
}
CLASS_FILES = {"confusion_csv": "confusion.csv", "confusion_plot": "confusion.png"}
"""The multi-class extras."""


@dataclass
class EvaluateResult:
    """What :func:`run` produced.

    Attributes:
        out_dir: the folder holding the files in :data:`FILES`.
        summary: ``summary.json`` as a dict (NaN where undefined; ``null`` in the file).
        run_id: the evaluate MLflow run.
        n_cases: cases scored.
        split: the split scored.
        model: where the model came from.
        files: name -> path of every output file.
        timings: seconds spent loading the model (``load``), decoding + predicting + scoring
            (``predict_score``), writing tables and plots (``write``, of which ``plots``), in all (``total``).
    """

    out_dir: Path
    summary: dict[str, Any]
    run_id: str
    n_cases: int
    split: str
    model: ModelRef
    files: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks


def check_files(info: ManifestInfo, rows: pd.DataFrame, source: Path) -> None:
    """Every image and mask of the split must exist (checked before any work is done)."""
    missing: list[Path] = []
    seen: set[Path] = set()
    for row in rows.to_dict("records"):
        for p in (*image_paths(info, row), *mask_paths(info, row)):
            if p not in seen:
                seen.add(p)
                if not p.exists():  # a file, or a DICOM series folder
                    missing.append(p)
    if missing:
        more = f" (+{len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise TumorsegError(f"{missing[0]}: listed in {source} but missing{more}; restore the files "
                            "or re-run tumorseg ingest")


def check_channels(seg: Segmenter, rows: pd.DataFrame, source: Path) -> None:
    """Images must have the model's channel count, or be grey/RGB for a grey/RGB model."""
    from tumorseg.inference import channels_compatible

    need = int(seg.base_channels)
    for ch in sorted({int(c) for c in rows["channels"]}):
        if not channels_compatible(ch, need, seg.config.spatial_dims == 3):
            raise TumorsegError(f"{source}: the split has {ch}-channel images but the model takes {need} "
                                "channel(s); evaluate a model trained on images like these")


# ----------------------------------------------------------------------------- scoring


# ----------------------------------------------------------------------------- the stage


def run(cfg: EvaluateConfig) -> EvaluateResult:
    """Evaluate ``cfg.model`` on ``cfg.split`` of ``cfg.manifest``.

    Returns:
        Output folder, summary, MLflow run id and case count.

    Raises:
        TumorsegError: missing manifest, split or files; unknown, corrupt or foreign model;
            model channels incompatible with the images.
    """
    from tumorseg.modelref import resolve_model

    t0 = time.perf_counter()
    mdir = resolve_manifest_dir(cfg.manifest)
    info, df = load_manifest(mdir)
    rows = select_split(df, cfg.split, mdir)
    check_files(info, rows, mdir / "manifest.csv")
    seg, mref = resolve_model(cfg.model, cfg.tracking, cfg.device)
    classes = label_set_of(seg)
    require_same_labels(classes, info.classes, mdir, f"model {mref.ref}")
    require_same_dims(seg.config.spatial_dims, info, mdir, f"model {mref.ref}")
    check_channels(seg, rows, mdir / "manifest.csv")
    if mref.manifest_digest and mref.manifest_digest != info.dataset_digest:
        log.warning("model was trained on another manifest (digest %s, this one %s): make sure the %s cases "
                    "were not in its training data", mref.manifest_digest[:12], info.dataset_digest[:12],
                    cfg.split)
    out_dir = cfg.out or Path("eval") / f"{info.name}-{cfg.split}-{mref.short_name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    timings = {"load": time.perf_counter() - t0}
    tags = {
        "tumorseg.model_ref": mref.ref,
        "tumorseg.checkpoint_sha256": mref.checkpoint_sha256,
        "tumorseg.manifest": info.name,
        "tumorseg.dataset_digest": info.dataset_digest,
        "tumorseg.split": cfg.split,
        "tumorseg.train_run_id": mref.train_run_id or None,
        "tumorseg.registered_model": mref.registered_name or None,
        "tumorseg.registered_version": mref.registered_version or None,
    }
    tags = {k: v for k, v in tags.items() if v is not None}
    with tracking.start_run(cfg.tracking, "evaluate", run_name=f"evaluate-{cfg.split}-{mref.short_name}",
                            tags=tags) as trk:
        t1 = time.perf_counter()
        per_case, gallery, outside, matrix = predict_and_score(seg, info, rows, cfg)
        n_cases = int(per_case["case_id"].nunique())  # a label map scores each case once per class
        timings["predict_score"] = time.perf_counter() - t1
        if outside:
            log.warning("%d of %d %s cases have stored intensities far from the training images'; first: %s",
                        len(outside), len(per_case), cfg.split, outside[0])
        t2 = time.perf_counter()
        per_group = per_group_table(per_case, cfg.empty_both)
        names = classes.names
        if classes.multiclass:
            scored = [name for _, name in classes.foreground]  # the tumour classes, or the regions
            summary = summarize_classes(per_case, per_group, cfg, scored, surface_unit(rows))
            summary["labels"] = classes.to_json()
            summary["regions"] = [[n, v] for n, v in (classes.regions or {}).items()] or None  # painting order
        else:
            summary = summarize(per_case, per_group, cfg, surface_unit(rows))
        summary.update(pixel_accuracy_summary(per_case, matrix, names))
        summary.update({
            "n_intensity_outside_training": len(outside),
            "split": cfg.split,
            "threshold": float(seg.threshold),
            "model": mref.to_dict(),
            "manifest": {"path": str(mdir.resolve()), "name": info.name,
                         "dataset_digest": info.dataset_digest},
            "model_manifest_digest": mref.manifest_digest,
            "same_manifest_as_training": bool(mref.manifest_digest == info.dataset_digest),
            "device": str(seg.device),
        })
        files = {k: out_dir / v for k, v in (FILES | (CLASS_FILES if matrix is not None else {})).items()}
        atomic_write_bytes(files["per_case"], _csv_bytes(per_case))
        atomic_write_bytes(files["per_group"], _csv_bytes(per_group))
        atomic_write_json(files["summary"], _json_safe(summary))
        atomic_write_text(files["config"], dump_config(cfg))
        t3 = time.perf_counter()
        from tumorseg import review

        review.overlay_grid(gallery.items(), files["gallery"], ncols=cfg.gallery_k,
                            classes=names if matrix is not None else None)
        review.dice_plot(per_case["dice"].to_numpy(dtype=np.float64), files["dice_plot"])
        if matrix is not None:
            atomic_write_bytes(files["confusion_csv"], _csv_bytes(confusion_table(matrix, names)))
            review.confusion_plot(matrix, names, files["confusion_plot"])
        timings["plots"] = time.perf_counter() - t3
        timings["write"] = time.perf_counter() - t2

        trk.log_params({
            "model": mref.ref, "manifest": str(mdir), "split": cfg.split, "empty_both": cfg.empty_both,
            "surface": cfg.surface, "hd95_empty": cfg.hd95_empty, "batch_size": cfg.batch_size,
            "device": str(seg.device),
            "threshold": seg.threshold, "bootstrap": cfg.bootstrap, "seed": cfg.seed,
            "labels": classes.describe(),
            "checkpoint_sha256": mref.checkpoint_sha256, "checkpoint_path": mref.checkpoint_path,
            "train_run_id": mref.train_run_id,
        })
        trk.log_metrics(split_metrics(summary, cfg.split))
        for path in files.values():
            trk.log_artifact(path, "evaluation")
        trk.log_manifest_input(mdir, context=cfg.split)
        ci = (f", 95% CI {summary['dice_ci_low']:.4f}-{summary['dice_ci_high']:.4f}"
              if math.isfinite(summary["dice_ci_low"]) else "")
        trk.set_description(  # headline first: the runs table shows the start
            f"{cfg.split} mean Dice {summary['dice_mean']:.4f} on {n_cases} cases{ci}, pooled Dice "
            f"{summary['dice_global']:.4f}, false positives on {summary['n_fp_empty']} of {summary['n_gt_empty']} "
            f"tumour-free cases: `{mref.short_name}` on `{info.name}` (digest `{info.dataset_digest[:12]}`).")
        run_id = trk.run_id
    if mref.train_run_id and cfg.write_back:
        write_back(trk.tracking_uri, mref.train_run_id, summary, cfg.split, run_id)
    timings["total"] = time.perf_counter() - t0
    log.info("evaluated %d %s cases in %.1f s: mean Dice %.4f -> %s", n_cases, cfg.split,
             timings["total"], summary["dice_mean"], out_dir)
    return EvaluateResult(out_dir=out_dir, summary=summary, run_id=run_id, n_cases=n_cases,
                          split=cfg.split, model=mref, files=files, timings=timings)


def label_set_of(seg: Segmenter) -> Classes:
    """What ``seg`` predicts; a segmenter that declares no label set (a stand-in, a plug-in) is binary."""
    return getattr(seg, "classes", None) or Classes()


def surface_unit(rows: pd.DataFrame) -> str:
    """What HD95/ASSD are in: ``pixels`` (PNG/JPEG/TIFF), ``mm`` (NIfTI/NRRD/MHA/DICOM spacing), or which is which."""
    from tumorseg.imageio.base import PHYSICAL

    mm = sum(image_format(str(p)) in PHYSICAL for p in rows["image"])
    return "pixels" if mm == 0 else "mm" if mm == len(rows) else "mm for cases with a voxel size, pixels for the others"


def predict_and_score(seg: Segmenter, info: ManifestInfo, rows: pd.DataFrame, cfg: EvaluateConfig
                      ) -> tuple[pd.DataFrame, Gallery, list[str], np.ndarray | None]:
    """Batched inference over the split with decoding in background threads; one score row per case (and class).

    Also returns ``"file: why"`` for each case whose stored intensities are far from the training images',
    and for a multi-class model the pixel confusion matrix (``None`` for a binary one).
    """
    import pandas as pd

    from tumorseg.context import SliceStacks, centre
    from tumorseg.data import CaseReader
    from tumorseg.postprocessing import StackBuffer
    from tumorseg.progress import track
    from tumorseg.streaming import batched

    split_of = [str(s) for s in rows["split"]]
    gallery = Gallery(cfg.gallery_k)
    out: list[dict[str, Any]] = []
    bs = seg.batch_for(cfg.batch_size)
    n_batches = math.ceil(len(rows) / bs)
    source = str(Path(cfg.manifest) / "manifest.csv")
    reader = CaseReader(info, source, context=_context(seg, rows, source))
    cases = reader.stream(rows, cfg.workers, ahead=2 * bs)
    outside: list[str] = []
    classes = label_set_of(seg)
    k = len(classes.names)
    matrix = np.zeros((k, k), dtype=np.int64) if classes.multiclass else None

    def score(case: Any, pred: np.ndarray) -> None:
        nonlocal matrix
        ident: dict[str, Any] = {"case_id": case.case_id, "group": case.group, "split": split_of[case.index]}
        dices = []
        scored = zip(classes.foreground, classes.score_masks(pred), classes.score_masks(case.mask), strict=True)
        for (_, name), p, g in scored:
            scores = scores_from_counts(confusion(p, g), cfg.empty_both)  # type: ignore[arg-type]
            row = {**ident, **({"label": name} if matrix is not None else {}), **scores}
            if cfg.surface:
                row["hd95"], row["assd"] = surface_distances(p, g, case.spacing, cfg.hd95_empty)
            out.append(row)
            dices.append(float(scores["dice"]))
        if matrix is not None:
            matrix += confusion_matrix(pred, case.mask, k)
        finite = [d for d in dices if math.isfinite(d)]
        gallery.offer(float(np.mean(finite)) if finite else float("nan"), case.index,
                      (centre(case.image, seg.context), case.mask, pred, case.case_id))
        why = seg.intensity_outside_training(case.image)
        if why is not None:
            outside.append(f"{image_path(info, rows.iloc[case.index])}: {why}")

    def finish(group: list[tuple[int, tuple[Any, np.ndarray]]]) -> None:
        preds = seg.stack_masks([prob for _, (_, prob) in group])
        for (_, (case, _)), pred in zip(group, preds, strict=True):
            score(case, pred)

    # volumetric post-processing: a stack's slices are post-processed together once all are predicted
    buffer: StackBuffer[int, tuple[Any, np.ndarray]] = StackBuffer(
        SliceStacks.from_frame(rows).positions(list(rows["case_id"])) if seg.post.volumetric else [])
    for batch in track(batched(cases, bs), n_batches, f"evaluate {cfg.split}"):
        probs = seg.predict_proba([c.image for c in batch], spacings=[c.spacing for c in batch])
        for case, prob in zip(batch, probs, strict=True):
            for group in buffer.add(case.index, (case, prob)):
                finish(group)
    for group in buffer.rest():
        finish(group)
    columns = PER_CASE_COLUMNS + (SURFACE_COLUMNS if cfg.surface else [])
    if matrix is not None:
        columns = [*columns[:3], "label", *columns[3:]]
    return pd.DataFrame(out, columns=columns), gallery, outside, matrix


def _context(seg: Segmenter, rows: pd.DataFrame, source: str) -> Any:
    """The reader's slice context for a 2.5D model (``None`` for a 2D one); data without stacks are an error."""
    if seg.context == 0:
        return None
    from tumorseg.data.reader import SliceContext

    return SliceContext.of(rows, seg.context, seg.base_channels,
                           f"{source}: the model takes {seg.context} neighbouring slice(s) a side (2.5D) but this "
                           "split has no ordered slice stacks; evaluate it on slices of volumes")


def split_metrics(summary: dict[str, Any], split: str) -> dict[str, float]:
    """Turn the numeric summary entries into MLflow metrics named ``{split}_{key}``."""
    out: dict[str, float] = {}
    for key, value in summary.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key in ("ci_level", "bootstrap_samples", "threshold"):
            continue
        out[f"{split}_{key}"] = float(value)
    return out


def write_back(uri: str, train_run_id: str, summary: dict[str, Any], split: str, eval_run_id: str) -> None:
    """Log the headline metrics to the training run (skipped with a warning when not in this store)."""
    metrics = {f"{split}_{key}": summary.get(key) for key in HEADLINE}
    if not tracking.log_to_run(uri, train_run_id, metrics, {f"tumorseg.eval_run_id.{split}": eval_run_id}):
        log.warning("training run %s is not in tracking store %s; %s metrics not written back",
                    train_run_id, uri, split)
