"""``tumorseg ingest`` on real folders of PNG, TIFF and NIfTI files."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from tumorseg import manifest as mf
from tumorseg.config import IngestConfig
from tumorseg.errors import TumorsegError
from tumorseg.imageio import FORMATS_TEXT
from tumorseg.ingest import IngestResult, run
from tumorseg.splits import assign_split

S = 32  # image side


# ----------------------------------------------------------------------------- helpers


def image(seed: int, size: int = S) -> np.ndarray:
    """Noise unique to ``seed``: two seeds never give byte-identical files."""
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def box(r0: int, r1: int, c0: int, c1: int, size: int = S, value: int = 255) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[r0:r1, c0:c1] = value
    return m


def png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr) if mode is None else Image.fromarray(arr, mode=mode)
    img.save(path, format="PNG")
    return path


def pair(folder: Path, stem: str, seed: int, mask: np.ndarray | None = None, mask_name: str | None = None) -> None:
    """``stem.png`` + ``stem_mask.png`` (or ``mask_name``) in ``folder``."""
    png(folder / f"{stem}.png", image(seed))
    png(folder / (mask_name or f"{stem}_mask.png"), box(2, 6, 3, 9) if mask is None else mask)


def ingest(images: Path, masks: Path | None = None, *, out: Path, name: str = "m", **kw: Any) -> IngestResult:
    kw.setdefault("workers", 1)
    return run(IngestConfig(images_dir=images, masks_dir=masks, name=name, out_dir=out, **kw))


def rows_of(res_or_dir: IngestResult | Path) -> list[dict[str, str]]:
    mdir = res_or_dir.manifest_dir if isinstance(res_or_dir, IngestResult) else res_or_dir
    with open(mdir / "manifest.csv", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


def by_id(res: IngestResult | Path) -> dict[str, dict[str, str]]:
    return {r["case_id"]: r for r in rows_of(res)}


def rejected_of(res: IngestResult | Path, name: str = "rejected.csv") -> dict[str, str]:
    mdir = res.manifest_dir if isinstance(res, IngestResult) else res
    with open(mdir / name, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["path", "reason"]
        out = {r["path"]: r["reason"] for r in reader}
    return out


def ignored_of(res: IngestResult | Path) -> dict[str, str]:
    return rejected_of(res, "ignored.csv")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_state(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every file and folder under ``root`` with its hash, mode and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[p.relative_to(root).as_posix()] = (sha(p) if p.is_file() else "dir", st.st_mode, st.st_mtime_ns)
    return out


OUTPUTS = ("manifest.csv", "manifest.json", "rejected.csv", "ignored.csv")


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Relative defaults (data_manifest/, ./mlruns) land in the test's folder, not the repo."""
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------- layouts and columns


def test_separate_folders_pair_by_stem_with_exact_columns(tmp_path: Path) -> None:
    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    # file names sort differently in the two folders: pairing must be by stem, not position
    png(images / "b.png", image(2))
    png(images / "a.png", image(1))
    png(masks / "a.png", box(0, 2, 0, 8))  # 16 px
    png(masks / "aa.png", box(0, 9, 0, 9))  # no image: pairing by position would shift b onto it
    png(masks / "b.png", np.zeros((S, S), np.uint8))
    res = ingest(images, masks, out=tmp_path / "out")
    assert res.n_cases == 2 and res.n_rejected == 1
    assert list(rejected_of(res)) == ["masks/aa.png"]
    assert res.manifest_dir == tmp_path / "out" / "m"
    assert sorted(p.name for p in res.manifest_dir.iterdir()) == sorted(OUTPUTS)  # no temp files left
    with open(res.manifest_dir / "manifest.csv", encoding="utf-8") as fh:
        assert fh.readline().strip().split(",") == mf.COLUMNS
    rows = by_id(res)
    a = rows["a"]
    assert a["image"] == "images/a.png" and a["mask"] == "masks/a.png"
    assert a["n_masks"] == "1" and a["group"] == "a" and a["slice_index"] == "-1"
    assert a["has_tumour"] == "true" and a["tumour_fraction"] == f"{16 / (S * S):.6f}"
    assert (a["height"], a["width"], a["channels"]) == (str(S), str(S), "1")
    assert a["image_sha256"] == sha(images / "a.png") and a["mask_sha256"] == sha(masks / "a.png")
    assert a["image_mode"] == "PNG:L uint8" and a["mask_encoding"] == "PNG:L 0/255"
    assert a["split"] in ("train", "val", "test") and a["fold"] == "-1"
    b = rows["b"]
    assert b["has_tumour"] == "false" and b["tumour_fraction"] == "0.000000"  # empty mask kept
    assert b["mask_encoding"] == "PNG:L 0"
    info = json.loads((res.manifest_dir / "manifest.json").read_text())
    assert info["data_root"] == str((tmp_path / "data").resolve())
    assert info["dataset_digest"] == res.dataset_digest == sha(res.manifest_dir / "manifest.csv")
    assert info["counts"] == {"cases": 2, "rejected": 1, "ignored": 0, "groups": 2}
    assert (res.manifest_dir / "rejected.csv").read_text() == (
        "path,reason\nmasks/aa.png,mask without image: no image with this stem; add it or remove the mask\n")


def test_separate_masks_folder_with_suffix(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i, stem in enumerate(("x1", "x2")):
        png(images / f"{stem}.png", image(i))
        png(masks / f"{stem}_mask.png", box(0, 1, 0, 4))
    png(masks / "x2_mask_1.png", box(5, 6, 0, 4))  # a second mask in the separate folder
    rows = by_id(ingest(images, masks, out=tmp_path / "out"))
    assert rows["x1"]["mask"] == "masks/x1_mask.png"
    assert rows["x2"]["mask"] == "masks/x2_mask.png|masks/x2_mask_1.png"
    assert rows["x2"]["n_masks"] == "2" and rows["x2"]["tumour_fraction"] == f"{8 / (S * S):.6f}"


def test_same_folder_masks_merge_by_union(tmp_path: Path) -> None:
    data = tmp_path / "data"
    png(data / "x.png", image(1))
    png(data / "x_mask.png", box(0, 1, 0, 4))  # 4 px
    png(data / "x_mask_1.png", box(0, 1, 2, 6))  # overlaps 2 px
    png(data / "x_mask_2.png", box(10, 11, 0, 1) // 255)  # 0/1 encoding, 1 px
    png(data / "x_mask_10.png", box(20, 21, 0, 1))  # numeric order: 2 before 10
    pair(data, "y", 2)
    res = ingest(data, out=tmp_path / "out")
    assert res.n_cases == 2 and res.n_rejected == 0
    x = by_id(res)["x"]
    assert x["n_masks"] == "4"
    assert x["mask"] == "x_mask.png|x_mask_1.png|x_mask_2.png|x_mask_10.png"
    assert x["tumour_fraction"] == f"{(6 + 1 + 1) / (S * S):.6f}"
    assert x["mask_encoding"] == "PNG:L 0/1; PNG:L 0/255"
    hashes = [sha(data / n) for n in x["mask"].split("|")]
    assert x["mask_sha256"] == hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    assert x["mask_sha256"] == mf.combined_sha256([data / n for n in x["mask"].split("|")])
    # MASKS_DIR equal to IMAGES_DIR is the same layout as MASKS_DIR omitted
    res2 = ingest(data, data, out=tmp_path / "out2")
    assert (res2.manifest_dir / "manifest.csv").read_bytes() == (res.manifest_dir / "manifest.csv").read_bytes()


def test_custom_mask_suffix(tmp_path: Path) -> None:
    data = tmp_path / "data"
    png(data / "a.png", image(1))
    png(data / "a_seg.png", box(0, 2, 0, 2))
    png(data / "a_seg_1.png", box(4, 5, 0, 2))
    res = ingest(data, out=tmp_path / "out", mask_suffix="_seg")
    assert res.n_rejected == 0
    assert by_id(res)["a"]["mask"] == "a_seg.png|a_seg_1.png"


def test_recursive_patient_folders_and_odd_names(tmp_path: Path) -> None:
    data = tmp_path / "data"
    odd = "patient [02] é 東"
    pair(data / "p1", "scan", 1)
    pair(data / "p2", "scan", 2)  # same file name in another folder
    pair(data / odd, "slice 1 (copy)", 3)
    pair(data / "p1" / "deeper", "scan", 4)
    res = ingest(data, out=tmp_path / "out", recursive=True)
    assert res.n_rejected == 0
    rows = by_id(res)
    assert sorted(rows) == sorted(["p1/scan", "p2/scan", f"{odd}/slice 1 (copy)", "p1/deeper/scan"])
    r = rows[f"{odd}/slice 1 (copy)"]
    assert r["image"] == f"{odd}/slice 1 (copy).png" and r["mask"] == f"{odd}/slice 1 (copy)_mask.png"
    assert r["image_sha256"] == sha(data / odd / "slice 1 (copy).png")
    # manifest is UTF-8 and readable by the later stages
    info, df = mf.load_manifest(res.manifest_dir)
    mf.verify_files(info, df, res.manifest_dir)
    assert set(df["case_id"]) == set(rows)
    # --group-pattern runs over the relative path: the top folder is the patient
    rows = by_id(ingest(data, out=tmp_path / "outg", recursive=True, group_pattern=r"^([^/]+)/", seed=4))
    assert {k: r["group"] for k, r in rows.items()} == {
        "p1/scan": "p1", "p1/deeper/scan": "p1", "p2/scan": "p2", f"{odd}/slice 1 (copy)": odd}
    # without --recursive the top folder holds no files: a one-line error that suggests the flag
    with pytest.raises(TumorsegError, match=r"no files found.*--recursive"):
        ingest(data, out=tmp_path / "out2")


def test_recursive_separate_folders(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i, p in enumerate(("pa", "pb")):
        png(images / p / "s.png", image(i))
        png(masks / p / "s.png", box(0, 3, 0, 3))
    res = ingest(images, masks, out=tmp_path / "out", recursive=True, group_by="folder")
    rows = by_id(res)
    assert rows["pa/s"]["mask"] == "masks/pa/s.png" and rows["pa/s"]["group"] == "pa"
    assert rows["pb/s"]["image"] == "images/pb/s.png" and rows["pb/s"]["group"] == "pb"


def test_masks_folder_inside_images_folder_recursive(tmp_path: Path) -> None:
    images = tmp_path / "data"
    png(images / "a.png", image(1))
    png(images / "masks" / "a.png", box(0, 3, 0, 3))
    res = ingest(images, images / "masks", out=tmp_path / "out", recursive=True)
    assert res.n_rejected == 0, rejected_of(res)
    assert by_id(res)["a"]["mask"] == "masks/a.png"


def test_image_modes_and_mask_encodings(tmp_path: Path) -> None:
    data = tmp_path / "data"
    grey = image(1)
    tm = box(1, 3, 1, 5) // 255
    rgb = np.stack([image(2), image(3), image(4)], axis=-1)
    png(data / "rgb.png", rgb, "RGB")
    png(data / "rgb_mask.png", np.repeat((tm * 255)[:, :, None], 3, axis=2), "RGB")
    rgba = np.concatenate([rgb, np.full((S, S, 1), 9, np.uint8)], axis=2)
    png(data / "rgba.png", rgba, "RGBA")
    png(data / "rgba_mask.png", np.concatenate([np.repeat((tm * 255)[:, :, None], 3, axis=2),
                                                np.full((S, S, 1), 255, np.uint8)], axis=2), "RGBA")
    png(data / "g16.png", grey.astype(np.uint16) * 257)
    Image.fromarray(tm * 255).convert("1").save(data / "g16_mask.png")
    pal = Image.fromarray(grey % 4, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    pal.save(data / "pal.png")
    pm = Image.fromarray(tm, mode="P")
    pm.putpalette([0, 0, 0, 255, 255, 0] + [0] * 762)
    pm.save(data / "pal_mask.png")
    png(data / "la.png", np.stack([grey, np.full((S, S), 100, np.uint8)], axis=-1), "LA")
    png(data / "la_mask.png", tm)
    tifffile.imwrite(data / "t.tif", grey.astype(np.uint16))
    tifffile.imwrite(data / "t_mask.tif", tm.astype(bool))
    res = ingest(data, out=tmp_path / "out", fractions=(1.0, 0.0, 0.0))
    assert res.n_rejected == 0, rejected_of(res)
    rows = by_id(res)
    expect = {
        "rgb": ("3", "PNG:RGB uint8", "PNG:RGB 0/255"),
        "rgba": ("3", "PNG:RGBA uint8", "PNG:RGBA 0/255"),
        "g16": ("1", "PNG:I;16 uint16", "PNG:1 0/1"),
        "pal": ("3", "PNG:P uint8", "PNG:P 0/1"),
        "la": ("1", "PNG:LA uint8", "PNG:L 0/1"),
        "t": ("1", "TIFF uint16", "TIFF 0/1"),
    }
    for case, (channels, mode, enc) in expect.items():
        assert (rows[case]["channels"], rows[case]["image_mode"], rows[case]["mask_encoding"]) == (channels, mode, enc)
        assert rows[case]["tumour_fraction"] == f"{8 / (S * S):.6f}", case


def test_tiff_and_png_mixed_pair(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "a.tif", image(1))
    png(data / "a_mask.png", box(0, 1, 0, 1))
    rows = by_id(ingest(data, out=tmp_path / "out"))
    assert rows["a"]["image"] == "a.tif" and rows["a"]["mask"] == "a_mask.png"


def _volume_pair(data: Path, stem: str, seed: int, shape: tuple[int, int, int], tumour_slices: list[int],
                 ext: str = ".nii.gz") -> np.ndarray:
    data.mkdir(parents=True, exist_ok=True)
    vol = np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int16)
    mask = np.zeros(shape, np.uint8)
    for k in tumour_slices:
        mask[1:3, 2:5, k] = 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(data / f"{stem}{ext}"))
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(data / f"{stem}_mask{ext}"))
    return mask


def test_nifti_volume_becomes_one_case_per_slice_with_slice_axis(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _volume_pair(data, "vol1", 1, (8, 6, 5), [1, 3])
    _volume_pair(data, "vol2", 2, (8, 6, 3), [0], ext=".nii")
    res = ingest(data, out=tmp_path / "out", slice_axis=2)
    assert res.n_rejected == 0
    rows = by_id(res)
    assert sorted(rows) == [f"vol1#z{k:03d}" for k in range(5)] + [f"vol2#z{k:03d}" for k in range(3)]
    for k in range(5):
        r = rows[f"vol1#z{k:03d}"]
        assert r["group"] == "vol1" and r["slice_index"] == str(k)
        assert (r["height"], r["width"], r["channels"]) == ("8", "6", "1")
        assert r["image"] == "vol1.nii.gz" and r["mask"] == "vol1_mask.nii.gz"
        assert r["has_tumour"] == ("true" if k in (1, 3) else "false")
        assert r["tumour_fraction"] == (f"{6 / 48:.6f}" if k in (1, 3) else "0.000000")
        assert r["image_mode"] == "NIfTI int16" and r["mask_encoding"] == "NIfTI 0/1"
    assert len({r["split"] for r in rows.values() if r["group"] == "vol1"}) == 1
    assert rows["vol2#z000"]["image"] == "vol2.nii"
    # along another axis: X slices of shape (Y, Z)
    res = ingest(data, out=tmp_path / "outx", slice_axis=0)
    rows = by_id(res)
    assert sorted(k for k in rows if k.startswith("vol1")) == [f"vol1#x{k:03d}" for k in range(8)]
    r = rows["vol1#x001"]
    assert (r["height"], r["width"]) == ("6", "5") and r["tumour_fraction"] == f"{6 / 30:.6f}"
    assert rows["vol1#x000"]["has_tumour"] == "false"


def test_nifti_2d_with_png_is_refused_either_way(tmp_path: Path) -> None:
    """A 2D NIfTI's (x, y) axes are rows and columns, or columns and rows, as the tool that wrote it chose (nibabel
    from a NumPy image, or ITK): paired with a PNG, a square case would pass transposed. Neither way is guessed."""
    data = tmp_path / "data"
    data.mkdir()
    nib.save(nib.Nifti1Image(image(1)[:, :20], np.eye(4)), str(data / "a.nii.gz"))  # X=32, Y=20
    png(data / "a_mask.png", box(0, 2, 0, 3)[:, :20])
    png(data / "b.png", image(2)[:, :20])
    nib.save(nib.Nifti1Image(box(0, 1, 0, 3)[:, :20], np.eye(4)), str(data / "b_mask.nii"))
    png(data / "c.png", image(3)[:, :20])
    nib.save(nib.Nifti1Image(np.zeros((32, 20, 2), np.uint8), np.eye(4)), str(data / "c_mask.nii"))
    png(data / "d.png", image(4)[:, :20])
    png(data / "d_mask.png", box(0, 2, 0, 3)[:, :20])
    res = ingest(data, out=tmp_path / "out", fractions=(1.0, 0.0, 0.0))
    assert set(by_id(res)) == {"d"}
    rejected = rejected_of(res)
    assert rejected["a_mask.png"].startswith("a 2D image and mask whose axes differ: a.nii.gz is a grid file")
    assert rejected["b_mask.nii"].startswith("a 2D image and mask whose axes differ: b_mask.nii is a grid file")
    assert "size mismatch: image is 32x20, mask is 32x20x2" in rejected["c_mask.nii"]


def test_unicode_normalisation_of_stems(tmp_path: Path) -> None:
    import unicodedata

    data = tmp_path / "data"
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    png(data / f"{nfc}.png", image(1))
    png(data / f"{nfd}_mask.png", box(0, 2, 0, 2))  # the mask came from a Mac
    res = ingest(data, out=tmp_path / "out")
    assert res.n_rejected == 0, rejected_of(res)
    assert by_id(res)[nfc]["mask"] == f"{nfd}_mask.png"


def test_case_id_clash_between_slice_and_2d_file_is_rejected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _volume_pair(data, "v", 1, (8, 6, 3), [0, 1, 2])
    png(data / "v#z001.png", image(2)[:8, :6])  # a 2D file named like a slice of v
    png(data / "v#z001_mask.png", box(0, 2, 0, 2)[:8, :6])
    pair(data, "other", 3)
    res = ingest(data, out=tmp_path / "out", fractions=(1.0, 0.0, 0.0), slice_axis=2)
    assert sorted(by_id(res)) == ["other"]
    rej = rejected_of(res)
    assert rej["v.nii.gz"] == "case id 'v#z001' is also made by v#z001.png; rename one of them"
    assert rej["v#z001.png"] == "case id 'v#z001' is also made by v.nii.gz; rename one of them"


def test_nifti_2d_is_one_case(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    nib.save(nib.Nifti1Image(image(1).astype(np.float32), np.eye(4)), str(data / "flat.nii.gz"))
    nib.save(nib.Nifti1Image(box(0, 2, 0, 2), np.eye(4)), str(data / "flat_mask.nii.gz"))
    rows = by_id(ingest(data, out=tmp_path / "out"))
    assert list(rows) == ["flat"]
    assert rows["flat"]["slice_index"] == "-1" and rows["flat"]["tumour_fraction"] == f"{4 / (S * S):.6f}"


# ----------------------------------------------------------------------------- rejections


def _messy(data: Path) -> None:
    pair(data, "good1", 1)
    pair(data, "good2", 2)
    pair(data, "empty", 3, mask=np.zeros((S, S), np.uint8))
    pair(data, "zero", 4)
    (data / "zero.png").write_bytes(b"")
    pair(data, "trunc", 5)
    full = (data / "trunc.png").read_bytes()
    (data / "trunc.png").write_bytes(full[: len(full) // 2])
    pair(data, "badmask", 6)
    (data / "badmask_mask.png").write_bytes(b"")
    png(data / "size.png", image(7))
    png(data / "size_mask.png", box(0, 2, 0, 2, size=16))
    png(data / "lonely.png", image(8))
    png(data / "orphan_mask.png", box(0, 2, 0, 2))
    pair(data, "dup", 9)
    tifffile.imwrite(data / "dup.tif", image(10))
    pair(data, "clash", 11)
    tifffile.imwrite(data / "clash_mask.tif", box(0, 2, 0, 2))
    multi = box(0, 2, 0, 2, value=100)
    multi[5:7, 5:7] = 200
    pair(data, "multi", 12, mask=multi)
    red = np.zeros((S, S, 3), np.uint8)
    red[0:2, 0:2, 0] = 255
    png(data / "colour.png", image(13))
    png(data / "colour_mask.png", red, "RGB")
    (data / "notes.txt").write_text("hello")  # not an image format: ignored, not rejected
    Image.fromarray(image(14)).save(data / "photo.gif")
    (data / ".hidden.png").write_bytes(b"")  # hidden files are skipped, neither rejected nor ignored


EXPECTED_REJECTIONS = {
    "zero.png": "zero-byte file",
    "trunc.png": "truncated or corrupt PNG",
    "badmask_mask.png": "zero-byte file",
    "badmask.png": "its mask badmask_mask.png was rejected",
    "size_mask.png": "size mismatch: image is 32x32, mask is 16x16",
    "size.png": "its mask size_mask.png has another size",
    "lonely.png": "image without mask",
    "orphan_mask.png": "mask without image",
    "dup.png": "two images share the stem 'dup' (dup.png, dup.tif)",
    "dup.tif": "two images share the stem 'dup' (dup.png, dup.tif)",
    "dup_mask.png": "two images share the stem 'dup'",
    "clash.png": "two masks share one stem",
    "clash_mask.png": "two masks share one stem",
    "clash_mask.tif": "two masks share one stem",
    "multi_mask.png": "mask has 3 distinct values (0, 100, 200)",
    "multi.png": "its mask multi_mask.png was rejected",
    "colour_mask.png": "colour mask whose channels differ",
    "colour.png": "its mask colour_mask.png was rejected",
    "photo.gif": "unsupported image format '.gif'; convert it to PNG",
}

EXPECTED_IGNORED = {
    "notes.txt": "not an image (.txt)",
}


def test_every_problem_is_a_row_of_rejected_csv(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _messy(data)
    res = ingest(data, out=tmp_path / "out")
    assert sorted(by_id(res)) == ["empty", "good1", "good2"]
    assert by_id(res)["empty"]["has_tumour"] == "false"
    rejected = rejected_of(res)
    assert set(rejected) == set(EXPECTED_REJECTIONS)
    for path, fragment in EXPECTED_REJECTIONS.items():
        assert fragment in rejected[path], (path, rejected[path])
        assert str(data) not in rejected[path]  # the path column names the file; the reason does not repeat it
    assert "--mask-threshold" in rejected["multi_mask.png"]
    assert "lonely_mask.png" in rejected["lonely.png"]  # says what mask name it looked for
    lines = (res.manifest_dir / "rejected.csv").read_text(encoding="utf-8").splitlines()
    assert lines[1:] == sorted(lines[1:])  # sorted: stable bytes
    assert res.n_rejected == len(rejected) == res.summary["rejected"]
    ignored = ignored_of(res)
    assert set(ignored) == set(EXPECTED_IGNORED)  # .hidden.png is in neither list
    for path, fragment in EXPECTED_IGNORED.items():
        assert ignored[path].startswith(fragment), (path, ignored[path])
    assert res.n_ignored == len(ignored) == res.summary["ignored"]


def test_mask_threshold_accepts_multi_valued_masks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    multi = box(0, 2, 0, 2, value=100)
    multi[5:7, 5:7] = 200
    pair(data, "multi", 1, mask=multi)
    res = ingest(data, out=tmp_path / "out", mask_threshold=150)
    row = by_id(res)["multi"]
    assert row["mask_encoding"] == "PNG:L >150" and row["tumour_fraction"] == f"{4 / (S * S):.6f}"
    assert json.loads((res.manifest_dir / "manifest.json").read_text())["mask_threshold"] == 150


def test_separate_folder_rejections(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    png(images / "a.png", image(1))
    png(masks / "a.png", box(0, 2, 0, 2))
    png(images / "nomask.png", image(2))
    png(masks / "noimage.png", box(0, 2, 0, 2))
    res = ingest(images, masks, out=tmp_path / "out")
    rej = rejected_of(res)
    assert set(rej) == {"images/nomask.png", "masks/noimage.png"}
    assert "image without mask" in rej["images/nomask.png"] and str(masks.resolve()) in rej["images/nomask.png"]
    assert rej["masks/noimage.png"].startswith("mask without image")


def test_symlink_outside_data_root_is_rejected(tmp_path: Path) -> None:
    data, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    pair(data, "a", 1)
    png(elsewhere / "b.png", image(2))
    png(data / "b_mask.png", box(0, 2, 0, 2))
    (data / "b.png").symlink_to(elsewhere / "b.png")
    pair(data, "c", 3)
    (data / "c_mask.png").unlink()
    (data / "c_mask.png").symlink_to(data / "gone.png")  # broken link: reported, not silently skipped
    pair(data, "d", 4)
    (data / "d_link.png").symlink_to(data / "d.png")  # a link inside the root is an ordinary file
    png(data / "d_link_mask.png", box(0, 2, 0, 2))
    pair(elsewhere / "sub", "e", 5)
    (data / "linked_dir").symlink_to(elsewhere / "sub", target_is_directory=True)  # never followed
    res = ingest(data, out=tmp_path / "out", recursive=True, fractions=(1.0, 0.0, 0.0))
    rej = rejected_of(res)
    assert "resolves outside the data root" in rej["b.png"]
    assert rej["c_mask.png"] == "file not found"
    assert rej["c.png"] == "its mask c_mask.png was rejected"
    assert sorted(by_id(res)) == ["a", "d", "d_link"]
    assert rej["b_mask.png"].startswith("mask without image")
    assert set(rej) == {"b.png", "b_mask.png", "c.png", "c_mask.png"}
    assert by_id(res)["d_link"]["group"] == "d"  # the same bytes as d.png


def test_unreadable_file_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    pair(data, "a", 1)
    pair(data, "locked", 2)
    (data / "locked.png").chmod(0)
    if os.geteuid() == 0:  # root reads any file: make the read fail as it would for a user (workers=1)
        import builtins

        from tumorseg.imageio import base as imageio

        def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
            if str(file).endswith("locked.png"):
                raise PermissionError(13, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(imageio, "open", fake_open, raising=False)
    try:
        rej = rejected_of(ingest(data, out=tmp_path / "out"))
    finally:
        (data / "locked.png").chmod(0o644)
    assert "cannot read file" in rej["locked.png"]


def test_group_pattern_that_does_not_match_is_rejected(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pair(data, "patient_1_s0", 1)
    pair(data, "patient_1_s1", 2)
    pair(data, "other", 3)
    res = ingest(data, out=tmp_path / "out", group_pattern=r"(patient_\d+)")
    assert {r["group"] for r in rows_of(res)} == {"patient_1"}
    assert "does not match --group-pattern" in rejected_of(res)["other.png"]
    with pytest.raises(TumorsegError, match="invalid regular expression"):
        ingest(data, out=tmp_path / "out", group_pattern="(unclosed")


# ----------------------------------------------------------------------------- strict and input errors


def test_strict_fails_and_writes_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pair(data, "a", 1)
    png(data / "lonely.png", image(2))
    with pytest.raises(TumorsegError) as exc:
        ingest(data, out=tmp_path / "out", strict=True)
    assert exc.value.exit_code == 2
    assert "lonely.png" in str(exc.value) and "--strict" in str(exc.value)
    assert not (tmp_path / "out").exists()
    # strict with nothing to reject is a normal ingest
    (data / "lonely.png").unlink()
    assert ingest(data, out=tmp_path / "out", strict=True).n_cases == 1


def _dataset_layout(data: Path) -> None:
    """A public dataset as shipped: images and masks with a README and a CSV beside them."""
    pair(data / "images", "a", 1)
    pair(data / "images", "b", 2, mask=np.zeros((S, S), np.uint8))
    (data / "README.md").write_text("# Dataset\nLicence: CC-BY\n")
    (data / "labels.csv").write_text("case,label\na,1\nb,0\n")
    (data / "images" / "notes" / "scanner.txt").parent.mkdir()
    (data / "images" / "notes" / "scanner.txt").write_text("scanner settings")
    (data / "LICENSE").write_text("CC-BY")


def test_strict_ignores_non_image_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _dataset_layout(data)
    res = ingest(data, out=tmp_path / "out", strict=True, recursive=True, fractions=(1.0, 0.0, 0.0))
    assert sorted(by_id(res)) == ["images/a", "images/b"]  # exactly the image cases
    assert res.n_rejected == 0 and rejected_of(res) == {}
    ignored = ignored_of(res)
    assert ignored == {
        "LICENSE": "not an image (no extension); ingest reads " + FORMATS_TEXT,
        "README.md": "not an image (.md); ingest reads " + FORMATS_TEXT,
        "images/notes/scanner.txt": "not an image (.txt); ingest reads " + FORMATS_TEXT,
        "labels.csv": "not an image (.csv); ingest reads " + FORMATS_TEXT,
    }
    lines = res.ignored_csv.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "path,reason" and lines[1:] == sorted(lines[1:])
    assert res.ignored_csv == res.manifest_dir / "ignored.csv"
    assert res.n_ignored == 4 and res.ignored == sorted(ignored.items())
    info = json.loads((res.manifest_dir / "manifest.json").read_text())
    assert info["counts"] == {"cases": 2, "rejected": 0, "ignored": 4, "groups": 2}
    assert info["summary"]["ignored"] == 4
    # ignored files do not touch the manifest or its digest, and reruns are byte-identical
    for p in ("README.md", "labels.csv", "LICENSE", "images/notes/scanner.txt"):
        (data / p).unlink()
    clean = ingest(data, out=tmp_path / "clean", strict=True, recursive=True, fractions=(1.0, 0.0, 0.0))
    assert clean.n_ignored == 0 and ignored_of(clean) == {}
    assert (clean.manifest_dir / "manifest.csv").read_bytes() == (res.manifest_dir / "manifest.csv").read_bytes()
    assert clean.dataset_digest == res.dataset_digest
    _dataset_layout(tmp_path / "again")
    a = ingest(tmp_path / "again", out=tmp_path / "r1", recursive=True, fractions=(1.0, 0.0, 0.0))
    b = ingest(tmp_path / "again", out=tmp_path / "r2", recursive=True, fractions=(1.0, 0.0, 0.0), workers=2)
    for n in OUTPUTS:
        assert (a.manifest_dir / n).read_bytes() == (b.manifest_dir / n).read_bytes(), n


def test_corrupt_image_is_still_rejected_beside_ignored_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _dataset_layout(data)
    pair(data / "images", "bad", 3)
    (data / "images" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(TumorsegError) as exc:
        ingest(data, out=tmp_path / "out", strict=True, recursive=True)
    assert exc.value.exit_code == 2
    msg = str(exc.value)
    assert "bad.png" in msg and "1 file(s) rejected" in msg
    assert "README" not in msg and "labels.csv" not in msg
    assert not (tmp_path / "out").exists()
    res = ingest(data, out=tmp_path / "out", recursive=True, fractions=(1.0, 0.0, 0.0))
    assert set(rejected_of(res)) == {"images/bad.png"}
    assert set(ignored_of(res)) == {"LICENSE", "README.md", "labels.csv", "images/notes/scanner.txt"}


def test_only_non_image_files_is_an_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "README.md").write_text("x")
    (data / "labels.csv").write_text("id,label\n")
    with pytest.raises(TumorsegError, match=r"no image files found, only 2 other file\(s\).*README\.md: not an image"):
        ingest(data, out=tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()


def test_a_file_name_not_in_utf8_is_a_rejected_row(tmp_path: Path) -> None:
    """A name in an older encoding (undecodable bytes) cannot go into a CSV or MLflow: a rejected row, not a crash."""
    data = tmp_path / "data"
    for i in range(4):
        pair(data, f"p{i}", i)
    for name, like in ((b"bad\xff.png", "p0.png"), (b"bad\xff_mask.png", "p0_mask.png")):
        (data / os.fsdecode(name)).write_bytes((data / like).read_bytes())
    res = ingest(data, out=tmp_path / "out", fractions=(1.0, 0.0, 0.0))
    assert len(rows_of(res)) == 4
    rejected = rejected_of(res)
    reason = rejected["bad\\xff.png"]
    assert reason.startswith("file name is not valid UTF-8") and "rename it" in reason
    assert "bad\\xff_mask.png" in rejected


def test_a_volume_without_its_label_is_told_the_label_name_it_needs(tmp_path: Path) -> None:
    import nibabel as nib

    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    for d in (images, labels):
        d.mkdir()
    vol = np.random.default_rng(0).random((8, 8, 6)).astype(np.float32)
    for stem in ("a", "b"):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), images / f"{stem}.nii.gz")
    lab = np.zeros((8, 8, 6), np.uint8)
    lab[2:5, 2:5, 2:4] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), labels / "a.nii.gz")
    res = ingest(images, labels, out=tmp_path / "out", fractions=(1.0, 0.0, 0.0))
    assert "'b_mask.nii.gz' or 'b.nii.gz' in" in rejected_of(res)["imagesTr/b.nii.gz"]


def test_a_split_left_empty_is_said_at_ingest_with_the_grouping_to_fix(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A group pattern without the patient's id puts every case in one group: val and test get none."""
    import logging

    from tumorseg.manifest import load_manifest, select_split

    data = tmp_path / "data"
    for p in range(4):
        for z in range(3):
            pair(data, f"patient_{p:03d}_slice_{z}", 3 * p + z)
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
        res = ingest(data, out=tmp_path / "out", group_pattern="patient")
    said = [r.getMessage() for r in caplog.records if "get no case" in r.getMessage()]
    assert len(said) == 1 and "split(s) val, test get no case" in said[0]
    assert "--group-pattern 'patient' makes 1 group(s) of 12 cases" in said[0] and "patient's id" in said[0]
    _, df = load_manifest(res.manifest_dir)
    with pytest.raises(TumorsegError, match=r"no cases in split 'val' .*12 cases in 1 group\(s\)\); re-ingest"):
        select_split(df, "val", "m")


def test_swapped_image_and_mask_folders_are_named_as_such(tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i in range(4):
        png(images / f"c{i}.png", image(i))
        png(masks / f"c{i}.png", box(2, 6, 3, 9))
    assert len(np.unique(image(0))) > 64
    with pytest.raises(TumorsegError, match=r"hold up to \d+ distinct values .* look like images, not masks; are "
                                            r"the folders swapped\?"):
        ingest(masks, images, out=tmp_path / "out")


def test_a_threshold_off_the_masks_range_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    data = tmp_path / "data"
    for i in range(6):
        pair(data, f"c{i}", i)
    for threshold, said in ((300.0, "none holds tumour of the 6 masks (read as PNG:L >300)"),
                            (-1.0, "tumour fills every one of the 6 masks (read as PNG:L >-1)")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
            ingest(data, out=tmp_path / "out", mask_threshold=threshold, seed=1)
        assert any(said in r.getMessage() and "--mask-threshold" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
        ingest(data, out=tmp_path / "out", seed=1)  # the masks as they are: nothing to say
    assert not any("--mask-threshold" in r.getMessage() for r in caplog.records)


def test_an_empty_mask_suffix_pairs_names_ending_in_numbers(tmp_path: Path) -> None:
    """``--mask-suffix ''``: masks named exactly like their images; a trailing ``_0`` is part of the name."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    for i in range(4):
        png(images / f"p{i}_slice_0.png", image(i))
        png(masks / f"p{i}_slice_0.png", box(2, 6, 3, 9))
    res = ingest(images, masks, out=tmp_path / "out", mask_suffix="", fractions=(1.0, 0.0, 0.0))
    assert res.n_rejected == 0 and [r["mask"] for r in rows_of(res)] == [f"masks/p{i}_slice_0.png" for i in range(4)]


def _cli(args: list[str]) -> Any:
    from tumorseg.cli import app

    return CliRunner().invoke(app, args)


def _assert_one_line_error(result: Any, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    err = result.stderr.strip()
    assert "Traceback" not in result.output
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and fragment in err


def test_cli_strict_exit_2_no_manifest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pair(data, "a", 1)
    (data / "junk.png").write_bytes(b"not an image")
    (data / "README.md").write_text("# readme")  # ignored: the error is about junk.png
    result = _cli(["ingest", str(data), "--name", "s", "--out-dir", str(tmp_path / "out"), "--strict",
                   "--workers", "1"])
    _assert_one_line_error(result, "junk.png")
    assert "README" not in result.stderr
    assert not (tmp_path / "out" / "s").exists()


def test_cli_strict_on_dataset_layout_lists_ignored_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _dataset_layout(data)
    result = _cli(["ingest", str(data), "--name", "d", "--out-dir", str(tmp_path / "out"), "--strict",
                   "--recursive", "--workers", "1", "--fractions", "1,0,0"])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "rejected files: 0" in out
    assert f"ignored 4 non-image files (see {tmp_path / 'out' / 'd' / 'ignored.csv'})" in out
    assert set(ignored_of(tmp_path / "out" / "d")) == {"LICENSE", "README.md", "labels.csv",
                                                        "images/notes/scanner.txt"}


def test_cli_missing_folder(tmp_path: Path) -> None:
    result = _cli(["ingest", str(tmp_path / "nope"), "--name", "x", "--out-dir", str(tmp_path / "out")])
    _assert_one_line_error(result, "does not exist")
    assert str(tmp_path / "nope") in result.stderr
    result = _cli(["ingest", str(tmp_path), str(tmp_path / "nomasks"), "--name", "x"])
    _assert_one_line_error(result, "MASKS_DIR does not exist")
    assert not (tmp_path / "out").exists()


def test_cli_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _cli(["ingest", str(tmp_path / "empty"), "--name", "x", "--out-dir", str(tmp_path / "out")])
    _assert_one_line_error(result, "no files found")
    (tmp_path / "afile").write_text("x")
    result = _cli(["ingest", str(tmp_path / "afile"), "--name", "x", "--out-dir", str(tmp_path / "out")])
    _assert_one_line_error(result, "is not a folder")
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_tracking_store_it_cannot_log_to_before_any_work(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The ./mlruns file store (refused by MLflow 3.13+), a file that is no database: one line, nothing written."""
    data = tmp_path / "data"
    pair(data, "a", 1)
    out = tmp_path / "out"
    for uri in ("./mlruns", f"file://{tmp_path}/mlruns"):
        result = _cli(["ingest", str(data), "--name", "t", "--out-dir", str(out), "--tracking-uri", uri])
        _assert_one_line_error(result, f"tracking URI {uri}: a file store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "mlruns")
    result = _cli(["ingest", str(data), "--name", "t", "--out-dir", str(out)])
    _assert_one_line_error(result, "tracking URI mlruns: a file store")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    result = _cli(["ingest", str(data), "--name", "t", "--out-dir", str(out), "--tracking-uri", f"sqlite:///{notes}"])
    _assert_one_line_error(result, f"{notes} is not an SQLite database")
    assert notes.read_text() == "not a database\n" and not out.exists()


def test_cli_output_folder_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pair(data, "a", 1)
    (tmp_path / "afile").write_text("x")
    result = _cli(["ingest", str(data), "--name", "t", "--out-dir", str(tmp_path / "afile"), "--workers", "1"])
    _assert_one_line_error(result, "a file stands where a folder is needed")
    assert str(tmp_path / "afile") in result.stderr
    result = _cli(["synth", str(tmp_path / "afile"), "--n", "2", "--size", "16"])
    _assert_one_line_error(result, "a file stands where a folder is needed")
    assert (tmp_path / "afile").read_text() == "x"


def test_cli_group_by_folder_needs_recursive(tmp_path: Path) -> None:
    """Without --recursive every case would share the group '.', leaving val and test empty."""
    data = tmp_path / "data"
    pair(data, "a", 1)
    result = _cli(["ingest", str(data), "--name", "g", "--out-dir", str(tmp_path / "out"), "--group-by", "folder"])
    _assert_one_line_error(result, "--group-by folder needs --recursive")
    assert not (tmp_path / "out").exists()


def test_only_rejected_files_is_an_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    png(data / "lonely.png", image(1))
    with pytest.raises(TumorsegError, match=r"no usable image/mask pairs.*lonely\.png: image without mask"):
        ingest(data, out=tmp_path / "out")


def test_cli_ingest_prints_summary(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(4):
        pair(data, f"c{i}", i, mask=None if i else np.zeros((S, S), np.uint8))
    result = _cli(["ingest", str(data), "--name", "cli", "--out-dir", str(tmp_path / "out"), "--workers", "1",
                   "--fractions", "1,0,0"])
    assert result.exit_code == 0, result.output
    table = {}
    for line in result.stdout.splitlines():
        cells = line.replace("│", " ").split()
        if cells and cells[0] in ("train", "val", "test", "all"):
            table[cells[0]] = cells[1:]
    assert table == {
        "train": ["4", "4", "3", "1", "1.000", "1.000"],
        "val": ["0", "0", "0", "0", "0.000", "0.000"],
        "test": ["0", "0", "0", "0", "0.000", "0.000"],
        "all": ["4", "4", "3", "1", "1.000", "1.000"],
    }
    out = result.stdout
    assert "groups in more than one split: 0" in out and "rejected files: 0" in out
    assert "ignored" not in out  # no line when nothing was ignored
    info = json.loads((tmp_path / "out" / "cli" / "manifest.json").read_text())
    assert info["summary"]["splits"]["train"] == {"cases": 4, "groups": 4, "tumour": 3, "empty": 1,
                                                  "case_fraction": 1.0, "group_fraction": 1.0}
    assert info["dataset_digest"] in out


def test_cli_passes_every_option(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for p in range(6):
        png(data / f"pat{p}" / "a.png", image(p))
        m = box(0, 2, 0, 2, value=100)
        m[3, 3] = 200
        png(data / f"pat{p}" / "a_seg_1.png", m)
    result = _cli(["ingest", str(data), str(data), "--name", "all", "--out-dir", str(tmp_path / "out"),
                   "--mask-suffix", "_seg", "--recursive", "--group-pattern", r"(pat\d)", "--group-by", "folder",
                   "--fractions", "0.5,0.25,0.25", "--seed", "6", "--folds", "2", "--mask-threshold", "150",
                   "--slice-axis", "1", "--strict", "--workers", "2", "--experiment", "cli-options"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "out" / "all" / "manifest.json").read_text())
    c = info["config"]
    assert (c["mask_suffix"], c["recursive"], c["group_pattern"], c["group_by"]) == ("_seg", True, r"(pat\d)", "folder")
    assert (c["fractions"], c["seed"], c["folds"], c["mask_threshold"], c["slice_axis"], c["strict"]) == (
        [0.5, 0.25, 0.25], 6, 2, 150.0, 1, True)
    rows = rows_of(tmp_path / "out" / "all")
    assert len(rows) == 6 and all(r["mask_encoding"] == "PNG:L >150" and r["tumour_fraction"] == f"{1 / S**2:.6f}"
                                  for r in rows)
    assert {r["group"] for r in rows} == {f"pat{p}" for p in range(6)}


def test_bad_fractions_is_one_line_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pair(data, "a", 1)
    result = _cli(["ingest", str(data), "--name", "x", "--fractions", "0.5,0.5"])
    _assert_one_line_error(result, "--fractions")
    result = _cli(["ingest", str(data), "--name", "x", "--fractions", "0.5,0.6,0.1"])
    _assert_one_line_error(result, "fractions")


# ----------------------------------------------------------------------------- inputs, paths, atomicity


def test_inputs_are_never_modified(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _messy(data)
    pair(data / "sub", "s", 20)
    _volume_pair(data / "vols", "v", 21, (8, 6, 3), [1])
    before = tree_state(data)
    ingest(data, out=tmp_path / "out", recursive=True)
    ingest(data, out=tmp_path / "out", recursive=True, workers=2, mask_threshold=50)
    assert tree_state(data) == before


def test_manifest_paths_are_relative_and_inside_data_root(tmp_path: Path) -> None:
    images, masks = tmp_path / "d" / "img", tmp_path / "d" / "lab"
    for i in range(3):
        png(images / "p" / f"s{i}.png", image(i))
        png(masks / "p" / f"s{i}_mask.png", box(0, 2, 0, 2))
    res = ingest(images, masks, out=tmp_path / "out", recursive=True, seed=2)
    info, df = mf.load_manifest(res.manifest_dir)
    root = Path(info.data_root)
    assert root == (tmp_path / "d").resolve()
    for row in rows_of(res):
        for rel in [row["image"], *row["mask"].split("|")]:
            p = Path(rel)
            assert not p.is_absolute() and ".." not in p.parts
            assert (root / p).resolve().is_relative_to(root)
            assert (root / p).is_file()
        assert sha(root / row["image"]) == row["image_sha256"]
    mf.verify_files(info, df, res.manifest_dir)
    # later stages notice a changed input
    png(images / "p" / "s1.png", image(99))
    with pytest.raises(TumorsegError, match=r"s1\.png: changed since ingest"):
        mf.verify_files(info, df, res.manifest_dir)


def test_relative_input_paths(tmp_path: Path) -> None:
    pair(tmp_path / "rel", "a", 1)
    res = ingest(Path("rel"), out=Path("outs"))  # cwd is tmp_path
    assert res.manifest_dir == Path("outs") / "m"
    assert json.loads((tmp_path / "outs" / "m" / "manifest.json").read_text())["data_root"] == str(
        (tmp_path / "rel").resolve())
    assert rows_of(res)[0]["image"] == "a.png"


def test_out_dir_inside_input_tree_is_not_ingested(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pair(data / "p1", "a", 1)
    pair(data / "p2", "b", 2)
    first = ingest(data, out=data / "manifests", recursive=True)
    second = ingest(data, out=data / "manifests", recursive=True)
    assert second.n_rejected == 0, rejected_of(second)
    for name in OUTPUTS:
        assert (second.manifest_dir / name).read_bytes() == (first.manifest_dir / name).read_bytes()


# ----------------------------------------------------------------------------- determinism and splits


def _patients(data: Path, ids: range, slices: int = 3) -> None:
    """Patient folders ``pNNN/sK.png`` + masks; every third slice is empty."""
    for p in ids:
        for k in range(slices):
            mask = np.zeros((S, S), np.uint8) if k == 2 else box(k, k + 3, p % 20, p % 20 + 4)
            pair(data / f"p{p:03d}", f"s{k}", p * 100 + k, mask=mask)


def test_byte_identical_reruns(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _patients(data, range(12))
    _messy(data / "junk")  # rejections are part of the bytes too
    opts: dict[str, Any] = dict(recursive=True, group_by="folder", seed=2, folds=3)
    a = ingest(data, out=tmp_path / "out_a", **opts)
    b = ingest(data, out=tmp_path / "out_b", **opts, workers=2)  # other folder, parallel decode
    first = {n: (a.manifest_dir / n).read_bytes() for n in OUTPUTS}
    c = ingest(data, out=tmp_path / "out_a", **opts)  # same folder again
    assert a.n_rejected == len(EXPECTED_REJECTIONS) and a.n_cases == 12 * 3 + 3
    for n in OUTPUTS:
        assert (b.manifest_dir / n).read_bytes() == first[n], n
        assert (c.manifest_dir / n).read_bytes() == first[n], n
    assert a.dataset_digest == b.dataset_digest == c.dataset_digest
    # a different seed is a different manifest
    d = ingest(data, out=tmp_path / "out_d", **{**opts, "seed": 7})
    assert d.dataset_digest != a.dataset_digest


def test_adding_patients_moves_zero_cases(tmp_path: Path) -> None:
    pool, data = tmp_path / "pool", tmp_path / "data"
    _patients(pool, range(30))
    for p in range(12):
        shutil.copytree(pool / f"p{p:03d}", data / f"p{p:03d}")
    opts: dict[str, Any] = dict(recursive=True, group_by="folder", seed=2, folds=4)
    old = by_id(ingest(data, out=tmp_path / "out1", **opts))
    for p in range(12, 30):
        shutil.copytree(pool / f"p{p:03d}", data / f"p{p:03d}")
    new = by_id(ingest(data, out=tmp_path / "out2", **opts))
    assert len(old) == 36 and len(new) == 90
    moved = [c for c in old if (old[c]["split"], old[c]["fold"], old[c]["group"]) !=
             (new[c]["split"], new[c]["fold"], new[c]["group"])]
    assert moved == []
    assert {r["split"] for r in new.values()} == {"train", "val", "test"}
    # a single patient alone gets the split it has among all the others
    shutil.copytree(pool / "p005", tmp_path / "alone" / "p005")
    alone = by_id(ingest(tmp_path / "alone", out=tmp_path / "out3", **opts))
    assert {r["split"] for r in alone.values()} == {new["p005/s0"]["split"]}


def test_synthetic_patients_split_by_pattern_and_are_stable(tmp_path: Path) -> None:
    from tumorseg import synth

    pool = tmp_path / "pool"
    synth.run(pool, n=48, size=32, seed=0)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "masks").mkdir()
    names = sorted(p.name for p in (pool / "images").iterdir())
    for n in names[:24]:
        shutil.copy(pool / "images" / n, data / "images" / n)
        shutil.copy(pool / "masks" / n, data / "masks" / n)
    opts: dict[str, Any] = dict(group_pattern=synth.GROUP_PATTERN, seed=3)
    old = by_id(ingest(data / "images", data / "masks", out=tmp_path / "o1", **opts))
    for n in names[24:]:
        shutil.copy(pool / "images" / n, data / "images" / n)
        shutil.copy(pool / "masks" / n, data / "masks" / n)
    res = ingest(data / "images", data / "masks", out=tmp_path / "o2", **opts)
    new = by_id(res)
    assert len(old) == 24 and len(new) == 48
    assert all(new[c]["split"] == old[c]["split"] for c in old)
    assert {r["group"] for r in new.values()} == {f"patient_{i:03d}" for i in range(12)}
    splits: dict[str, set[str]] = {}
    for r in new.values():
        assert r["group"] == r["case_id"][: len("patient_000")]
        splits.setdefault(r["group"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert res.summary["groups_straddling_splits"] == 0
    for name, v in res.summary["splits"].items():
        sel = [r for r in new.values() if r["split"] == name]
        assert v["cases"] == len(sel) and v["groups"] == len({r["group"] for r in sel})
        assert v["tumour"] == sum(r["has_tumour"] == "true" for r in sel) and v["tumour"] > 0
        assert v["empty"] == len(sel) - v["tumour"]
        assert v["case_fraction"] == round(len(sel) / 48, 4)
    assert sum(v["cases"] for v in res.summary["splits"].values()) == 48


def test_split_hash_is_pinned() -> None:
    """Changing the hash would move every existing case: these values must never change."""
    f = (0.7, 0.15, 0.15)
    assert [assign_split(f"patient_{i:03d}", 0, f) for i in range(8)] == [
        "train", "train", "train", "train", "train", "test", "train", "test"]
    assert [assign_split(f"patient_{i:03d}", 3, f) for i in range(6)] == [
        "train", "train", "train", "val", "train", "test"]


def test_no_group_straddles_splits_and_folds(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _patients(data, range(20), slices=4)
    res = ingest(data, out=tmp_path / "out", recursive=True, group_by="folder", seed=2, folds=3)
    rows = rows_of(res)
    per_group: dict[str, set[tuple[str, str]]] = {}
    for r in rows:
        assert r["group"] == r["case_id"].split("/")[0]
        per_group.setdefault(r["group"], set()).add((r["split"], r["fold"]))
        if r["split"] == "test":
            assert r["fold"] == "-1"
        else:
            assert r["fold"] in {"0", "1", "2"}
    assert len(per_group) == 20 and all(len(v) == 1 for v in per_group.values())
    non_test_folds = {f for v in per_group.values() for s, f in v if s != "test"}
    assert non_test_folds == {"0", "1", "2"}
    # without --folds every fold is -1
    assert {r["fold"] for r in rows_of(ingest(data, out=tmp_path / "o2", recursive=True, seed=2))} == {"-1"}


def test_fractions_all_train(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _patients(data, range(5), slices=1)
    res = ingest(data, out=tmp_path / "out", recursive=True, fractions=(1.0, 0.0, 0.0))
    assert {r["split"] for r in rows_of(res)} == {"train"}
    assert res.summary["splits"]["val"]["cases"] == 0


def test_identical_images_share_a_group(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    _patients(data, range(1, 8), slices=2)
    shutil.copy(data / "p003" / "s0.png", data / "p006" / "dup.png")  # the same image in another patient
    png(data / "p006" / "dup_mask.png", box(0, 1, 0, 1))
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest"):
        res = ingest(data, out=tmp_path / "out", recursive=True, group_by="folder", seed=4)
    assert "1 group(s) merged into others because they share byte-identical images (e.g. 'p006' into 'p003')" in \
        caplog.text
    rows = by_id(res)
    for case in ("p003/s0", "p003/s1", "p006/s0", "p006/s1", "p006/dup"):
        assert rows[case]["group"] == "p003", case  # merged groups take the smallest name
    assert len({rows[c]["split"] for c in rows if c.startswith(("p003", "p006"))}) == 1
    assert rows["p001/s0"]["group"] == "p001"
    assert res.summary["groups"] == 6 and res.summary["groups_straddling_splits"] == 0
    # with default per-case groups the two copies still land together
    res = ingest(data, out=tmp_path / "out2", recursive=True, seed=4)
    rows = by_id(res)
    assert rows["p006/dup"]["group"] == rows["p003/s0"]["group"] == "p003/s0"


def test_tumour_coverage_failure_suggests_a_seed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(4):
        pair(data, f"t{i}", i)  # four tumour cases, one group each
    with pytest.raises(TumorsegError) as exc:
        ingest(data, out=tmp_path / "out", seed=1)  # seed 1 puts none of them in val
    msg = str(exc.value)
    assert "would get no tumour case" in msg and "val" in msg and "--seed 8" in msg
    assert not (tmp_path / "out").exists()
    res = ingest(data, out=tmp_path / "out", seed=8)
    assert all(v["tumour"] > 0 for v in res.summary["splits"].values())


def test_a_split_far_below_its_fraction_is_a_warning_with_a_seed_that_is_not(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    names = [f"t{i:02d}" for i in range(24)]  # 24 one-case groups: 0.15 asks for 3.6 in val and in test
    for i, stem in enumerate(names):
        pair(data, stem, i)

    def sizes(seed: int) -> dict[str, int]:
        splits = [assign_split(n, seed, (0.7, 0.15, 0.15)) for n in names]
        return {s: splits.count(s) for s in ("train", "val", "test")}

    small = next(s for s in range(100) if min(sizes(s)["val"], sizes(s)["test"]) == 1)  # one case: under 1.8
    fair = next(s for s in range(small + 1, 200) if min(sizes(s)["val"], sizes(s)["test"]) >= 2)
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
        res = ingest(data, out=tmp_path / "out", seed=small)  # a warning, not a refusal: the manifest is written
    assert (res.manifest_dir / "manifest.csv").exists()
    short = next(s for s in ("val", "test") if sizes(small)[s] == 1)
    said = [r.getMessage() for r in caplog.records if "asked" in r.getMessage()]
    assert len(said) == 1 and f"with --seed {small} {short} gets 1 of 24 groups (about 3.6 asked)" in said[0]
    assert f"--seed {fair} gives every split its share" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
        ingest(data, out=tmp_path / "out2", seed=fair)
    assert not [r for r in caplog.records if "asked" in r.getMessage()]


# ----------------------------------------------------------------------------- MLflow


def test_mlflow_run_is_logged(tmp_path: Path, mlflow_uri: str) -> None:
    import mlflow

    data = tmp_path / "data"
    pair(data, "a", 1)
    pair(data, "b", 2, mask=np.zeros((S, S), np.uint8))
    png(data / "lonely.png", image(3))
    (data / "README.md").write_text("# a dataset\n")
    res = ingest(data, out=tmp_path / "out", name="tracked", fractions=(1.0, 0.0, 0.0))
    assert res.run_id
    client = mlflow.MlflowClient(mlflow_uri)
    run_ = client.get_run(res.run_id)
    assert run_.info.status == "FINISHED"
    assert client.get_experiment(run_.info.experiment_id).name == "tumorseg"
    p = run_.data.params
    assert p["name"] == "tracked" and p["seed"] == "0" and p["mask_suffix"] == "_mask"
    assert p["images_dir"] == str(data) and p["fractions"] == "[1.0, 0.0, 0.0]"
    m = run_.data.metrics
    assert (m["cases"], m["rejected"], m["ignored"], m["tumour"], m["empty"], m["groups"]) == (2, 1, 1, 1, 1, 2)
    assert (m["train_cases"], m["val_cases"], m["test_cases"]) == (2, 0, 0)
    assert run_.data.tags["tumorseg.stage"] == "ingest"
    assert run_.data.tags["tumorseg.dataset_digest"] == res.dataset_digest
    note = run_.data.tags["mlflow.note.content"]  # the run's description in the UI
    assert note.startswith("2 cases (train 2 / val 0 / test 0)")  # headline first: the runs table shows the start
    assert "`tracked`" in note and res.dataset_digest[:12] in note
    assert "1 rejected and 1 ignored file(s)" in note
    assert sorted(a.path for a in client.list_artifacts(res.run_id, "manifest")) == [
        f"manifest/{n}" for n in sorted(OUTPUTS)]
    local = Path(client.download_artifacts(res.run_id, "manifest", str(tmp_path / "dl")))
    for n in OUTPUTS:
        assert (local / n).read_bytes() == (res.manifest_dir / n).read_bytes()
    inputs = run_.inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert ds.name == "tracked"
    assert ds.digest == res.dataset_digest[:36]
    assert res.dataset_digest.startswith(ds.digest)
    assert json.loads(ds.source)["uri"] == str((res.manifest_dir / "manifest.csv").resolve())
    assert json.loads(ds.profile)["num_rows"] == 2
    assert {t.key: t.value for t in inputs[0].tags}.get("mlflow.data.context") == "ingest"


def test_masks_in_a_sibling_folder_pair_by_stem(tmp_path: Path) -> None:
    """A public dataset's layout (BUSI): CLASS/images/x.png beside CLASS/mask/x_mask.png (+ x_mask_1.png)."""
    data = tmp_path / "data"
    png(data / "benign" / "images" / "benign (1).png", image(1))
    png(data / "benign" / "mask" / "benign (1)_mask.png", box(2, 6, 3, 9))
    png(data / "benign" / "mask" / "benign (1)_mask_1.png", box(8, 10, 8, 10))
    png(data / "benign" / "images" / "benign (2).png", image(2))
    png(data / "benign" / "mask" / "benign (2)_mask.png", box(1, 3, 1, 3))
    png(data / "normal" / "images" / "normal (1).png", image(3))
    png(data / "normal" / "mask" / "normal (1)_mask.png", np.zeros((S, S), np.uint8))
    # an ambiguous stem: two sibling folders of images hold 'x' under one parent, so neither is paired
    png(data / "amb" / "a" / "x.png", image(4))
    png(data / "amb" / "b" / "x.png", image(5))
    png(data / "amb" / "masks" / "x_mask.png", box(2, 6, 3, 9))
    res = ingest(data, out=tmp_path / "out", recursive=True, fractions=(1.0, 0.0, 0.0))
    rows = by_id(res)
    assert sorted(rows) == ["benign/images/benign (1)", "benign/images/benign (2)", "normal/images/normal (1)"]
    merged = "benign/mask/benign (1)_mask.png|benign/mask/benign (1)_mask_1.png"
    assert rows["benign/images/benign (1)"]["mask"] == merged
    assert rows["benign/images/benign (1)"]["n_masks"] == "2"
    assert rows["normal/images/normal (1)"]["has_tumour"] == "false"
    rejected = rejected_of(res)
    assert set(rejected) == {"amb/a/x.png", "amb/b/x.png", "amb/masks/x_mask.png"}
    assert "image without mask" in rejected["amb/a/x.png"] and "mask without image" in rejected["amb/masks/x_mask.png"]


def test_a_blank_image_shared_by_patients_joins_no_groups(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A constant slice (all black) exported identically for several patients carries nothing of them."""
    data = tmp_path / "data"
    _patients(data, range(1, 8), slices=2)
    for p in ("p002", "p005"):
        png(data / p / "blank.png", np.zeros((S, S), np.uint8))
        png(data / p / "blank_mask.png", np.zeros((S, S), np.uint8))
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest"):
        res = ingest(data, out=tmp_path / "out", recursive=True, group_by="folder", seed=4)
    rows = by_id(res)
    assert rows["p002/blank"]["image_sha256"] == rows["p005/blank"]["image_sha256"]
    assert (rows["p002/blank"]["group"], rows["p005/blank"]["group"]) == ("p002", "p005")
    assert res.summary["groups"] == 7 and "merged into others" not in caplog.text
