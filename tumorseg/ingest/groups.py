"""Groups of the ingest stage when the slices of a volume come as numbered 2D files.

A lab's slice stacks often arrive as one file per slice, numbered within a patient's folder
(``TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_12.tif``). Each file is its own group under
``--group-by case``: one patient's slices then land in different splits (the test split shares
patients with training) and are scored apart. ``--group-by auto`` (the default) makes each
stack one group where the files are such slices:

* at least half of the images are numbered slices of ordered stacks (three or more consecutive
  numbers within one folder, :func:`tumorseg.context.path_members`), in at least :data:`MIN_STACKS`
  stacks, each file still its own group;
* adjacent slices are confirmed to be neighbours in the anatomy: in a seeded sample of stacks they
  correlate clearly more than unrelated slices (:data:`tumorseg.context.ADJACENT_MARGIN`, the plan's
  own test for slice context).

Each stack (a run of consecutive numbers) becomes one group, named by its folder, prefix and slice
range. A gap in the numbers (slice files missing from a patient's folder) stays inside the group
where it is shorter than the runs either side and the slices either side still correlate like
neighbours (:func:`bridged`), else it separates two groups (volumes numbered on in one folder). Unconfirmed files
(a class folder of unrelated images numbered 1..N) are not merged; nor are three or four huge stacks
(:data:`MIN_STACKS`), where a split would have no groups to choose from.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from tumorseg.config import IngestConfig
from tumorseg.context import Neighbours, sampled_similarity

MIN_STACKS = 10
"""``--group-by auto`` makes stacks groups only where there are at least this many: each split needs several."""
SAMPLE_STACKS = 12
"""Stacks whose adjacent slices are compared (three consecutive files read from each)."""


def numbered_stacks(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The ordered stacks (runs of three or more) among the 2D files of ``rows`` that are each their own group."""
    return [run for _, run in numbered_segments(rows) if len(run) >= 3]


def _own_files(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The 2D files of ``rows`` that are each their own group (what stacks may be found among)."""
    return [r for r in rows if int(r["slice_index"]) < 0 and "depth" not in r and r["group"] == r["case_id"]]


def stack_name(run: list[dict[str, Any]]) -> str:
    """One stack's group: ``folder/prefix<first>-<last>`` (``TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_1-20``)."""
    from tumorseg.context import slice_number

    first, last = (PurePosixPath(str(r["image"])) for r in (run[0], run[-1]))  # as path_members reads them
    a, b = slice_number(first.name), slice_number(last.name)
    assert a is not None and b is not None  # path_members found them by their numbers
    parent = str(first.parent)
    return f"{'' if parent == '.' else parent + '/'}{a[0]}{a[1]}-{b[1]}"


def numbered_segments(rows: list[dict[str, Any]]) -> list[tuple[Hashable, list[dict[str, Any]]]]:
    """The runs of consecutive numbers (of any length) among the 2D files of ``rows`` that are their own group.

    Each run with its key (folder, prefix and extension), in slice order, the runs of one key in turn with a gap
    between each (:func:`tumorseg.context.keyed_runs`).
    """
    from tumorseg.context import keyed_runs, path_members

    files = _own_files(rows)
    return [(key, [files[i] for i in run]) for key, run in keyed_runs(path_members([r["image"] for r in files]))]


def _reader(root: Path) -> Callable[[Sequence[dict[str, Any]]], list[np.ndarray]]:
    """Rows -> their images as ``(C, H, W)`` float planes (an empty list where one no longer decodes)."""
    from tumorseg.imageio import DecodeError, decode, read_bytes, slice_of

    def read(rows: Sequence[dict[str, Any]]) -> list[np.ndarray]:
        paths = [root / str(r["image"]).split("|")[0] for r in rows]
        try:
            return [slice_of(decode(read_bytes(p), p), -1, 2).astype(np.float32) for p in paths]
        except DecodeError:  # (inspection read them already; a file changed meanwhile is not a slice to judge)
            return []

    return read


def bridged(segments: list[tuple[Hashable, list[dict[str, Any]]]], near: Neighbours,
            read: Callable[[Sequence[dict[str, Any]]], list[np.ndarray]]) -> list[list[dict[str, Any]]]:
    """Runs of one key joined across each gap of missing slices.

    A gap is bridged where fewer numbers are missing than the shorter run either side holds, and the slices
    either side are still neighbours. A gap of hundreds of numbers between two volumes numbered on in one folder
    is no missing slice, however alike their edge slices look.
    """
    from tumorseg.context import slice_number

    def number(row: dict[str, Any]) -> int:
        parsed = slice_number(PurePosixPath(str(row["image"])).name)
        assert parsed is not None  # numbered_segments found it by its number
        return parsed[1]

    out: list[tuple[Hashable, list[dict[str, Any]]]] = []
    for key, seg in segments:
        if out and out[-1][0] == key:
            before = out[-1][1]
            missing = number(seg[0]) - number(before[-1]) - 1
            if missing < min(len(before), len(seg)):
                planes = read([before[-1], seg[0]])
                if len(planes) == 2 and near.across_gap(*planes):
                    before.extend(seg)
                    continue
        out.append((key, list(seg)))
    return [seg for _, seg in out]


def stack_groups(rows: list[dict[str, Any]], cfg: IngestConfig, root: Path) -> str | None:
    """``--group-by auto``: each confirmed stack of numbered slices becomes one group (``rows`` in place).

    A short gap in the numbers joins the slices either side into one group where they are still neighbours
    (slice files missing from a patient's folder, :func:`bridged`), so a patient is not cut in two; otherwise
    (two volumes numbered on in one folder) each run is its own group. Slice context still stops at the gap
    (:class:`tumorseg.context.SliceStacks`).
    Returns what was done (one line for the log), or ``None`` where the rows are left as they are.
    """
    if cfg.group_by != "auto" or cfg.group_pattern:
        return None
    segments = numbered_segments(rows)
    runs = [run for _, run in segments if len(run) >= 3]
    covered = sum(len(run) for run in runs)
    if len(runs) < MIN_STACKS or 2 * covered < len(rows):
        return None
    read = _reader(root)
    near = sampled_similarity(runs, read, sample=SAMPLE_STACKS)
    if not near.ordered:
        return None
    stacks = bridged(segments, near, read)
    for stack in stacks:
        if len(stack) > 1:
            name = stack_name(stack)
            for r in stack:
                r["group"] = name
    gaps = len(segments) - len(stacks)
    bridges = f"; {gaps} gap(s) in the numbers bridged, the slices either side being neighbours" if gaps else ""
    return (f"{covered} of {len(rows)} images are numbered slices of {len(runs)} stacks (adjacent slices "
            f"correlate {near.adjacent:.2f}, unrelated {near.unrelated:.2f}): each stack is one group, e.g. "
            f"{runs[0][0]['group']}{bridges} (--group-by auto; --group-by case keeps each image its own group)")


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
