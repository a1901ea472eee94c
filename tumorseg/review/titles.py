"""Panel titles fitted to their panel: at most three lines, each measured against the panel width.

A long case id never runs into the neighbouring panel: :func:`panel_title` builds such a title
from a rank, case id and score.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

ELLIPSIS = "…"
TITLE_FONTSIZE = 8
TITLE_LINES = 3
TITLE_CHARS = 34  # characters per line that fit a 3-inch panel at TITLE_FONTSIZE
MIN_TITLE_CHARS = 16
_MIN_FRAGMENT = 4  # a cut that leaves fewer characters of a dropped name snaps to the separator
_TOKEN = re.compile(r"[^/\s]*[/\s]+|[^/\s]+")  # a name and the '/' or spaces after it
_NAME_BREAK = re.compile(r"[_\-.#]")  # where a name too long for a line may break


# ----------------------------------------------------------------------------- panel titles


def _one_line(text: object) -> str:
    """``text`` as one line: line breaks become spaces."""
    return " ".join(str(text).splitlines()).strip()


def _clip_right(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters at its end, marked with an ellipsis."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + ELLIPSIS


def _shorten_left(text: str, avail: int) -> str:
    """``text`` in at most ``avail`` characters, keeping its end; a cut is marked with a leading ellipsis.

    A cut that would keep only a short fragment (under ``_MIN_FRAGMENT`` characters) of a
    dropped name moves on to the next ``/`` or space, e.g. ``…/patient_0012/slice_0042.png``.
    """
    if len(text) <= avail:
        return text
    if avail <= 1:
        return ELLIPSIS[:avail]
    tail = text[len(text) - (avail - 1):]
    m = re.search(r"[/\s]", tail)
    if m is not None and 0 < m.start() < _MIN_FRAGMENT:
        tail = tail[m.start():]
    return ELLIPSIS + tail


def _tokens(text: str, width: int, name_breaks: bool = True) -> list[str]:
    """Split after each ``/`` or space run; a name longer than ``width`` is cut into chunks from its end.

    With ``name_breaks``, a chunk starts after a ``_``, ``-``, ``.`` or ``#`` where that keeps it
    at least half a line long.
    """
    out: list[str] = []
    for tok in _TOKEN.findall(text):
        chunks: list[str] = []
        while len(tok) > width:
            window = tok[-width:]
            m = _NAME_BREAK.search(window[: width - width // 2]) if name_breaks else None
            chunk = window[m.end():] if m is not None else window
            chunks.insert(0, chunk)
            tok = tok[: len(tok) - len(chunk)]
        out.extend(([tok] if tok else []) + chunks)
    return out


def _fit_path(prefix: str, text: str, width: int, max_lines: int) -> list[str]:
    """Lay ``prefix + text`` out in at most ``max_lines`` lines of at most ``width`` characters.

    ``text`` (a case id) wraps after ``/`` or spaces, filling lines from its end, so its most
    specific part (the file name) is kept; what does not fit is dropped from the left of the
    first line, which starts with ``prefix`` and marks the cut with an ellipsis.
    """
    if len(prefix) + len(text) <= width:
        return [prefix + text]
    lines, cut = _layout(prefix, _tokens(text, width), width, max_lines)
    if cut and len(prefix + text) <= width * max_lines:
        # breaking a long name at '_' etc. cost its start: break anywhere if that shows the whole id
        hard, hard_cut = _layout(prefix, _tokens(text, width, name_breaks=False), width, max_lines)
        if not hard_cut:
            return hard
    return lines


def _layout(prefix: str, rest: list[str], width: int, max_lines: int) -> tuple[list[str], bool]:
    """Pieces of :func:`_tokens` in lines filled from the end; the first line holds ``prefix`` and any cut.

    Returns:
        The lines, and whether the start of the text was cut.
    """
    below: list[str] = []
    while rest and len(below) < max_lines - 1 and len(prefix) + len("".join(rest)) > width:
        line, j = "", len(rest)
        # the first piece stays on the first line when it fits there, so that line is never just the prefix
        stop = 1 if len(prefix) + len(rest[0]) <= width else 0
        while j > stop and len(rest[j - 1]) + len(line) <= width:
            j -= 1
            line = rest[j] + line
        below.insert(0, line.rstrip())
        rest = rest[:j]
    head = "".join(rest)
    avail = width - len(prefix)
    return [(prefix + _shorten_left(head, avail)).rstrip(), *below], len(head) > avail


def _fit_lines(title: str, width: int, max_lines: int = TITLE_LINES) -> list[str]:
    """Fit any title to at most ``max_lines`` lines of at most ``width`` characters.

    Lines that fit are kept as they are (so a :func:`panel_title` passes unchanged). A longer
    line wraps into the spare lines and is shortened from the left (see :func:`_fit_path`),
    keeping a short ``"label: "`` start such as ``"worst: "``. With more than ``max_lines``
    lines, the first ``max_lines - 1`` and the last (usually the score) are kept.
    """
    lines = [line.rstrip() for line in str(title).splitlines()] or [""]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + lines[-1:]
    spare = max_lines - len(lines)
    out: list[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        head, sep, rest = line.partition(": ")
        prefix = head + sep if sep and len(head) + len(sep) <= width // 2 else ""
        fitted = _fit_path(prefix, rest if prefix else line, width, 1 + spare)
        spare -= len(fitted) - 1
        out.extend(_clip_right(f, width) for f in fitted)
    return out


def panel_title(rank: str, case_id: str, dice: float, gt_empty: bool, pred_pixels: int,
                width_chars: int = TITLE_CHARS) -> str:
    """Title of one gallery panel: at most 3 lines of at most ``width_chars`` characters.

    The first line is ``"{rank}: {case_id}"``. A case id too long for it wraps after ``/``
    (filling lines from its end) and loses its start, marked with a leading ``…``, so the file
    name and its folder stay readable. The last line is ``"Dice 0.873"``. A tumour-free ground
    truth gets a mark: with predicted pixels (a false positive, Dice 0) the lines
    ``"tumour-free: 1,234 px predicted"`` and ``"Dice 0.000 · false positive"``, which leave the
    case id one line; with nothing predicted ``"Dice 1.000 · both empty"``.

    The default width fits a 3-inch panel at font size 8. Pure and deterministic.

    Args:
        rank: the panel's label, e.g. ``"worst"`` or ``"best"``.
        case_id: the case id (patient folder and file name, or a volume's slice).
        dice: the case's Dice (NaN prints as ``nan``).
        gt_empty: whether the ground-truth mask is empty (tumour-free).
        pred_pixels: number of predicted tumour pixels.
        width_chars: characters per line, at least 16.

    Returns:
        The title, its lines joined by newlines.

    Raises:
        ValueError: ``width_chars`` is under 16.
    """
    width = int(width_chars)
    if width < MIN_TITLE_CHARS:
        raise ValueError(f"width_chars must be at least {MIN_TITLE_CHARS}, got {width_chars}")
    score = f"Dice {dice:.3f}"
    n = int(pred_pixels)

    def first_fitting(*options: str) -> str:
        return next((o for o in options if len(o) <= width), _clip_right(options[-1], width))

    if gt_empty and n > 0:
        info = [first_fitting(f"tumour-free: {n:,} px predicted", f"tumour-free: {n:,} px", "tumour-free"),
                first_fitting(f"{score} · false positive", f"{score} · FP", score)]
    elif gt_empty:
        info = [first_fitting(f"{score} · both empty", score)]
    else:
        info = [first_fitting(score)]
    rank = _one_line(rank)
    if len(rank) + 2 > width // 2:
        rank = _clip_right(rank, width // 2 - 2)
    case = _fit_path(f"{rank}: ", _one_line(case_id), width, TITLE_LINES - len(info))
    return "\n".join([*case, *info])


def title_fitter(fig: Any, max_width_in: float) -> Callable[[str], str]:
    """A function fitting a title into ``max_width_in`` inches, measured by ``fig``'s renderer.

    It tries :data:`TITLE_CHARS` characters per line and fewer until every line's rendered
    width fits, so even wide glyphs never reach the neighbouring panel.
    """
    from matplotlib.font_manager import FontProperties

    renderer = fig.canvas.get_renderer()
    prop = FontProperties(size=TITLE_FONTSIZE)
    max_px = max_width_in * fig.dpi

    def fits(line: str) -> bool:
        w, _, _ = renderer.get_text_width_height_descent(line, prop, ismath=False)
        return bool(w <= max_px)

    def fit(title: str) -> str:
        lines = _fit_lines(title, TITLE_CHARS)
        width = TITLE_CHARS
        while width > 1 and not all(fits(line) for line in lines):
            width -= 1
            lines = _fit_lines(title, width)
        return "\n".join(lines)

    return fit


# ----------------------------------------------------------------------------- figures


