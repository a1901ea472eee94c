"""``tumorseg ingest``: image/mask folders -> ``data_manifest/NAME/``.

Discovery pairs files by stem (never by position), decoding runs in parallel worker
processes that return one small row per case (memory does not grow with the data), every
problem with an image file becomes a row of ``rejected.csv``, files that are not images by
their extension (a dataset's README, CSVs) become rows of ``ignored.csv``, and the four
output files are written atomically. Splits come from :mod:`tumorseg.splits`.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg import __version__
from tumorseg.config import IngestConfig
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_write_bytes, atomic_write_json, sha256_bytes
from tumorseg.imageio import (
    EXTENSIONS,
    DecodeError,
    binarize_mask,
    decode,
    mask_plane,
    read_bytes,
    split_ext,
    union_masks,
)
from tumorseg.manifest import COLUMNS, MASK_SEP, SPLITS, combine_hashes
from tumorseg.progress import track
from tumorseg.splits import assign_fold, assign_split, merge_groups, splits_without_tumour, suggest_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One case to inspect: an image and its mask files, as POSIX paths relative to the data root.

    Plain strings, not ``Path`` objects: tasks are pickled to the worker processes and the
    paths go into the manifest as they are.
    """

    key: str
    image: str
    masks: tuple[str, ...]
    group: str | None


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


# ----------------------------------------------------------------------------- discovery


def _list_files(folder: Path, recursive: bool, skip: frozenset[Path] = frozenset()) -> list[tuple[str, bool]]:
    """Files under ``folder`` as sorted ``(relative POSIX path, is_symlink)`` pairs.

    Hidden files and folders are skipped, and so are symlinked folders (never followed) and
    the folders in ``skip`` (resolved paths): a masks folder or the manifest output folder
    that lies inside the walked tree is not read as images on a ``--recursive`` walk.
    Symlinked files are listed (even broken ones, so they are reported, not lost). Plain
    strings and ``os.scandir`` rather than ``pathlib``: discovery of large folders is
    otherwise dominated by path-object overhead.
    """
    out: list[tuple[str, bool]] = []
    stack = [("", os.fspath(folder))]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if recursive and Path(entry.path).resolve() not in skip:
                        stack.append((f"{rel_dir}{entry.name}/", entry.path))
                elif entry.is_symlink():
                    if not entry.is_dir():
                        out.append((f"{rel_dir}{entry.name}", True))
                elif entry.is_file():
                    out.append((f"{rel_dir}{entry.name}", False))
    out.sort(key=lambda item: item[0].split("/"))
    return out


def _mask_regex(suffix: str) -> re.Pattern[str]:
    return re.compile(rf"^(?P<base>.+?){re.escape(suffix)}(?:_(?P<idx>\d+))?$")


def _name(rel: str) -> str:
    return rel.rpartition("/")[2]


def _not_an_image(ext: str) -> str:
    """The ``ignored.csv`` reason for a file whose extension is not an image format."""
    return f"not an image ({ext or 'no extension'}); ingest reads PNG, TIFF and NIfTI (.nii/.nii.gz)"


def discover(cfg: IngestConfig, root: Path) -> tuple[list[Task], list[tuple[str, str]], list[tuple[str, str]]]:
    """Pair images with masks by stem.

    Returns:
        The cases, the rejected image files and the ignored non-image files (the last two
        as ``(root-relative path, reason)`` pairs).
    """
    images_dir = cfg.images_dir.resolve()
    masks_dir = (cfg.masks_dir or cfg.images_dir).resolve()
    same_folder = masks_dir == images_dir
    mask_re = _mask_regex(cfg.mask_suffix)
    rejected: list[tuple[str, str]] = []
    ignored: list[tuple[str, str]] = []
    # files are kept as paths relative to ``root`` (the manifest's form) until a Task is made
    images: dict[str, list[str]] = defaultdict(list)
    masks: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    image_rel: dict[str, str] = {}  # root-relative -> relative to IMAGES_DIR (for --group-pattern)

    def key_of(rel: str, stem: str) -> str:
        rel_dir = rel.rpartition("/")[0]
        # NFC: a name typed on Linux and the same name copied from macOS (NFD) are one stem
        return unicodedata.normalize("NFC", f"{rel_dir}/{stem}" if rel_dir else stem)

    def prefix_of(folder: Path) -> str:
        rel = folder.relative_to(root).as_posix()
        return "" if rel == "." else f"{rel}/"

    def accept(rel_root: str, is_link: bool) -> str | None:
        """The file's stem, or ``None`` for a file that cannot be a case.

        A file that is not an image by its extension is ignored; an image file that cannot be
        used is rejected.
        """
        stem, ext = split_ext(_name(rel_root))
        if ext not in EXTENSIONS:
            ignored.append((rel_root, _not_an_image(ext)))
            return None
        if is_link and not (root / rel_root).resolve().is_relative_to(root):
            rejected.append((rel_root, f"resolves outside the data root {root} (symlink?); copy the file in"))
            return None
        return stem

    # manifests written inside the input tree must not be ingested by the next --recursive run
    outputs = {cfg.out_dir.resolve(), (cfg.out_dir / cfg.name).resolve()}
    prefix = prefix_of(images_dir)
    for rel, is_link in _list_files(images_dir, cfg.recursive, frozenset({masks_dir, *outputs}) - {images_dir}):
        rel_root = prefix + rel
        stem = accept(rel_root, is_link)
        if stem is None:
            continue
        m = mask_re.match(stem) if same_folder else None
        if m:
            masks[key_of(rel, m["base"])][int(m["idx"] or 0)].append(rel_root)
        else:
            images[key_of(rel, stem)].append(rel_root)
            image_rel[rel_root] = rel
    if not same_folder:
        prefix = prefix_of(masks_dir)
        for rel, is_link in _list_files(masks_dir, cfg.recursive, frozenset({images_dir, *outputs}) - {masks_dir}):
            rel_root = prefix + rel
            stem = accept(rel_root, is_link)
            if stem is None:
                continue
            m = mask_re.match(stem)
            base, idx = (m["base"], int(m["idx"] or 0)) if m else (stem, 0)
            masks[key_of(rel, base)][idx].append(rel_root)

    tasks: list[Task] = []
    for key in sorted(set(images) | set(masks)):
        imgs = images.get(key, [])
        mask_sets = masks.get(key, {})
        mask_files = [p for idx in sorted(mask_sets) for p in mask_sets[idx]]
        if not imgs:
            for p in mask_files:
                rejected.append((p, "mask without image: no image with this stem; add it or remove the mask"))
            continue
        if len(imgs) > 1:
            names = ", ".join(_name(p) for p in imgs)
            for p in imgs + mask_files:
                rejected.append((p, f"two images share the stem '{key}' ({names}); keep one of them"))
            continue
        stem = _name(key)
        if not mask_files:
            rejected.append(
                (imgs[0],
                 f"image without mask: expected a mask named like '{stem}{cfg.mask_suffix}.png'"
                 + ("" if same_folder else f" or '{stem}.png' in {masks_dir}"))
            )
            continue
        clash = [ps for ps in mask_sets.values() if len(ps) > 1]
        if clash:
            names = ", ".join(_name(p) for p in clash[0])
            for p in imgs + mask_files:
                rejected.append((p, f"two masks share one stem ({names}); keep one of them"))
            continue
        group = _group_of(cfg, image_rel[imgs[0]], key)
        if group is None:
            rejected.append((imgs[0], f"path does not match --group-pattern {cfg.group_pattern!r}; fix the pattern"))
            continue
        tasks.append(Task(key, imgs[0], tuple(mask_files), group))
    return tasks, rejected, ignored


def _group_of(cfg: IngestConfig, rel: str, key: str) -> str | None:
    """The group of an image from its path relative to IMAGES_DIR."""
    if cfg.group_pattern:
        m = re.search(cfg.group_pattern, rel)
        if not m:
            return None
        return m.group(1) if m.re.groups else m.group(0)
    if cfg.group_by == "folder":
        return rel.rpartition("/")[0] or "."
    return key


# ----------------------------------------------------------------------------- inspection (worker side)


@dataclass(frozen=True)
class _Ctx:
    root: str
    mask_threshold: float | None
    slice_axis: int


def _fraction(mask: Any) -> tuple[bool, float]:
    n = int(np.count_nonzero(mask))
    return n > 0, round(n / mask.size, 6)


_DTYPE_NAMES: dict[Any, str] = {}


def _dtype_name(dtype: Any) -> str:
    """``str(dtype)``, cached: numpy builds the name in Python on every call."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


def inspect_case(task: Task, ctx: _Ctx) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Decode one case in a worker: manifest rows, or the reasons it is rejected."""
    rel_img = task.image
    img_path = os.path.join(ctx.root, rel_img)
    try:
        data = read_bytes(img_path)
        img_sha = sha256_bytes(data)
        image = decode(data, img_path, "image")
    except DecodeError as exc:
        return [], [(rel_img, _reason(exc, img_path))]
    channels = image.array.shape[0] if image.mode != "NIfTI" else 1
    if channels not in (1, 3):
        return [], [(rel_img, f"{channels}-channel image; use grey or RGB(A)")]
    # Compare masks with the image as the loaders will read them: a volume as (X, Y, Z), any
    # 2D file (a one-slice NIfTI included) as one (H, W) plane, so formats can be mixed.
    volume = image.is_volume
    img_shape = image.array.shape if volume else _plane(image.array, image.mode).shape

    masks = []
    encodings = []
    hashes = []
    for rel in task.masks:
        path = os.path.join(ctx.root, rel)
        try:
            mdata = read_bytes(path)
            hashes.append(sha256_bytes(mdata))
            decoded = decode(mdata, path, "mask")
            if decoded.mode == "NIfTI":
                plane = decoded.array if decoded.is_volume or volume else decoded.array[:, :, 0]
            else:
                plane = mask_plane(decoded.array, path)
            binary, values = binarize_mask(plane, path, ctx.mask_threshold)
        except DecodeError as exc:
            return [], [(rel, _reason(exc, path)), (rel_img, f"its mask {_name(rel)} was rejected")]
        if binary.shape != img_shape:
            return [], [
                (rel,
                 f"size mismatch: image is {_fmt_shape(img_shape)}, mask is {_fmt_shape(binary.shape)}; "
                 "masks must match their image pixel for pixel"),
                (rel_img, f"its mask {_name(rel)} has another size"),
            ]
        masks.append(binary)
        encodings.append(f"{decoded.mode} {values}")
    mask = union_masks(masks)
    mask_sha = combine_hashes(hashes)
    common = {
        "image": rel_img,
        "mask": MASK_SEP.join(task.masks),
        "n_masks": len(task.masks),
        "group": task.group,
        "channels": channels,
        "image_sha256": img_sha,
        "mask_sha256": mask_sha,
        "image_mode": f"{image.mode} {_dtype_name(image.array.dtype)}",
        "mask_encoding": "; ".join(sorted(set(encodings))),
    }
    if volume:
        rows = []
        for k in range(mask.shape[ctx.slice_axis]):
            plane2d = np.take(mask, k, axis=ctx.slice_axis)
            has, frac = _fraction(plane2d)
            rows.append({**common, "case_id": f"{task.key}#{'xyz'[ctx.slice_axis]}{k:03d}", "slice_index": k,
                         "has_tumour": has, "tumour_fraction": frac,
                         "height": plane2d.shape[0], "width": plane2d.shape[1]})
        return rows, []
    plane2d = mask
    has, frac = _fraction(plane2d)
    return [{**common, "case_id": task.key, "slice_index": -1, "has_tumour": has, "tumour_fraction": frac,
             "height": plane2d.shape[0], "width": plane2d.shape[1]}], []


def _plane(arr: Any, mode: str) -> Any:
    """The first 2D plane of a decoded non-volume: ``(C, H, W)`` or NIfTI ``(X, Y, 1)``."""
    return arr[:, :, 0] if mode == "NIfTI" else arr[0]


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _reason(exc: DecodeError, path: str) -> str:
    """The message without the leading path (the report has its own path column)."""
    msg = str(exc)
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


_worker_ctx: _Ctx | None = None


def _init_worker(ctx: _Ctx) -> None:
    global _worker_ctx
    _worker_ctx = ctx


def _inspect_in_worker(task: Task) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    assert _worker_ctx is not None
    return inspect_case(task, _worker_ctx)


def _inspect_all(tasks: list[Task], ctx: _Ctx, workers: int) -> Iterator[tuple[list[dict[str, Any]], list]]:
    """Inspect cases in order, in ``workers`` processes (in-process for 1).

    The context goes to each worker once (pool initializer), not with every task.
    """
    if workers <= 1 or len(tasks) < 2:
        yield from (inspect_case(t, ctx) for t in tasks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(ctx,)) as pool:
        yield from pool.imap(_inspect_in_worker, tasks, chunksize=max(1, min(32, len(tasks) // (workers * 8))))


# ----------------------------------------------------------------------------- splits and summary


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


def assign_splits(rows: list[dict[str, Any]], cfg: IngestConfig) -> None:
    """Set ``group`` (merged over identical images), ``split`` and ``fold`` on each row, in place."""
    merged = merge_groups([r["group"] for r in rows], [r["image_sha256"] for r in rows])
    joined = {(r["group"], g) for r, g in zip(rows, merged, strict=True) if r["group"] != g}
    if joined:
        # worth a word: a blank slice exported identically for many patients joins them all
        example = min(joined)
        log.warning("%d group(s) merged into others because they share byte-identical images "
                    "(e.g. %r into %r)", len({a for a, _ in joined}), example[0], example[1])
    for row, group in zip(rows, merged, strict=True):
        row["group"] = group
        row["split"] = assign_split(group, cfg.seed, cfg.fractions)
        row["fold"] = assign_fold(group, cfg.seed, cfg.folds) if row["split"] != "test" else -1


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
        "splits": per_split,
    }


def _check_tumour_coverage(rows: list[dict[str, Any]], cfg: IngestConfig) -> None:
    tumour_groups = sorted({r["group"] for r in rows if r["has_tumour"]})
    missing = splits_without_tumour(tumour_groups, cfg.seed, cfg.fractions)
    if not missing:
        return
    better = suggest_seed(tumour_groups, cfg.seed, cfg.fractions)
    hint = f"pass --seed {better}, which gives every split tumour cases" if better is not None else "change --fractions"
    raise TumorsegError(
        f"{cfg.images_dir}: with --seed {cfg.seed} split(s) {', '.join(missing)} would get no tumour case "
        f"({len(tumour_groups)} tumour groups); {hint}. Keep that seed for later ingests: splits stay stable."
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
    images = cfg.images_dir.resolve()
    if cfg.masks_dir is None:
        return images
    return Path(os.path.commonpath([images, cfg.masks_dir.resolve()]))


def _check_inputs(cfg: IngestConfig) -> None:
    for label, folder in (("IMAGES_DIR", cfg.images_dir), ("MASKS_DIR", cfg.masks_dir)):
        if folder is None:
            continue
        if not folder.exists():
            raise TumorsegError(f"{folder}: {label} does not exist; check the path")
        if not folder.is_dir():
            raise TumorsegError(f"{folder}: {label} is not a folder; pass the folder that holds the files")
    if cfg.group_pattern:
        try:
            re.compile(cfg.group_pattern)
        except re.error as exc:
            raise TumorsegError(f"--group-pattern {cfg.group_pattern!r}: invalid regular expression ({exc})") from exc


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
    tasks, rejected, ignored = discover(cfg, root)
    ignored = sorted(set(ignored))
    if not tasks and not rejected:
        hint = " (or add --recursive)" if not cfg.recursive else ""
        if ignored:
            raise TumorsegError(f"{cfg.images_dir}: no image files found, only {len(ignored)} other file(s) "
                                f"(first: {ignored[0][0]}: {ignored[0][1]}); check the folder{hint}")
        raise TumorsegError(f"{cfg.images_dir}: no files found; check the folder{hint}")
    ctx = _Ctx(str(root), cfg.mask_threshold, cfg.slice_axis)
    workers = cfg.workers or min(8, os.cpu_count() or 1)
    rows: list[dict[str, Any]] = []
    for case_rows, case_rejected in track(_inspect_all(tasks, ctx, workers), len(tasks), "ingest"):
        rows.extend(case_rows)
        rejected.extend(case_rejected)
    rows = _drop_duplicate_ids(rows, rejected)
    rejected = sorted(set(rejected))
    if cfg.strict and rejected:
        path, reason = rejected[0]
        raise TumorsegError(
            f"{root / path}: {reason} ({len(rejected)} file(s) rejected; --strict writes no manifest - "
            "run without --strict to get the full rejected.csv)"
        )
    if not rows:
        raise TumorsegError(f"{cfg.images_dir}: no usable image/mask pairs ({len(rejected)} file(s) rejected: "
                            f"first: {rejected[0][0]}: {rejected[0][1]})")
    assign_splits(rows, cfg)
    _check_tumour_coverage(rows, cfg)
    rows.sort(key=lambda r: r["case_id"])
    summary = summarize(rows, len(rejected), len(ignored))

    manifest_csv = _csv_bytes(rows, COLUMNS)
    rejected_csv = _csv_bytes([{"path": p, "reason": r} for p, r in rejected], ["path", "reason"])
    ignored_csv = _csv_bytes([{"path": p, "reason": r} for p, r in ignored], ["path", "reason"])
    digest = sha256_bytes(manifest_csv)
    info = {
        "name": cfg.name,
        "tumorseg_version": __version__,
        "data_root": str(root),
        "dataset_digest": digest,
        "slice_axis": cfg.slice_axis,
        "mask_threshold": cfg.mask_threshold,
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
        return run.run_id
