"""The one image loader, on real files written to disk (PNG, TIFF, NIfTI)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from PIL import Image

from tumorseg.imageio import (
    DecodeError,
    binarize_mask,
    decode,
    image_format,
    load_image,
    load_mask,
    mask_plane,
    read_bytes,
    read_nifti_affine,
    slice_of,
    split_ext,
    write_mask_png,
    write_nifti,
    write_png,
)

H, W = 5, 9  # non-square on purpose: a transposition changes the shape


def asym(dtype: type = np.uint8, scale: int = 3) -> np.ndarray:
    """A non-square array whose every pixel differs, so any flip or transpose shows."""
    return (np.arange(H * W).reshape(H, W) * scale).astype(dtype)


def save_pil(path: Path, img: Image.Image) -> Path:
    img.save(path, format="PNG")
    return path


def decode_file(path: Path, role: str = "image"):  # type: ignore[no-untyped-def]
    return decode(read_bytes(path), path, role)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", ("a", ".png")),
        ("A.PNG", ("A", ".png")),
        ("a.b.nii.gz", ("a.b", ".nii.gz")),
        ("scan.NII.GZ", ("scan", ".nii.gz")),
        ("x.tif", ("x", ".tif")),
        ("noext", ("noext", "")),
        ("a.jpg", ("a", ".jpg")),
    ],
)
def test_split_ext(name: str, expected: tuple[str, str]) -> None:
    assert split_ext(name) == expected


def test_image_format() -> None:
    assert image_format("a.png") == "png"
    assert image_format("dir/a.TIFF") == "tiff"
    assert image_format("a.tif") == "tiff"
    assert image_format("a.nii") == "nifti"
    assert image_format("a.nii.gz") == "nifti"
    assert image_format("a.JPG") == "jpeg"
    assert image_format("a.jpeg") == "jpeg"
    assert image_format("a.bmp") == "bmp"
    assert image_format("a.dcm") == "dicom"
    assert image_format("a.nrrd") == image_format("a.mha") == image_format("a.mhd") == "itk"
    assert image_format("a.gif") is None
    assert image_format("a.gz") is None


# ----------------------------------------------------------------------------- image modes


def test_png_grey_8bit(tmp_path: Path) -> None:
    a = asym()
    p = save_pil(tmp_path / "g.png", Image.fromarray(a))
    d = decode_file(p)
    assert d.mode == "PNG:L"
    assert d.array.dtype == np.uint8
    assert d.array.shape == (1, H, W)
    np.testing.assert_array_equal(d.array[0], a)
    img = load_image(p)
    assert img.dtype == np.float32 and img.shape == (1, H, W)
    np.testing.assert_array_equal(img[0], a.astype(np.float32))


def test_png_grey_16bit(tmp_path: Path) -> None:
    a = asym(np.uint16, scale=1400)  # values up to 61600: needs 16 bits
    assert a.max() > 255
    p = save_pil(tmp_path / "g16.png", Image.fromarray(a))
    d = decode_file(p)
    assert d.mode == "PNG:I;16"
    assert d.array.dtype == np.uint16
    np.testing.assert_array_equal(d.array[0], a)
    np.testing.assert_array_equal(load_image(p)[0], a.astype(np.float32))


def test_png_rgb(tmp_path: Path) -> None:
    rgb = np.stack([asym(), asym() + 1, asym() + 2], axis=-1)
    p = save_pil(tmp_path / "c.png", Image.fromarray(rgb, mode="RGB"))
    d = decode_file(p)
    assert d.mode == "PNG:RGB"
    assert d.array.shape == (3, H, W)
    for c in range(3):
        np.testing.assert_array_equal(d.array[c], rgb[:, :, c])


def test_png_rgba_alpha_dropped(tmp_path: Path) -> None:
    rgba = np.stack([asym(), asym() + 1, asym() + 2, np.full((H, W), 7, np.uint8)], axis=-1)
    p = save_pil(tmp_path / "c.png", Image.fromarray(rgba, mode="RGBA"))
    d = decode_file(p)
    assert d.mode == "PNG:RGBA"
    assert d.array.shape == (3, H, W)
    np.testing.assert_array_equal(np.moveaxis(d.array, 0, -1), rgba[:, :, :3])


def test_png_grey_alpha_dropped(tmp_path: Path) -> None:
    la = np.stack([asym(), np.full((H, W), 200, np.uint8)], axis=-1)
    p = save_pil(tmp_path / "la.png", Image.fromarray(la, mode="LA"))
    d = decode_file(p)
    assert d.mode == "PNG:LA"
    assert d.array.shape == (1, H, W)
    np.testing.assert_array_equal(d.array[0], asym())


def _palette_image(indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    img = Image.fromarray(indices.astype(np.uint8), mode="P")
    flat = [v for c in colours for v in c]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return img


def test_png_palette_image_expands_to_rgb(tmp_path: Path) -> None:
    idx = (asym() % 3).astype(np.uint8)
    colours = [(10, 20, 30), (200, 100, 50), (0, 255, 0)]
    p = save_pil(tmp_path / "p.png", _palette_image(idx, colours))
    d = decode_file(p, "image")
    assert d.mode == "PNG:P"
    assert d.array.shape == (3, H, W)
    expected = np.array(colours, np.uint8)[idx]  # (H, W, 3)
    np.testing.assert_array_equal(np.moveaxis(d.array, 0, -1), expected)


def test_png_palette_with_transparency_drops_alpha(tmp_path: Path) -> None:
    idx = (asym() % 2).astype(np.uint8)
    img = _palette_image(idx, [(1, 2, 3), (4, 5, 6)])
    img.save(tmp_path / "pt.png", format="PNG", transparency=0)
    d = decode_file(tmp_path / "pt.png", "image")
    assert d.array.shape == (3, H, W)
    np.testing.assert_array_equal(d.array[:, 0, 0], [1, 2, 3])  # idx 0 at (0, 0)
    np.testing.assert_array_equal(d.array[:, 0, 1], [4, 5, 6])


def test_tiff_grey_16bit_and_rgb(tmp_path: Path) -> None:
    a = asym(np.uint16, scale=1000)
    tifffile.imwrite(tmp_path / "g.tif", a)
    d = decode_file(tmp_path / "g.tif")
    assert d.mode == "TIFF" and d.array.dtype == np.uint16 and d.array.shape == (1, H, W)
    np.testing.assert_array_equal(d.array[0], a)

    rgb = np.stack([asym(), asym() + 1, asym() + 2], axis=-1)
    tifffile.imwrite(tmp_path / "c.tiff", rgb, photometric="rgb")
    d = decode_file(tmp_path / "c.tiff")
    assert d.array.shape == (3, H, W)
    np.testing.assert_array_equal(np.moveaxis(d.array, 0, -1), rgb)


def test_tiff_planar_rgb(tmp_path: Path) -> None:
    planar = np.stack([asym(), asym() + 1, asym() + 2])  # (3, H, W): tifffile writes it as planar RGB
    tifffile.imwrite(tmp_path / "planar.tif", planar)
    d = decode_file(tmp_path / "planar.tif")
    assert d.array.shape == (3, H, W)
    np.testing.assert_array_equal(d.array, planar)


def test_tiff_written_by_pillow(tmp_path: Path) -> None:
    rgb = np.stack([asym(), asym() + 1, asym() + 2], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.tif")
    Image.fromarray(asym()).save(tmp_path / "g.tif")
    Image.fromarray(TRUTH * 255).convert("1").save(tmp_path / "m.tif")
    np.testing.assert_array_equal(np.moveaxis(decode_file(tmp_path / "c.tif").array, 0, -1), rgb)
    np.testing.assert_array_equal(decode_file(tmp_path / "g.tif").array[0], asym())
    binary, values, _ = mask_of(tmp_path / "m.tif")
    assert values == "0/1"
    np.testing.assert_array_equal(binary, TRUTH)


def test_tiff_single_page_stack_is_2d(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "one.tif", asym()[None])
    d = decode_file(tmp_path / "one.tif")
    assert d.array.shape == (1, H, W)
    np.testing.assert_array_equal(d.array[0], asym())


@pytest.mark.parametrize("shape", [(6, H, W), (3, H, W), (H, W, 2)])
def test_tiff_multipage_stack_is_a_volume(tmp_path: Path, shape: tuple[int, ...]) -> None:
    # a stack of 3 or of H grey pages is a volume (pages are slices), not an RGB or grey+alpha image
    stack = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    d = decode_file(tmp_path / "stack.tif")
    assert d.is_volume and d.mode == "TIFF-stack"
    np.testing.assert_array_equal(d.array, np.transpose(stack, (2, 1, 0)))  # (Z, Y, X) -> (X, Y, Z)
    np.testing.assert_array_equal(d.affine, np.eye(4))


def test_tiff_of_separate_images_of_one_shape_is_one_line(tmp_path: Path) -> None:
    """Pages written one series each (tifffile's contiguous=False): reading the first alone would drop the rest."""
    with tifffile.TiffWriter(tmp_path / "sep.tif") as w:
        for k in range(3):
            w.write(asym() + k, photometric="minisblack", contiguous=False)
    with pytest.raises(DecodeError, match=r"sep\.tif: TIFF of 3 separate images of one shape; save one image per"):
        decode_file(tmp_path / "sep.tif")


# ----------------------------------------------------------------------------- mask encodings


def mask_of(path: Path, threshold: float | None = None) -> tuple[np.ndarray, str, str]:
    d = decode_file(path, "mask")
    binary, values = binarize_mask(mask_plane(d.array, path), path, threshold)
    return binary, values, d.mode


TRUTH = (asym() % 4 == 0).astype(np.uint8)  # non-square, non-symmetric {0, 1}


def test_mask_mode_1(tmp_path: Path) -> None:
    p = save_pil(tmp_path / "m.png", Image.fromarray(TRUTH * 255).convert("1"))
    binary, values, mode = mask_of(p)
    assert mode == "PNG:1"
    assert values == "0/1"
    assert binary.dtype == np.uint8
    np.testing.assert_array_equal(binary, TRUTH)


def test_mask_0_1(tmp_path: Path) -> None:
    p = save_pil(tmp_path / "m.png", Image.fromarray(TRUTH))
    binary, values, mode = mask_of(p)
    assert (mode, values) == ("PNG:L", "0/1")
    np.testing.assert_array_equal(binary, TRUTH)


def test_mask_0_255(tmp_path: Path) -> None:
    p = save_pil(tmp_path / "m.png", Image.fromarray(TRUTH * 255))
    binary, values, _ = mask_of(p)
    assert values == "0/255"
    np.testing.assert_array_equal(binary, TRUTH)


def test_mask_0_65535(tmp_path: Path) -> None:
    p = save_pil(tmp_path / "m.png", Image.fromarray(TRUTH.astype(np.uint16) * 65535))
    binary, values, _ = mask_of(p)
    assert values == "0/65535"
    np.testing.assert_array_equal(binary, TRUTH)


def test_mask_grey_stored_as_rgb(tmp_path: Path) -> None:
    rgb = np.repeat((TRUTH * 255)[:, :, None], 3, axis=2)
    p = save_pil(tmp_path / "m.png", Image.fromarray(rgb, mode="RGB"))
    binary, values, mode = mask_of(p)
    assert (mode, values) == ("PNG:RGB", "0/255")
    np.testing.assert_array_equal(binary, TRUTH)


def test_mask_grey_stored_as_rgba(tmp_path: Path) -> None:
    rgba = np.concatenate([np.repeat((TRUTH * 255)[:, :, None], 3, axis=2), np.full((H, W, 1), 255, np.uint8)],
                          axis=2)
    p = save_pil(tmp_path / "m.png", Image.fromarray(rgba, mode="RGBA"))
    binary, values, mode = mask_of(p)
    assert (mode, values) == ("PNG:RGBA", "0/255")
    np.testing.assert_array_equal(binary, TRUTH)


def test_mask_drawn_in_the_alpha_channel_alone(tmp_path: Path) -> None:
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 3] = TRUTH * 255
    p = save_pil(tmp_path / "m.png", Image.fromarray(rgba, "RGBA"))
    binary, values, mode = mask_of(p)
    assert (mode, values) == ("PNG:RGBA", "0/255")
    np.testing.assert_array_equal(binary, TRUTH)


def test_mask_colour_channels_differ_rejected(tmp_path: Path) -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = TRUTH * 255  # red tumour on black
    p = save_pil(tmp_path / "red.png", Image.fromarray(rgb, mode="RGB"))
    with pytest.raises(DecodeError, match=r"red\.png: colour mask whose channels differ"):
        mask_of(p)


def test_mask_palette_indices(tmp_path: Path) -> None:
    # index 1 is drawn red: the mask is read by index, not by colour
    p = save_pil(tmp_path / "m.png", _palette_image(TRUTH, [(0, 0, 0), (255, 0, 0)]))
    binary, values, mode = mask_of(p)
    assert (mode, values) == ("PNG:P", "0/1")
    np.testing.assert_array_equal(binary, TRUTH)


def test_mask_multi_valued_rejected_with_values(tmp_path: Path) -> None:
    m = np.zeros((H, W), np.uint8)
    m[0, :3] = 100
    m[1, :3] = 200
    p = save_pil(tmp_path / "multi.png", Image.fromarray(m))
    with pytest.raises(DecodeError) as exc:
        mask_of(p)
    msg = str(exc.value)
    assert "multi.png" in msg
    assert "3 distinct values (0, 100, 200)" in msg
    assert "--mask-threshold" in msg


def test_mask_whose_larger_value_is_0_is_rejected(tmp_path: Path) -> None:
    """-1/0: by the larger-is-tumour rule 0 would be tumour (99% of the image): a one-line reason instead."""
    import tifffile

    p = tmp_path / "neg.tif"
    tifffile.imwrite(p, TRUTH.astype(np.int16) - 1)
    with pytest.raises(DecodeError, match=r"neg\.tif: mask values -1/0 would make 0 the tumour; save masks with 0 "
                                          r"as background"):
        mask_of(p)
    tifffile.imwrite(p, np.full((H, W), -1, np.int16))  # its tumour-free masks: all -1, not all tumour
    with pytest.raises(DecodeError, match=r"neg\.tif: mask holds only -1; save masks with 0 as background"):
        mask_of(p)


def test_mask_many_values_listing_is_shortened(tmp_path: Path) -> None:
    p = save_pil(tmp_path / "ramp.png", Image.fromarray(asym()))  # 45 distinct values
    with pytest.raises(DecodeError, match=r"45 distinct values \(0, 3, 6, 9, 12, 15, \.\.\.\)"):
        mask_of(p)


def test_mask_threshold(tmp_path: Path) -> None:
    m = np.zeros((H, W), np.uint8)
    m[0, :3] = 100
    m[1, :3] = 200
    p = save_pil(tmp_path / "multi.png", Image.fromarray(m))
    binary, values, _ = mask_of(p, threshold=150)
    assert values == ">150"
    np.testing.assert_array_equal(binary, (m > 150).astype(np.uint8))
    assert binary.sum() == 3
    binary, _, _ = mask_of(p, threshold=50)
    assert binary.sum() == 6


def test_mask_nan_rejected(tmp_path: Path) -> None:
    m = TRUTH.astype(np.float32)
    m[0, 0] = np.nan
    write_nifti(tmp_path / "nan.nii.gz", m)
    with pytest.raises(DecodeError, match=r"nan\.nii\.gz: mask contains NaN"):
        load_mask([tmp_path / "nan.nii.gz"])


def test_float_nifti_mask(tmp_path: Path) -> None:
    write_nifti(tmp_path / "f.nii.gz", TRUTH.astype(np.float64))
    np.testing.assert_array_equal(load_mask([tmp_path / "f.nii.gz"]), TRUTH)


def test_mask_single_value(tmp_path: Path) -> None:
    p = save_pil(tmp_path / "empty.png", Image.fromarray(np.zeros((H, W), np.uint8)))
    binary, values, _ = mask_of(p)
    assert values == "0" and binary.shape == (H, W) and binary.sum() == 0
    p = save_pil(tmp_path / "full.png", Image.fromarray(np.full((H, W), 255, np.uint8)))
    binary, values, _ = mask_of(p)
    assert values == "255" and binary.sum() == H * W


def test_load_mask_union_of_several_files(tmp_path: Path) -> None:
    a = np.zeros((H, W), np.uint8)
    a[0, 0] = 1
    b = np.zeros((H, W), np.uint8)
    b[4, 8] = 255
    save_pil(tmp_path / "a.png", Image.fromarray(a))
    save_pil(tmp_path / "b.png", Image.fromarray(b))
    out = load_mask([tmp_path / "a.png", tmp_path / "b.png"])
    assert out.dtype == np.uint8 and out.shape == (H, W)
    assert set(np.unique(out)) == {0, 1}
    assert out[0, 0] == 1 and out[4, 8] == 1 and out.sum() == 2


def test_load_mask_needs_a_path() -> None:
    with pytest.raises(DecodeError):
        load_mask([])


# ----------------------------------------------------------------------------- orientation


def test_png_round_trip_keeps_orientation(tmp_path: Path) -> None:
    a = asym()
    write_png(tmp_path / "a.png", a)
    img = load_image(tmp_path / "a.png")
    assert img.shape == (1, H, W)
    np.testing.assert_array_equal(img[0], a)
    # the file itself, read by plain Pillow, is H rows of W pixels
    with Image.open(tmp_path / "a.png") as pil:
        assert pil.size == (W, H)
        assert pil.getpixel((W - 1, 0)) == a[0, W - 1]


def test_png_16bit_round_trip(tmp_path: Path) -> None:
    a = asym(np.uint16, scale=1400)
    write_png(tmp_path / "a.png", a)
    np.testing.assert_array_equal(load_image(tmp_path / "a.png")[0], a)


def test_mask_png_round_trip_keeps_orientation(tmp_path: Path) -> None:
    write_mask_png(tmp_path / "m.png", TRUTH)
    with Image.open(tmp_path / "m.png") as pil:
        assert pil.mode == "L"
        assert set(np.unique(np.asarray(pil))) == {0, 255}
    np.testing.assert_array_equal(load_mask([tmp_path / "m.png"]), TRUTH)


def test_write_png_leaves_no_temp_files(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", asym())
    write_png(tmp_path / "a.png", asym() + 1)  # replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    np.testing.assert_array_equal(load_image(tmp_path / "a.png")[0], asym() + 1)


def test_tiff_round_trip_keeps_orientation(tmp_path: Path) -> None:
    a = asym()
    tifffile.imwrite(tmp_path / "a.tif", a)
    np.testing.assert_array_equal(load_image(tmp_path / "a.tif")[0], a)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_volume_slices_keep_orientation(tmp_path: Path, suffix: str) -> None:
    vol = np.arange(6 * 9 * 4, dtype=np.int16).reshape(6, 9, 4)
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = [10, -20, 5]
    path = tmp_path / f"vol{suffix}"
    write_nifti(path, vol, affine)
    d = decode_file(path)
    assert d.mode == "NIfTI" and d.is_volume
    assert d.array.shape == (6, 9, 4)
    np.testing.assert_array_equal(d.array, vol)
    np.testing.assert_allclose(d.affine, affine)
    np.testing.assert_allclose(read_nifti_affine(path), affine)
    for k in range(4):
        np.testing.assert_array_equal(slice_of(d, k, 2), vol[:, :, k][None])
        np.testing.assert_array_equal(load_image(path, k, 2)[0], vol[:, :, k])
    np.testing.assert_array_equal(slice_of(d, 2, 0), vol[2][None])
    np.testing.assert_array_equal(slice_of(d, 3, 1), vol[:, 3, :][None])
    # and nibabel, read independently, agrees with what was written
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(path)).dataobj), vol)


def test_nifti_written_gz_is_gzip(tmp_path: Path) -> None:
    write_nifti(tmp_path / "a.nii.gz", np.zeros((3, 4), np.uint8))
    write_nifti(tmp_path / "a.nii", np.zeros((3, 4), np.uint8))
    assert (tmp_path / "a.nii.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "a.nii").read_bytes()[:2] != b"\x1f\x8b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii", "a.nii.gz"]


def test_nifti_2d_round_trip(tmp_path: Path) -> None:
    a = asym(np.float32)
    write_nifti(tmp_path / "a.nii.gz", a)
    d = decode_file(tmp_path / "a.nii.gz")
    assert d.array.shape == (H, W, 1) and not d.is_volume
    np.testing.assert_array_equal(slice_of(d, -1, 2), a[None])
    np.testing.assert_array_equal(load_image(tmp_path / "a.nii.gz")[0], a)


def test_nifti_volume_needs_slice_index(tmp_path: Path) -> None:
    write_nifti(tmp_path / "v.nii", np.zeros((3, 4, 2), np.uint8))
    with pytest.raises(DecodeError, match="slice index"):
        load_image(tmp_path / "v.nii")


def test_nifti_mask_slices(tmp_path: Path) -> None:
    vol = np.zeros((6, 9, 3), np.uint8)
    vol[1, 7, 2] = 1
    write_nifti(tmp_path / "m.nii.gz", vol)
    assert load_mask([tmp_path / "m.nii.gz"], 2, 2)[1, 7] == 1
    assert load_mask([tmp_path / "m.nii.gz"], 0, 2).sum() == 0
    assert load_mask([tmp_path / "m.nii.gz"], 1, 0)[7, 2] == 1


def test_nifti_4d_is_a_multi_channel_volume_up_to_8_channels(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 2, 2), np.uint8), np.eye(4)), str(tmp_path / "c.nii"))
    assert decode_file(tmp_path / "c.nii").array.shape == (3, 4, 2, 2)  # two sequences, last axis
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 2, 9), np.uint8), np.eye(4)), str(tmp_path / "t.nii"))
    with pytest.raises(DecodeError, match=r"t\.nii: NIfTI with shape \(3, 4, 2, 9\); only 2D images, 3D volumes"):
        decode_file(tmp_path / "t.nii")
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 1, 2), np.uint8), np.eye(4)), str(tmp_path / "f.nii"))
    with pytest.raises(DecodeError, match=r"f\.nii: NIfTI with shape"):  # a 2D image with channels: not a volume
        decode_file(tmp_path / "f.nii")


def test_read_nifti_affine_of_png_is_none(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", asym())
    assert read_nifti_affine(tmp_path / "a.png") is None


# ----------------------------------------------------------------------------- broken files


def _good_bytes(tmp_path: Path, suffix: str) -> bytes:
    path = tmp_path / f"good{suffix}"
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (32, 32), dtype=np.uint8)  # noise: compressed data is long
    if suffix == ".png":
        write_png(path, a)
    elif suffix == ".tif":
        tifffile.imwrite(path, a)
    else:
        write_nifti(path, a)
    return path.read_bytes()


@pytest.mark.parametrize("suffix", [".png", ".tif", ".nii", ".nii.gz"])
def test_truncated_file_raises_decode_error_naming_file(tmp_path: Path, suffix: str) -> None:
    data = _good_bytes(tmp_path, suffix)
    bad = tmp_path / f"cut [1] ü{suffix}"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError) as exc:
        load_image(bad)
    assert str(bad) in str(exc.value)
    assert "truncated or corrupt" in str(exc.value)
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        load_mask([bad])


@pytest.mark.parametrize("suffix", [".png", ".tif", ".nii.gz"])
def test_zero_byte_file_raises_decode_error_naming_file(tmp_path: Path, suffix: str) -> None:
    bad = tmp_path / f"empty{suffix}"
    bad.touch()
    with pytest.raises(DecodeError) as exc:
        load_image(bad)
    assert str(bad) in str(exc.value)
    assert "zero-byte" in str(exc.value)


def test_garbage_bytes_raise_decode_error(tmp_path: Path) -> None:
    bad = tmp_path / "text.png"
    bad.write_bytes(b"this is not a png at all" * 10)
    with pytest.raises(DecodeError, match=r"text\.png"):
        load_image(bad)


def test_missing_file_raises_decode_error(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match=r"nope\.png: file not found"):
        load_image(tmp_path / "nope.png")


def test_unsupported_extension_raises_decode_error(tmp_path: Path) -> None:
    p = tmp_path / "a.gif"
    Image.fromarray(asym()).save(p, format="GIF")
    with pytest.raises(DecodeError, match=r"a\.gif: unsupported format"):
        load_image(p)


def test_reading_does_not_modify_file(tmp_path: Path) -> None:
    write_png(tmp_path / "a.png", asym())
    before = (tmp_path / "a.png").read_bytes()
    mtime = (tmp_path / "a.png").stat().st_mtime_ns
    load_image(tmp_path / "a.png")
    load_mask([tmp_path / "a.png"], threshold=10)
    assert (tmp_path / "a.png").read_bytes() == before
    assert (tmp_path / "a.png").stat().st_mtime_ns == mtime
