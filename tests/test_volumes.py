"""Volumes as cases (3D): ingest, canonical orientation, plan rules, train, evaluate, predict and the pyfunc model.

Real NIfTI files written to disk and read back by the product's own loader; one tiny 3D model trained once
per module (a few steps: its masks are checked for grid and shape, not for quality).
"""

from __future__ import annotations

import csv
import gzip
import math
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import kill_at_epoch

from tumorseg.config import IngestConfig, TrainConfig, load_config
from tumorseg.errors import TumorsegError
from tumorseg.imageio.nifti import write_nifti

SPACING = (0.7, 0.7, 3.0)
LPS = np.diag([-0.7, -0.7, 3.0, 1.0])
"""DICOM's orientation (x to the left, y to the back) with 0.7 x 0.7 x 3 mm voxels: not the canonical RAS+."""
SHAPE = (24, 32, 16)


def blob_volume(seed: int, shape: tuple[int, int, int] = SHAPE, empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """An ``int16`` volume with a bright ellipsoid tumour (in mm: round), and its label volume."""
    rng = np.random.RandomState(seed)
    grid = np.indices(shape, dtype=np.float32)
    label = np.zeros(shape, np.uint8)
    if not empty:
        c = rng.uniform(0.35, 0.65, 3) * np.asarray(shape)
        r_mm = rng.uniform(3.0, 5.0)
        d = sum(((grid[a] - c[a]) * SPACING[a] / r_mm) ** 2 for a in range(3))
        label[d <= 1.0] = 1
    image = 200.0 + 400.0 * label + rng.normal(0, 30, shape)
    return image.astype(np.int16), label


def write_set(root: Path, n: int, affine: np.ndarray = LPS) -> tuple[Path, Path]:
    images, masks = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, label = blob_volume(i, empty=i % 6 == 5)
        write_nifti(images / f"case_{i:03d}.nii.gz", image, affine)
        write_nifti(masks / f"case_{i:03d}.nii.gz", label, affine)
    return images, masks


def ingest(images: Path, masks: Path, out: Path, **kw: object) -> Path:
    """Ingest, taking the seed ingest suggests when a split would get no tumour case."""
    from tumorseg import ingest as stage

    for _ in range(3):
        try:
            return stage.run(IngestConfig(images_dir=images, masks_dir=masks, name="vol", out_dir=out, workers=1,
                                          **kw)).manifest_dir  # type: ignore[arg-type]
        except TumorsegError as exc:
            m = re.search(r"pass --seed (\d+)", str(exc))
            if not m:
                raise
            kw["seed"] = int(m.group(1))
    raise AssertionError("ingest kept refusing the suggested seed")


def rows(mdir: Path, name: str = "manifest.csv") -> list[dict[str, str]]:
    with open(mdir / name, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- ingest


def test_a_volume_is_one_case_by_default_and_slices_on_request(tmp_path: Path) -> None:
    images, masks = write_set(tmp_path / "data", 6)
    mdir = ingest(images, masks, tmp_path / "m3")
    import json

    info = json.loads((mdir / "manifest.json").read_text())
    assert info["dims"] == 3
    got = rows(mdir)
    assert len(got) == 6 and {r["slice_index"] for r in got} == {"-1"}
    first = next(r for r in got if r["case_id"] == "case_000")
    assert (first["height"], first["width"], first["depth"]) == ("24", "32", "16")
    assert first["spacing"] == "0.7x0.7x3" and first["orientation"] == "LPS"
    label = blob_volume(0)[1]
    assert float(first["tumour_fraction"]) == pytest.approx(label.mean(), abs=1e-6)
    sliced = ingest(images, masks, tmp_path / "m2", slice_axis=2)
    info2 = json.loads((sliced / "manifest.json").read_text())
    assert "dims" not in info2 and len(rows(sliced)) == 6 * 16
    assert "depth" not in rows(sliced)[0]


def test_the_reader_gives_canonical_volumes_and_spacing(tmp_path: Path) -> None:
    from tumorseg.data import CaseReader
    from tumorseg.manifest import load_manifest

    images, masks = write_set(tmp_path / "data", 3)
    info, df = load_manifest(ingest(images, masks, tmp_path / "m"))
    case = CaseReader(info, "m").read(df.iloc[0])
    image, label = blob_volume(0)
    # LPS -> RAS: the first two axes are flipped, nothing is resampled
    assert case.image.shape == (1, *SHAPE) and case.mask.shape == SHAPE
    np.testing.assert_array_equal(case.mask, label[::-1, ::-1, :])
    np.testing.assert_array_equal(case.image[0], image[::-1, ::-1, :].astype(np.float32))
    assert case.spacing == pytest.approx(SPACING)


def test_a_4d_volume_is_one_case_with_its_sequences_as_channels(tmp_path: Path) -> None:
    from tumorseg.data import CaseReader, infer_in_channels
    from tumorseg.manifest import load_manifest

    images, masks = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    masks.mkdir()
    for i in range(6):
        image, label = blob_volume(i)
        write_nifti(images / f"c{i}.nii.gz", np.stack([image, 1000 - image], axis=-1), LPS)  # (X, Y, Z, 2)
        write_nifti(masks / f"c{i}.nii.gz", label, LPS)
        for folder in (images, masks):  # the Decathlon's tarballs carry macOS AppleDouble files: not cases
            (folder / f"._c{i}.nii.gz").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    info, df = load_manifest(ingest(images, masks, tmp_path / "m"))
    assert len(df) == 6 and not (tmp_path / "m" / "vol" / "rejected.csv").read_text().strip().count("\n")
    assert set(df["channels"].astype(int)) == {2} and infer_in_channels(df) == 2
    case = CaseReader(info, "m").read(df[df["case_id"] == "c0"].iloc[0])
    image, label = blob_volume(0)
    assert case.image.shape == (2, *SHAPE)
    np.testing.assert_array_equal(case.image[1], (1000 - image)[::-1, ::-1, :].astype(np.float32))
    from tumorseg import ingest as stage

    with pytest.raises(TumorsegError, match="2-channel volume .* without --slice-axis"):
        stage.run(IngestConfig(images_dir=images, masks_dir=masks, name="s", out_dir=tmp_path / "m3", workers=1,
                               slice_axis=2, strict=True))


def write_channel_files(images: Path, masks: Path | None, n: int, first: int = 0) -> None:
    """nnU-Net's layout: ``c<i>_0000.nii.gz`` and ``c<i>_0001.nii.gz`` (two sequences), label ``c<i>.nii.gz``."""
    images.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + n):
        image, label = blob_volume(i, empty=i % 6 == 5)
        write_nifti(images / f"c{i}_0000.nii.gz", image, LPS)
        write_nifti(images / f"c{i}_0001.nii.gz", (1000 - image).astype(np.int16), LPS)
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            write_nifti(masks / f"c{i}.nii.gz", label, LPS)


def test_nnunet_channel_files_are_one_case(tmp_path: Path) -> None:
    """``case_0000.nii.gz`` + ``case_0001.nii.gz`` with the label ``case.nii.gz``: one 2-channel case."""
    from tumorseg.data import CaseReader
    from tumorseg.manifest import load_manifest

    images, masks = tmp_path / "imagesTr", tmp_path / "labelsTr"
    write_channel_files(images, masks, 6)
    # a case whose second channel lies on another grid
    shifted = LPS.copy()
    shifted[:3, 3] = (9.0, 0.0, 0.0)
    image, label = blob_volume(5)
    write_nifti(images / "bad_0000.nii.gz", image, LPS)
    write_nifti(images / "bad_0001.nii.gz", image, shifted)
    write_nifti(masks / "bad.nii.gz", label, LPS)
    mdir = ingest(images, masks, tmp_path / "m")
    info, df = load_manifest(mdir)
    first = df[df["case_id"] == "c0"].iloc[0]
    assert first["image"] == "imagesTr/c0_0000.nii.gz|imagesTr/c0_0001.nii.gz" and int(first["channels"]) == 2
    case = CaseReader(info, "m").read(first)
    image, _ = blob_volume(0)
    assert case.image.shape == (2, *SHAPE)
    np.testing.assert_array_equal(case.image[1], (1000 - image)[::-1, ::-1, :].astype(np.float32))
    rejected = {r["path"]: r["reason"] for r in rows(mdir, "rejected.csv")}
    assert "bad_0001.nii.gz: on another grid than" in rejected["imagesTr/bad_0000.nii.gz|imagesTr/bad_0001.nii.gz"]
    assert len(df) == 6


def test_canonical_round_trip_of_a_permuted_grid() -> None:
    from tumorseg.imageio.volume import axcodes, canonical_spacing, from_canonical, to_canonical

    affine = np.array([[0, 0, 2.0, 0], [-1.0, 0, 0, 0], [0, 1.5, 0, 0], [0, 0, 0, 1]])
    a = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    c = to_canonical(a, affine)
    assert axcodes(affine) == "PSR" and c.shape == (6, 4, 5)
    assert canonical_spacing(affine) == (2.0, 1.0, 1.5)
    np.testing.assert_array_equal(from_canonical(c, affine), a)
    np.testing.assert_array_equal(from_canonical(np.stack([c, c]), affine), np.stack([a, a]))


def _bad_inputs(root: Path) -> dict[str, str]:
    """Write one bad case of each kind beside good ones; returns file -> the words its rejected row must hold."""
    images, masks = write_set(root, 6)
    image, label = blob_volume(99)
    expect = {}
    # a label volume on another grid (shifted origin) than its image
    shifted = LPS.copy()
    shifted[:3, 3] = (5.0, 0.0, 0.0)
    write_nifti(images / "grid.nii.gz", image, LPS)
    write_nifti(masks / "grid.nii.gz", label, shifted)
    expect["labelsTr/grid.nii.gz"] = "on another grid than its image grid.nii.gz"
    # a 2D file in a set of volumes
    write_nifti(images / "flat.nii.gz", image[:, :, :1], LPS)
    write_nifti(masks / "flat.nii.gz", label[:, :, :1], LPS)
    expect["imagesTr/flat.nii.gz"] = "2D image in a set of 3D volumes"
    # NaN voxels
    nan = image.astype(np.float32)
    nan[1, 2, 3] = np.nan
    write_nifti(images / "nan.nii.gz", nan, LPS)
    write_nifti(masks / "nan.nii.gz", label, LPS)
    expect["imagesTr/nan.nii.gz"] = "NaN or infinite"
    # a label value outside --labels
    odd = label.copy()
    odd[0, 0, 0] = 7
    write_nifti(images / "odd.nii.gz", image, LPS)
    write_nifti(masks / "odd.nii.gz", odd, LPS)
    expect["labelsTr/odd.nii.gz"] = "7"
    # zero (and negative) spacing in the header
    img = nib.Nifti1Image(image, LPS)
    img.header["pixdim"][1:4] = (0.7, 0.0, 3.0)
    nib.save(img, str(images / "zero.nii"))
    write_nifti(masks / "zero.nii", label, LPS)
    expect["imagesTr/zero.nii"] = "zero or negative"
    # a gzip file cut short
    write_nifti(images / "cut.nii.gz", image, LPS)
    data = (images / "cut.nii.gz").read_bytes()
    (images / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    write_nifti(masks / "cut.nii.gz", label, LPS)
    expect["imagesTr/cut.nii.gz"] = "truncated or corrupt"
    # a 5D volume
    write_nifti(images / "five.nii.gz", np.zeros((4, 4, 4, 2, 2), np.int16), LPS)
    write_nifti(masks / "five.nii.gz", np.zeros((4, 4, 4, 2, 2), np.uint8), LPS)
    expect["imagesTr/five.nii.gz"] = "only 2D images, 3D volumes and 4D volumes"
    # a zero-sized volume
    write_nifti(images / "empty.nii.gz", np.zeros((4, 0, 4), np.int16), LPS)
    write_nifti(masks / "empty.nii.gz", np.zeros((4, 0, 4), np.uint8), LPS)
    expect["imagesTr/empty.nii.gz"] = "zero-sized"
    # two sequences where every other case holds one
    write_nifti(images / "two.nii.gz", np.stack([image, image], -1), LPS)
    write_nifti(masks / "two.nii.gz", label, LPS)
    expect["imagesTr/two.nii.gz"] = "2 channel(s) where the other volumes hold 1; give every case the same sequences"
    # a header in metres among millimetres
    write_nifti(images / "metres.nii.gz", image, LPS * np.array([1e-3, 1e-3, 1e-3, 1.0]))
    write_nifti(masks / "metres.nii.gz", label, LPS * np.array([1e-3, 1e-3, 1e-3, 1.0]))
    expect["imagesTr/metres.nii.gz"] = "is 0.001 times the set's median (0.7x0.7x3 mm): a header in metres"
    return expect


def test_each_bad_volume_is_a_rejected_row_naming_the_problem(tmp_path: Path) -> None:
    expect = _bad_inputs(tmp_path / "data")
    mdir = ingest(tmp_path / "data" / "imagesTr", tmp_path / "data" / "labelsTr", tmp_path / "m",
                  labels={0: "background", 1: "tumour"})
    rejected = {r["path"]: r["reason"] for r in rows(mdir, "rejected.csv")}
    for path, words in expect.items():
        assert path in rejected, (path, rejected)
        assert words in rejected[path], (path, rejected[path])
    assert sorted(r["case_id"] for r in rows(mdir)) == [f"case_{i:03d}" for i in range(6)]


def test_a_volume_in_a_set_of_2d_images_is_rejected(tmp_path: Path) -> None:
    from tumorseg import synth

    synth.run(tmp_path / "d", n=8, size=32, seed=0)
    image, label = blob_volume(1)
    write_nifti(tmp_path / "d" / "images" / "patient_099_vol.nii.gz", image, LPS)
    write_nifti(tmp_path / "d" / "masks" / "patient_099_vol.nii.gz", label, LPS)
    mdir = ingest(tmp_path / "d" / "images", tmp_path / "d" / "masks", tmp_path / "m", group_pattern=r"(patient_\d+)")
    rejected = {r["path"]: r["reason"] for r in rows(mdir, "rejected.csv")}
    reason = rejected["images/patient_099_vol.nii.gz"]
    assert "3D volume in a set of 2D images" in reason and "--slice-axis" in reason
    assert len(rows(mdir)) == 8


# ----------------------------------------------------------------------------- metrics and plan


def test_hd95_in_mm_on_an_anisotropic_grid() -> None:
    """One voxel each, two voxels apart along z (3 mm) or along x (0.7 mm): every distance is the same."""
    from tumorseg.metrics import surface_distances

    gt = np.zeros((6, 6, 6), np.uint8)
    gt[2, 2, 2] = 1
    along_z, along_x = np.zeros_like(gt), np.zeros_like(gt)
    along_z[2, 2, 4] = 1
    along_x[4, 2, 2] = 1
    assert surface_distances(along_z, gt, SPACING) == pytest.approx((6.0, 6.0))
    assert surface_distances(along_x, gt, SPACING) == pytest.approx((1.4, 1.4))
    assert surface_distances(along_z, gt, None) == pytest.approx((2.0, 2.0))


def fingerprint(spacing: tuple[float, float, float], shape: tuple[int, int, int],
                p10: tuple[float, float, float] | None = None, tumour: float = 40.0) -> object:
    from tumorseg.planning.fingerprint import Fingerprint

    return Fingerprint(manifest_name="f", manifest_digest="d", n_train=40, size_median=shape[:2],
                       size_p10=shape[:2], size_p90=shape[:2], channels=1, grey_as_rgb=False,
                       intensity=[{"p0_5": 0.0, "p50": 100.0, "p99_5": 500.0, "mean": 120.0, "std": 80.0}],
                       foreground_fraction=0.02, empty_share=0.1,
                       tumour_pixels={"median": 1.0, "p5": 1.0, "p1": 1.0},
                       tumour_diameter={"median": tumour, "p5": tumour / 2, "p1": tumour / 3}, sampled_images=4,
                       dims=3, shape_median=shape, spacing_median=spacing, spacing_p10=p10 or spacing,
                       spacing_p90=spacing)


def test_plan_rules_on_isotropic_and_anisotropic_fingerprints() -> None:
    from tumorseg.planning import volumes

    iso = fingerprint((1.0, 1.0, 1.0), (128, 128, 128))
    dims, why = volumes.dims_rule(iso)  # type: ignore[arg-type]
    assert dims == 3 and why.startswith("3D")
    assert volumes.target_spacing(iso)[0] == (1.0, 1.0, 1.0)  # type: ignore[arg-type]
    assert volumes.strides_for((128, 128, 128), (1.0, 1.0, 1.0)) == [[2, 2, 2]] * 5

    # 0.7 x 0.7 x 5 mm: anisotropic; the coarse axis takes its 10th percentile, in-plane is pooled first
    aniso = fingerprint((0.7, 0.7, 5.0), (256, 256, 24), p10=(0.7, 0.7, 3.0))
    target, why = volumes.target_spacing(aniso)  # type: ignore[arg-type]
    assert target == (0.7, 0.7, 3.0) and "anisotropic" in why
    assert volumes.dims_rule(aniso)[0] == 3  # type: ignore[arg-type]
    size = volumes.grid(aniso, target)  # type: ignore[arg-type]
    assert size == (256, 256, 40)
    strides = volumes.strides_for(size, target)
    assert strides[:2] == [[2, 2, 1], [2, 2, 1]] and strides[2] == [2, 2, 2]
    assert volumes.coarsened(target, 2.0) == (1.4, 1.4, 3.0)  # the finest axes coarsen first

    # the patch holds the median volume whole: each axis rounded up to a multiple of 8 (nnU-Net pads its patch)
    small = fingerprint((1.0, 1.0, 1.0), (36, 50, 33))
    assert volumes.grid(small, (1.0, 1.0, 1.0)) == (40, 56, 40)  # type: ignore[arg-type]
    assert volumes.grid(small, (1.25, 1.25, 1.1)) == (32, 40, 32)  # type: ignore[arg-type]  # 28.8 x 40 x 30

    # a few thick slices: too thin for a 3D network, the plan says to slice
    thin = fingerprint((0.7, 0.7, 6.0), (256, 256, 5))
    dims, why = volumes.dims_rule(thin)  # type: ignore[arg-type]
    assert dims == 2 and "--slice-axis 2" in why
    with pytest.raises(TumorsegError, match="--slice-axis 2"):
        volumes.choose(thin, 600, 4, lambda *a: None, "cpu")  # type: ignore[arg-type]


def test_the_plan_widens_the_3d_network_only_where_the_budget_buys_it() -> None:
    """V4: nnU-Net's widths (32..320) where they buy the wanted volumes at the target spacing, else 16..256."""
    from tumorseg.planning import volumes
    from tumorseg.planning.probe import Throughput

    small = fingerprint((1.0, 1.0, 1.0), (36, 50, 33))  # hippocampus-sized: 40 train volumes want 4,000 samples
    asked: list[int] = []

    def probe(wide_ips: float, narrow_ips: float = 40.0) -> object:
        def measure(model: object, size: tuple[int, ...], batch: int) -> Throughput:
            asked.append(model.channels[0])  # type: ignore[attr-defined]
            return Throughput(narrow_ips if model.channels[0] == 16 else wide_ips, 120.0)  # type: ignore[attr-defined]
        return measure

    # 30 minutes at 10 volumes/s buy ~18,000 volumes with nnU-Net's widths: they are taken
    wide = volumes.choose(small, 1800, 8, probe(10.0), "cpu")  # type: ignore[arg-type]
    assert wide["train"]["model"]["channels"] == [32, 64, 128, 256]
    assert wide["train"]["target_spacing"] == [1.0, 1.0, 1.0]
    assert "nnU-Net's widths (32..320) buy" in wide["reasons"]["network"]
    assert wide["estimates"]["train_images_per_second"] == pytest.approx(10.0, rel=0.2)
    # at 1 volume/s they would buy ~1,700: the narrower network keeps the target spacing instead
    narrow = volumes.choose(small, 1800, 8, probe(1.0), "cpu")  # type: ignore[arg-type]
    assert narrow["train"]["model"]["channels"] == [16, 32, 64, 128]
    assert "would buy only" in narrow["reasons"]["network"]
    # on a GPU whose memory fits the wide network's activations only in smaller patches: context before width
    def gpu(model: object, size: tuple[int, ...], batch: int) -> Throughput:
        wide = model.channels[0] == 32  # type: ignore[attr-defined]
        return Throughput(400.0, 1200.0, bytes_per_image=(8e9 if wide else 1e9) * math.prod(size) / 40 / 56 / 40)
    tight = volumes.choose(small, 1800, 8, gpu, "cuda", free_memory=12e9)  # type: ignore[arg-type]
    assert tight["train"]["model"]["channels"][0] == 16 and "context before width" in tight["reasons"]["network"]
    # large volumes the budget cannot buy at the target spacing: resolution first, the wide network is never probed
    asked.clear()
    large = fingerprint((1.0, 1.0, 1.0), (192, 192, 160))
    big = volumes.choose(large, 1800, 8, probe(10.0, narrow_ips=1.0), "cpu")  # type: ignore[arg-type]
    assert set(asked) == {16} and big["train"]["model"]["channels"][0] == 16
    assert "resolution comes before width" in big["reasons"]["network"]


def test_plan_uses_the_ct_rule_for_hounsfield_units_only() -> None:
    from tumorseg.planning import volumes

    mri = fingerprint((1.0, 1.0, 1.0), (64, 64, 64))
    assert volumes.intensity_rule(mri)[0] == "image"  # type: ignore[arg-type]
    ct = mri.model_copy(update={  # type: ignore[attr-defined]
        "intensity": [{"p0_5": -1024.0, "p50": -700.0, "p99_5": 1200.0, "mean": -500.0, "std": 400.0}]})
    rule, why = volumes.intensity_rule(ct)  # type: ignore[arg-type]
    assert rule == "ct" and "foreground" in why


def test_a_3d_grid_must_divide_by_its_strides() -> None:
    assert TrainConfig(image_size=(32, 32, 16), model={"channels": [8, 16, 32], "strides": [[2, 2, 1], [2, 2, 2]]})
    with pytest.raises(ValueError, match="not divisible"):
        TrainConfig(image_size=(32, 32, 24))
    # 3D strides with the default 2D image size: the message says to give the grid too
    with pytest.raises(ValueError, match=r"need 2 factors each.*--set image_size=\[D,H,W\]"):
        TrainConfig(model={"channels": [8, 16, 32], "strides": [[2, 2, 1], [2, 2, 2]]})
    with pytest.raises(ValueError, match="as many"):
        TrainConfig(image_size=(32, 32, 16), patch_size=(16, 16))


@pytest.mark.parametrize("model", [
    {"name": "unet", "channels": [4, 8, 16], "strides": [[2, 2, 1], [2, 2, 2]], "norm": "instance"},
    {"name": "dynunet", "channels": [4, 8, 16], "strides": [[2, 2, 1], [2, 2, 2]], "deep_supervision": True},
    {"name": "attention_unet", "channels": [4, 8, 16]},
    {"name": "segresnet", "init_filters": 8},
])
def test_each_3d_network_takes_a_step_on_an_anisotropic_grid(model: dict) -> None:
    import torch

    from tumorseg.config import LossConfig, ModelConfig
    from tumorseg.model import build_loss, build_model, main_output

    torch.manual_seed(0)
    net = build_model(ModelConfig.model_validate(model), 1, 3, spatial_dims=3)
    loss_fn = build_loss(LossConfig(name="dice_ce"), multiclass=True)
    x, y = torch.randn(2, 1, 16, 16, 8), torch.randint(0, 3, (2, 1, 16, 16, 8)).float()
    loss = loss_fn(net(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    net.eval()
    with torch.no_grad():
        assert main_output(net(x), x.dim()).shape == (2, 3, 16, 16, 8)


def test_region_targets_of_a_volume() -> None:
    """BraTS-style regions on volumes: class-index targets become one channel per region, as in 2D."""
    import torch

    from tumorseg.config import LossConfig
    from tumorseg.model import build_loss

    loss_fn = build_loss(LossConfig(name="dice_ce"), multiclass=True, regions=[[1, 2, 3], [1, 3], [3]])
    target = torch.zeros(1, 1, 4, 4, 2)
    target[0, 0, 0, 0, 0], target[0, 0, 1, 1, 1], target[0, 0, 2, 2, 0] = 1, 2, 3
    regions = torch.stack([(target[:, 0] > 0), (target[:, 0] == 1) | (target[:, 0] == 3), target[:, 0] == 3], 1)
    perfect = (regions.float() * 2 - 1) * 20  # logits that are sure of every region
    assert float(loss_fn(perfect, target)) < 1e-3
    assert float(loss_fn(-perfect, target)) > 1.0


# ----------------------------------------------------------------------------- train, evaluate, predict


TINY_3D = [
    "plan=off", "epochs=2", "max_steps=6", "batch_size=2", "image_size=[16,16,16]", "model.channels=[4,8,16]",
    "model.num_res_units=1", "model.norm=instance", "normalize=ct", "log_model=false", "val_overlays=2",
    "augment.flip_axes=[vertical,horizontal,depth]", "postprocess=auto",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(manifest folder, run folder, data folder): 12 LPS volumes of 0.7 x 0.7 x 3 mm and a tiny 3D model."""
    from tumorseg.train import run as train

    root = tmp_path_factory.mktemp("vol")
    images, masks = write_set(root / "data", 12)
    mdir = ingest(images, masks, root / "m", seed=1)
    cfg = load_config(TrainConfig, None, TINY_3D, base={"manifest": str(mdir), "out": str(root / "runs")})
    res = train(cfg)
    return mdir, Path(res.run_dir), root / "data"


def test_a_3d_model_trains_and_evaluates_per_volume(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from tumorseg import evaluate
    from tumorseg.config import EvaluateConfig
    from tumorseg.inference import Segmenter

    mdir, run_dir, _ = trained
    seg = Segmenter.from_checkpoint(run_dir / "best.pt", device="cpu")
    assert seg.config.spatial_dims == 3 and (run_dir / "val_overlays.png").is_file()
    assert seg.batch_for(16) == 2 and seg.batch_for(1) == 1  # never more volumes a pass than training's batch
    # normalize: ct (nnU-Net's CT rule): the window and z-score come from the tumour voxels (600 +- 30), not
    # from the whole volumes (mean about 210)
    assert seg.stats is not None
    (lo, hi), = seg.stats["clip"]
    assert 500 < lo < 560 and 640 < hi < 700
    assert seg.stats["mean"][0] == pytest.approx(600, abs=5) and seg.stats["std"][0] == pytest.approx(30, abs=3)
    res = evaluate.run(EvaluateConfig(model=str(run_dir), manifest=mdir, out=tmp_path / "eval", surface=True,
                                      bootstrap=0))
    per_case = rows(res.out_dir, "per_case.csv")
    test_ids = [r["case_id"] for r in rows(mdir) if r["split"] == "test"]
    assert sorted(r["case_id"] for r in per_case) == sorted(test_ids)  # one row per volume
    for r in per_case:
        counts = [int(r[k]) for k in ("tp", "fp", "fn", "tn")]
        assert sum(counts) == math.prod(SHAPE)  # scored on the volume's own grid
    assert (res.out_dir / "gallery.png").is_file()


def test_predict_writes_the_mask_on_the_inputs_own_grid(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """0.7 x 0.7 x 3 mm voxels in LPS order go in; the mask comes back with the same shape and affine."""
    from tumorseg import predict
    from tumorseg.config import PredictConfig
    from tumorseg.inference import Segmenter

    _, run_dir, data = trained
    src = tmp_path / "in"
    src.mkdir()
    image, _ = blob_volume(42, shape=(20, 28, 12))
    write_nifti(src / "new.nii.gz", image, LPS)
    predict.run(PredictConfig(model=str(run_dir), inputs=[src], output_dir=tmp_path / "out", format="nifti",
                              probabilities=True))
    out = nib.load(str(tmp_path / "out" / "new.nii.gz"))
    assert out.shape == (20, 28, 12)
    np.testing.assert_allclose(out.affine, LPS)
    # the same as the segmenter on the canonical volume, turned back onto the file's axes
    seg = Segmenter.from_checkpoint(run_dir / "best.pt", device="cpu")
    want = seg.predict_masks([image[::-1, ::-1, :][None].astype(np.float32)])[0][::-1, ::-1, :]
    np.testing.assert_array_equal(np.asarray(out.dataobj), want)
    prob = nib.load(str(tmp_path / "out" / "new_prob.nii.gz"))
    assert prob.shape == (20, 28, 12)
    # a 2D file given to the 3D model: one line naming it
    flat = tmp_path / "flat"
    flat.mkdir()
    write_nifti(flat / "one.nii.gz", image[:, :, :1], LPS)
    with pytest.raises(TumorsegError, match="one.nii.gz: a 2D image given to a 3D model"):
        predict.run(PredictConfig(model=str(run_dir), inputs=[flat], output_dir=tmp_path / "out2",
                                  format="nifti"))


def test_predict_joins_nnunet_channel_files_as_a_4d_file(tmp_path: Path) -> None:
    """A 2-channel model predicts ``new_0000`` + ``new_0001`` as one input (mask ``new.nii.gz``), as the 4D file."""
    from tumorseg import predict
    from tumorseg.config import PredictConfig
    from tumorseg.train import run as train

    write_channel_files(tmp_path / "imagesTr", tmp_path / "labelsTr", 12)
    mdir = ingest(tmp_path / "imagesTr", tmp_path / "labelsTr", tmp_path / "m", seed=1)
    cfg = load_config(TrainConfig, None, [*TINY_3D, "max_steps=2", "postprocess=none", "val_overlays=0"],
                      base={"manifest": str(mdir), "out": str(tmp_path / "runs")})
    run_dir = str(train(cfg).run_dir)
    files, four_d = tmp_path / "new", tmp_path / "new4d"
    write_channel_files(files, None, 2, first=40)
    four_d.mkdir()
    for i in (40, 41):
        seqs = [np.asarray(nib.load(str(files / f"c{i}_{c:04d}.nii.gz")).dataobj) for c in (0, 1)]
        write_nifti(four_d / f"c{i}.nii.gz", np.stack(seqs, axis=-1), LPS)
    res = predict.run(PredictConfig(model=run_dir, inputs=[files], output_dir=tmp_path / "out", format="nifti",
                                    probabilities=True))
    assert res.n_inputs == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == [
        "c40.nii.gz", "c40_prob.nii.gz", "c41.nii.gz", "c41_prob.nii.gz"]
    predict.run(PredictConfig(model=run_dir, inputs=[four_d], output_dir=tmp_path / "out4d", format="nifti",
                              probabilities=True))
    for name in ("c40.nii.gz", "c40_prob.nii.gz", "c41.nii.gz", "c41_prob.nii.gz"):
        joined, whole = nib.load(str(tmp_path / "out" / name)), nib.load(str(tmp_path / "out4d" / name))
        assert joined.shape == SHAPE
        np.testing.assert_array_equal(np.asarray(joined.dataobj), np.asarray(whole.dataobj))  # channels in order
    swapped = tmp_path / "swapped"  # the sequences in the other order: other probabilities (the test can fail)
    swapped.mkdir()
    for c in (0, 1):
        (swapped / f"c40_{c:04d}.nii.gz").write_bytes((files / f"c40_{1 - c:04d}.nii.gz").read_bytes())
    predict.run(PredictConfig(model=run_dir, inputs=[swapped], output_dir=tmp_path / "outs", format="nifti",
                              probabilities=True))
    assert not np.array_equal(np.asarray(nib.load(str(tmp_path / "outs" / "c40_prob.nii.gz")).dataobj),
                              np.asarray(nib.load(str(tmp_path / "out" / "c40_prob.nii.gz")).dataobj))
    (files / "c41_0001.nii.gz").unlink()  # a case missing its second sequence: one line naming it
    with pytest.raises(TumorsegError, match=r"c41_0000.nii.gz: the model takes 2 channels.* has _0000;"):
        predict.run(PredictConfig(model=run_dir, inputs=[files], output_dir=tmp_path / "out2", format="nifti"))


def test_the_pyfunc_model_takes_volumes_by_rank(trained: tuple[Path, Path, Path]) -> None:
    from tumorseg.inference import Segmenter
    from tumorseg.mlflow_model import TumorsegPyfunc, as_images

    _, run_dir, _ = trained
    vol = np.random.RandomState(0).rand(12, 14, 10).astype(np.float32)
    one, single = as_images(vol, 1, spatial=3)
    assert single and one[0].shape == (1, 12, 14, 10)
    batch, single = as_images(np.stack([vol[None], vol[None]]), 1, spatial=3)
    assert not single and len(batch) == 2
    with pytest.raises(TumorsegError, match=r"\(N, C, D, H, W\)"):
        as_images(np.zeros((2, 2, 2, 2, 2, 2)), 1, spatial=3)
    holed = vol.copy()
    holed[1, 2, 3] = np.inf
    with pytest.raises(TumorsegError, match=r"1 NaN or infinite value\(s\)"):
        as_images(holed, 1, spatial=3)
    model = TumorsegPyfunc()
    model.segmenter = Segmenter.from_checkpoint(run_dir / "best.pt", device="cpu")
    mask = model.predict(None, vol)
    assert mask.shape == (12, 14, 10) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, model.segmenter.predict_masks([vol[None]])[0])
    assert model.predict(None, np.stack([vol[None]] * 2)).shape == (2, 12, 14, 10)


def test_truncated_gzip_volume_at_predict_is_one_line(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    from tumorseg import predict
    from tumorseg.config import PredictConfig

    _, run_dir, _ = trained
    src = tmp_path / "in"
    src.mkdir()
    image, _ = blob_volume(3)
    raw = gzip.compress(nib.Nifti1Image(image, LPS).to_bytes())
    (src / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TumorsegError, match="cut.nii.gz: truncated or corrupt NIfTI"):
        predict.run(PredictConfig(model=str(run_dir), inputs=[src], output_dir=tmp_path / "out", format="nifti"))


def test_a_model_of_the_other_kind_is_one_line(trained: tuple[Path, Path, Path], manifest: Path,
                                               tmp_path: Path) -> None:
    """A 2D config on a manifest of volumes, and a 3D model on a manifest of 2D images: one line each, no work."""
    from tumorseg import evaluate
    from tumorseg.config import EvaluateConfig
    from tumorseg.train import run as train

    mdir, run_dir, _ = trained
    cfg = load_config(TrainConfig, None, ["plan=off", "max_steps=1"], base={"manifest": str(mdir),
                                                                            "out": str(tmp_path / "runs")})
    with pytest.raises(TumorsegError, match=r"holds 3D volumes \(each one case\) but image_size \[128, 128\] is 2D"):
        train(cfg)
    with pytest.raises(TumorsegError, match="holds 2D cases .* but model .* is 3D"):
        evaluate.run(EvaluateConfig(model=str(run_dir), manifest=manifest, out=tmp_path / "ev"))


@pytest.mark.slow
def test_exact_resume_of_a_3d_run_after_killed_process(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """As in 2D (deterministic mode, on-disk cache): kill a 3D training, resume it, get the uninterrupted weights."""
    import subprocess
    import sys

    import torch

    from tumorseg import train
    from tumorseg.checkpoint import load as load_checkpoint

    mdir = trained[0]
    sets = [*[s for s in TINY_3D if not s.startswith(("epochs", "max_steps", "postprocess", "val_overlays"))],
            "epochs=8", "deterministic=true", "early_stopping_patience=null", "postprocess=none", "val_overlays=0",
            "cache=disk", f"cache_dir={tmp_path / 'cache'}"]
    full = train.run(load_config(TrainConfig, None, [*sets, "run_name=full"],
                                 base={"manifest": str(mdir), "out": str(tmp_path)}))
    proc = subprocess.Popen([sys.executable, "-m", "tumorseg", "train", str(mdir), "--out", str(tmp_path),
                             *[f"--set={s}" for s in (*sets, "run_name=killed")]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = tmp_path / "killed" / "last.pt"
    assert 2 <= kill_at_epoch(proc, last, 2, 180) < 8
    resumed = train.resume(tmp_path / "killed")
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(last)
    assert a["epoch"] == b["epoch"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["val_dice"] for h in full.history] == [h["val_dice"] for h in resumed.history]


@pytest.mark.slow
def test_ddp_trains_a_3d_model_on_two_cpu_processes(trained: tuple[Path, Path, Path], tmp_path: Path,
                                                     mlflow_uri: str) -> None:
    """torchrun with 2 gloo processes on volumes: one run, one set of checkpoints, the disk cache built once."""
    import os
    import subprocess
    import sys

    mdir = trained[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_TRACKING_URI": mlflow_uri}
    sets = [*TINY_3D, "run_name=ddp3d", "device=cpu", "cache=disk", f"cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tumorseg",
         "train", str(mdir), "--out", str(tmp_path), *[f"--set={s}" for s in sets]],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("best val Dice") == 1
    assert (tmp_path / "ddp3d" / "best.pt").is_file()
    assert proc.stderr.count(": built ") == 2, proc.stderr[-3000:]
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "cache").glob("*")) == ["16x16x16"] * 2
