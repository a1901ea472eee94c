"""Volumes at one voxel size (planning rule V3, :mod:`tumorseg.placement`): nnU-Net's resampling to a spacing.

The placement by hand, the cache's stored grids, training's validation against inference, predict on a file's
own grid, the MLflow model's ``spacing`` param, and the plan. Volumes of several fields of view are written as
NIfTI files, ingested and read back by the product's own reader; the model is trained for a few steps (checked
for grids and agreement, not quality).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_volumes import LPS, TINY_3D, blob_volume, fingerprint, ingest

from tumorseg.config import TrainConfig, load_config
from tumorseg.imageio.nifti import write_nifti
from tumorseg.placement import Placement, placement, put

SHAPES = [(20, 28, 12), (24, 32, 16), (28, 36, 16)]
"""Fields of view of the written volumes (0.7 x 0.7 x 3 mm voxels), cycled: the last is shrunk to fit the grid."""
TARGET = (1.4, 1.4, 3.0)
PLACED = [*TINY_3D, "target_spacing=[1.4,1.4,3.0]", "input_spacing=[0.7,0.7,3.0]"]


def test_a_placement_by_hand() -> None:
    # 10 x 20 x 8 voxels of 1 x 1 x 3 mm at 1 x 1 x 1.5 mm: 10 x 20 x 16 voxels, centred in 16 x 24 x 24
    where = placement((10, 20, 8), (1.0, 1.0, 3.0), (1.0, 1.0, 1.5), (16, 24, 24))
    assert where == Placement((10, 20, 16), (3, 2, 4))
    assert where.region == (slice(3, 13), slice(2, 22), slice(4, 20))
    # 40 x 20 x 10 mm in a 16-voxel cube: 40 does not fit, so every axis shrinks by 16/40 (not only the first)
    assert placement((40, 20, 10), (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (16, 16, 16)) == Placement((16, 8, 4), (0, 4, 6))
    # the grid's own size at its own spacing: the whole grid, nothing moved
    assert placement((16, 16, 8), (2.0, 2.0, 2.0), (2.0, 2.0, 2.0), (16, 16, 8)) == Placement((16, 16, 8), (0, 0, 0))


def test_put_leaves_zeros_around() -> None:
    import torch

    where = Placement((2, 1, 2), (1, 0, 1))
    out = put(torch.ones((2, 2, 1, 2)), where, (4, 3, 4))
    assert out.shape == (2, 4, 3, 4) and float(out.sum()) == 2 * 4
    assert float(out[(slice(None), *where.region)].min()) == 1.0


def test_a_volume_is_predicted_in_one_pass_while_it_holds_a_training_batch() -> None:
    from tumorseg.placement import divisor, tiling

    cfg = TrainConfig(image_size=(16, 16, 16), batch_size=2, model={"channels": [4, 8, 16], "strides": [2, 2]},
                      target_spacing=(1.0, 1.0, 1.0))
    assert divisor(cfg) == (4, 4, 4)
    assert tiling(cfg, (14, 16, 9)) == (None, (4, 4, 4))  # padded to 16x16x12, one pass
    assert tiling(cfg, (21, 21, 21)) == ((16, 16, 16), None)  # 9261 voxels > 2 x 16^3: the grid as window
    patched = cfg.model_copy(update={"patch_size": (8, 8, 8)})
    assert tiling(patched, (10, 10, 10)) == (None, (4, 4, 4)) and tiling(patched, (12, 12, 12)) == ((8, 8, 8), None)
    per_axis = cfg.model_copy(update={"model": cfg.model.model_copy(update={"strides": [[2, 2, 1], [2, 2, 1]]})})
    assert divisor(per_axis) == (4, 4, 1)


def test_a_structure_spans_the_same_voxels_whatever_the_field_of_view() -> None:
    """A 6 mm cube in a 20 mm and in a 30 mm volume: 6 voxels across in both (stretching gives 9.6 and 6.4)."""
    from tumorseg.data.reader import Case
    from tumorseg.data.split import prepare
    from tumorseg.inference import resize_image
    from tumorseg.intensity import SCALE_PERCENTILES, prescale

    rng = np.random.RandomState(0)
    sizes = []
    for n in (20, 30):
        mask = np.zeros((n, n, n), np.uint8)
        mask[4:10, 4:10, 4:10] = 1
        image = (100 + 50 * mask + rng.normal(0, 5, mask.shape)).astype(np.float32)[None]
        case = Case(0, f"c{n}", f"c{n}", image, mask, (1.0, 1.0, 1.0))
        p = prepare(case, (32, 32, 32), 1, "image", target=(1.0, 1.0, 1.0))
        assert p.placement == Placement((n, n, n), ((32 - n) // 2,) * 3)
        sizes.append(int(p.mask.sum()))
        region = (slice(None), *p.placement.region)
        want = resize_image(prescale(image, "image", SCALE_PERCENTILES), (n, n, n)).numpy()
        np.testing.assert_array_equal(p.image[region], want)  # the voxels themselves, at the same spacing
        outside = np.ones(p.image.shape, bool)
        outside[region] = False
        assert not p.image[outside].any() and not p.mask[outside].any()  # zeros around
        np.testing.assert_array_equal(p.original_mask, mask)  # scored on the volume as stored
        stretched = prepare(case, (32, 32, 32), 1, "image")
        assert stretched.placement is None and int(stretched.mask.sum()) != 216
    assert sizes == [216, 216]


def write_fields(root: Path, n: int) -> tuple[Path, Path]:
    """Blob volumes of the :data:`SHAPES` fields of view, 0.7 x 0.7 x 3 mm voxels in DICOM's LPS orientation."""
    images, masks = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(n):
        image, label = blob_volume(i, SHAPES[i % len(SHAPES)], empty=i % 6 == 5)
        write_nifti(images / f"case_{i:03d}.nii.gz", image, LPS)
        write_nifti(masks / f"case_{i:03d}.nii.gz", label, LPS)
    return images, masks


@pytest.fixture(scope="module")
def placed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(manifest folder, run folder): 12 volumes of three fields of view, a tiny model trained at 1.4 x 1.4 x 3."""
    from tumorseg.train import run as train

    root = tmp_path_factory.mktemp("place")
    images, masks = write_fields(root / "data", 12)
    mdir = ingest(images, masks, root / "m", seed=1)
    cfg = load_config(TrainConfig, None, [*PLACED, "cache=disk"],
                      base={"manifest": str(mdir), "out": str(root / "runs")})
    return mdir, Path(train(cfg).run_dir)


def test_the_cache_stores_each_volume_at_its_place(placed_run: tuple[Path, Path]) -> None:
    from tumorseg import checkpoint
    from tumorseg.data.disk import DiskSplit, cache_key, check, folder_name
    from tumorseg.manifest import load_manifest

    mdir, run_dir = placed_run
    info, df = load_manifest(mdir)
    val = df[df["split"] == "val"]
    ids = [str(c) for c in val["case_id"]]
    key = cache_key(info.dataset_digest, "val", ids, (16, 16, 16), 1, "ct", 0, False, TARGET)
    assert key != cache_key(info.dataset_digest, "val", ids, (16, 16, 16), 1, "ct", 0, False)  # a folder of its own
    meta, why = check(mdir / "cache" / folder_name("val", (16, 16, 16), key), key)
    assert meta is not None, why
    split = DiskSplit(mdir / "cache" / folder_name("val", (16, 16, 16), key), meta)
    for i, case_id in enumerate(ids):
        shape = SHAPES[int(case_id.split("_")[1]) % len(SHAPES)]
        assert split.original_mask(i).shape == shape
        assert split.placement(i) == placement(shape, (0.7, 0.7, 3.0), TARGET, (16, 16, 16))
    cfg = checkpoint.train_config(checkpoint.load(run_dir / "best.pt"))
    assert cfg.target_spacing == TARGET and cfg.input_spacing == (0.7, 0.7, 3.0)  # what inference reads back


def test_validation_and_inference_place_volumes_alike(placed_run: tuple[Path, Path]) -> None:
    """Training's val probabilities (from the RAM cache) equal the Segmenter's on the files that fit the grid.

    The one larger than the grid is shrunk in training's cache only: the Segmenter predicts it whole.
    """
    import torch

    from tumorseg.data import CaseReader
    from tumorseg.data.split import in_ram
    from tumorseg.inference import Segmenter
    from tumorseg.manifest import load_manifest
    from tumorseg.train.validation import val_probabilities

    mdir, run_dir = placed_run
    seg = Segmenter.from_checkpoint(run_dir / "best.pt", device="cpu")
    info, df = load_manifest(mdir)
    reader = CaseReader(info, str(mdir))
    rows = df.iloc[:6]
    split, _ = in_ram(reader, rows, (16, 16, 16), 1, "ct", "val", TARGET)
    split.normalise(seg.stats)
    got = list(val_probabilities(seg.net, split, seg.config, torch.device("cpu")))
    cases = reader.read_all(rows)
    assert {c.image.shape[1:] for c in cases} == set(SHAPES)
    seen: list[tuple[int, ...]] = []
    hook = seg.net.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape[2:])))
    for case, prob in zip(cases, got, strict=True):
        seen.clear()
        want = seg.predict_proba([case.image], spacings=[case.spacing])[0]
        assert prob.shape == want.shape == case.mask.shape
        if case.image.shape[1:] == SHAPES[2]:  # 14 x 18 x 16 voxels at the target: 18 > 16, whole at inference
            assert seen and set(seen) == {(16, 20, 16)}  # in one pass, padded to the network's downsampling (4)
            assert not np.allclose(prob, want, atol=2e-3)
        else:
            np.testing.assert_allclose(prob, want, atol=2e-3)
    hook.remove()
    # with training patches smaller than the volumes, both tile each volume's own region alike (sliding window)
    tiled = Segmenter(seg.net, seg.config.model_copy(update={"patch_size": (8, 8, 8)}), seg.in_channels, seg.device,
                      seg.stats, seg.post, seg.fingerprint, seg.classes)
    for case, prob in zip(cases, val_probabilities(seg.net, split, tiled.config, torch.device("cpu")), strict=True):
        if case.image.shape[1:] != SHAPES[2]:
            want = tiled.predict_proba([case.image], spacings=[case.spacing])[0]
            np.testing.assert_allclose(prob, want, atol=2e-3)
    # without a spacing the model assumes its input_spacing (here the files' own), with another a new placement
    first = cases[0]
    np.testing.assert_array_equal(seg.predict_proba([first.image])[0],
                                  seg.predict_proba([first.image], spacings=[first.spacing])[0])
    other = seg.predict_proba([first.image], spacings=[(1.4, 1.4, 3.0)])[0]
    assert other.shape == first.mask.shape and not np.array_equal(other, got[0])


def test_predict_writes_a_placed_models_mask_on_the_files_grid(placed_run: tuple[Path, Path], tmp_path: Path) -> None:
    import nibabel as nib

    from tumorseg import predict
    from tumorseg.config import PredictConfig
    from tumorseg.imageio.volume import canonical_spacing, from_canonical, to_canonical
    from tumorseg.inference import Segmenter

    _, run_dir = placed_run
    image, _ = blob_volume(50, (30, 20, 10))
    affine = np.array([[0, 0, 2.5, 0], [-0.9, 0, 0, 0], [0, 1.1, 0, 0], [0, 0, 0, 1]])  # permuted axes
    write_nifti(tmp_path / "in" / "v.nii.gz", image, affine)
    predict.run(PredictConfig(model=str(run_dir), inputs=[tmp_path / "in"], output_dir=tmp_path / "out",
                              format="nifti", probabilities=True))
    out = nib.load(tmp_path / "out" / "v.nii.gz")
    assert out.shape == (30, 20, 10)
    np.testing.assert_allclose(out.affine, affine)
    # the Segmenter on the canonical volume at the file's voxel size (2.5 x 0.9 x 1.1 mm), back on the file's axes
    seg = Segmenter.from_checkpoint(run_dir / "best.pt", device="cpu")
    canonical = to_canonical(image, affine)[None].astype(np.float32)
    assert canonical_spacing(affine) == (2.5, 0.9, 1.1)
    want = seg.predict_proba([canonical], spacings=[(2.5, 0.9, 1.1)])[0]
    np.testing.assert_allclose(from_canonical(want, affine), np.asarray(nib.load(tmp_path / "out" / "v_prob.nii.gz")
                                                                        .dataobj), atol=1e-6)
    assumed = seg.predict_proba([canonical])[0]  # as if its voxels were the training median's: another input
    assert not np.allclose(assumed, want, atol=1e-3)


def test_a_voxel_size_in_another_unit_or_a_tiny_volume(placed_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A header in metres is named, never resampled to one voxel (or to terabytes); a volume of a few voxels is
    padded to the network's depth and predicted."""
    from mlflow.exceptions import MlflowException

    from tumorseg import predict
    from tumorseg.config import PredictConfig
    from tumorseg.errors import TumorsegError
    from tumorseg.inference import Segmenter
    from tumorseg.mlflow_model import TumorsegPyfunc

    _, run_dir = placed_run
    image, _ = blob_volume(51, (24, 24, 12))
    write_nifti(tmp_path / "m" / "metres.nii.gz", image, np.diag([7e-4, 7e-4, 3e-3, 1.0]))
    with pytest.raises(TumorsegError, match=r"metres\.nii\.gz: voxel size 0\.0007x0\.0007x0\.003 mm is 0\.0005 "
                                            r"times the model's target spacing \(1\.4x1\.4x3 mm\): a header in metres"):
        predict.run(PredictConfig(model=str(run_dir), inputs=[tmp_path / "m"], output_dir=tmp_path / "o1"))
    write_nifti(tmp_path / "t" / "tiny.nii.gz", image[:2, :2, :2], np.diag([1.4, 1.4, 3.0, 1.0]))
    predict.run(PredictConfig(model=str(run_dir), inputs=[tmp_path / "t"], output_dir=tmp_path / "o2"))
    assert nib_shape(tmp_path / "o2" / "tiny.nii.gz") == (2, 2, 2)
    model = TumorsegPyfunc()
    model.segmenter = Segmenter.from_checkpoint(run_dir / "best.pt", device="cpu")
    with pytest.raises(MlflowException, match=r"params spacing: voxel size 1000x1000x1000 mm is 714 times"):
        model.predict(None, image.astype(np.float32), params={"spacing": [1000, 1000, 1000]})


def nib_shape(path: Path) -> tuple[int, ...]:
    import nibabel as nib

    return tuple(int(v) for v in nib.load(path).shape)


def test_the_mlflow_models_spacing_param() -> None:
    from tumorseg.errors import TumorsegError
    from tumorseg.mlflow_model import _spacing

    assert _spacing([0.7, 0.7, 3]) == (0.7, 0.7, 3.0)
    assert _spacing(None) is None and _spacing([0.0, 0.0, 0.0]) is None  # not given: the model's input_spacing
    for bad in ([1.0, 2.0], [1.0, -1.0, 2.0], "x"):
        with pytest.raises(TumorsegError, match="params spacing .*three positive voxel sizes"):
            _spacing(bad)


def test_a_spacing_is_three_positive_sizes() -> None:
    from pydantic import ValidationError

    from tumorseg.errors import TumorsegError

    # given on the command line before the plan makes the grid 3D (the default grid is 2D): accepted
    assert load_config(TrainConfig, None, ["target_spacing=[1.2,1.2,1.2]"]).target_spacing == (1.2, 1.2, 1.2)
    with pytest.raises(TumorsegError, match="target_spacing and input_spacing are voxel sizes in mm"):
        load_config(TrainConfig, None, ["target_spacing=[1,0,1]"])
    with pytest.raises(ValidationError, match="three positive numbers"):
        TrainConfig(image_size=(16, 16, 16), model={"channels": [4, 8, 16], "strides": [2, 2]},
                    target_spacing=(1.0, 0.0, 1.0))


def test_the_plan_sizes_the_grid_for_95_percent_of_the_volumes() -> None:
    from tumorseg.planning import volumes
    from tumorseg.planning.probe import Throughput

    base = fingerprint((1.0, 1.0, 1.0), (40, 56, 40))
    spread = base.model_copy(update={"extent_p95": (48.0, 70.0, 41.0)})  # type: ignore[attr-defined]
    assert volumes.storage(spread, (1.0, 1.0, 1.0), (40, 56, 40)) == (48, 72, 48)  # p95 rounded up to 8
    assert volumes.storage(spread, (2.0, 2.0, 2.0), (24, 32, 24)) == (24, 40, 24)  # never below the median's
    assert volumes.storage(base, (1.0, 1.0, 1.0), (40, 56, 40)) == (40, 56, 40)  # unmeasured: the median volume
    cropped = spread.model_copy(update={"extent_p95_cropped": (30.0, 30.0, 30.0), "shape_median_cropped": (24, 24, 24)})
    assert volumes.storage(cropped, (1.0, 1.0, 1.0), (24, 24, 24)) == (32, 32, 32)  # the boxes', where it crops
    planned = volumes.choose(spread, 1800, 8, lambda *a: Throughput(40.0, 120.0), "cpu")  # type: ignore[arg-type]
    train = planned["train"]
    assert train["target_spacing"] == [1.0, 1.0, 1.0] and train["input_spacing"] == [1.0, 1.0, 1.0]
    assert train["image_size"] == [48, 72, 48] and "95% of the volumes whole" in planned["reasons"]["image_size"]
    assert train["patch_size"] == [40, 56, 40]  # the network trains on median-volume patches of the grid (nnU-Net)
    assert planned["reasons"]["patch_size"].startswith("the median volume: random 40x56x40 patches")
    cfg = TrainConfig.model_validate(train)
    assert cfg.target_spacing == (1.0, 1.0, 1.0)
    # a slower machine: a coarser spacing, and the grid follows it
    slow = volumes.choose(spread, 1800, 8, lambda *a: Throughput(0.5, 2.0), "cpu")  # type: ignore[arg-type]
    assert slow["train"]["target_spacing"][0] > 1.0
    assert math.prod(slow["train"]["image_size"]) < math.prod(train["image_size"])
    # volumes of one size: the grid is the median volume, trained whole
    same = volumes.choose(base, 1800, 8, lambda *a: Throughput(40.0, 120.0), "cpu")  # type: ignore[arg-type]
    assert same["train"]["image_size"] == [40, 56, 40] and same["train"]["patch_size"] is None


def test_the_fingerprint_measures_the_extent(placed_run: tuple[Path, Path]) -> None:
    from tumorseg.manifest import load_manifest
    from tumorseg.planning import fingerprint as fpm

    mdir, _ = placed_run
    info, df = load_manifest(mdir)
    train = df[df["split"] == "train"]
    fp = fpm.compute(info, train, str(mdir))
    mm = np.asarray([[n * s for n, s in zip(SHAPES[int(c.split("_")[1]) % 3], (0.7, 0.7, 3.0), strict=True)]
                     for c in train["case_id"]])
    np.testing.assert_allclose(fp.extent_p95, np.percentile(mm, 95, axis=0), rtol=1e-4)  # type: ignore[arg-type]
    np.testing.assert_allclose(fp.extent_p95_cropped, fp.extent_p95, rtol=1e-4)  # type: ignore[arg-type]
