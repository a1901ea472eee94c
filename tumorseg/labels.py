"""Declared label sets: ``--labels 0=background,1=necrosis,2=edema,3=enhancing``.

Labels are a property of the dataset, declared once at ingest and recorded in ``manifest.json``;
they are never guessed per file (a mask holding only ``{0, 3}`` is a valid map of class 3). Class
``k`` of the network is the ``k``-th declared value in ascending order; value 0 is background.
"""

from __future__ import annotations

import re

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
