"""Review images for people: overlay grids, learning curves, Dice distributions, confusion matrices.

matplotlib is imported inside each function and figures are drawn by its ``Agg`` renderer
without pyplot, so importing this package is free, nothing needs a display, and the global
backend of a notebook or another thread is left alone. Every PNG is written atomically.
Panel titles are fitted to their panel (:mod:`tumorseg.review.titles`).
"""

from tumorseg.review.figures import (
    CLASS_COLOURS,
    GT_COLOUR,
    LEGEND_H,
    PANEL_W,
    PRED_COLOUR,
    _grid_figure,
    _title_band,
    confusion_plot,
    dice_plot,
    learning_curve,
    overlay_grid,
)
from tumorseg.review.titles import TITLE_CHARS, TITLE_LINES, _fit_lines, panel_title, title_fitter

__all__ = [
    "CLASS_COLOURS", "GT_COLOUR", "LEGEND_H", "PANEL_W", "PRED_COLOUR", "TITLE_CHARS", "TITLE_LINES",
    "_fit_lines", "_grid_figure", "_title_band", "confusion_plot", "dice_plot", "learning_curve",
    "overlay_grid", "panel_title", "title_fitter",
]
