"""Review images for people: overlay grids, learning curves and Dice distributions.

matplotlib is imported inside each function and figures are drawn by its ``Agg`` renderer
without pyplot, so importing this module is free, nothing needs a display, and the global
backend of a notebook or another thread is left alone. Every PNG is written
atomically (a crash never leaves half an image behind).

Panel titles in :func:`overlay_grid` are fitted to their panel (at most three lines, each
measured against the panel width), so a long case id never runs into the neighbouring
panel: :func:`panel_title` builds such a title from a rank, case id and score.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.fsutil import atomic_path

GT_COLOUR = "#00d000"
PRED_COLOUR = "#ff2020"

ELLIPSIS = "…"
TITLE_FONTSIZE = 8
TITLE_LINES = 3
TITLE_CHARS = 34  # characters per line that fit a 3-inch panel at TITLE_FONTSIZE
MIN_TITLE_CHARS = 16
PANEL_W, LEGEND_H = 3.0, 0.35  # inches
_TITLE_MARGIN = 0.1  # inches of a panel's width a title leaves free
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


def _title_fitter(fig: Any, max_width_in: float) -> Callable[[str], str]:
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


def _figure(**kwargs: Any) -> Any:
    """Make a figure drawn by the Agg renderer, outside pyplot's global state (no display, thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    """Save a figure as PNG atomically."""
    with atomic_path(path) as tmp:
        # zlib level 1: ~3x faster than the default 6 on these figures, files ~20% larger
        fig.savefig(tmp, format="png", dpi=100, pil_kwargs={"compress_level": 1})


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """``(C, H, W)`` float -> an ``(H, W)`` grey or ``(H, W, 3)`` RGB array in [0, 1] and its colour map."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 2:
        img = img[None]
    if img.shape[0] >= 3:
        arr = np.moveaxis(img[:3], 0, -1)
        cmap = None
    else:
        arr = img[0]
        cmap = "gray"
    finite = arr[np.isfinite(arr)]
    if finite.size:
        lo, hi = np.percentile(finite, [0.5, 99.5])
        if hi <= lo:
            lo, hi = float(finite.min()), float(finite.max())
    else:
        lo, hi = 0.0, 1.0
    scale = hi - lo if hi > lo else 1.0
    arr = np.clip((np.nan_to_num(arr) - lo) / scale, 0.0, 1.0)
    return arr, cmap


def _contour(ax: Any, mask: np.ndarray, colour: str) -> None:
    m = (np.asarray(mask) > 0).astype(np.float32)
    if m.any() and not m.all():
        ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.2)


def _title_band(n_lines: int) -> float:
    """Height in inches of the band above a panel for titles of ``n_lines`` lines at font size 8."""
    return 0.2 + 0.12 * max(n_lines, 1)


def _grid_figure(items: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], ncols: int) -> Any:
    """The overlay grid figure (see :func:`overlay_grid`)."""
    from matplotlib.lines import Line2D

    n = max(len(items), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    # explicit axes positions and text titles: tight_layout and title placement cost ~10x the drawing
    aspect = max((it[0].shape[-2] / max(it[0].shape[-1], 1) for it in items), default=1.0)
    panel_w, legend_h = PANEL_W, LEGEND_H
    panel_h = panel_w * min(max(aspect, 0.4), 2.0)
    fig = _figure(figsize=(panel_w * ncols, panel_h))
    fit = _title_fitter(fig, panel_w - _TITLE_MARGIN)
    titles = [fit(it[3]) for it in items]
    title_h = _title_band(max((t.count("\n") + 1 for t in titles), default=1))
    fig_w, fig_h = panel_w * ncols, (panel_h + title_h) * nrows + legend_h
    fig.set_size_inches(fig_w, fig_h)
    for k in range(n):
        r, c = divmod(k, ncols)
        bottom = fig_h - (r + 1) * (panel_h + title_h)
        ax = fig.add_axes((c * panel_w / fig_w + 0.01, bottom / fig_h, panel_w / fig_w - 0.02,
                           (panel_h - 0.05) / fig_h))
        ax.set_axis_off()
        if k >= len(items):
            ax.text(0.5, 0.5, "no cases", ha="center", va="center", transform=ax.transAxes)
            continue
        image, gt, pred, _ = items[k]
        arr, cmap = _display_image(image)
        ax.imshow(arr, cmap=cmap, interpolation="nearest")
        _contour(ax, gt, GT_COLOUR)
        _contour(ax, pred, PRED_COLOUR)
        # parse_math=False: a '$' in a file name is text, not mathtext
        ax.text(0.5, 1.01, titles[k], ha="center", va="bottom", fontsize=TITLE_FONTSIZE,
                transform=ax.transAxes, parse_math=False)
    handles = [Line2D([], [], color=GT_COLOUR, label="ground truth"),
               Line2D([], [], color=PRED_COLOUR, label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def overlay_grid(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: Path, ncols: int = 4
) -> None:
    """Draw images with ground-truth (green) and predicted (red) contours in a grid.

    Each title is fitted to its panel (see :func:`_fit_lines`): at most 3 lines, each no wider
    than the panel as rendered, a long case id wrapped after ``/`` and shortened from the left;
    titles made by :func:`panel_title` pass unchanged.

    Args:
        items: ``(image (C, H, W) float, gt (H, W) {0,1}, pred (H, W) {0,1}, title)`` per panel.
        path: PNG to write (atomically).
        ncols: panels per row.
    """
    _save(_grid_figure(items, ncols), Path(path))


def learning_curve(history: list[dict[str, float]], path: Path) -> None:
    """Plot training loss and validation Dice (and the learning rate) against epoch.

    Args:
        history: one row per epoch with keys ``epoch``, ``train_loss``, ``val_dice``, ``lr``
            (missing or NaN values are skipped).
        path: PNG to write (atomically).
    """
    def column(key: str) -> np.ndarray:
        return np.array([float(r.get(key, float("nan"))) for r in history], dtype=np.float64)

    epochs = column("epoch")
    fig = _figure(figsize=(10, 4))
    ax_loss, ax_dice = fig.subplots(1, 2)
    loss = column("train_loss")
    ok = np.isfinite(loss)
    ax_loss.plot(epochs[ok], loss[ok], marker="o", ms=3, label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    lr = column("lr")
    if np.isfinite(lr).any() and (lr[np.isfinite(lr)] > 0).all():
        ax_lr = ax_loss.twinx()
        ok_lr = np.isfinite(lr)
        ax_lr.plot(epochs[ok_lr], lr[ok_lr], color="grey", ls="--", lw=1, label="lr")
        ax_lr.set_yscale("log")
        ax_lr.set_ylabel("learning rate", color="grey")
    dice = column("val_dice")
    ok = np.isfinite(dice)
    ax_dice.plot(epochs[ok], dice[ok], marker="o", ms=3, color="tab:green", label="val Dice")
    if ok.any():
        best = int(np.nanargmax(np.where(ok, dice, -np.inf)))
        ax_dice.axvline(epochs[best], color="tab:green", ls=":", lw=1)
        ax_dice.set_title(f"validation Dice (best {dice[best]:.3f} at epoch {epochs[best]:g})")
    else:
        ax_dice.set_title("validation Dice")
    ax_dice.set_xlabel("epoch")
    ax_dice.set_ylabel("Dice")
    ax_dice.set_ylim(0, 1)
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.13, top=0.9, wspace=0.55)
    _save(fig, Path(path))


def dice_plot(dice: np.ndarray, path: Path) -> None:
    """Histogram and box plot of per-case Dice (NaN cases are left out and counted in the title).

    Args:
        dice: per-case Dice values.
        path: PNG to write (atomically).
    """
    v = np.asarray(dice, dtype=np.float64).ravel()
    finite = v[np.isfinite(v)]
    fig = _figure(figsize=(10, 4))
    ax_hist, ax_box = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1]})
    ax_hist.hist(finite, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("Dice")
    ax_hist.set_ylabel("cases")
    n_nan = int(v.size - finite.size)
    extra = f", {n_nan} NaN left out" if n_nan else ""
    mean = f", mean {finite.mean():.3f}, median {np.median(finite):.3f}" if finite.size else ""
    ax_hist.set_title(f"per-case Dice ({finite.size} cases{extra}{mean})", fontsize=9)
    if finite.size:
        ax_box.boxplot(finite, vert=True, widths=0.5)
        ax_box.scatter(np.ones_like(finite) + np.random.default_rng(0).uniform(-0.08, 0.08, finite.size),
                       finite, s=6, alpha=0.5, color="tab:blue")
    ax_box.set_ylim(0, 1.02)
    ax_box.set_xticks([])
    ax_box.set_title("Dice", fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.9, wspace=0.15)
    _save(fig, Path(path))
