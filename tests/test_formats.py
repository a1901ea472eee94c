"""The formats labs have, written for real and read back through the product's one loader.

JPEG and BMP (Pillow), TIFF frames Pillow cannot open (tifffile), DICOM files, multi-frame files and
series folders (pydicom), NRRD and MHA/MHD (SimpleITK), and ingest from a pairs list.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from tumorseg.config import IngestConfig
from tumorseg.errors import TumorsegError
from tumorseg.imageio import DecodeError, decode, load_image, load_mask, read_bytes, volume_shape
from tumorseg.ingest import IngestResult, run

H, W = 24, 40


def asym(seed: int = 0, dtype: Any = np.uint8, hi: int = 255) -> np.ndarray:
    """A smooth, non-symmetric image (JPEG keeps smooth images close)."""
    yy, xx = np.mgrid[0:H, 0:W]
    return ((np.sin(xx / 7.0 + seed) + np.cos(yy / 5.0)) * hi / 4 + hi / 2).astype(dtype)


def decode_file(path: Path, role: str = "image") -> Any:
    return decode(read_bytes(path), path, role)  # type: ignore[arg-type]


def disk_mask(h: int = H, w: int = W, r: int = 7) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return (((yy - h // 2) ** 2 + (xx - w // 3) ** 2) < r * r).astype(np.uint8)


def rejected_of(res: IngestResult) -> dict[str, str]:
    with open(res.manifest_dir / "rejected.csv", newline="") as fh:
        return {r["path"]: r["reason"] for r in csv.DictReader(fh)}


def rows_of(res: IngestResult) -> list[dict[str, str]]:
    with open(res.manifest_dir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def ingest(tmp_path: Path, images: Path | None, masks: Path | None = None, **kw: Any) -> IngestResult:
    kw.setdefault("fractions", (0.5, 0.25, 0.25))
    return run(IngestConfig(images_dir=images, masks_dir=masks, name="fmt", out_dir=tmp_path / "out", workers=1,
                            **kw))


# ----------------------------------------------------------------------------- JPEG and BMP


def test_jpeg_grey_and_rgb_within_their_loss(tmp_path: Path) -> None:
    grey, rgb = asym(), np.stack([asym(0), asym(1), asym(2)], axis=-1)
    Image.fromarray(grey).save(tmp_path / "g.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "c.JPEG", quality=95)
    g, c = decode_file(tmp_path / "g.jpg"), decode_file(tmp_path / "c.JPEG")
    assert (g.mode, g.array.shape, g.lossy) == ("JPEG:L", (1, H, W), True)
    assert (c.mode, c.array.shape) == ("JPEG:RGB", (3, H, W))
    assert np.abs(g.array[0].astype(int) - grey).mean() < 2.0
    assert np.abs(c.array.astype(int) - np.moveaxis(rgb, -1, 0)).mean() < 3.0


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    grey = asym()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    Image.fromarray(grey).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    arr = load_image(tmp_path / "phone.jpg")
    assert arr.shape == (1, W, H)
    assert np.abs(arr[0] - np.rot90(grey, -1)).mean() < 2.0


def test_jpeg_mask_is_thresholded_at_half_its_range(tmp_path: Path) -> None:
    m = disk_mask() * 255
    noisy = np.stack([m, np.clip(m.astype(int) - 3, 0, 255), m], axis=-1).astype(np.uint8)  # channels differ a little
    Image.fromarray(noisy).save(tmp_path / "m.jpg", quality=80)
    raw = decode_file(tmp_path / "m.jpg", "mask").array
    assert raw.shape == (1, H, W) and len(np.unique(raw)) > 2  # JPEG is never two exact values
    mask = load_mask([tmp_path / "m.jpg"])
    np.testing.assert_array_equal(mask, (raw[0] > 127).astype(np.uint8))
    assert abs(int(mask.sum()) - int(disk_mask().sum())) <= 4


def jpeg_set(root: Path, n: int = 8) -> None:
    """Kvasir-SEG's layout: images/x.jpg and masks/x.jpg (RGB JPEG masks)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img = np.stack([asym(i), asym(i + 1), asym(i + 2)], axis=-1)
        Image.fromarray(img).save(root / "images" / f"c{i:02d}.jpg")
        m = disk_mask(r=4 + i) * 255 if i % 4 else np.zeros((H, W), np.uint8)
        Image.fromarray(np.stack([m] * 3, axis=-1)).save(root / "masks" / f"c{i:02d}.jpg", quality=75)


def test_jpeg_set_ingests_with_no_rejected_pairs_and_records_the_rule(tmp_path: Path) -> None:
    jpeg_set(tmp_path / "kvasir")
    res = ingest(tmp_path, tmp_path / "kvasir" / "images", tmp_path / "kvasir" / "masks")
    assert res.n_cases == 8 and res.n_rejected == 0
    assert res.summary["lossy_masks"] == 8
    rows = rows_of(res)
    assert {r["image_mode"] for r in rows} == {"JPEG:RGB uint8"}
    assert all(r["mask_encoding"] in ("JPEG:RGB >127", "JPEG:RGB 0") for r in rows)
    assert sum(r["has_tumour"] == "true" for r in rows) == 6


def test_jpeg_set_under_one_root_pairs_masks_folder_by_name(tmp_path: Path) -> None:
    jpeg_set(tmp_path / "Kvasir-SEG")
    (tmp_path / "Kvasir-SEG" / "kavsir_bboxes.json").write_text("{}")
    res = ingest(tmp_path, tmp_path / "Kvasir-SEG", recursive=True, seed=5)
    assert res.n_cases == 8 and res.n_rejected == 0 and res.n_ignored == 1
    assert {(r["image"], r["mask"]) for r in rows_of(res)} == {(f"images/c{i:02d}.jpg", f"masks/c{i:02d}.jpg")
                                                               for i in range(8)}


def test_isic_segmentation_suffix_pairs_by_default(tmp_path: Path) -> None:
    root = tmp_path / "isic"
    root.mkdir()
    for i in range(6):
        Image.fromarray(np.stack([asym(i)] * 3, axis=-1)).save(root / f"ISIC_{i:07d}.jpg")
        suffix = "_Segmentation" if i % 2 else "_segmentation"  # ISIC 2016 and 2017 spell it differently
        Image.fromarray(disk_mask(r=4 + i) * 255).save(root / f"ISIC_{i:07d}{suffix}.png")
    res = ingest(tmp_path, root)
    assert res.n_cases == 6 and res.n_rejected == 0


def test_jpeg_label_map_is_refused_with_the_fix(tmp_path: Path) -> None:
    jpeg_set(tmp_path / "kvasir", n=4)
    res = None
    with pytest.raises(TumorsegError, match=r"a JPEG mask cannot hold a label map .*save label maps as PNG"):
        res = ingest(tmp_path, tmp_path / "kvasir" / "images", tmp_path / "kvasir" / "masks",
                     labels={0: "background", 255: "polyp"})
    assert res is None


@pytest.mark.parametrize("what", ["truncated", "cmyk", "12bit"])
def test_bad_jpegs_are_one_line(tmp_path: Path, what: str) -> None:
    p = tmp_path / "bad.jpg"
    if what == "12bit":  # a 12-bit (extended) JPEG: the frame header says precision 12
        buf = io.BytesIO()
        Image.fromarray(asym()).save(buf, format="JPEG")
        data = bytearray(buf.getvalue())
        sof = data.find(b"\xff\xc0")
        data[sof + 1], data[sof + 4] = 0xC1, 12
        p.write_bytes(bytes(data))
        pattern = r"bad\.jpg: 12-bit JPEG \(more than 8 bits per sample\), which Pillow does not decode"
    elif what == "truncated":
        buf = io.BytesIO()
        Image.fromarray(asym()).save(buf, format="JPEG")
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        pattern = r"bad\.jpg: truncated or corrupt JPEG .*re-export"
    else:
        Image.fromarray(np.zeros((H, W, 4), np.uint8), "CMYK").save(p, format="JPEG")
        pattern = r"bad\.jpg: CMYK JPEG \(print colours.*\); save the image as 8-bit grey or RGB"
    with pytest.raises(DecodeError, match=pattern) as info:
        load_image(p)
    assert "\n" not in str(info.value)


def test_bmp_grey_rgb_and_1bit_are_exact(tmp_path: Path) -> None:
    grey, rgb = asym(), np.stack([asym(0), asym(1), asym(2)], axis=-1)
    Image.fromarray(grey).save(tmp_path / "g.bmp")
    Image.fromarray(rgb).save(tmp_path / "c.bmp")
    Image.fromarray(disk_mask().astype(bool)).convert("1").save(tmp_path / "m.bmp")
    np.testing.assert_array_equal(load_image(tmp_path / "g.bmp")[0], grey)
    np.testing.assert_array_equal(load_image(tmp_path / "c.bmp"), np.moveaxis(rgb, -1, 0))
    assert decode_file(tmp_path / "c.bmp").mode == "BMP:RGB"
    np.testing.assert_array_equal(load_mask([tmp_path / "m.bmp"]), disk_mask())


def test_bmp_dermoscopy_layout_pairs_by_sibling_folders(tmp_path: Path) -> None:
    """PH2's layout: IMDnnn/IMDnnn_Dermoscopic_Image/IMDnnn.bmp beside IMDnnn/IMDnnn_lesion/IMDnnn_lesion.bmp."""
    root = tmp_path / "PH2"
    for i in range(6):
        case = root / f"IMD{i:03d}"
        (case / f"IMD{i:03d}_Dermoscopic_Image").mkdir(parents=True)
        (case / f"IMD{i:03d}_lesion").mkdir()
        Image.fromarray(np.stack([asym(i)] * 3, axis=-1)).save(case / f"IMD{i:03d}_Dermoscopic_Image" /
                                                                f"IMD{i:03d}.bmp")
        Image.fromarray(disk_mask(r=5 + i) * 255).save(case / f"IMD{i:03d}_lesion" / f"IMD{i:03d}_lesion.bmp")
    res = ingest(tmp_path, root, recursive=True)  # "_lesion" is a known mask suffix, like ISIC's "_segmentation"
    assert res.n_cases == 6 and res.n_rejected == 0
    assert {r["mask"] for r in rows_of(res)} == {f"IMD{i:03d}/IMD{i:03d}_lesion/IMD{i:03d}_lesion.bmp"
                                                 for i in range(6)}


# ----------------------------------------------------------------------------- TIFF


def test_tiff_frames_in_original_and_ground_truth_folders(tmp_path: Path) -> None:
    """CVC-ClinicDB's layout: Original/n.tif (RGB tagged BlackIsZero) and Ground Truth/n.tif."""
    root = tmp_path / "CVC-ClinicDB"
    (root / "Original").mkdir(parents=True)
    (root / "Ground Truth").mkdir()
    for i in range(1, 9):
        rgb = np.stack([asym(i), asym(i + 1), asym(i + 2)], axis=-1)
        tifffile.imwrite(root / "Original" / f"{i}.tif", rgb, photometric="minisblack", planarconfig="contig")
        tifffile.imwrite(root / "Ground Truth" / f"{i}.tif", disk_mask(r=3 + i) * 255)
    res = ingest(tmp_path, root, recursive=True, seed=1)
    assert res.n_cases == 8 and res.n_rejected == 0
    assert {r["channels"] for r in rows_of(res)} == {"3"}
    res2 = ingest(tmp_path, root / "Original", root / "Ground Truth", seed=1)
    assert res2.n_cases == 8 and res2.n_rejected == 0


def test_tiff_rgb_frame_tagged_blackiszero_is_read_as_colour(tmp_path: Path) -> None:
    """Older endoscopy sets store RGB frames whose header says BlackIsZero; Pillow cannot open them."""
    rgb = np.stack([asym(0), asym(1), asym(2)], axis=-1)
    tifffile.imwrite(tmp_path / "frame.tif", rgb, photometric="minisblack", planarconfig="contig")
    with pytest.raises(Exception):  # noqa: B017 - the point: Pillow refuses what tifffile reads
        with Image.open(tmp_path / "frame.tif") as im:
            np.asarray(im.convert("RGB"))
            assert im.mode == "RGB"
    np.testing.assert_array_equal(load_image(tmp_path / "frame.tif"), np.moveaxis(rgb, -1, 0))


# ----------------------------------------------------------------------------- DICOM


def write_dicom(path: Path, pixels: np.ndarray, **attrs: Any) -> None:
    """An uncompressed DICOM file (explicit VR little endian) written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = attrs.pop("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")  # MR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = attrs.pop("TransferSyntaxUID", ExplicitVRLittleEndian)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = attrs.pop("Modality", "MR")
    if pixels is not None:
        frames = pixels.shape[0] if pixels.ndim == 3 and attrs.get("SamplesPerPixel", 1) == 1 else 1
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.Rows, ds.Columns = pixels.shape[-2:] if attrs.get("SamplesPerPixel", 1) == 1 else pixels.shape[:2]
        ds.SamplesPerPixel = attrs.pop("SamplesPerPixel", 1)
        ds.PhotometricInterpretation = attrs.pop("PhotometricInterpretation", "MONOCHROME2")
        if ds.SamplesPerPixel == 3:
            ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = pixels.dtype.itemsize * 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        encapsulated = attrs.pop("encapsulated", None)
        ds.PixelData = encapsulated if encapsulated is not None else pixels.tobytes()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_single_frame_modality_lut_and_spacing(tmp_path: Path) -> None:
    stored = asym(dtype=np.uint16, hi=2000)
    write_dicom(tmp_path / "ct.dcm", stored, Modality="CT", RescaleSlope=2, RescaleIntercept=-1024,
                PixelSpacing=[0.5, 0.7])
    d = decode_file(tmp_path / "ct.dcm")
    assert d.mode == "DICOM:CT" and d.array.shape == (1, H, W) and not d.is_grid
    np.testing.assert_array_equal(d.array[0], stored.astype(np.float64) * 2 - 1024)
    assert d.pixel_spacing == (0.5, 0.7)


def test_dicom_monochrome1_is_inverted_and_rgb_kept(tmp_path: Path) -> None:
    stored = asym(dtype=np.uint16, hi=1000)
    write_dicom(tmp_path / "xray.dcm", stored, Modality="DX", PhotometricInterpretation="MONOCHROME1")
    arr = load_image(tmp_path / "xray.dcm")[0]
    np.testing.assert_array_equal(arr, stored.max() + stored.min() - stored.astype(np.float32))
    rgb = np.stack([asym(0), asym(1), asym(2)], axis=-1)
    write_dicom(tmp_path / "us.dcm", rgb, Modality="US", SamplesPerPixel=3, PhotometricInterpretation="RGB")
    np.testing.assert_array_equal(load_image(tmp_path / "us.dcm"), np.moveaxis(rgb, -1, 0))


AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def write_series(folder: Path, volume: np.ndarray, step: float = 2.5, spacing: tuple[float, float] = (0.8, 0.6),
                 skip: int | None = None, tilt_at: int | None = None) -> None:
    """A (Z, Y, X) volume as one DICOM file per slice, file names shuffled against the slice order."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    order = np.random.default_rng(1).permutation(volume.shape[0])
    for k in range(volume.shape[0]):
        if k == skip:
            continue
        iop = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0] if k == tilt_at else AXIAL
        write_dicom(folder / f"IM{order[k]:04d}.dcm", volume[k], SeriesInstanceUID=series,
                    ImagePositionPatient=[-10.0, 20.0, 5.0 + step * k], ImageOrientationPatient=iop,
                    PixelSpacing=list(spacing), SliceThickness=step, RescaleSlope=1, RescaleIntercept=0)


def test_dicom_series_folder_is_one_volume_sorted_by_position(tmp_path: Path) -> None:
    vol = np.stack([asym(k, np.uint16, 900) for k in range(5)])  # (Z, Y, X)
    write_series(tmp_path / "S1", vol)
    d = decode_file(tmp_path / "S1")
    assert d.is_volume and d.mode == "DICOM-series:MR" and d.array.shape == (W, H, 5)
    np.testing.assert_array_equal(d.array, np.transpose(vol, (2, 1, 0)))
    # LPS (-10, 20, 5) is RAS (10, -20, 5); columns step 0.6 mm along L (-x in RAS), rows 0.8 mm along P (-y)
    expected = np.array([[-0.6, 0, 0, 10.0], [0, -0.8, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(d.affine, expected, atol=1e-9)
    assert volume_shape(tmp_path / "S1") == (W, H, 5)


@pytest.mark.parametrize("problem", ["gap", "tilt"])
def test_dicom_series_with_a_missing_slice_or_mixed_orientations_is_one_line(tmp_path: Path, problem: str) -> None:
    vol = np.stack([asym(k, np.uint16, 900) for k in range(6)])
    if problem == "gap":
        write_series(tmp_path / "S", vol, skip=3)
        pattern = r"S: missing slice between IM\d+\.dcm and IM\d+\.dcm \(5 mm apart, the series' step is 2\.5 mm\)"
    else:
        write_series(tmp_path / "S", vol, tilt_at=2)
        pattern = r"S: mixed orientations in one series .*put each orientation's slices in its own folder"
    with pytest.raises(DecodeError, match=pattern):
        decode_file(tmp_path / "S")


def test_folder_of_separate_2d_dicoms_is_not_a_series(tmp_path: Path) -> None:
    from tumorseg.imageio import image_format

    (tmp_path / "us").mkdir()
    for i in range(3):  # ultrasound exports: no position, each its own image
        write_dicom(tmp_path / "us" / f"f{i}.dcm", asym(i), Modality="US")
    assert image_format(tmp_path / "us") is None
    assert image_format(tmp_path / "us" / "f0.dcm") == "dicom"


def test_dicom_multiframe_is_a_volume(tmp_path: Path) -> None:
    vol = np.stack([asym(k, np.uint16, 500) for k in range(4)])
    write_dicom(tmp_path / "mf.dcm", vol, PixelSpacing=[0.5, 0.5], SpacingBetweenSlices=1.5,
                ImageOrientationPatient=AXIAL, ImagePositionPatient=[0.0, 0.0, 0.0])
    d = decode_file(tmp_path / "mf.dcm")
    assert d.is_volume and d.array.shape == (W, H, 4)
    np.testing.assert_array_equal(d.array, np.transpose(vol, (2, 1, 0)))
    np.testing.assert_allclose(np.abs(np.diag(d.affine))[:3], [0.5, 0.5, 1.5])
    assert volume_shape(tmp_path / "mf.dcm") == (W, H, 4)


def test_enhanced_multiframe_geometry_from_its_functional_groups(tmp_path: Path) -> None:
    """Enhanced DICOM keeps slice spacing in the shared pixel measures and each frame's position per frame; frames
    stored from head to feet (descending z) must come out descending, 3 mm apart, not ascending 1 mm apart."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    vol = np.stack([asym(k, np.uint16, 500) for k in range(4)])
    shared, orient, measures = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = AXIAL
    measures.PixelSpacing, measures.SpacingBetweenSlices, measures.SliceThickness = [0.5, 0.5], 3.0, 3.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = Sequence([orient]), Sequence([measures])
    frames = []
    for k in range(4):
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, 30.0 - 3.0 * k]
        item.PlanePositionSequence = Sequence([pos])
        frames.append(item)
    write_dicom(tmp_path / "enh.dcm", vol, SharedFunctionalGroupsSequence=Sequence([shared]),
                PerFrameFunctionalGroupsSequence=Sequence(frames))
    d = decode_file(tmp_path / "enh.dcm")
    assert d.is_volume and d.array.shape == (W, H, 4)
    world = d.affine @ np.array([[0, 0, k, 1.0] for k in range(4)]).T  # voxel (0, 0, k) in RAS+ mm
    np.testing.assert_allclose(world[2], [30.0, 27.0, 24.0, 21.0])  # z (superior) as the frames say
    # without per-frame positions: the shared pixel measures' spacing, not 1 mm
    write_dicom(tmp_path / "nopos.dcm", vol, SharedFunctionalGroupsSequence=Sequence([shared]))
    np.testing.assert_allclose(np.linalg.norm(decode_file(tmp_path / "nopos.dcm").affine[:3, :3], axis=0),
                               [0.5, 0.5, 3.0])


def test_dicom_without_pixels_and_undecodable_syntaxes_are_one_line(tmp_path: Path) -> None:
    write_dicom(tmp_path / "sr.dcm", None, Modality="SR", SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11")
    with pytest.raises(DecodeError, match=r"sr\.dcm: DICOM without pixel data \(SR: a structured report"):
        load_image(tmp_path / "sr.dcm")
    from pydicom.encaps import encapsulate

    frame = encapsulate([b"\x00" * 64])
    write_dicom(tmp_path / "video.dcm", asym(), TransferSyntaxUID="1.2.840.10008.1.2.4.100", encapsulated=frame)
    with pytest.raises(DecodeError, match=r"video\.dcm: DICOM transfer syntax MPEG2 .* is not an image compression "
                                          r"tumorseg can decode; re-export the images uncompressed"):
        load_image(tmp_path / "video.dcm")


def test_compressed_dicom_without_its_decoder_names_the_extra(tmp_path: Path) -> None:
    try:
        import pylibjpeg  # noqa: F401
        pytest.skip("pylibjpeg is installed here: JPEG Lossless decodes")
    except ImportError:
        pass
    from pydicom.encaps import encapsulate

    write_dicom(tmp_path / "jl.dcm", asym(), TransferSyntaxUID="1.2.840.10008.1.2.4.70",
                encapsulated=encapsulate([b"\xff\xd8\xff\xd9"]))
    with pytest.raises(DecodeError, match=r"jl\.dcm: compressed DICOM \(JPEG Lossless.*\) and no decoder for it is "
                                          r"installed; pip install 'tumorseg\[dicom\]' \(pylibjpeg\)"):
        load_image(tmp_path / "jl.dcm")


def test_dicom_series_with_a_nifti_label_ingests_as_one_volume(tmp_path: Path) -> None:
    import nibabel as nib

    vol = np.stack([asym(k, np.uint16, 900) for k in range(5)])
    for c in range(4):
        write_series(tmp_path / "images" / f"case{c}", vol)
    (tmp_path / "labels").mkdir()
    label = np.zeros((W, H, 5), np.uint8)
    label[10:20, 5:15, 1:4] = 1
    grid = decode_file(tmp_path / "images" / "case0").affine  # the label lies on its series' grid
    for c in range(4):
        nib.save(nib.Nifti1Image(label, grid), str(tmp_path / "labels" / f"case{c}.nii.gz"))
    res = ingest(tmp_path, tmp_path / "images", tmp_path / "labels", seed=4, slice_axis=2)
    assert res.n_rejected == 0 and res.n_cases == 4 * 5
    rows = rows_of(res)
    assert {r["image"] for r in rows} == {f"images/case{c}" for c in range(4)}
    assert rows[0]["case_id"] == "case0#z000" and rows[0]["image_mode"].startswith("DICOM-series:MR")
    from tumorseg.manifest import load_manifest, verify_files

    info, df = load_manifest(res.manifest_dir)
    verify_files(info, df, res.manifest_dir)  # a series folder hashes as ingest read it
    from tumorseg.evaluate.stage import check_files

    check_files(info, df, res.manifest_dir)  # evaluate finds a series folder as present as a file
    from tumorseg.data import CaseReader

    case = CaseReader(info, "m").read(df.iloc[2])
    np.testing.assert_array_equal(case.image[0], vol[2].T)
    np.testing.assert_array_equal(case.mask, label[:, :, 2])
    assert case.spacing == (0.6, 0.8)


# ----------------------------------------------------------------------------- NRRD and MHA/MHD


def write_itk(path: Path, zyx: np.ndarray, spacing: tuple[float, ...], origin: tuple[float, ...],
              direction: tuple[float, ...] | None = None) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".mhd"])
def test_itk_volumes_keep_values_spacing_and_orientation(tmp_path: Path, ext: str) -> None:
    pytest.importorskip("SimpleITK")
    zyx = np.stack([asym(k, np.int16, 800) for k in range(3)])
    # rows run along -y (LPS: anterior), as a sagittal-free oblique direction would
    direction = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    write_itk(tmp_path / f"v{ext}", zyx, (0.7, 0.7, 3.0), (1.0, 2.0, 3.0), direction)
    d = decode_file(tmp_path / f"v{ext}")
    assert d.is_volume and d.array.shape == (W, H, 3) and d.array.dtype == np.int16
    np.testing.assert_array_equal(d.array, np.transpose(zyx, (2, 1, 0)))
    expected = np.array([[-0.7, 0, 0, -1.0], [0, 0.7, 0, -2.0], [0, 0, 3.0, 3.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(d.affine, expected, atol=1e-9)
    assert volume_shape(tmp_path / f"v{ext}") == (W, H, 3)


def test_mhd_hash_covers_its_data_file(tmp_path: Path) -> None:
    pytest.importorskip("SimpleITK")
    write_itk(tmp_path / "v.mhd", np.zeros((2, H, W), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    raw = next(p for p in tmp_path.iterdir() if p.suffix in (".raw", ".zraw"))
    before = read_bytes(tmp_path / "v.mhd")
    raw.write_bytes(raw.read_bytes()[:-1] + b"\x07")
    assert read_bytes(tmp_path / "v.mhd") != before


def test_2d_nrrd_is_a_one_slice_grid_and_a_cut_file_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("SimpleITK")
    write_itk(tmp_path / "p.nrrd", asym(), (0.5, 0.25), (0.0, 0.0))
    d = decode_file(tmp_path / "p.nrrd")
    assert d.array.shape == (W, H, 1) and not d.is_volume
    np.testing.assert_array_equal(load_image(tmp_path / "p.nrrd")[0], asym().T)
    write_itk(tmp_path / "v.mha", np.stack([asym(k) for k in range(3)]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    data = (tmp_path / "v.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[: len(data) - 500])
    with pytest.raises(DecodeError, match=r"cut\.mha: truncated or corrupt MHA file") as info:
        decode_file(tmp_path / "cut.mha")
    assert "\n" not in str(info.value)


def test_nrrd_without_simpleitk_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real = builtins.__import__

    def no_sitk(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "SimpleITK":
            raise ImportError("no SimpleITK")
        return real(name, *args, **kwargs)

    (tmp_path / "v.nrrd").write_bytes(b"NRRD0004\n")
    monkeypatch.setattr(builtins, "__import__", no_sitk)
    with pytest.raises(DecodeError, match=r"v\.nrrd: reading NRRD/MHA/MHD needs SimpleITK, which is not installed; "
                                          r"pip install 'tumorseg\[itk\]'"):
        load_image(tmp_path / "v.nrrd")


def test_nifti_with_zero_spacing_is_one_line(tmp_path: Path) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), np.eye(4)), str(tmp_path / "z.nii"))
    data = bytearray((tmp_path / "z.nii").read_bytes())
    data[84:88] = np.float32(0.0).tobytes()  # pixdim[2]: the y spacing, as a broken exporter writes it
    (tmp_path / "z.nii").write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=r"z\.nii: voxel spacing .* is zero or negative; fix the header's pixdim"):
        load_image(tmp_path / "z.nii", 0)


# ----------------------------------------------------------------------------- pairs lists


def pairs_set(root: Path, n: int = 10) -> None:
    (root / "img").mkdir(parents=True)
    (root / "gt").mkdir()
    for i in range(n):
        Image.fromarray(asym(i)).save(root / "img" / f"{i:02d}.png")
        Image.fromarray(disk_mask(r=3 + i % 5) * 255).save(root / "gt" / f"{i:02d}_seg.png")


def test_a_tiff_stack_with_a_2d_mask_among_2d_images_says_what_it_is(tmp_path: Path) -> None:
    root = tmp_path / "data"
    pairs_set(root, 6)
    tifffile.imwrite(root / "img" / "stack.tif", np.stack([asym(i) for i in range(5)]), photometric="minisblack")
    Image.fromarray(disk_mask(r=3) * 255).save(root / "gt" / "stack.png")
    res = run(IngestConfig(images_dir=root / "img", masks_dir=root / "gt", name="s", out_dir=tmp_path / "out",
                           workers=1, mask_suffix="_seg", fractions=(1.0, 0.0, 0.0)))
    with open(res.manifest_dir / "rejected.csv", encoding="utf-8", newline="") as fh:
        reason = {r["path"]: r["reason"] for r in csv.DictReader(fh)}["gt/stack.png"]
    assert "a 3D image with a 2D mask: a volume among 2D images?" in reason and "--slice-axis" in reason


def test_a_2d_grid_image_with_a_picture_mask_is_rejected(tmp_path: Path) -> None:
    """A 2D NIfTI (x, y axes) and a PNG mask (rows, columns): a square pair would pass transposed, so neither does."""
    import nibabel as nib

    root = tmp_path / "data"
    pairs_set(root, 6)
    nib.save(nib.Nifti1Image(asym(0).T.copy(), np.eye(4)), root / "img" / "grid.nii.gz")
    Image.fromarray(disk_mask(r=3) * 255).save(root / "gt" / "grid_seg.png")
    res = run(IngestConfig(images_dir=root / "img", masks_dir=root / "gt", name="g", out_dir=tmp_path / "out",
                           workers=1, mask_suffix="_seg", fractions=(1.0, 0.0, 0.0)))
    with open(res.manifest_dir / "rejected.csv", encoding="utf-8", newline="") as fh:
        reason = {r["path"]: r["reason"] for r in csv.DictReader(fh)}["gt/grid_seg.png"]
    assert reason.startswith("a 2D image and mask whose axes differ: grid.nii.gz is a grid file (x, y")
    assert res.n_cases == 6


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def test_pairs_list_keeps_a_published_split_and_hashes_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "data"
    pairs_set(root)
    fixed = {0: "test", 1: "test", 2: "val", 3: "train"}
    write_csv(root / "pairs.csv", ["image", "mask", "split"],
              [[f"img/{i:02d}.png", f"gt/{i:02d}_seg.png", fixed.get(i, "")] for i in range(10)])
    cfg = IngestConfig(pairs=root / "pairs.csv", name="p", out_dir=tmp_path / "out", workers=1, seed=0)
    res = run(cfg)
    assert res.n_cases == 10 and res.n_rejected == 0
    rows = {r["case_id"]: r for r in rows_of(res)}
    for i, split in fixed.items():
        assert rows[f"img/{i:02d}"]["split"] == split
    from tumorseg.splits import assign_split

    for i in range(4, 10):
        key = f"img/{i:02d}"
        assert rows[key]["split"] == assign_split(key, 0, cfg.fractions)
        assert rows[key]["mask"] == f"gt/{i:02d}_seg.png"
    first = (res.manifest_dir / "manifest.csv").read_bytes()
    assert run(cfg).dataset_digest == res.dataset_digest  # stable
    assert (res.manifest_dir / "manifest.csv").read_bytes() == first


def test_a_pairs_list_that_splits_a_group_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    root = tmp_path / "data"
    pairs_set(root)
    # patient p0's first two rows in test, its others left to the hash: a patient in two splits
    write_csv(root / "pairs.csv", ["image", "mask", "group", "split"],
              [[f"img/{i:02d}.png", f"gt/{i:02d}_seg.png", f"p{i % 3}", "test" if i in (0, 3) else ""]
               for i in range(10)])
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
        res = run(IngestConfig(pairs=root / "pairs.csv", name="p", out_dir=tmp_path / "out", workers=1))
    n = res.summary["groups_straddling_splits"]
    said = [r.getMessage() for r in caplog.records if "more than one split" in r.getMessage()]
    assert n > 0 and len(said) == 1 and f"{n} group(s) have cases in more than one split" in said[0]


def test_pairs_list_bad_rows_are_rejected_rows(tmp_path: Path) -> None:
    root = tmp_path / "data"
    pairs_set(root)
    Image.fromarray(asym()).save(tmp_path / "outside.png")
    rows = [[f"img/{i:02d}.png", f"gt/{i:02d}_seg.png", "p1" if i < 2 else ""] for i in range(8)]
    rows += [["img/missing.png", "gt/00_seg.png", ""],
             ["../outside.png", "gt/01_seg.png", ""],
             ["img/07.png", "gt/07_seg.png", ""]]  # the same image twice
    write_csv(root / "pairs.csv", ["image", "mask", "group"], rows)
    res = run(IngestConfig(pairs=root / "pairs.csv", name="p", out_dir=tmp_path / "out", workers=1, seed=4))
    rej = rejected_of(res)
    assert "file not found" in rej["img/missing.png"]
    assert "outside the pairs list's folder" in rej["../outside.png"]
    assert rej["img/07.png"] == "pairs.csv: listed 2 times (rows 9, 12); keep one row per image"
    assert res.n_cases == 7
    groups = {r["case_id"]: r["group"] for r in rows_of(res)}
    assert groups["img/00"] == groups["img/01"] == "p1" and groups["img/02"] == "img/02"


@pytest.mark.parametrize(("header", "pattern"), [
    (["image", "mask", "patient"], r"pairs\.csv: unknown column 'patient'; the columns are image,mask and "
                                   r"optionally group,split"),
    (["image", "label"], r"pairs\.csv: no mask column \(header: image, label\)"),
])
def test_pairs_list_bad_columns_are_one_line_exit_2(tmp_path: Path, header: list[str], pattern: str) -> None:
    from tumorseg.cli import app

    root = tmp_path / "data"
    pairs_set(root, 2)
    write_csv(root / "pairs.csv", header, [["img/00.png", "gt/00_seg.png", "x"][: len(header)]])
    result = CliRunner().invoke(app, ["ingest", "--pairs", str(root / "pairs.csv"), "--name", "p",
                                      "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


def test_inputs_are_untouched_by_ingest_of_every_format(tmp_path: Path) -> None:
    jpeg_set(tmp_path / "kvasir", n=4)
    before = {p: p.read_bytes() for p in (tmp_path / "kvasir").rglob("*") if p.is_file()}
    mtimes = {p: os.stat(p).st_mtime_ns for p in before}
    ingest(tmp_path, tmp_path / "kvasir" / "images", tmp_path / "kvasir" / "masks", seed=3)
    assert {p: p.read_bytes() for p in before} == before
    assert {p: os.stat(p).st_mtime_ns for p in before} == mtimes


# ----------------------------------------------------------------------------- volume checks at ingest


def test_volume_checks_are_rejected_rows_naming_both_files(tmp_path: Path) -> None:
    import nibabel as nib

    img_dir, lab_dir = tmp_path / "imagesTr", tmp_path / "labelsTr"
    img_dir.mkdir()
    lab_dir.mkdir()
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    label = np.zeros((12, 10, 4), np.uint8)
    label[3:8, 2:6, 1:3] = 1
    for c in range(6):
        vol = np.random.default_rng(c).normal(0, 1, (12, 10, 4)).astype(np.float32)
        if c == 4:
            vol[0, 0, 0] = np.nan
        nib.save(nib.Nifti1Image(vol, affine), str(img_dir / f"c{c}.nii.gz"))
        lab_affine = np.diag([0.7, 0.7, 2.5, 1.0]) if c == 5 else affine  # c5's label: another slice spacing
        nib.save(nib.Nifti1Image(label, lab_affine), str(lab_dir / f"c{c}.nii.gz"))
    shifted = affine.copy()
    shifted[:3, 3] = [0.0, 5.0, 0.0]
    nib.save(nib.Nifti1Image(label, shifted), str(lab_dir / "c3.nii.gz"))  # c3's label: moved 5 mm
    res = ingest(tmp_path, img_dir, lab_dir, seed=0, fractions=(0.34, 0.33, 0.33), slice_axis=2)
    rej = rejected_of(res)
    assert rej["labelsTr/c5.nii.gz"] == ("on another grid than its image c5.nii.gz (voxel size (0.7, 0.7, 3) mm vs "
                                         "(0.7, 0.7, 2.5) mm); resample the mask onto the image's grid")
    assert rej["labelsTr/c3.nii.gz"].startswith("on another grid than its image c3.nii.gz (origin (0, 0, 0) vs "
                                                "(0, 5, 0))")
    assert rej["imagesTr/c3.nii.gz"] == "its mask c3.nii.gz lies on another grid"
    assert rej["imagesTr/c4.nii.gz"].startswith("1 NaN or infinite pixel value(s); replace them")
    assert res.n_cases == 3 * 4  # c0-c2, sliced
