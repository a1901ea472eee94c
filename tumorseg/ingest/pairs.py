"""Discovery from a pairs list: ``tumorseg ingest --pairs pairs.csv`` (columns ``image,mask[,group][,split]``).

Many datasets list their pairs (and a challenge its official split) in a CSV instead of a folder
layout. Paths are relative to the CSV's folder, which is the data root: a path that leaves it is
rejected, as a symlink out of the data root is in folder mode. Several masks of one case are joined
with ``|`` (merged by union). Rows become the same :class:`~tumorseg.ingest.discover.Task` as folder
discovery makes, so the checks, the rejected report and the stable splits are the same; a row's
``split`` is kept exactly, rows without one get the stable hash split.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from tumorseg.config import IngestConfig
from tumorseg.errors import TumorsegError
from tumorseg.imageio import FORMATS_TEXT, image_format, split_ext
from tumorseg.ingest.discover import Task, _group_of
from tumorseg.manifest import MASK_SEP, SPLITS

REQUIRED = ("image", "mask")
OPTIONAL = ("group", "split")


def read_pairs(cfg: IngestConfig, root: Path) -> tuple[list[Task], list[tuple[str, str]], list[tuple[str, str]]]:
    """The cases of a pairs list, its rejected rows' files and (always none) ignored files.

    Raises:
        TumorsegError: an unreadable file, a missing or unknown column, or a split that is not train/val/test.
    """
    assert cfg.pairs is not None
    rows = _read_rows(cfg.pairs)
    rejected: list[tuple[str, str]] = []
    by_image: dict[str, list[int]] = defaultdict(list)
    parsed: list[tuple[int, str, tuple[str, ...], str | None, str | None]] = []
    for line, row in rows:
        image = (row.get("image") or "").strip()
        masks = tuple(m.strip() for m in (row.get("mask") or "").split(MASK_SEP) if m.strip())
        where = f"{cfg.pairs.name} row {line}"
        if not image or not masks:
            rejected.append((image or where, f"{where}: empty {'image' if not image else 'mask'} cell; fill it in "
                                             "or remove the row"))
            continue
        problems = [(p, why) for p in (image, *masks) if (why := _check_path(p, root)) is not None]
        if problems:
            for p, why in problems:
                rejected.append((p, f"{where}: {why}"))
            if image not in {p for p, _ in problems}:
                rejected.append((image, f"{where}: its mask was rejected"))
            continue
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise TumorsegError(f"{cfg.pairs}: row {line} has split {row.get('split')!r}; use train, val or test "
                                "(or leave it empty for the stable hash split)")
        group = (row.get("group") or "").strip() or None
        rel_image = _relative(image, root)
        by_image[rel_image].append(line)
        parsed.append((line, rel_image, tuple(_relative(m, root) for m in masks), group, split))
    tasks = []
    for _line, image, masks, group, split in parsed:
        lines = by_image[image]
        if len(lines) > 1:
            rejected.append((image, f"{cfg.pairs.name}: listed {len(lines)} times (rows "
                                    f"{', '.join(map(str, lines))}); keep one row per image"))
            continue
        key = image if image_format(root / image) == "dicom-series" else _key(image)
        group = group or _group_of(cfg, image, key)
        if group is None:
            rejected.append((image, f"path does not match --group-pattern {cfg.group_pattern!r}; fix the pattern "
                                    "or give a group column"))
            continue
        tasks.append(Task(key, image, masks, group, split))
    return tasks, sorted(set(rejected)), []


def _read_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """The CSV's rows with their line numbers (the header is line 1); bad columns stop the stage."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip().lower() for c in (reader.fieldnames or [])]
            reader.fieldnames = columns
            rows = [(reader.line_num, row) for row in reader]
    except FileNotFoundError as exc:
        raise TumorsegError(f"{path}: pairs list not found; check the path") from exc
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TumorsegError(f"{path}: cannot read the pairs list ({exc}); save it as a UTF-8 CSV") from exc
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise TumorsegError(f"{path}: no {' or '.join(missing)} column (header: {', '.join(columns) or 'empty'}); "
                            "the columns are image,mask and optionally group,split")
    unknown = [c for c in columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise TumorsegError(f"{path}: unknown column {unknown[0]!r}; the columns are image,mask and optionally "
                            "group,split")
    if len(set(columns)) != len(columns):
        raise TumorsegError(f"{path}: a column appears twice in the header; keep one")
    if not rows:
        raise TumorsegError(f"{path}: the pairs list has no rows")
    return [(line, {k: v or "" for k, v in row.items() if k is not None}) for line, row in rows]


def _check_path(path: str, root: Path) -> str | None:
    """Why a listed path cannot be used, or ``None``."""
    full = (root / path).resolve()
    if not full.is_relative_to(root):
        return f"{path} is outside the pairs list's folder {root}; move the file under it (or the list above it)"
    if not full.exists():
        return f"{path}: file not found; fix the path (relative to the pairs list's folder)"
    if image_format(full) is None:
        ext = split_ext(full.name)[1] or "no extension"
        return f"{path}: not an image format tumorseg reads ({ext}); use {FORMATS_TEXT}"
    return None


def _relative(path: str, root: Path) -> str:
    """A listed path as a POSIX path relative to the data root (the manifest's form)."""
    return (root / path).resolve().relative_to(root).as_posix()


def _key(rel: str) -> str:
    """The case id of an image path: the path without its image extension."""
    folder, _, name = rel.rpartition("/")
    stem = split_ext(name)[0]
    return f"{folder}/{stem}" if folder else stem


def pairs_root(pairs: Path) -> Path:
    """The data root of a pairs list: its folder."""
    return Path(os.path.abspath(pairs)).parent.resolve()
