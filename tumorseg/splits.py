"""Stable, patient-aware splits.

A group's split is a pure function of ``(seed, group)``: a SHA-256 of both mapped to
``[0, 1)`` and cut at the cumulative fractions. It never depends on which other cases
exist, so ingesting again after new patients arrive moves no existing case, and no group
can straddle two splits. Folds (over the non-test groups) use a second, independent hash.

Stratification by ``has_tumour`` cannot be exact under that stability guarantee (exact
stratification needs every group's rank, which shifts as data grows). Instead ingest
checks the outcome: :func:`splits_without_tumour` finds a split left with no tumour case and
:func:`suggest_seed` names the first seed that gives every split tumour cases. Data only
ever adds groups, so once a seed passes it keeps passing. Sizes are checked alike, as a
warning: :func:`small_splits` finds a split far below its fraction (a small dataset's hashed
sizes vary) and :func:`balanced_seed` names a seed that gives every split its share.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

from tumorseg.errors import TumorsegError

SPLITS = ("train", "val", "test")


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.7,0.15,0.15"`` -> the train, val and test fractions (``--fractions``)."""
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError as exc:
        raise TumorsegError(f"--fractions {text!r}: expected three numbers like 0.7,0.15,0.15") from exc
    if len(parts) != 3:
        raise TumorsegError(f"--fractions {text!r}: expected three numbers (train,val,test) like 0.7,0.15,0.15")
    return parts  # type: ignore[return-value]


def unit_hash(seed: int, key: str, salt: str) -> float:
    """A uniform number in ``[0, 1)`` from ``(salt, seed, key)``."""
    digest = hashlib.sha256(f"{salt}\0{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(group: str, seed: int, fractions: Sequence[float]) -> str:
    """The split of a group, from its hash and the train/val/test fractions."""
    u = unit_hash(seed, group, "split")
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if u < edge:
            return name
    return next(name for name, frac in reversed(list(zip(SPLITS, fractions, strict=True))) if frac > 0)


def assign_fold(group: str, seed: int, folds: int) -> int:
    """The cross-validation fold of a non-test group (``-1`` without folds)."""
    if folds < 2:
        return -1
    return int(unit_hash(seed, group, "fold") * folds)


def merge_groups(groups: Sequence[str], keys: Sequence[str]) -> list[str]:
    """Merge groups that share a key (byte-identical images share a group).

    Each merged set takes its lexicographically smallest group name. Union-find over
    the groups, linked through equal ``keys``.
    """
    parent: dict[str, str] = {g: g for g in groups}

    def find(g: str) -> str:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    first_by_key: dict[str, str] = {}
    for group, key in zip(groups, keys, strict=True):
        other = first_by_key.setdefault(key, group)
        a, b = find(group), find(other)
        if a != b:
            lo, hi = sorted((a, b))
            parent[hi] = lo
    return [find(g) for g in groups]


def splits_without_tumour(
    tumour_groups: Iterable[str], seed: int, fractions: Sequence[float]
) -> list[str]:
    """Splits with a non-zero fraction that would get no tumour group."""
    groups = list(tumour_groups)
    wanted = [s for s, f in zip(SPLITS, fractions, strict=True) if f > 0]
    if len(groups) < len(wanted):
        return []  # too few tumour groups to cover every split: nothing to check
    got = {assign_split(g, seed, fractions) for g in groups}
    return [s for s in wanted if s not in got]


def suggest_seed(tumour_groups: Iterable[str], seed: int, fractions: Sequence[float], tries: int = 1000) -> int | None:
    """The first seed after ``seed`` that gives every split a tumour group."""
    return covering_seed([list(tumour_groups)], seed, fractions, tries)


def covering_seed(group_sets: Sequence[Sequence[str]], seed: int, fractions: Sequence[float],
                  tries: int = 1000) -> int | None:
    """The first seed after ``seed`` that gives every split a group of each set (one set per class)."""
    return _first_seed(seed, tries, lambda s: not any(splits_without_tumour(g, s, fractions) for g in group_sets))


def _first_seed(seed: int, tries: int, ok: Callable[[int], bool]) -> int | None:
    """The first of the ``tries`` seeds after ``seed`` that is ``ok``."""
    return next((candidate for candidate in range(seed + 1, seed + 1 + tries) if ok(candidate)), None)

SMALL_SPLIT = 0.5
"""A split holding under this share of the groups its fraction asks for is small (checked where it asks for 3+)."""


def small_splits(groups: Sequence[str], seed: int, fractions: Sequence[float]) -> dict[str, tuple[int, float]]:
    """Splits that get under :data:`SMALL_SPLIT` of their expected groups: ``{split: (got, expected)}``.

    Only splits expected to hold at least 3 groups: below that, every split is small by nature. The hash gives
    each group its split alone (stability), so a small dataset's split sizes vary around the fractions.
    """
    unique = sorted(set(groups))
    got = dict.fromkeys(SPLITS, 0)
    for g in unique:
        got[assign_split(g, seed, fractions)] += 1
    out = {}
    for name, frac in zip(SPLITS, fractions, strict=True):
        expected = frac * len(unique)
        if expected >= 3 and got[name] < SMALL_SPLIT * expected:
            out[name] = (got[name], expected)
    return out


def balanced_seed(groups: Sequence[str], group_sets: Sequence[Sequence[str]], seed: int, fractions: Sequence[float],
                  tries: int = 1000) -> int | None:
    """The first seed after ``seed`` with no small split that still gives every split a group of each set."""
    return _first_seed(seed, tries, lambda s: not small_splits(groups, s, fractions) and not any(
        splits_without_tumour(g, s, fractions) for g in group_sets))
