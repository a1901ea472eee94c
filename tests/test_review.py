"""Review gallery titles: panel_title strings and overlay_grid panels that never overlap."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tumorseg import review
from tumorseg.review import overlay_grid, panel_title

# a 120-character nested case id: hospital export / cohort / site / series / patient / file
LONG_ID = ("archive_v02/hospital_a/radiology_export_2023_11/cohort_b/site_03/mri_t1_contrast/"
           "series_0007/patient_0012/slice_0042.png")
ID_200 = "/".join(f"folder_{i:02d}_abcdefgh" for i in range(10)) + "/slice_0042.png"


def test_fixture_ids_have_the_lengths_the_tests_claim() -> None:
    assert len(LONG_ID) == 120
    assert len(ID_200) >= 200


def test_short_id_is_one_line_then_dice() -> None:
    assert panel_title("worst", "patient_0012/slice_0042.png", 0.12345, False, 50) == (
        "worst: patient_0012/slice_0042.png\nDice 0.123")


def test_id_slightly_too_long_wraps_after_a_slash_without_losing_anything() -> None:
    assert panel_title("best", "data/patient_0012/slice_0042.png", 0.98, False, 500) == (
        "best: data/\npatient_0012/slice_0042.png\nDice 0.980")


def test_long_nested_id_keeps_its_end_and_marks_the_cut() -> None:
    assert panel_title("worst", LONG_ID, 0.5, False, 1234) == (
        "worst: …i_t1_contrast/series_0007/\n"
        "patient_0012/slice_0042.png\n"
        "Dice 0.500")


def test_short_fragment_of_a_dropped_name_snaps_to_the_slash() -> None:
    # the cut would keep only "ab" of "xxab/": it drops to the separator instead
    assert panel_title("worst", "xxab/" + "p" * 12 + "/slice_0042.png", 0.25, True, 9, width_chars=38) == (
        "worst: …/pppppppppppp/slice_0042.png\ntumour-free: 9 px predicted\nDice 0.250 · false positive")


def test_tumour_free_false_positive_is_marked() -> None:
    assert panel_title("worst", LONG_ID, 0.0, True, 1234) == (
        "worst: …atient_0012/slice_0042.png\n"
        "tumour-free: 1,234 px predicted\n"
        "Dice 0.000 · false positive")


def test_tumour_free_false_positive_short_id() -> None:
    assert panel_title("worst", "p7/s1.png", 0.0, True, 3) == (
        "worst: p7/s1.png\ntumour-free: 3 px predicted\nDice 0.000 · false positive")


def test_both_empty_is_marked() -> None:
    assert panel_title("best", "patient_0003/slice_0001.png", 1.0, True, 0) == (
        "best: patient_0003/slice_0001.png\nDice 1.000 · both empty")


def test_missed_tumour_is_not_called_a_false_positive() -> None:
    assert panel_title("worst", "p/s.png", 0.0, False, 0) == "worst: p/s.png\nDice 0.000"


def test_long_volume_slice_id_breaks_inside_the_name() -> None:
    assert panel_title("worst", "vol_patient_0012_t1_contrast_enhanced_registered.nii.gz#z042", 0.2, False, 3) == (
        "worst: vol_patient_0012_t1_contra\nst_enhanced_registered.nii.gz#z042\nDice 0.200")


def test_line_breaks_in_a_case_id_do_not_add_lines() -> None:
    assert panel_title("best", "a\nb.png", 0.5, False, 1) == "best: a b.png\nDice 0.500"


def test_narrow_width_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        panel_title("worst", "a.png", 0.5, False, 1, width_chars=15)


IDS = ["a.png", "patient_0012/slice_0042.png", LONG_ID, ID_200, "x" * 200, "/" * 50, " spaced name / x y z " * 8,
       "vol.nii.gz#z001", "a/" * 90 + "b", "ünïcødé/…/名前/" * 6]
RANKS = ["worst", "best", "worst 12", "a rank far too long for the first line of any title"]
CASES = [(0.0, True, 1234), (1.0, True, 0), (0.5, False, 10), (float("nan"), True, 0), (0.0, True, 10**12)]


@pytest.mark.parametrize("width", [16, 20, 34, 50])
def test_every_line_fits_and_at_most_three_lines(width: int) -> None:
    for rank, case_id, (dice, gt_empty, px) in itertools.product(RANKS, IDS, CASES):
        title = panel_title(rank, case_id, dice, gt_empty, px, width_chars=width)
        lines = title.split("\n")
        assert 2 <= len(lines) <= 3, title
        assert all(0 < len(line) <= width for line in lines), title
        assert lines[-1].startswith("Dice "), title
        assert title == panel_title(rank, case_id, dice, gt_empty, px, width_chars=width)  # deterministic


def test_fit_lines_keeps_a_fitting_title_and_bounds_any_other() -> None:
    title = panel_title("worst", LONG_ID, 0.0, True, 5)
    assert review._fit_lines(title, 34) == title.split("\n")
    for raw in [f"worst: {ID_200}\nDice 0.100", f"{ID_200} Dice 0.873", "x" * 500, "a\nb\nc\nd\ne"]:
        lines = review._fit_lines(raw, 34)
        assert 1 <= len(lines) <= 3 and all(len(line) <= 34 for line in lines), lines
    assert review._fit_lines(f"worst: {ID_200}\nDice 0.100", 34)[0].startswith("worst: …")
    assert review._fit_lines("a\nb\nc\nd\ne", 34) == ["a", "b", "e"]


def _items(titles: list[str]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, str]]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    out = []
    for k, title in enumerate(titles):
        image = rng.random((1, 32, 32)).astype(np.float32)
        gt = (((yy - 16) ** 2 + (xx - 16) ** 2) < 49).astype(np.uint8) if k % 2 else np.zeros((32, 32), np.uint8)
        pred = (((yy - 14) ** 2 + (xx - 17) ** 2) < 36).astype(np.uint8)
        out.append((image, gt, pred, title))
    return out


def test_overlay_grid_with_a_200_character_case_id_writes_a_png(tmp_path: Path) -> None:
    items = _items([panel_title("worst", ID_200, 0.0, True, 113), f"best: {ID_200}\nDice 0.912"])
    path = tmp_path / "out" / "gallery.png"
    overlay_grid(items, path, ncols=4)
    with Image.open(path) as im:
        im.load()
        size, fmt = im.size, im.format
    fig_h = (review.PANEL_W + review._title_band(3)) + review.LEGEND_H  # square images: panel as tall as wide
    assert fmt == "PNG"
    assert size[0] == 2 * 100 * review.PANEL_W  # two panels (ncols capped at the number of items), 100 dpi
    assert abs(size[1] - 100 * fig_h) <= 1
    assert [p.name for p in path.parent.iterdir()] == ["gallery.png"]  # no temporary file left behind


def test_overlay_grid_titles_stay_inside_their_panel_column(tmp_path: Path) -> None:
    titles = [panel_title("worst", ID_200, 0.0, True, 113), f"worst: {ID_200}\nDice 0.100",
              "W" * 80 + " Dice 0.930", "best: patient_0002/$odd$_" + "W" * 30 + ".png\nDice 1.000",
              panel_title("best", "p1/s1.png", 0.95, False, 40)]
    fig = review._grid_figure(_items(titles), ncols=3)
    renderer = fig.canvas.get_renderer()
    col_px = review.PANEL_W * fig.dpi
    fig_h_px = fig.get_size_inches()[1] * fig.dpi
    axes_boxes = [ax.get_window_extent(renderer) for ax in fig.axes]
    title_boxes = []
    for k, ax in enumerate(fig.axes):
        (text,) = ax.texts
        box = text.get_window_extent(renderer)
        title_boxes.append(box)
        if k >= len(titles):
            continue
        c = k % 3
        assert text.get_text().count("\n") <= 2
        assert c * col_px <= box.x0 and box.x1 <= (c + 1) * col_px, (text.get_text(), box)
        assert box.y0 >= axes_boxes[k].y1 and box.y1 <= fig_h_px
        for j, other in enumerate(axes_boxes):
            if j != k:
                assert not box.overlaps(other), (text.get_text(), j)
    for a, b in itertools.combinations(title_boxes[: len(titles)], 2):
        assert not a.overlaps(b)
    # a title made by panel_title is drawn as it is
    assert fig.axes[4].texts[0].get_text() == titles[4]
    assert fig.axes[0].texts[0].get_text() == titles[0]
    overlay_grid(_items(titles), tmp_path / "g.png", ncols=3)  # '$' in a title is text, not mathtext
    with Image.open(tmp_path / "g.png") as im:
        assert im.size[0] == 3 * 100 * review.PANEL_W
