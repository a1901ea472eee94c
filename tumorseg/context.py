"""Slice context (2.5D): the neighbouring slices of a case as extra input channels.

A case has neighbours when it is one slice of an ordered stack:

* a slice of a volume ingested in slice mode (``slice_index >= 0``): the slices of the same image;
* a 2D file whose name differs from others of its folder and group only by a trailing slice number
  (``TCGA_CS_4941_19960909_12.tif``, ``case3_slice007.png``): the files of consecutive numbers.

A gap in the numbers ends a stack (the slice beyond it is not a neighbour), and two files claiming one
number (``a_1.png``, ``a_01.png``) are left out of stacks. Names without a trailing number are not slices.

With a context of ``k`` the network sees ``2k + 1`` planes, from slice ``i - k`` to ``i + k``, each
converted to the model's base channels and concatenated along the channel axis (``(C * (2k + 1), H, W)``);
at the ends of a stack the edge slice is repeated (as a missing neighbour is, for a case in no stack).
Train and evaluate build the planes from the manifest (:class:`SliceStacks`); predict from the volume or
from the input files' names (:func:`path_stacks`); the pyfunc model from the order of the images it is
given (:func:`stack_planes`: one ordered stack per call).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, TypeVar

import numpy as np

from tumorseg.imageio import split_ext, to_channels

T = TypeVar("T")

_TRAILING = re.compile(r"^(.*?)(\d+)$")

ADJACENT_MARGIN = 0.3
"""Numbered slices are neighbours in the anatomy where adjacent ones correlate at least this much more than
unrelated ones (median correlations of thumbnails less their shared mean, :func:`consecutive_similarity`): the
plan's test for slice context (rule 10) and ingest's for grouping a stack (``--group-by auto``). Measured: the
left-atrium slices 0.95 against -0.12 (as NIfTI slices) and 0.95 against -0.06 (as numbered PNGs); numbered
images that are not neighbours (the synthetic demo's) differ by at most 0.15, in samples of four stacks."""


def slice_number(name: str) -> tuple[str, int] | None:
    """``(prefix, number)`` of a file name ending (before its extension) in a slice number, else ``None``.

    ``"TCGA_CS_4941_19960909_12.tif" -> ("TCGA_CS_4941_19960909_", 12)``; ``"benign (12).png"`` has
    no trailing number (a closing parenthesis follows it) and is no slice.
    """
    stem, _ = split_ext(PurePosixPath(name).name)
    m = _TRAILING.match(stem)
    return (m.group(1), int(m.group(2))) if m else None


def ordered_runs(members: Iterable[tuple[Hashable, T, int]]) -> list[list[T]]:
    """Runs of consecutive positions within each key: ``(key, item, position)`` -> ordered runs of items.

    A gap in the positions ends a run; items sharing a position (ambiguous order) are left out.
    """
    return [run for _, run in keyed_runs(members) if len(run) > 1]


def keyed_runs(members: Iterable[tuple[Hashable, T, int]]) -> list[tuple[Hashable, list[T]]]:
    """:func:`ordered_runs` with each run's key, single items included, the runs of a key in turn."""
    by_key: dict[Hashable, dict[int, list[T]]] = defaultdict(lambda: defaultdict(list))
    for key, item, pos in members:
        by_key[key][pos].append(item)
    runs: list[tuple[Hashable, list[T]]] = []
    for key, positions in by_key.items():
        last = None
        for pos in sorted(positions):
            items = positions[pos]
            if len(items) != 1:  # ambiguous order: left out, and it ends the run
                last = None
                continue
            if last is None or pos != last + 1:
                runs.append((key, []))
            runs[-1][1].append(items[0])
            last = pos
    return runs


def window(n: int, i: int, k: int) -> list[int]:
    """Indices ``i - k .. i + k`` into a stack of ``n``, clamped at its ends."""
    return [min(max(i + d, 0), n - 1) for d in range(-k, k + 1)]


@dataclass(frozen=True)
class SliceStacks:
    """The ordered stacks among a manifest's cases.

    Attributes:
        runs: each stack's case ids in slice order (stacks of at least two slices).
    """

    runs: tuple[tuple[str, ...], ...]

    @classmethod
    def from_frame(cls, df: Any) -> SliceStacks:
        """The stacks of a manifest frame (its ``case_id``, ``image``, ``group`` and ``slice_index``).

        A frame of whole volumes (a ``dims: 3`` manifest, with its ``depth`` column) has none: numbered volume files
        are patients, not slices.
        """
        members: list[tuple[Hashable, str, int]] = []
        if "depth" in df.columns:
            return cls(())
        for cid, image, group, index in zip(df["case_id"], df["image"], df["group"], df["slice_index"],
                                            strict=True):
            if int(index) >= 0:
                members.append((("volume", str(image), str(group)), str(cid), int(index)))
                continue
            parsed = slice_number(str(image))
            if parsed is not None:
                parent = str(PurePosixPath(str(image)).parent)
                ext = split_ext(str(image))[1]
                members.append((("files", parent, parsed[0], ext, str(group)), str(cid), parsed[1]))
        return cls(tuple(tuple(run) for run in ordered_runs(members)))

    def positions(self, case_ids: Sequence[str]) -> list[list[int]]:
        """Each stack whose cases are all in ``case_ids``, as positions in it (slice order)."""
        index = {str(cid): i for i, cid in enumerate(case_ids)}
        return [[index[c] for c in run] for run in self.runs if all(c in index for c in run)]

    def neighbours(self, k: int) -> dict[str, list[str]]:
        """``case id -> the 2k + 1 case ids of its window`` for every case in a stack."""
        out: dict[str, list[str]] = {}
        for run in self.runs:
            for i, cid in enumerate(run):
                out[cid] = [run[j] for j in window(len(run), i, k)]
        return out

    def summary(self, n_cases: int) -> dict[str, float]:
        """Stacks, the share of cases in stacks of three or more, and the median stack length."""
        long = [len(r) for r in self.runs if len(r) >= 3]
        return {"stacks": len(long), "share_in_stacks": round(sum(long) / n_cases, 4) if n_cases else 0.0,
                "median_length": float(np.median(long)) if long else 0.0}


def path_stacks(paths: Sequence[Any]) -> list[list[int]]:
    """Ordered stacks among input files (indices into ``paths``), by folder and trailing slice number."""
    return ordered_runs(path_members(paths))


def path_members(paths: Sequence[Any]) -> list[tuple[Hashable, int, int]]:
    """``(folder, prefix and extension; index into paths; slice number)`` of each numbered file in ``paths``."""
    members: list[tuple[Hashable, int, int]] = []
    for i, p in enumerate(paths):
        path = PurePosixPath(str(p))
        parsed = slice_number(path.name)
        if parsed is not None:
            members.append(((str(path.parent), parsed[0], split_ext(path.name)[1]), i, parsed[1]))
    return members


def stack_planes(planes: Sequence[np.ndarray], k: int, channels: int) -> list[np.ndarray]:
    """Each plane of an ordered stack with its ``k`` neighbours a side: ``(channels * (2k + 1), H, W)`` each.

    Every plane is converted to ``channels`` (grey <-> RGB) first; the stack's ends repeat the edge plane.
    """
    base = [to_channels(np.asarray(p, dtype=np.float32), channels) for p in planes]
    if k == 0:
        return base
    shapes = {b.shape[1:] for b in base}
    if len(shapes) > 1:
        from tumorseg.errors import TumorsegError

        raise TumorsegError(f"slices of one stack differ in size ({', '.join(sorted(map(str, shapes)))}); "
                            "a model with slice context needs the slices of one volume")
    return [np.concatenate([base[j] for j in window(len(base), i, k)], axis=0) for i in range(len(base))]


def window_image(planes: Sequence[np.ndarray], channels: int) -> np.ndarray:
    """One case's network input from its window of ``2k + 1`` planes (each converted to ``channels``)."""
    return np.concatenate([to_channels(np.asarray(p, dtype=np.float32), channels) for p in planes], axis=0)


def centre(image: np.ndarray, k: int) -> np.ndarray:
    """The case's own plane of a context image (its middle ``C / (2k + 1)`` channels)."""
    if k == 0:
        return image
    c = image.shape[0] // (2 * k + 1)
    return image[k * c:(k + 1) * c]


@dataclass(frozen=True)
class Neighbours:
    """What a seeded sample of numbered slices says about their order (:func:`sampled_similarity`).

    Attributes:
        adjacent: the median correlation of consecutive slices.
        unrelated: the median correlation of slices of different stacks (or far apart in one).
        shared: the sample's mean thumbnail, taken from every thumbnail compared (``None``: nothing read).
    """

    adjacent: float
    unrelated: float
    shared: np.ndarray | None = None

    @property
    def ordered(self) -> bool:
        """Whether the numbers follow the anatomy: adjacent slices correlate :data:`ADJACENT_MARGIN` more."""
        return self.adjacent - self.unrelated >= ADJACENT_MARGIN

    def across_gap(self, before: np.ndarray, after: np.ndarray) -> bool:
        """Whether the planes either side of a gap in the numbers are still neighbours (a missing slice).

        They are where they correlate nearer the adjacent median than the unrelated one; the edge slices of
        two volumes numbered on in one folder correlate as unrelated slices do.
        """
        if self.shared is None:
            return False
        r = _corr(_thumb(before) - self.shared, _thumb(after) - self.shared)
        return r >= (self.adjacent + self.unrelated) / 2


def sampled_similarity(runs: Sequence[Sequence[T]], read: Callable[[Sequence[T]], list[np.ndarray]],
                       seed: int = 0, sample: int = 12) -> Neighbours:
    """:func:`consecutive_similarity` of three consecutive slices from each of up to ``sample`` seeded ``runs``.

    ``read`` turns three items of a run into their planes (an empty list: unreadable, left out). The fingerprint
    (rule 10) and ingest (``--group-by auto``) judge stacks by this one sample.
    """
    rng = np.random.default_rng(seed)
    picked = [runs[int(i)] for i in np.sort(rng.permutation(len(runs))[:sample])]
    planes = []
    for run in picked:
        start = int(rng.integers(len(run) - 2))
        planes.append(read(run[start:start + 3]))
    return _similarity(planes, rng)


def consecutive_similarity(stacks: Sequence[Sequence[np.ndarray]], rng: np.random.Generator,
                           pairs: int = 32) -> tuple[float, float]:
    """Median correlation of consecutive planes, and of planes from different stacks (or far apart in one).

    Ordered slices of a volume correlate far more with their neighbours than with random slices; file names
    that only happen to end in numbers do not. Planes are compared as ``32 x 32`` grey thumbnails, each minus
    the mean thumbnail of the sample: what every image shares (a head centred in the field of view, a dark
    background) is not similarity between two slices, else unrelated brain slices would correlate almost as
    much as neighbours.
    """
    found = _similarity(stacks, rng, pairs)
    return found.adjacent, found.unrelated


def _similarity(stacks: Sequence[Sequence[np.ndarray]], rng: np.random.Generator, pairs: int = 32) -> Neighbours:
    thumbs = [[_thumb(p) for p in s] for s in stacks if len(s) >= 2]
    if not thumbs:
        return Neighbours(float("nan"), float("nan"))
    shared = np.mean([t for s in thumbs for t in s], axis=0)
    thumbs = [[t - shared for t in s] for s in thumbs]
    near, far = [], []
    flat = [(si, j) for si, s in enumerate(thumbs) for j in range(len(s))]
    for _ in range(pairs):
        si = int(rng.integers(len(thumbs)))
        j = int(rng.integers(len(thumbs[si]) - 1))
        near.append(_corr(thumbs[si][j], thumbs[si][j + 1]))
        a, b = (flat[int(x)] for x in rng.integers(len(flat), size=2))
        if a[0] != b[0] or abs(a[1] - b[1]) > 2:
            far.append(_corr(thumbs[a[0]][a[1]], thumbs[b[0]][b[1]]))
    return Neighbours(float(np.median(near)), float(np.median(far)) if far else float("nan"), shared)


def _thumb(plane: np.ndarray) -> np.ndarray:
    grey = np.asarray(plane, dtype=np.float32).mean(axis=0)
    h, w = grey.shape
    ys = np.linspace(0, h - 1, 32).round().astype(int)
    xs = np.linspace(0, w - 1, 32).round().astype(int)
    return grey[np.ix_(ys, xs)].ravel()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = float(a.std()), float(b.std())
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb and float(a.mean()) == float(b.mean()) else 0.0
    return float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
