"""Volumetric post-processing: component rules over a whole ordered stack of slices (issue #23, tumour-free slices).

Hand-built stacks with exact expected masks; the fast counting of :func:`tumorseg.train.postprocess.stack_counts`
against the masks themselves; and evaluate, predict (a volume, and numbered slice files) and the pyfunc model
applying the stored volumetric choice to the same stack alike.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tumorseg.labels import Classes
from tumorseg.postprocessing import Postprocess, StackBuffer


def stack_with_speck() -> list[np.ndarray]:
    """Four 8x8 slices: a tumour over slices 0-2 (probability 0.9), a lone speck on slice 3 (0.97)."""
    probs = [np.zeros((8, 8), np.float32) for _ in range(4)]
    for z in range(3):
        probs[z][2:5, 2:5] = 0.9
    probs[3][6, 6] = 0.97
    return probs


def test_keep_largest_over_the_stack_removes_the_speck_on_a_tumour_free_slice() -> None:
    probs = stack_with_speck()
    flat = Postprocess(keep="largest")
    volumetric = Postprocess(keep="largest", volumetric=True)
    per_slice = flat.stack_masks(probs)
    stacked = volumetric.stack_masks(probs)
    assert per_slice[3].sum() == 1  # slice by slice, the speck is the largest component of its slice
    assert stacked[3].sum() == 0  # over the stack, it is a component of 1 voxel against one of 27
    for z in range(3):
        assert np.array_equal(stacked[z], (probs[z] > 0.5).astype(np.uint8))


def test_min_size_counts_voxels_of_the_stack() -> None:
    probs = stack_with_speck()
    masks = Postprocess(keep="min_size", min_size=27, volumetric=True).stack_masks(probs)
    assert [int(m.sum()) for m in masks] == [9, 9, 9, 0]
    masks = Postprocess(keep="min_size", min_size=28, volumetric=True).stack_masks(probs)
    assert [int(m.sum()) for m in masks] == [0, 0, 0, 0]


def test_a_component_is_as_confident_as_its_surest_voxel_in_any_slice() -> None:
    probs = [np.zeros((6, 6), np.float32) for _ in range(2)]
    probs[0][1:3, 1:3] = 0.97
    probs[1][1:3, 1:3] = 0.7  # the same blob continued on the next slice, less sure there
    flat = Postprocess(min_confidence=0.9).stack_masks(probs)
    volumetric = Postprocess(min_confidence=0.9, volumetric=True).stack_masks(probs)
    assert [int(m.sum()) for m in flat] == [4, 0]
    assert [int(m.sum()) for m in volumetric] == [4, 4]


def test_diagonal_neighbours_across_slices_are_one_component() -> None:
    probs = [np.zeros((5, 5), np.float32) for _ in range(2)]
    probs[0][0:3, 0:3] = 0.9
    probs[1][3, 3] = 0.9  # touches the blob only at a corner, one slice on
    masks = Postprocess(keep="largest", volumetric=True).stack_masks(probs)
    assert [int(m.sum()) for m in masks] == [9, 1]


def test_stack_masks_falls_back_to_slices_when_not_volumetric_or_of_other_sizes() -> None:
    probs = stack_with_speck()
    assert all(np.array_equal(a, b) for a, b in zip(Postprocess(keep="largest").stack_masks(probs),
                                                    [Postprocess(keep="largest").mask(p) for p in probs],
                                                    strict=True))
    mixed = [*probs[:3], np.pad(probs[3], 1)]
    masks = Postprocess(keep="largest", volumetric=True).stack_masks(mixed)
    assert masks[3].sum() == 1 and masks[3].shape == (10, 10)


def test_multiclass_stacks_apply_the_rule_per_class_in_3d() -> None:
    classes = Classes.from_json({0: "background", 1: "a", 2: "b"})
    probs = []
    for z in range(3):
        p = np.zeros((3, 6, 6), np.float32)
        p[0] = 1.0
        p[:, 1:4, 1:4] = [[[0.1]], [[0.8]], [[0.1]]]  # class a, 27 voxels over the stack
        if z == 2:
            p[:, 5, 5] = [0.1, 0.1, 0.8]  # class b: one voxel
            p[:, 0, 5] = [0.1, 0.8, 0.1]  # class a: a speck apart from its blob
        probs.append(p)
    masks = Postprocess(keep="largest", volumetric=True).stack_masks(probs, classes)
    assert int((masks[2] == 1).sum()) == 9  # the class-a speck goes, its blob stays
    assert int((masks[2] == 2).sum()) == 1  # class b's only component is its largest


def test_the_choice_round_trips_through_the_checkpoint() -> None:
    from tumorseg.config import TrainConfig

    post = Postprocess(threshold=0.4, keep="largest", volumetric=True)
    cfg = TrainConfig.model_validate({"manifest": "m"})
    assert Postprocess.from_checkpoint({"postprocess": post.to_dict()}, cfg) == post
    old = {"threshold": 0.4, "keep": "largest", "min_size": 0, "tta": False, "min_confidence": 0.0,
           "confidence": "peak"}
    assert Postprocess.from_checkpoint({"postprocess": old}, cfg).volumetric is False


def test_stack_buffer_gathers_stacks_in_slice_order_whatever_the_arrival() -> None:
    buffer: StackBuffer[int, str] = StackBuffer([[3, 1, 2]])
    assert buffer.add(0, "a") == [[(0, "a")]]  # in no stack: at once
    assert buffer.add(2, "c") == [] and buffer.add(3, "d") == []
    assert buffer.add(1, "b") == [[(3, "d"), (1, "b"), (2, "c")]]
    buffer.add(2, "x")
    assert buffer.rest() == [[(2, "x")]] and buffer.rest() == []


def test_fast_stack_counts_equal_the_counts_of_the_masks() -> None:
    """The per-component counting of choose() gives exactly the counts of the masks each candidate makes."""
    from tumorseg.train.postprocess import stack_counts
    from tumorseg.train.validation import case_counts

    rng = np.random.default_rng(3)
    plains = [rng.random((12, 12)).astype(np.float32) ** 3 for _ in range(5)]
    mirrors = [rng.random((12, 12)).astype(np.float32) ** 3 for _ in range(5)]
    gts = [(rng.random((12, 12)) > 0.8).astype(np.uint8) for _ in range(5)]
    gts[2][:] = 0
    grid = [(tta, t, Postprocess(threshold=t, keep=keep, min_size=4 if keep == "min_size" else 0,
                                 min_confidence=conf, tta=tta, volumetric=True))
            for tta in (False, True) for t in (0.3, 0.6) for conf in (0.0, 0.9)
            for keep in ("all", "largest", "min_size")]
    group = [(i, (plains[i], mirrors[i], gts[i], None)) for i in range(5)]
    classes = Classes()
    fast = stack_counts(grid, group, classes)
    for c, (tta, _, post) in enumerate(grid):
        masks = post.stack_masks(mirrors if tta else plains)
        for j in range(5):
            assert np.array_equal(fast[j, c], case_counts(masks[j], gts[j], classes)), (c, j)
    assert len({tuple(fast[:, c].ravel()) for c in range(len(grid))}) > 4  # the candidates differ


# ----------------------------------------------------------------------------- end to end on real files


@pytest.fixture(scope="module")
def volumetric_run(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> dict[str, Path]:
    """NIfTI volumes in slice mode, a 2D model trained on them for a few steps, and a copy of its run whose
    checkpoint holds a volumetric choice at a threshold that leaves several components per volume."""
    import nibabel as nib

    from tumorseg import checkpoint, ingest, train
    from tumorseg.config import IngestConfig, TrackingConfig, TrainConfig
    from tumorseg.inference import Segmenter
    from tumorseg.predict.files import Item, load_item

    tmp = tmp_path_factory.mktemp("volumetric")
    rng = np.random.default_rng(1)
    (tmp / "img").mkdir()
    (tmp / "lab").mkdir()
    for v in range(8):
        vol = rng.normal(0, 0.5, (32, 32, 6)).astype(np.float32)
        lab = np.zeros((32, 32, 6), np.uint8)
        lab[8 + v:18 + v, 10:20, 1:5] = 1
        vol[lab == 1] += 1.5
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp / "img" / f"v{v}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp / "lab" / f"v{v}.nii.gz"))
    tracking = TrackingConfig(uri=mlflow_uri)
    res = ingest.run(IngestConfig(images_dir=tmp / "img", masks_dir=tmp / "lab", name="vol", out_dir=tmp / "dm",
                                  fractions=(0.5, 0.25, 0.25), seed=1, workers=1, tracking=tracking, slice_axis=2))
    cfg = TrainConfig.model_validate({
        "manifest": str(res.manifest_dir), "out": str(tmp / "runs"), "run_name": "vol", "plan": "off",
        "epochs": 2, "batch_size": 4, "image_size": [32, 32], "model": {"channels": [8, 16, 32], "num_res_units": 1},
        "val_overlays": 1, "val_window": 1, "postprocess": "auto", "tracking": {"uri": mlflow_uri},
    })
    out = train.run(cfg)
    # the same network with a volumetric choice, at a threshold that cuts its probabilities into many blobs
    run = tmp / "run_volumetric"
    shutil.copytree(out.run_dir, run)
    seg = Segmenter.from_checkpoint(run / "best.pt", device="cpu")
    planes = load_item(Item(0, tmp / "img" / "v7.nii.gz", Path("v7.nii.gz")), 2).planes
    probs = seg.predict_proba(planes)
    threshold = float(np.quantile(np.stack(probs), 0.9))
    ckpt = checkpoint.load(run / "best.pt")
    ckpt["postprocess"] = Postprocess(threshold=threshold, keep="largest", volumetric=True).to_dict()
    checkpoint.save(run / "best.pt", ckpt)
    return {"tmp": tmp, "manifest": res.manifest_dir, "trained": out.run_dir, "run": run}


def test_training_offers_volumetric_candidates_for_val_stacks(volumetric_run: dict[str, Path]) -> None:
    import json

    chosen = json.loads((volumetric_run["trained"] / "postprocess.json").read_text())
    volumetric = [k for k in chosen["candidates"] if k.endswith("volumetric=1")]
    assert volumetric and all("keep=all" not in k or "conf=0.0" not in k for k in volumetric)
    assert "volumetric" in chosen["chosen"]


def expected_masks(run: Path, planes: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The volumetric masks of a volume's planes under the run's stored choice, and the per-slice ones."""
    from dataclasses import replace

    from tumorseg.inference import Segmenter

    seg = Segmenter.from_checkpoint(run / "best.pt", device="cpu")
    probs = seg.predict_proba(planes)
    assert seg.post.volumetric
    return seg.stack_masks(probs), replace(seg.post, volumetric=False).stack_masks(probs)


def test_predict_applies_the_rule_over_a_volume_and_over_numbered_slice_files(
        volumetric_run: dict[str, Path]) -> None:
    import tifffile
    from PIL import Image

    from tumorseg import predict
    from tumorseg.config import PredictConfig
    from tumorseg.imageio import decode, read_bytes, slice_of
    from tumorseg.predict.files import Item, load_item

    tmp, run = volumetric_run["tmp"], volumetric_run["run"]
    volume = tmp / "img" / "v7.nii.gz"
    planes = load_item(Item(0, volume, Path(volume.name)), 2).planes
    want, per_slice = expected_masks(run, planes)
    from tumorseg.postprocessing import components

    assert components(np.stack(want))[1].size == 2  # one 3D component kept: the largest of the volume
    assert components(np.stack(per_slice))[1].size > 2  # slice by slice, each slice kept its own largest
    (tmp / "slices").mkdir()
    for z, plane in enumerate(planes):
        tifffile.imwrite(tmp / "slices" / f"v7_{z + 8}.tif", plane[0])  # 8..13: as text, 10 sorts before 8
    predict.run(PredictConfig(model=str(run), inputs=[volume], output_dir=tmp / "out_vol"))
    predict.run(PredictConfig(model=str(run), inputs=[tmp / "slices"], output_dir=tmp / "out_files"))
    vol_mask = decode(read_bytes(tmp / "out_vol" / "v7.nii.gz"), tmp / "out_vol" / "v7.nii.gz", "mask")
    for z, w in enumerate(want):
        assert np.array_equal(slice_of(vol_mask, z, 2)[0] > 0, w > 0)
        assert np.array_equal(np.asarray(Image.open(tmp / "out_files" / f"v7_{z + 8}.png")) > 0, w > 0)


def test_pyfunc_reads_a_batch_as_one_stack_for_a_volumetric_choice(volumetric_run: dict[str, Path]) -> None:
    from tumorseg.inference import Segmenter
    from tumorseg.mlflow_model import TumorsegPyfunc
    from tumorseg.predict.files import Item, load_item

    tmp, run = volumetric_run["tmp"], volumetric_run["run"]
    planes = load_item(Item(0, tmp / "img" / "v7.nii.gz", Path("v7.nii.gz")), 2).planes
    want, _ = expected_masks(run, planes)
    model = TumorsegPyfunc()
    model.segmenter = Segmenter.from_checkpoint(run / "best.pt", device="cpu")
    masks = model.predict(None, np.stack(planes))
    assert masks.shape == (len(planes), 32, 32)
    assert all(np.array_equal(m > 0, w > 0) for m, w in zip(masks, want, strict=True))


def test_evaluate_scores_the_volumetric_masks(volumetric_run: dict[str, Path]) -> None:
    from tumorseg import evaluate
    from tumorseg.config import EvaluateConfig
    from tumorseg.data import CaseReader
    from tumorseg.manifest import load_manifest
    from tumorseg.metrics import confusion

    tmp, run = volumetric_run["tmp"], volumetric_run["run"]
    res = evaluate.run(EvaluateConfig(model=str(run), manifest=volumetric_run["manifest"], split="test",
                                      out=tmp / "eval"))
    per_case = pd.read_csv(res.out_dir / "per_case.csv").set_index("case_id")
    info, df = load_manifest(volumetric_run["manifest"])
    test = df[df["split"] == "test"]
    reader = CaseReader(info, "m")
    checked = 0
    for _, rows in test.groupby("image"):
        rows = rows.sort_values("slice_index")
        cases = [reader.read(r) for r in rows.to_dict("records")]
        want, _ = expected_masks(run, [c.image for c in cases])
        for cid, case, w in zip(rows["case_id"], cases, want, strict=True):
            c = confusion(w, case.mask)
            assert (per_case.loc[cid, "tp"], per_case.loc[cid, "fp"], per_case.loc[cid, "fn"]) == (c.tp, c.fp, c.fn)
            checked += 1
    assert checked == len(per_case) > 0
