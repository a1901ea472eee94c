"""Groups of the ingest stage when the slices of a volume come as numbered 2D files.

A lab's slice stacks often arrive as one file per slice, numbered within a patient's folder
(``TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12.tif``). Each file is its own group under
``--group-by case``: one patient's slices then land in different splits (the test split shares
patients with training) and are scored apart. ``--group-by auto`` (the default) makes each
stack one group where the files are such slices:

* at least half of the images are numbered slices of ordered stacks (three or more consecutive
  numbers within one folder, :func:`tumorseg.context.path_stacks`), in at least :data:`MIN_STACKS`
  stacks, each file still its own group;
* adjacent slices are confirmed to be neighbours in the anatomy: in a seeded sample of stacks they
  correlate clearly more than unrelated slices (:data:`tumorseg.context.ADJACENT_MARGIN`, the plan's
  own test for slice context).

Each stack (a run of consecutive numbers) becomes one group, named by its folder, prefix and slice
range. A gap in the numbers ends a stack, so files that only share a folder (a class folder of
unrelated images numbered 1..N) are not merged into one group; nor are three or four huge stacks
(:data:`MIN_STACKS`), where a split would have no groups to choose from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from tumorseg.config import IngestConfig

MIN_STACKS = 10
"""``--group-by auto`` makes stacks groups only where there are at least this many: each split needs several."""
SAMPLE_STACKS = 12
"""Stacks whose adjacent slices are compared (three consecutive files read from each)."""


def numbered_stacks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The ordered stacks (runs of three or more) among the 2D files of ``rows`` that are each their own group."""
    from tumorseg.context import path_stacks

    files = [r for r in rows if int(r["slice_index"]) < 0 and "depth" not in r and r["group"] == r["case_id"]]
    return [[files[i] for i in run] for run in path_stacks([r["image"] for r in files]) if len(run) >= 3]


def stack_name(run: list[dict[str, Any]]) -> str:
    """One stack's group: ``folder/prefix<first>-<last>`` (``TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_1-20``)."""
    from tumorseg.context import slice_number

    first, last = (PurePosixPath(str(r["image"])) for r in (run[0], run[-1]))  # as path_stacks reads them
    a, b = slice_number(first.name), slice_number(last.name)
    assert a is not None and b is not None  # path_stacks found them by their numbers
    parent = str(first.parent)
    return f"{'' if parent == '.' else parent + '/'}{a[0]}{a[1]}-{b[1]}"


def adjacent_similarity(runs: list[list[dict[str, Any]]], root: Path) -> tuple[float, float]:
    """Median correlation of adjacent slices and of unrelated ones in a seeded sample of ``runs`` (the plan's)."""
    from tumorseg.context import sampled_similarity
    from tumorseg.imageio import DecodeError, decode, read_bytes, slice_of

    def read(rows: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        paths = [root / str(r["image"]).split("|")[0] for r in rows]
        try:
            return [slice_of(decode(read_bytes(p), p), -1, 2).astype(np.float32) for p in paths]
        except DecodeError:  # (inspection read them already; a file changed meanwhile is not a slice to judge)
            return []

    return sampled_similarity(runs, read, sample=SAMPLE_STACKS)


def stack_groups(rows: list[dict[str, Any]], cfg: IngestConfig, root: Path) -> str | None:
    """``--group-by auto``: each confirmed stack of numbered slices becomes one group (``rows`` in place).

    Returns what was done (one line for the log), or ``None`` where the rows are left as they are.
    """
    from tumorseg.context import ADJACENT_MARGIN

    if cfg.group_by != "auto" or cfg.group_pattern:
        return None
    runs = numbered_stacks(rows)
    covered = sum(len(run) for run in runs)
    if len(runs) < MIN_STACKS or 2 * covered < len(rows):
        return None
    adjacent, unrelated = adjacent_similarity(runs, root)
    if not adjacent - unrelated >= ADJACENT_MARGIN:
        return None
    for run in runs:
        name = stack_name(run)
        for r in run:
            r["group"] = name
    return (f"{covered} of {len(rows)} images are numbered slices of {len(runs)} stacks (adjacent slices "
            f"correlate {adjacent:.2f}, unrelated {unrelated:.2f}): each stack is one group, e.g. "
            f"{stack_name(runs[0])} (--group-by auto; --group-by case keeps each image its own group)")


def ungrouped_slices(rows: list[dict[str, Any]], cfg: IngestConfig) -> str | None:
    """Why to group by patient, when most images are numbered slices of several stacks each in its own group.

    Under ``--group-by case`` (or ``auto`` where the slices were not confirmed as neighbours) one patient's
    slices (``TCGA_CS_4941_19960909_12.tif``) land in different splits, are scored apart, and give no slice
    stacks to the plan (rules 9 and 10).
    """
    if cfg.group_pattern or cfg.group_by == "folder":
        return None
    runs = numbered_stacks(rows)
    covered = sum(len(run) for run in runs)
    if len(runs) < 2 or 2 * covered < len(rows):
        return None
    first = runs[0]
    return (f"{covered} of {len(rows)} images are numbered slices of {len(runs)} stacks (e.g. {first[0]['image']} "
            f".. {first[-1]['image']}) but each is its own group (--group-by {cfg.group_by}): one patient's slices "
            "can land in different splits and are scored apart; pass --group-by folder (a folder per patient) or "
            "--group-pattern (the patient's part of the path)")


def merge_keys(rows: list[dict[str, Any]], root: Path) -> list[str]:
    """What byte-identical images are merged by (:func:`tumorseg.splits.merge_groups`): each row's image hash.

    A constant image (a blank slice, exported identically for many patients) carries nothing of a patient: its
    rows get keys of their own, so it joins no groups. Only hashes shared by several groups are decoded.
    """
    from tumorseg.imageio import DecodeError, decode, read_bytes

    groups: dict[str, set[str]] = defaultdict(set)
    first: dict[str, str] = {}
    for r in rows:
        groups[r["image_sha256"]].add(str(r["group"]))
        first.setdefault(r["image_sha256"], str(r["image"]))
    blank = set()
    for sha, members in groups.items():
        if len(members) < 2:
            continue
        try:
            arrays = [decode(read_bytes(root / p), root / p).array for p in first[sha].split("|")]
        except DecodeError:
            continue
        if all(a.size and float(np.min(a)) == float(np.max(a)) for a in arrays):
            blank.add(sha)
    return [f"{r['image_sha256']}:{r['case_id']}" if r["image_sha256"] in blank else str(r["image_sha256"])
            for r in rows]
