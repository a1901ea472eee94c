"""Declared label sets: ``--labels 0=background,1=necrosis,2=edema,3=enhancing``.

Labels are a property of the dataset, declared once at ingest and recorded in ``manifest.json``;
they are never guessed per file (a mask holding only ``{0, 3}`` is a valid map of class 3).

The background is the value named ``background``, else value 0 (:func:`background_value`): label maps
with no 0, such as the Oxford pets trimaps (``1=pet,2=background,3=border``), declare which value it is.
Class 0 of the network is the background; class ``k`` is the ``k``-th other declared value in ascending
order (:func:`class_values`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.errors import TumorsegError

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def parse_labels(text: str, source: str = "--labels") -> dict[int, str]:
    """``"0=background,1=tumour"`` -> ``{0: "background", 1: "tumour"}``, checked (:func:`check_labels`)."""
    out: dict[int, str] = {}
    for part in (p.strip() for p in text.split(",")):
        value, sep, name = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise TumorsegError(f"{source}: {part!r} is not VALUE=NAME; write e.g. --labels "
                                "0=background,1=necrosis,2=edema")
        v = int(value)
        if v in out:
            raise TumorsegError(f"{source}: value {v} is declared twice ({out[v]}, {name.strip()}); each value once")
        out[v] = name.strip()
    return check_labels(out, source)


BACKGROUND = "background"
"""The class name that marks the background value of a label set declared without 0."""


def background_value(labels: dict[int, str]) -> int | None:
    """The background's value: the one named :data:`BACKGROUND` (any case), else 0 when declared, else ``None``."""
    named = [v for v, n in labels.items() if n.lower() == BACKGROUND]
    if named:
        return min(named)
    return 0 if 0 in labels else None


def class_values(labels: dict[int, str]) -> list[int]:
    """The declared values in class order: the background first, then the others ascending."""
    bg = background_value(labels)
    rest = sorted(v for v in labels if v != bg)
    return rest if bg is None else [bg, *rest]


def check_labels(labels: dict[int, str], source: str = "--labels") -> dict[int, str]:
    """A valid label set: a background (0, or a value named background), 2..255 values in 0..255, unique names."""
    if background_value(labels) is None:
        raise TumorsegError(f"{source}: no background: value 0 is not declared and no value is named background; "
                            "declare 0=background, or name the background value (e.g. 1=pet,2=background,3=border)")
    if len(labels) < 2:
        raise TumorsegError(f"{source}: only background declared; declare at least one tumour class (1=tumour)")
    bad = [v for v in labels if not 0 <= v <= 255]
    if bad:
        raise TumorsegError(f"{source}: value {bad[0]} is outside 0..255; label maps are stored as 8-bit values")
    names = list(labels.values())
    for name in names:
        if not _NAME.match(name):
            raise TumorsegError(f"{source}: name {name!r} must start with a letter and hold only letters, digits "
                                "and _ (it names metrics: val_dice_<name>)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TumorsegError(f"{source}: name {dup[0]!r} is used for two values; give each class its own name")
    named_bg = sorted(v for v, n in labels.items() if n.lower() == BACKGROUND)
    if len(named_bg) > 1:
        raise TumorsegError(f"{source}: values {named_bg[0]} and {named_bg[1]} are both named background; name one")
    return dict(sorted(labels.items()))


def from_dataset_json(folders: list[Path]) -> tuple[Path, dict[int, str]] | None:
    """The label set a ``dataset.json`` in (or above) ``folders`` declares (the Decathlon's and nnU-Net's file).

    Both forms: ``{"labels": {"0": "background", ...}}`` (Decathlon, nnU-Net v1) and ``{"background": 0, ...}``
    (nnU-Net v2; region entries, lists of values, are not a label set). Names are made valid class names
    (``"non-enhancing tumor"`` -> ``non_enhancing_tumor``). ``None`` where there is none, or it does not parse.
    """
    import json

    for path in dict.fromkeys(f / "dataset.json" for folder in folders for f in (folder, folder.parent)):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))["labels"]
            pairs = [(int(k), str(v)) if str(k).lstrip("-").isdigit() else (int(v), str(k)) for k, v in raw.items()]
            return path, check_labels({v: _class_name(n) for v, n in pairs}, str(path))
        except (OSError, ValueError, TypeError, KeyError, AttributeError, TumorsegError):
            continue
    return None


def _class_name(text: str) -> str:
    """Free text as a valid class name: runs of other characters as ``_``, a leading ``c`` where no letter starts it."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text.strip()).strip("_")
    return name if name[:1].isalpha() else f"c{name}"


def format_labels(labels: dict[int, str]) -> str:
    """The ``--labels`` text of a label set."""
    return ",".join(f"{v}={n}" for v, n in sorted(labels.items()))


def parse_regions(text: str, labels: dict[int, str] | None = None, source: str = "--regions") -> dict[str, list[int]]:
    """``"whole=1,2,3 core=1,3 enhancing=3"`` -> ``{"whole": [1, 2, 3], ...}`` (nnU-Net's region-based training).

    Each region is a name and the declared tumour values it unites; regions may overlap. Written in
    the order predictions are painted back into a label map (outermost first, as BraTS's whole tumour,
    tumour core, enhancing tumour). With ``labels``, also checked against them (:func:`check_regions`);
    without, only the syntax (ingest checks them against the declared labels).
    """
    out: dict[str, list[int]] = {}
    for part in text.replace(";", " ").split():
        name, sep, values = part.partition("=")
        try:
            vals = sorted({int(v) for v in values.split(",") if v.strip()}) if sep else []
        except ValueError:
            vals = []
        if not sep or not vals:
            raise TumorsegError(f"{source}: {part!r} is not NAME=VALUE,VALUE...; write e.g. --regions "
                                "whole=1,2,3 core=1,3 enhancing=3")
        out[name] = vals
    return out if labels is None else check_regions(out, labels, source)


def check_regions(regions: dict[str, list[int]], labels: dict[int, str],
                  source: str = "--regions") -> dict[str, list[int]]:
    """Regions over declared tumour values, with unique identifier-like names (they name metrics)."""
    if not regions:
        raise TumorsegError(f"{source}: no region given; write e.g. --regions whole=1,2,3 core=1,3")
    for name, values in regions.items():
        if not _NAME.match(name):
            raise TumorsegError(f"{source}: region name {name!r} must start with a letter and hold only letters, "
                                "digits and _")
        bg = background_value(labels)
        bad = [v for v in values if v not in labels or v == bg]
        if bad:
            raise TumorsegError(f"{source}: region {name} holds {bad[0]}, which is not a declared tumour value "
                                f"({', '.join(str(v) for v in sorted(labels) if v != bg)}); fix --regions or "
                                "--labels")
        if not values:
            raise TumorsegError(f"{source}: region {name} holds no value")
    return {n: sorted(set(v)) for n, v in regions.items()}


def format_regions(regions: dict[str, list[int]]) -> str:
    """The ``--regions`` text of a region set."""
    return " ".join(f"{n}={','.join(map(str, v))}" for n, v in regions.items())


BINARY = {0: "background", 1: "tumour"}
"""The label set of a binary manifest (and of every model trained before label sets existed)."""


class Classes:
    """What a label set means to the network: its output channels and how indices map to values.

    Masks travel as class *indices* (0: the background, ``k``: the ``k``-th other declared value in ascending
    order; :func:`class_values`). A set with one tumour class is binary (one sigmoid channel, as always); with
    more it is multi-class: one softmax channel per class (background included), or, with ``regions``, one sigmoid
    channel per (possibly overlapping) region, scored per region and painted back into a label map in
    the regions' order (nnU-Net's region-based training).

    Args:
        labels: ``{value: name}``; ``None`` means binary (:data:`BINARY`).
        regions: ``{name: [declared values]}`` for region-based training, or ``None``.
    """

    def __init__(self, labels: dict[int, str] | None = None, regions: dict[str, list[int]] | None = None) -> None:
        declared = labels or BINARY
        self.values = class_values(declared)
        self.labels = {v: declared[v] for v in self.values}
        self.names = list(self.labels.values())
        self.regions = dict(regions) if regions else None
        index = {v: i for i, v in enumerate(self.values)}
        self._region_index = [[index[v] for v in vals] for vals in (self.regions or {}).values()]
        # the class each region paints: the one it holds that no later region holds (see paint)
        self._paint = []
        for r, idx in enumerate(self._region_index):
            later = {i for other in self._region_index[r + 1:] for i in other}
            self._paint.append(min([i for i in idx if i not in later] or idx))

    @classmethod
    def from_json(cls, d: dict[str, str] | dict[int, str] | None,
                  regions: list[list[Any]] | dict[str, list[int]] | None = None) -> Classes:
        """From the ``manifest.json``/checkpoint form; ``None``: binary.

        Values come as strings, regions as ``[name, values]`` pairs whose order is the painting order.
        """
        pairs = regions.items() if isinstance(regions, dict) else (regions or [])
        return cls({int(v): str(n) for v, n in d.items()} if d else None,
                   {str(n): [int(v) for v in vals] for n, vals in pairs} or None)

    def to_json(self) -> dict[str, str] | None:
        """``{"0": "background", ...}``, or ``None`` for a binary set (so old and new binary models compare equal)."""
        return {str(v): n for v, n in self.labels.items()} if self.multiclass else None

    @property
    def multiclass(self) -> bool:
        """More than one tumour class (masks and predictions are label maps)."""
        return len(self.labels) > 2

    @property
    def region_based(self) -> bool:
        """One sigmoid channel per region instead of one softmax channel per class."""
        return self.regions is not None

    @property
    def softmax(self) -> bool:
        """Whether the network's channels are a softmax over the classes."""
        return self.multiclass and not self.region_based

    @property
    def out_channels(self) -> int:
        """Network output channels: one per class (softmax), one per region (sigmoid), else one (sigmoid)."""
        if self.regions:
            return len(self.regions)
        return len(self.labels) if self.multiclass else 1

    @property
    def foreground(self) -> list[tuple[int, str]]:
        """``(index, name)`` of what is scored: each tumour class (background left out), or each region."""
        if self.regions:
            return list(enumerate(self.regions))
        return list(enumerate(self.names))[1:]

    @property
    def region_indices(self) -> list[list[int]]:
        """The class indices each region unites (empty without regions)."""
        return [list(r) for r in self._region_index]

    def same_as(self, other: Classes) -> bool:
        """Whether two label sets are identical (values, names and regions)."""
        return self.to_json() == other.to_json() and self.regions == other.regions

    def describe(self) -> str:
        """``binary`` or the ``--labels`` text (and the ``--regions`` text)."""
        if not self.multiclass:
            return "binary"
        regions = f" regions {format_regions(self.regions)}" if self.regions else ""
        return format_labels(self.labels) + regions

    def to_values(self, index: np.ndarray) -> np.ndarray:
        """Class indices -> the declared label values (``uint8``); binary masks stay ``{0, 1}``."""
        return np.asarray(self.values if self.multiclass else [0, 1], dtype=np.uint8)[index]

    def score_masks(self, index: np.ndarray) -> list[np.ndarray]:
        """The masks that are scored, one per :attr:`foreground` entry, of a class-index map."""
        if self.regions:
            return [np.isin(index, r) for r in self._region_index]
        if not self.multiclass:
            return [np.asarray(index) > 0]
        return [np.asarray(index) == k for k in range(1, len(self.values))]

    def decide(self, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """``uint8`` class indices from probabilities.

        ``(H, W)`` tumour probabilities are thresholded, ``(K, H, W)`` class probabilities take the argmax,
        ``(R, H, W)`` region probabilities are thresholded and painted (:meth:`paint`).
        """
        if prob.ndim == 2 or not (self.multiclass or self.regions):  # one channel, none stored (images or volumes)
            return (prob > threshold).astype(np.uint8)
        if self.regions:
            return self.paint(prob > threshold)
        return np.argmax(prob, axis=0).astype(np.uint8)

    def paint(self, masks: np.ndarray) -> np.ndarray:
        """Region masks ``(R, H, W)`` -> a class-index map, painting the regions in order.

        A region paints the class it holds that no later region holds (BraTS: whole tumour -> oedema, core
        -> necrosis, enhancing -> enhancing), so nested regions come back as the labels they were made of.
        """
        out = np.zeros(masks.shape[1:], dtype=np.uint8)
        for mask, k in zip(masks, self._paint, strict=True):
            out[mask] = k
        return out

    def channel_priors(self, class_fractions: list[float]) -> list[float]:
        """Each output channel's prior from the classes' pixel shares (background first)."""
        if self.regions:
            return [float(sum(class_fractions[i] for i in idx)) for idx in self._region_index]
        return list(class_fractions)
