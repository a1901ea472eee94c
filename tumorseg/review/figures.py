"""Review images for people: overlay grids, learning curves, Dice distributions, confusion matrices.

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
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.fsutil import atomic_path
from tumorseg.review.titles import TITLE_FONTSIZE, title_fitter

GT_COLOUR = "#00d000"
PRED_COLOUR = "#ff2020"

PANEL_W, LEGEND_H = 3.0, 0.35  # inches
_TITLE_MARGIN = 0.1  # inches of a panel's width a title leaves free


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


def _contour(ax: Any, mask: np.ndarray, colour: str, style: str = "solid") -> None:
    m = (np.asarray(mask) > 0).astype(np.float32)
    if m.any() and not m.all():
        ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.2, linestyles=style)


CLASS_COLOURS = ("#ff2020", "#00d000", "#2080ff", "#ffd000", "#ff40ff", "#00e0e0", "#ff8000", "#a060ff")
"""Colours of tumour classes 1, 2, ... in multi-class overlays (cycled beyond eight)."""


def _draw_masks(ax: Any, gt: np.ndarray, pred: np.ndarray, classes: list[str] | None) -> None:
    """Binary: truth green, prediction red. Multi-class: each class its colour, truth solid, prediction dashed."""
    if classes is None:
        _contour(ax, gt, GT_COLOUR)
        _contour(ax, pred, PRED_COLOUR)
        return
    for k in range(1, len(classes)):
        colour = CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)]
        _contour(ax, np.asarray(gt) == k, colour)
        _contour(ax, np.asarray(pred) == k, colour, "dashed")


def _legend(fig: Any, classes: list[str] | None) -> None:
    from matplotlib.lines import Line2D

    if classes is None:
        handles = [Line2D([], [], color=GT_COLOUR, label="ground truth"),
                   Line2D([], [], color=PRED_COLOUR, label="prediction")]
    else:
        handles = [Line2D([], [], color="black", label="truth"), Line2D([], [], color="black", ls="--",
                                                                        label="prediction")]
        handles += [Line2D([], [], color=CLASS_COLOURS[(k - 1) % len(CLASS_COLOURS)], lw=4, label=name)
                    for k, name in enumerate(classes[1:], 1)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)


def _title_band(n_lines: int) -> float:
    """Height in inches of the band above a panel for titles of ``n_lines`` lines at font size 8."""
    return 0.2 + 0.12 * max(n_lines, 1)


def _grid_figure(items: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], ncols: int,
                 classes: list[str] | None = None) -> Any:
    """The overlay grid figure (see :func:`overlay_grid`)."""
    n = max(len(items), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    # explicit axes positions and text titles: tight_layout and title placement cost ~10x the drawing
    aspect = max((it[0].shape[-2] / max(it[0].shape[-1], 1) for it in items), default=1.0)
    panel_w, legend_h = PANEL_W, LEGEND_H
    panel_h = panel_w * min(max(aspect, 0.4), 2.0)
    fig = _figure(figsize=(panel_w * ncols, panel_h))
    fit = title_fitter(fig, panel_w - _TITLE_MARGIN)
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
        _draw_masks(ax, gt, pred, classes)
        # parse_math=False: a '$' in a file name is text, not mathtext
        ax.text(0.5, 1.01, titles[k], ha="center", va="bottom", fontsize=TITLE_FONTSIZE,
                transform=ax.transAxes, parse_math=False)
    _legend(fig, classes)
    return fig


def overlay_grid(
    items: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]], path: Path, ncols: int = 4,
    classes: list[str] | None = None,
) -> None:
    """Draw images with ground-truth (green) and predicted (red) contours in a grid.

    Each title is fitted to its panel (see :func:`_fit_lines`): at most 3 lines, each no wider
    than the panel as rendered, a long case id wrapped after ``/`` and shortened from the left;
    titles made by :func:`panel_title` pass unchanged.

    Args:
        items: ``(image (C, H, W) float, gt (H, W) {0,1}, pred (H, W) {0,1}, title)`` per panel.
        path: PNG to write (atomically).
        ncols: panels per row.
        classes: class names (background first) when ``gt`` and ``pred`` are class-index maps: each
            class is drawn in its own colour (truth solid, prediction dashed) with a legend.

    A volume (``image (C, X, Y, Z)``, masks ``(X, Y, Z)`` in canonical RAS+ order) gets a row of its three
    orthogonal planes through the tumour's centre (:func:`orthogonal_planes`).
    """
    if any(np.asarray(it[1]).ndim == 3 for it in items):
        items = [plane for it in items for plane in orthogonal_planes(*it)]
        ncols = 3
    _save(_grid_figure(items, ncols, classes), Path(path))


def orthogonal_planes(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, title: str
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    """The axial, coronal and sagittal planes of a canonical (RAS+) volume through its tumour's centre.

    The centre is the truth's centroid, else the prediction's, else the volume's; each plane is turned so
    that superior (or anterior, in the axial plane) is up.
    """
    fg = np.argwhere(gt > 0) if np.any(gt) else np.argwhere(pred > 0)
    centre = fg.mean(axis=0).round().astype(int) if len(fg) else np.asarray(gt.shape) // 2
    out = []
    for axis, name in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
        k = int(centre[axis])

        def cut(a: np.ndarray, lead: int = 0, axis: int = axis, k: int = k) -> np.ndarray:
            return np.rot90(np.take(a, k, axis=axis + lead), axes=(lead, lead + 1))

        out.append((np.ascontiguousarray(cut(image, 1)), np.ascontiguousarray(cut(gt)),
                    np.ascontiguousarray(cut(pred)), f"{title} · {name} {'xyz'[axis]}={k}"))
    return out


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


def confusion_plot(matrix: np.ndarray, names: list[str], path: Path) -> None:
    """A pixel confusion matrix as a heat map: each row (true class) normalised to 1, with the raw counts."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(axis=1, keepdims=True)
    share = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    k = len(names)
    fig = _figure(figsize=(1.2 * k + 2.5, 1.0 * k + 1.5))
    ax = fig.add_axes((0.3, 0.25, 0.6, 0.65))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{share[i, j]:.2f}\n{int(m[i, j]):,}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("pixel confusion (row-normalised)", fontsize=9)
    _save(fig, Path(path))
