"""Declared label sets: ``--labels 0=background,1=necrosis,2=edema,3=enhancing``.

Labels are a property of the dataset, declared once at ingest and recorded in ``manifest.json``;
they are never guessed per file (a mask holding only ``{0, 3}`` is a valid map of class 3). Class
``k`` of the network is the ``k``-th declared value in ascending order; value 0 is background.
"""

from __future__ import annotations

import re

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


def check_labels(labels: dict[int, str], source: str = "--labels") -> dict[int, str]:
    """A valid label set: 0 declared (background), 2..255 values in 0..255, unique identifier-like names."""
    if 0 not in labels:
        raise TumorsegError(f"{source}: value 0 (background) is not declared; start with 0=background")
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
    return dict(sorted(labels.items()))


def format_labels(labels: dict[int, str]) -> str:
    """The ``--labels`` text of a label set."""
    return ",".join(f"{v}={n}" for v, n in sorted(labels.items()))


BINARY = {0: "background", 1: "tumour"}
"""The label set of a binary manifest (and of every model trained before label sets existed)."""


class Classes:
    """What a label set means to the network: its output channels and how indices map to values.

    Masks travel as class *indices* (``k``: the ``k``-th declared value in ascending order, 0 is
    background). A set with one tumour class is binary (one sigmoid channel, as always); with more it is
    multi-class (one softmax channel per class, background included).

    Args:
        labels: ``{value: name}``; ``None`` means binary (:data:`BINARY`).
    """

    def __init__(self, labels: dict[int, str] | None = None) -> None:
        self.labels = dict(sorted((labels or BINARY).items()))
        self.values = list(self.labels)
        self.names = list(self.labels.values())

    @classmethod
    def from_json(cls, d: dict[str, str] | dict[int, str] | None) -> Classes:
        """From ``manifest.json``/checkpoint form (values as strings); ``None``: binary."""
        return cls({int(v): str(n) for v, n in d.items()} if d else None)

    def to_json(self) -> dict[str, str] | None:
        """``{"0": "background", ...}``, or ``None`` for a binary set (so old and new binary models compare equal)."""
        return {str(v): n for v, n in self.labels.items()} if self.multiclass else None

    @property
    def multiclass(self) -> bool:
        """More than one tumour class."""
        return len(self.labels) > 2

    @property
    def out_channels(self) -> int:
        """Network output channels: one per class (softmax) when multi-class, else one (sigmoid)."""
        return len(self.labels) if self.multiclass else 1

    @property
    def foreground(self) -> list[tuple[int, str]]:
        """``(index, name)`` of each tumour class (index 0, background, left out)."""
        return list(enumerate(self.names))[1:]

    def same_as(self, other: Classes) -> bool:
        """Whether two label sets are identical (values and names)."""
        return self.to_json() == other.to_json()

    def describe(self) -> str:
        """``binary`` or the ``--labels`` text."""
        return format_labels(self.labels) if self.multiclass else "binary"

    def to_values(self, index: np.ndarray) -> np.ndarray:
        """Class indices -> the declared label values (``uint8``); binary masks stay ``{0, 1}``."""
        return np.asarray(self.values if self.multiclass else [0, 1], dtype=np.uint8)[index]
