"""The ingest stage: discover, inspect in parallel, assign splits, write the manifest atomically."""

from __future__ import annotations

import io
import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tumorseg import __version__
from tumorseg.config import IngestConfig
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_write_bytes, atomic_write_json, sha256_bytes
from tumorseg.ingest.discover import discover
from tumorseg.ingest.groups import merge_keys, stack_groups, ungrouped_slices
from tumorseg.ingest.inspect import VOLUME_COLUMNS, InspectContext, class_columns, inconsistent_volumes, inspect_all
from tumorseg.ingest.pairs import pairs_root, read_pairs
from tumorseg.labels import check_labels, check_regions, format_labels, from_dataset_json
from tumorseg.manifest import COLUMNS, SPLITS
from tumorseg.progress import track
from tumorseg.splits import (
    assign_fold,
    assign_split,
    balanced_seed,
    covering_seed,
    merge_groups,
    small_splits,
    splits_without_tumour,
)

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    """What :func:`run` produced."""

    manifest_dir: Path
    n_cases: int
    n_rejected: int
    dataset_digest: str
    summary: dict[str, Any]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    run_id: str | None = None
    n_ignored: int = 0
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ignored_csv(self) -> Path:
        """The list of non-image files that were skipped (``path,reason``)."""
        return self.manifest_dir / "ignored.csv"


def _drop_duplicate_ids(rows: list[dict[str, Any]], rejected: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Reject the files behind a case id made twice (``v#z000.png`` beside a volume ``v.nii``)."""
    images_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        images_of[r["case_id"]].add(r["image"])
    clashes = {cid: sorted(imgs) for cid, imgs in images_of.items() if len(imgs) > 1}
    if not clashes:
        return rows
    bad = {img for imgs in clashes.values() for img in imgs}
    for cid, imgs in clashes.items():
        for img in imgs:
            rejected.append((img, f"case id '{cid}' is also made by {', '.join(i for i in imgs if i != img)}; "
                                  "rename one of them"))
    return [r for r in rows if r["image"] not in bad]


def assign_splits(rows: list[dict[str, Any]], cfg: IngestConfig, root: Path) -> None:
    """Set ``group`` (numbered slice stacks grouped, identical images merged), ``split`` and ``fold`` in place."""
    grouped = stack_groups(rows, cfg, root)
    if grouped:
        log.info("%s", grouped)
    merged = merge_groups([r["group"] for r in rows], merge_keys(rows, root))
    joined = {(r["group"], g) for r, g in zip(rows, merged, strict=True) if r["group"] != g}
    if joined:
        # worth a word (a constant image, such as a blank slice exported for many patients, joins nothing)
        example = min(joined)
        log.warning("%d group(s) merged into others because they share byte-identical images "
                    "(e.g. %r into %r)", len({a for a, _ in joined}), example[0], example[1])
    for row, group in zip(rows, merged, strict=True):
        row["group"] = group
        row["split"] = row.pop("fixed_split", None) or assign_split(group, cfg.seed, cfg.fractions)
        row["fold"] = assign_fold(group, cfg.seed, cfg.folds) if row["split"] != "test" else -1
    why = ungrouped_slices(rows, cfg)
    if why:
        log.warning("%s", why)


def _keep_one_kind(rows: list[dict[str, Any]], rejected: list[tuple[str, str]]) -> int:
    """Without ``--slice-axis``: 3 when the set's cases are volumes (each one case), else 2.

    A set holds one kind: the minority (2D files in a set of volumes, or volumes in a set of 2D images) is
    removed from ``rows`` into ``rejected``, each with the reason and the fix.
    """
    volumes = [r for r in rows if "depth" in r]
    if not volumes:
        return 2
    planes = [r for r in rows if "depth" not in r]
    dims = 3 if len(volumes) >= len(planes) else 2
    odd = planes if dims == 3 else volumes
    why = ("a 2D image in a set of 3D volumes; ingest it on its own, or pass --slice-axis 2 to cut the volumes "
           "into slices" if dims == 3 else
           "a 3D volume in a set of 2D images; pass --slice-axis 2 to cut volumes into slices, or ingest it on its own")
    rejected.extend((str(r["image"]), why) for r in odd)
    rows[:] = volumes if dims == 3 else planes
    if dims == 3:  # every volume holds the set's sequences, at a voxel size in the set's unit
        bad = inconsistent_volumes(rows)
        rejected.extend((str(r["image"]), bad[id(r)]) for r in rows if id(r) in bad)
        rows[:] = [r for r in rows if id(r) not in bad]
    return dims


def summarize(rows: list[dict[str, Any]], n_rejected: int, n_ignored: int = 0) -> dict[str, Any]:
    """Cases, groups, tumour/empty counts, rejected/ignored files and achieved fractions per split."""
    total = len(rows) or 1
    groups_total = len({r["group"] for r in rows}) or 1
    per_split: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        sel = [r for r in rows if r["split"] == split]
        groups = {r["group"] for r in sel}
        tumour = sum(1 for r in sel if r["has_tumour"])
        per_split[split] = {
            "cases": len(sel),
            "groups": len(groups),
            "tumour": tumour,
            "empty": len(sel) - tumour,
            "case_fraction": round(len(sel) / total, 4),
            "group_fraction": round(len(groups) / groups_total, 4),
        }
    splits_of_group: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        splits_of_group[r["group"]].add(r["split"])
    return {
        "cases": len(rows),
        "groups": len(splits_of_group),
        "rejected": n_rejected,
        "ignored": n_ignored,
        "tumour": sum(1 for r in rows if r["has_tumour"]),
        "empty": sum(1 for r in rows if not r["has_tumour"]),
        "groups_straddling_splits": sum(1 for s in splits_of_group.values() if len(s) > 1),
        # lossy (JPEG) masks are thresholded at half their range, not read as two exact values: say how many
        "lossy_masks": sum(1 for r in rows if "JPEG:" in str(r.get("mask_encoding", ""))),
        "splits": per_split,
    }


def _tumour_groups(rows: list[dict[str, Any]], cfg: IngestConfig) -> dict[str, list[str]]:
    """The groups holding tumour, and for label maps those holding each declared class: what every split needs."""
    classes = [("tumour", "has_tumour")] + [(col[3:], col) for col in class_columns(cfg.labels)]
    return {name: sorted({str(r["group"]) for r in rows if r[col]}) for name, col in classes}


def _check_tumour_coverage(rows: list[dict[str, Any]], cfg: IngestConfig) -> None:
    """Every split gets tumour cases - of every declared class, for label maps - or a seed that does it."""
    sets = _tumour_groups(rows, cfg)
    for name, groups in sets.items():
        missing = splits_without_tumour(groups, cfg.seed, cfg.fractions)
        if not missing:
            continue
        better = covering_seed(list(sets.values()), cfg.seed, cfg.fractions)
        what = "tumour" if name == "tumour" else f"class {name}"
        cover = "cases of every class" if cfg.labels else "tumour cases"
        hint = f"pass --seed {better}, which gives every split {cover}" if better is not None else "change --fractions"
        raise TumorsegError(
            f"{cfg.source}: with --seed {cfg.seed} split(s) {', '.join(missing)} would get no {what} case "
            f"({len(groups)} groups with {what}); {hint}. Keep that seed for later ingests: splits stay stable."
        )


def _warn_small_splits(rows: list[dict[str, Any]], cfg: IngestConfig) -> None:
    """One warning line where a split got far fewer groups than its fraction asks, with a seed that does not.

    Where a split asked for gets no case at all (train or evaluate then stops), the line names the grouping instead.
    """
    groups = [str(r["group"]) for r in rows]
    empty = [s for s, f in zip(SPLITS, cfg.fractions, strict=True) if f > 0 and not any(r["split"] == s for r in rows)]
    if empty:
        n = len(set(groups))
        how = (f"--group-pattern {cfg.group_pattern!r} makes {n} group(s) of {len(rows)} cases (e.g. {groups[0]!r}): "
               "its first capture group should be the patient's id" if cfg.group_pattern and n < len(rows) / 2
               else f"{n} group(s) cannot fill every split asked for: add patients or ask for fewer splits "
               "(e.g. --fractions 0.8,0.2,0)")
        log.warning("%s: split(s) %s get no case, so train or evaluate will stop there; %s", cfg.source,
                    ", ".join(empty), how)
        return
    small = small_splits(groups, cfg.seed, cfg.fractions)
    if not small:
        return
    better = balanced_seed(groups, list(_tumour_groups(rows, cfg).values()), cfg.seed, cfg.fractions)
    said = ", ".join(f"{name} gets {got} of {len(set(groups))} groups (about {expected:.1f} asked)"
                     for name, (got, expected) in small.items())
    log.warning("%s: with --seed %d %s: the best checkpoint and post-processing are chosen on val, the scores on "
                "test; %s", cfg.source, cfg.seed, said,
                f"--seed {better} gives every split its share (keep it for later ingests)" if better is not None
                else "consider --folds")


_MULTI = re.compile(r"mask has (\d+) distinct values \(([^)]*)\)")
IMAGE_LIKE_VALUES = 64
"""Masks holding more distinct values than this look like images (an 8-bit image has ~256): folders swapped?"""


LABEL_MAP_SHARE = 0.25
"""Without ``--labels``: when at least this share of the cases hold masks of more than two values, the dataset
is label maps and ingest stops with the ``--labels`` to pass; fewer are stray files (rejected rows)."""


def _check_label_maps(rejected: list[tuple[str, str]], n_cases: int, cfg: IngestConfig) -> None:
    """Multi-valued masks without ``--labels``: one line with the values found and the option to declare."""
    if cfg.labels or cfg.mask_threshold is not None:
        return
    found = [(p, m.group(2)) for p, r in rejected if (m := _MULTI.search(r))]
    if not found or len(found) < LABEL_MAP_SHARE * n_cases:
        return
    most = max(int(m.group(1)) for _, r in rejected if (m := _MULTI.search(r)))
    if most > IMAGE_LIKE_VALUES:
        raise TumorsegError(f"{cfg.source}: {len(found)} mask file(s) hold up to {most} distinct values (first: "
                            f"{found[0][0]}): they look like images, not masks; are the folders swapped? "
                            "(tumorseg ingest IMAGES_DIR MASKS_DIR: images first; label maps of that many classes: "
                            "--labels)")
    values = sorted({int(float(v)) for _, shown in found for v in shown.split(", ") if v != "..."} | {0})
    declared = from_dataset_json([d for d in (cfg.images_dir, cfg.masks_dir, cfg.pairs and cfg.pairs.parent) if d])
    if declared is not None:
        how = f"as {declared[0]} declares them: --labels {format_labels(declared[1])}"
    else:
        how = "e.g. --labels " + ",".join(f"{v}={'background' if v == 0 else f'class{v}'}" for v in values)
    raise TumorsegError(
        f"{cfg.source}: {len(found)} mask file(s) hold more than two values ({', '.join(map(str, values))}; "
        f"first: {found[0][0]}): label maps, not binary masks; declare the labels, {how} "
        "(or binarise them with --mask-threshold T)"
    )


# ----------------------------------------------------------------------------- writing


def _csv_bytes(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([_cell(row.get(k)) for k in columns] for row in rows)
    return buf.getvalue().encode("utf-8")


def _cell(v: Any) -> Any:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6f}"
    return v


def _data_root(cfg: IngestConfig) -> Path:
    if cfg.pairs is not None:
        return pairs_root(cfg.pairs)
    assert cfg.images_dir is not None
    images = cfg.images_dir.resolve()
    if cfg.masks_dir is None:
        return images
    return Path(os.path.commonpath([images, cfg.masks_dir.resolve()]))


def _check_inputs(cfg: IngestConfig) -> None:
    if cfg.regions is not None:
        if cfg.labels is None:
            raise TumorsegError("--regions needs --labels: regions unite declared label values (e.g. --labels "
                                "0=background,1=necrosis,2=edema,3=enhancing --regions whole=1,2,3 core=1,3)")
        check_regions(cfg.regions, cfg.labels, "regions")
    if cfg.labels is not None:
        check_labels(cfg.labels, "labels")
        if cfg.mask_threshold is not None:
            raise TumorsegError("--labels and --mask-threshold: give one (label maps keep their values; a threshold "
                                "binarises)")
    if cfg.group_pattern:
        try:
            re.compile(cfg.group_pattern)
        except re.error as exc:
            raise TumorsegError(f"--group-pattern {cfg.group_pattern!r}: invalid regular expression ({exc})") from exc
    if cfg.pairs is not None and not cfg.pairs.is_file():
        raise TumorsegError(f"{cfg.pairs}: pairs list not found; give a CSV with columns image,mask[,group][,split]")
    for label, folder in (("IMAGES_DIR", cfg.images_dir), ("MASKS_DIR", cfg.masks_dir)):
        if folder is None:
            continue
        if not folder.exists():
            raise TumorsegError(f"{folder}: {label} does not exist; check the path")
        if not folder.is_dir():
            raise TumorsegError(f"{folder}: {label} is not a folder; pass the folder that holds the files")


def run(cfg: IngestConfig) -> IngestResult:
    """Ingest image/mask folders into ``cfg.out_dir / cfg.name``.

    Returns:
        The manifest folder, counts, digest and split summary.

    Raises:
        TumorsegError: missing/empty input folder, bad options, or (``strict``) any rejection.
            Ignored non-image files never fail a run.
    """
    _check_inputs(cfg)
    root = _data_root(cfg)
    tasks, rejected, ignored = read_pairs(cfg, root) if cfg.pairs is not None else discover(cfg, root)
    ignored = sorted(set(ignored))
    if not tasks and not rejected:
        hint = " (or add --recursive)" if not cfg.recursive else ""
        if ignored:
            raise TumorsegError(f"{cfg.source}: no image files found, only {len(ignored)} other file(s) "
                                f"(first: {ignored[0][0]}: {ignored[0][1]}); check the folder{hint}")
        raise TumorsegError(f"{cfg.source}: no files found; check the folder{hint}")
    ctx = InspectContext(str(root), cfg.mask_threshold, cfg.slice_axis, cfg.labels)
    workers = cfg.workers or min(8, os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    for case_rows, case_rejected in track(inspect_all(tasks, ctx, workers), len(tasks), "ingest"):
        rows.extend(case_rows)
        rejected.extend(case_rejected)
    rows = _drop_duplicate_ids(rows, rejected)
    dims = 2 if cfg.slice_axis is not None else _keep_one_kind(rows, rejected)
    rejected = sorted(set(rejected))
    _check_label_maps(rejected, len(tasks), cfg)
    if cfg.strict and rejected:
        path, reason = rejected[0]
        raise TumorsegError(
            f"{root / path}: {reason} ({len(rejected)} file(s) rejected; --strict writes no manifest - "
            "run without --strict to get the full rejected.csv)"
        )
    if not rows:
        # name a cause, not an image rejected only because its mask was
        path, reason = next(((p, r) for p, r in rejected if not r.startswith("its mask")), rejected[0])
        raise TumorsegError(f"{cfg.source}: no usable image/mask pairs ({len(rejected)} file(s) rejected: "
                            f"first: {path}: {reason})")
    fixed = any(r.get("fixed_split") for r in rows)
    assign_splits(rows, cfg, root)
    if not fixed:  # a published split is kept as it is
        _check_tumour_coverage(rows, cfg)
        _warn_small_splits(rows, cfg)
    rows.sort(key=lambda r: r["case_id"])
    summary = summarize(rows, len(rejected), len(ignored))
    if not summary["tumour"] or all(float(r["tumour_fraction"]) >= 1 for r in rows):  # a threshold off the masks?
        log.warning("%s: %s of the %d masks (read as %s): if that is not what they hold, check the mask files and "
                    "--mask-threshold", cfg.source, "none holds tumour" if not summary["tumour"] else "tumour fills "
                    "every one", len(rows), rows[0].get("mask_encoding", "?"))
    if summary["groups_straddling_splits"]:  # only a pairs list's split column can do it
        log.warning("%s: %d group(s) have cases in more than one split, as the pairs list's split column (or its "
                    "blank cells: the group's own split) puts them: a patient in train and test leaks; give each "
                    "group's rows one split", cfg.source, summary["groups_straddling_splits"])

    extra = VOLUME_COLUMNS if dims == 3 else []
    manifest_csv = _csv_bytes(rows, COLUMNS + extra + class_columns(cfg.labels))
    rejected_csv = _csv_bytes([{"path": p, "reason": r} for p, r in rejected], ["path", "reason"])
    ignored_csv = _csv_bytes([{"path": p, "reason": r} for p, r in ignored], ["path", "reason"])
    digest = sha256_bytes(manifest_csv)
    info = {
        "name": cfg.name,
        "tumorseg_version": __version__,
        "data_root": str(root),
        "dataset_digest": digest,
        "slice_axis": 2 if cfg.slice_axis is None else cfg.slice_axis,
        **({"dims": 3} if dims == 3 else {}),  # 2D manifests stay as they were
        "mask_threshold": cfg.mask_threshold,
        "labels": {str(v): n for v, n in sorted(cfg.labels.items())} if cfg.labels else None,
        "regions": [[n, v] for n, v in cfg.regions.items()] if cfg.regions else None,  # a list: JSON keeps its order
        # where the manifest was written and how fast it was built do not describe the data:
        # without them, the same inputs and options give byte-identical files in any out_dir
        "config": cfg.model_dump(mode="json", exclude={"tracking", "workers", "out_dir"}),
        "counts": {"cases": len(rows), "rejected": len(rejected), "ignored": len(ignored),
                   "groups": summary["groups"]},
        "summary": summary,
    }
    out = cfg.out_dir / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    # manifest.json (with the digest) goes last: a reader that finds it finds a complete csv.
    atomic_write_bytes(out / "manifest.csv", manifest_csv)
    atomic_write_bytes(out / "rejected.csv", rejected_csv)
    atomic_write_bytes(out / "ignored.csv", ignored_csv)
    atomic_write_json(out / "manifest.json", info)
    result = IngestResult(out, len(rows), len(rejected), digest, summary, rejected,
                          n_ignored=len(ignored), ignored=ignored)
    result.run_id = _track(cfg, result)
    return result


def _track(cfg: IngestConfig, result: IngestResult) -> str:
    from tumorseg import tracking

    tags = {"tumorseg.manifest": cfg.name, "tumorseg.dataset_digest": result.dataset_digest}
    with tracking.start_run(cfg.tracking, "ingest", run_name=f"ingest-{cfg.name}", tags=tags) as run:
        run.log_params(cfg.model_dump(mode="json", exclude={"tracking"}))
        s = result.summary
        metrics: dict[str, float] = {k: s[k] for k in ("cases", "groups", "rejected", "ignored", "tumour",
                                                        "empty", "groups_straddling_splits")}
        for split, v in s["splits"].items():
            for k in ("cases", "groups", "tumour", "empty", "case_fraction"):
                metrics[f"{split}_{k}"] = v[k]
        run.log_metrics(metrics)
        for name in ("manifest.csv", "manifest.json", "rejected.csv", "ignored.csv"):
            run.log_artifact(result.manifest_dir / name, "manifest")
        run.log_manifest_input(result.manifest_dir, context="ingest")
        run.set_description(describe(cfg, result))
        return run.run_id


def describe(cfg: IngestConfig, result: IngestResult) -> str:
    """The ingest run's description, headline first (the runs table shows its start): cases, splits, data."""
    s = result.summary
    splits = " / ".join(f"{split} {v['cases']}" for split, v in s["splits"].items())
    return (f"{result.n_cases} cases ({splits}) in {s['groups']} groups, {s['tumour']} with tumour: ingest of "
            f"`{cfg.name}` (digest `{result.dataset_digest[:12]}`) from `{cfg.source}`; {result.n_rejected} "
            f"rejected and {result.n_ignored} ignored file(s); split seed {cfg.seed}.")
