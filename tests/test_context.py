"""Slice context (2.5D): neighbour discovery, the context image, the plan rule, and the predict/pyfunc contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tumorseg.context import (
    SliceStacks,
    centre,
    consecutive_similarity,
    path_stacks,
    slice_number,
    stack_planes,
    window,
)


def frame(images: list[str], groups: list[str] | None = None, slices: list[int] | None = None) -> pd.DataFrame:
    return pd.DataFrame({"case_id": [f"c{i}" for i in range(len(images))], "image": images,
                         "group": groups or ["g"] * len(images), "slice_index": slices or [-1] * len(images)})


def runs_of(df: pd.DataFrame) -> list[list[str]]:
    """The stacks as image names, in slice order."""
    name = dict(zip(df["case_id"], df["image"], strict=True))
    return [[name[c] for c in run] for run in SliceStacks.from_frame(df).runs]


def test_slice_number_reads_a_trailing_number_only() -> None:
    assert slice_number("TCGA_CS_4941_19960909_12.tif") == ("TCGA_CS_4941_19960909_", 12)
    assert slice_number("p1/case3_slice007.png") == ("case3_slice", 7)
    assert slice_number("vol.nii.gz") is None
    assert slice_number("benign (12).png") is None  # BUSI: the number is not the name's end
    assert slice_number("mask.png") is None


def test_ordered_names_sort_by_number_not_by_text() -> None:
    names = [f"p/TCGA_{i}.tif" for i in (10, 2, 1, 9, 3, 8, 4, 7, 5, 6)]
    assert runs_of(frame(names)) == [[f"p/TCGA_{i}.tif" for i in range(1, 11)]]


def test_a_gap_in_the_numbers_ends_a_stack() -> None:
    names = [f"s_{i}.png" for i in (1, 2, 3, 5, 6, 9)]
    assert runs_of(frame(names)) == [["s_1.png", "s_2.png", "s_3.png"], ["s_5.png", "s_6.png"]]


def test_unordered_names_make_no_stacks() -> None:
    # no trailing numbers (BUSI), and one numbered file per prefix (hash-like names, as Kvasir's)
    assert runs_of(frame(["benign (1).png", "benign (2).png", "malignant (1).png"])) == []
    assert runs_of(frame(["cju0qkwl35piu0993l0dewei2.jpg", "cju0qoxqj9q6s0835b43399p4.jpg"])) == []


def test_stacks_stay_within_a_folder_group_and_extension_and_refuse_ambiguous_numbers() -> None:
    df = frame(["a/s_1.png", "a/s_2.png", "b/s_3.png", "a/s_3.tif", "a/x_1.png", "a/x_01.png", "a/x_2.png"],
               groups=["g", "g", "g", "g", "g", "g", "h"])
    # a/s_1, a/s_2 one stack; b/s_3 another folder; a/s_3.tif another extension; x_1/x_01 claim one number;
    # a/x_2 is another group
    assert runs_of(df) == [["a/s_1.png", "a/s_2.png"]]


def test_slices_of_a_volume_are_a_stack_per_image() -> None:
    df = frame(["v1.nii.gz"] * 4 + ["v2.nii.gz"] * 2, groups=["v1"] * 4 + ["v2"] * 2, slices=[3, 0, 2, 1, 0, 1])
    assert [[int(df.set_index("case_id").loc[c, "slice_index"]) for c in run]
            for run in SliceStacks.from_frame(df).runs] == [[0, 1, 2, 3], [0, 1]]


def test_windows_clamp_at_the_ends_of_a_stack() -> None:
    assert window(5, 0, 1) == [0, 0, 1]
    assert window(5, 2, 2) == [0, 1, 2, 3, 4]
    assert window(5, 4, 2) == [2, 3, 4, 4, 4]
    df = frame([f"s_{i}.png" for i in range(4)])
    nb = SliceStacks.from_frame(df).neighbours(1)
    assert nb["c0"] == ["c0", "c0", "c1"] and nb["c2"] == ["c1", "c2", "c3"] and nb["c3"] == ["c2", "c3", "c3"]


def test_stack_planes_concatenates_converted_neighbours() -> None:
    planes = [np.full((1, 2, 3), float(i), np.float32) for i in range(3)]
    out = stack_planes(planes, 1, 1)
    assert [o.shape for o in out] == [(3, 2, 3)] * 3
    assert [o[:, 0, 0].tolist() for o in out] == [[0, 0, 1], [0, 1, 2], [1, 2, 2]]
    rgb = stack_planes([np.stack([np.full((2, 2), c, np.float32) for c in (0, 3, 6)])] * 2, 1, 1)
    assert rgb[0].shape == (3, 2, 2) and np.all(rgb[0] == 3.0)  # RGB planes made grey first
    assert np.array_equal(centre(out[1], 1), planes[1])
    from tumorseg.errors import TumorsegError

    with pytest.raises(TumorsegError, match="differ in size"):
        stack_planes([np.zeros((1, 2, 2)), np.zeros((1, 3, 2))], 1, 1)


def test_adjacent_slices_of_a_volume_correlate_more_than_unrelated_ones() -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    stacks = []
    for _ in range(6):  # smooth anatomy drifting slowly along z, a different one per volume
        cy, cx = rng.uniform(12, 36, 2)
        stacks.append([np.exp(-((yy - cy - z) ** 2 + (xx - cx) ** 2) / 80.0)[None]
                       + rng.normal(0, 0.02, (1, 48, 48)) for z in range(3)])
    adjacent, unrelated = consecutive_similarity(stacks, np.random.default_rng(1))
    assert adjacent > 0.9 and adjacent - unrelated > 0.3
    noise = [[rng.normal(0, 1, (1, 48, 48)) for _ in range(3)] for _ in range(6)]  # numbered, not neighbours
    adjacent, unrelated = consecutive_similarity(noise, np.random.default_rng(1))
    assert abs(adjacent - unrelated) < 0.1


def test_the_plan_rule_offers_context_only_for_confirmed_stacks() -> None:
    from tumorseg.planning import stacks as stack_rules
    from tumorseg.planning.fingerprint import Fingerprint

    base = dict(manifest_name="m", manifest_digest="d", n_train=10, size_median=(64, 64), size_p10=(64, 64),
                size_p90=(64, 64), channels=1, grey_as_rgb=False, intensity=[], foreground_fraction=0.1,
                empty_share=0.5, tumour_pixels={}, tumour_diameter={}, sampled_images=10)
    flat = Fingerprint(**base)
    assert stack_rules.slice_context(flat)[0] == 0 and "0% of the train cases" in stack_rules.slice_context(flat)[1]
    numbered = Fingerprint(**base, slice_stacks={"stacks": 4, "share_in_stacks": 0.9, "median_length": 20,
                                                 "adjacent": 0.31, "unrelated": 0.30})
    k, why = stack_rules.slice_context(numbered)
    assert k == 0 and "not the anatomy's" in why
    stacks = Fingerprint(**base, slice_stacks={"stacks": 4, "share_in_stacks": 0.9, "median_length": 20,
                                               "adjacent": 0.95, "unrelated": 0.4})
    k, why = stack_rules.slice_context(stacks)
    assert k == stack_rules.CONTEXT_WHEN_ORDERED == 1 and "4 ordered stacks" in why and why.startswith("2.5D, 1 ")


# ----------------------------------------------------------------------------- end to end on real files


@pytest.fixture(scope="module")
def stack_run(tmp_path_factory: pytest.TempPathFactory, mlflow_uri: str) -> dict[str, Path]:
    """NIfTI volumes in slice mode and a 2.5D model (one slice a side) trained on them for a few steps."""
    import nibabel as nib

    from tumorseg import ingest, train
    from tumorseg.config import IngestConfig, TrackingConfig, TrainConfig

    tmp = tmp_path_factory.mktemp("context")
    rng = np.random.default_rng(0)
    (tmp / "img").mkdir()
    (tmp / "lab").mkdir()
    for v in range(8):
        vol = rng.normal(0, 0.3, (32, 32, 6)).astype(np.float32)
        lab = np.zeros((32, 32, 6), np.uint8)
        lab[8 + v:18 + v, 10:20, 1:5] = 1
        vol[lab == 1] += 2.0
        vol += np.arange(6, dtype=np.float32) * 0.1  # each slice its own level: the window's order shows
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp / "img" / f"v{v}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp / "lab" / f"v{v}.nii.gz"))
    tracking = TrackingConfig(uri=mlflow_uri)
    res = ingest.run(IngestConfig(images_dir=tmp / "img", masks_dir=tmp / "lab", name="stack", out_dir=tmp / "dm",
                                  fractions=(0.5, 0.25, 0.25), seed=1, workers=1, tracking=tracking, slice_axis=2))
    cfg = TrainConfig.model_validate({
        "manifest": str(res.manifest_dir), "out": str(tmp / "runs"), "run_name": "ctx", "plan": "off",
        "epochs": 2, "batch_size": 4, "image_size": [32, 32], "model": {"channels": [8, 16, 32], "num_res_units": 1},
        "val_overlays": 1, "val_window": 1, "slice_context": 1, "tracking": {"uri": mlflow_uri},
    })
    out = train.run(cfg)
    return {"tmp": tmp, "manifest": res.manifest_dir, "run": out.run_dir, "model_uri": Path(str(out.model_uri))}


def test_the_reader_gives_each_slice_its_neighbours(stack_run: dict[str, Path]) -> None:
    import nibabel as nib

    from tumorseg.data import CaseReader
    from tumorseg.data.reader import SliceContext
    from tumorseg.manifest import load_manifest

    info, df = load_manifest(stack_run["manifest"])
    reader = CaseReader(info, "m", context=SliceContext.of(df, 1, 1))
    plain = CaseReader(info, "m")
    vol = np.asarray(nib.load(str(stack_run["tmp"] / "img" / "v0.nii.gz")).dataobj, dtype=np.float32)
    rows = df[df["image"].str.endswith("v0.nii.gz")].set_index("slice_index")
    for z in (0, 3, 5):  # first, middle, last slice
        case = reader.read(rows.loc[z].to_dict() | {"slice_index": z})
        want = [plain.read(rows.loc[n].to_dict() | {"slice_index": n}).image for n in window(6, z, 1)]
        assert case.image.shape == (3, 32, 32)
        assert np.array_equal(case.image, np.concatenate(want))
        assert np.allclose(np.sort(case.image[1].ravel()), np.sort(vol[:, :, z].ravel()))


def test_a_context_model_records_its_channels_and_evaluates(stack_run: dict[str, Path]) -> None:
    from tumorseg import evaluate
    from tumorseg.checkpoint import load
    from tumorseg.config import EvaluateConfig

    ckpt = load(stack_run["run"] / "best.pt")
    assert int(ckpt["in_channels"]) == 3 and ckpt["config"]["slice_context"] == 1
    res = evaluate.run(EvaluateConfig(model=str(stack_run["run"]), manifest=stack_run["manifest"], split="test",
                                      out=stack_run["tmp"] / "eval"))
    from tumorseg.manifest import load_manifest

    per_case = pd.read_csv(res.out_dir / "per_case.csv")
    test = load_manifest(stack_run["manifest"])[1].query("split == 'test'")
    assert sorted(per_case["case_id"]) == sorted(test["case_id"]) and per_case["dice"].between(0, 1).all()


def test_predict_and_pyfunc_take_neighbours_from_the_volume_or_the_file_names(stack_run: dict[str, Path]) -> None:
    """One volume predicted three ways gives the same masks: as a NIfTI volume, as numbered TIFF slices in a
    folder (neighbours found by name), and as one ordered (N, 1, H, W) stack sent to the pyfunc model."""
    import mlflow
    import tifffile
    from PIL import Image

    from tumorseg import predict
    from tumorseg.config import PredictConfig
    from tumorseg.imageio import slice_of
    from tumorseg.predict.files import Item, load_item

    tmp = stack_run["tmp"]
    volume = tmp / "img" / "v7.nii.gz"
    planes = load_item(Item(0, volume, Path(volume.name)), 2).planes
    (tmp / "slices").mkdir()
    for z, plane in enumerate(planes):  # numbered 5..10: as text, slice10 sorts before slice5
        tifffile.imwrite(tmp / "slices" / f"v7_slice{z + 5}.tif", plane[0])
    run = str(stack_run["run"])
    predict.run(PredictConfig(model=run, inputs=[volume], output_dir=tmp / "out_vol"))
    predict.run(PredictConfig(model=run, inputs=[tmp / "slices"], output_dir=tmp / "out_files"))
    from tumorseg.imageio import decode, read_bytes

    vol_mask = decode(read_bytes(tmp / "out_vol" / "v7.nii.gz"), tmp / "out_vol" / "v7.nii.gz", "mask")
    by_volume = [slice_of(vol_mask, z, 2)[0] for z in range(len(planes))]
    by_files = [np.asarray(Image.open(tmp / "out_files" / f"v7_slice{z + 5}.png")) > 0 for z in range(len(planes))]
    assert sum(int(m.sum()) for m in by_volume) > 0
    for a, b in zip(by_volume, by_files, strict=True):
        assert np.array_equal(a > 0, b)
    model = mlflow.pyfunc.load_model(str(stack_run["model_uri"]))
    meta = model.metadata.metadata
    assert meta["tumorseg_slice_context"] == 1 and meta["tumorseg_in_channels"] == 1
    assert "ordered stack" in meta["tumorseg_input"]
    batch = np.stack(planes)  # (N, 1, H, W): the volume's slices in order
    masks = model.predict(batch)
    assert masks.shape == (len(planes), 32, 32)
    for a, b in zip(by_volume, masks, strict=True):
        assert np.array_equal(a > 0, b > 0)
    # the probabilities are the network's on each slice's window (previous, own, next; ends repeated) ...
    from tumorseg.inference import Segmenter

    seg = Segmenter.from_checkpoint(stack_run["run"] / "best.pt", device="cpu")
    probs = model.predict(batch, params={"probabilities": True})
    windows = [np.concatenate([planes[max(z - 1, 0)], planes[z], planes[min(z + 1, len(planes) - 1)]])
               for z in range(len(planes))]
    assert np.allclose(probs, np.stack(seg.predict_proba(windows)), atol=1e-6)
    # ... and not on the slice repeated: the neighbours reach the network
    repeated = np.stack(seg.predict_proba([np.concatenate([p, p, p]) for p in planes]))
    assert not np.allclose(probs, repeated, atol=1e-3)
    # a bare slice given to the 2.5D network is refused, not silently repeated
    from tumorseg.errors import TumorsegError

    with pytest.raises(TumorsegError, match="pass the slices of a stack through Segmenter.stack"):
        seg.predict_proba([planes[0]])


def test_context_without_stacks_is_one_line(tmp_path: Path) -> None:
    from tumorseg import ingest, train
    from tumorseg.config import IngestConfig, TrainConfig
    from tumorseg.errors import TumorsegError
    from tumorseg.imageio import write_mask_png, write_png

    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        (tmp_path / d).mkdir()
    for name in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"):  # no slice numbers
        mask = np.zeros((32, 32), np.uint8)
        mask[8:20, 8:20] = 1
        write_png(tmp_path / "images" / f"{name}.png", (rng.random((32, 32)) * 100 + 100 * mask).astype(np.uint8))
        write_mask_png(tmp_path / "masks" / f"{name}.png", mask)
    res = ingest.run(IngestConfig(images_dir=tmp_path / "images", masks_dir=tmp_path / "masks", name="flat",
                                  out_dir=tmp_path / "dm", workers=1))
    cfg = TrainConfig(manifest=res.manifest_dir, out=tmp_path / "runs", plan="off", epochs=1, slice_context=1)
    with pytest.raises(TumorsegError, match="slice_context=1 needs cases that are slices of ordered stacks"):
        train.run(cfg)


def test_path_stacks_find_numbered_inputs() -> None:
    paths = ["d/a_3.png", "d/a_1.png", "d/a_2.png", "d/b.png", "e/a_4.png"]
    assert path_stacks(paths) == [[1, 2, 0]]


def test_synthetic_volumes_are_ordered_stacks_and_numbered_2d_files_are_not(tmp_path: Path) -> None:
    """Rule 10 on real files: ``synth --dims 3`` volumes in slice mode are confirmed stacks; the 2D synthetic
    set (``patient_007_slice_2.png``: numbered, but each slice an independent image) is not."""
    import nibabel as nib

    from tumorseg import ingest, synth
    from tumorseg.config import IngestConfig
    from tumorseg.manifest import load_manifest, select_split
    from tumorseg.planning.fingerprint import compute
    from tumorseg.planning.stacks import slice_context

    res = synth.run(tmp_path / "vol", n=8, size=24, seed=1, classes=2, dims=3)
    assert res.n == 8 and sorted(p.name for p in res.images_dir.iterdir())[0] == "case_000.nii.gz"
    first = tmp_path / "vol" / "images" / "case_000.nii.gz"
    img, lab = nib.load(str(first)), nib.load(str(tmp_path / "vol" / "masks" / "case_000.nii.gz"))
    assert img.shape == lab.shape == (24, 24, 24) and img.get_data_dtype() == np.int16
    labels = np.asarray(lab.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2}
    data = np.asarray(img.dataobj, dtype=np.float32)
    if (labels == 2).any() and (labels == 1).any():  # the brighter class is the higher label
        assert data[labels == 2].mean() > data[labels == 1].mean() > data[labels == 0].mean()
    before = first.read_bytes()
    synth.run(tmp_path / "vol", n=8, size=24, seed=1, classes=2, dims=3)
    assert first.read_bytes() == before  # the same seed, the same bytes

    man = ingest.run(IngestConfig(images_dir=res.images_dir, masks_dir=res.masks_dir, name="vol",
                                  out_dir=tmp_path / "dm", labels={0: "background", 1: "class_1", 2: "class_2"},
                                  slice_axis=2, fractions=(0.5, 0.25, 0.25), seed=0, workers=1))
    info, df = load_manifest(man.manifest_dir)
    fp = compute(info, select_split(df, "train", "m"), "m")
    assert fp.slice_stacks["share_in_stacks"] == 1.0 and fp.slice_stacks["median_length"] == 24
    assert fp.slice_stacks["adjacent"] - fp.slice_stacks["unrelated"] > 0.2
    assert "offered" in slice_context(fp)[1] or slice_context(fp)[0] > 0

    flat = synth.run(tmp_path / "flat", n=24, size=32, seed=0)
    man2 = ingest.run(IngestConfig(images_dir=flat.images_dir, masks_dir=flat.masks_dir, name="flat",
                                   out_dir=tmp_path / "dm", group_pattern=synth.GROUP_PATTERN, seed=3, workers=1))
    info2, df2 = load_manifest(man2.manifest_dir)
    fp2 = compute(info2, select_split(df2, "train", "m"), "m")
    assert fp2.slice_stacks["share_in_stacks"] > 0.5  # numbered 0..3 within each patient
    k, why = slice_context(fp2)
    assert k == 0 and "not the anatomy's" in why


def test_synth_dims_is_checked(tmp_path: Path) -> None:
    from tumorseg import synth
    from tumorseg.errors import TumorsegError

    with pytest.raises(TumorsegError, match="--dims 4: give 2"):
        synth.run(tmp_path, n=1, size=16, dims=4)


def test_ingest_warns_when_numbered_slices_are_each_their_own_group(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Numbered slices of several stacks, each its own group (the default): one warning naming the fix."""
    import logging

    from tumorseg import ingest
    from tumorseg.config import IngestConfig
    from tumorseg.imageio import write_mask_png, write_png

    tmp = tmp_path
    (tmp / "img").mkdir()
    (tmp / "lab").mkdir()
    rng = np.random.default_rng(0)
    for patient in ("pa", "pb"):
        for z in range(1, 5):
            write_png(tmp / "img" / f"{patient}_{z}.png", rng.integers(0, 255, (16, 16), dtype=np.uint8))
            mask = np.zeros((16, 16), np.uint8)
            mask[4:8, 4:8] = 1
            write_mask_png(tmp / "lab" / f"{patient}_{z}.png", mask)
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
        ingest.run(IngestConfig(images_dir=tmp / "img", masks_dir=tmp / "lab", name="a", out_dir=tmp / "dm",
                                workers=1))
    warned = [r.getMessage() for r in caplog.records if "numbered slices" in r.getMessage()]
    assert len(warned) == 1 and "8 of 8 images are numbered slices of 2 stacks" in warned[0]
    assert "--group-by folder" in warned[0] and "--group-pattern" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
        ingest.run(IngestConfig(images_dir=tmp / "img", masks_dir=tmp / "lab", name="b", out_dir=tmp / "dm",
                                workers=1, group_pattern=r"(p[ab])_"))
    assert not [r for r in caplog.records if "numbered slices" in r.getMessage()]


def write_stacks(root: Path, patients: int, slices: int, *, anatomy: bool, start: int = 1,
                 skip: int | None = None) -> None:
    """``root/P/P_<z>.png`` + ``_mask.png``: a folder per patient, one numbered PNG per slice.

    ``anatomy``: smooth structures drifting slowly from slice to slice (a volume's slices), else unrelated noise.
    ``skip``: a slice number left out of every stack (a gap).
    """
    from tumorseg.imageio import write_mask_png, write_png

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for p in range(patients):
        folder = root / f"pat{p:02d}"
        folder.mkdir(parents=True)
        cy, cx = rng.uniform(8, 24, 2)
        for z in range(start, start + slices):
            if z == skip:
                continue
            if anatomy:
                blob = np.exp(-((yy - cy - 0.5 * z) ** 2 + (xx - cx) ** 2) / 40.0)
                img = np.clip(255 * blob + rng.normal(0, 4, (32, 32)), 0, 255).astype(np.uint8)
            else:
                img = rng.integers(0, 255, (32, 32), dtype=np.uint8)
            write_png(folder / f"pat{p:02d}_{z}.png", img)
            mask = np.zeros((32, 32), np.uint8)
            mask[12:18, 12:18] = 1 if z % 2 else 0
            write_mask_png(folder / f"pat{p:02d}_{z}_mask.png", mask)


def _ingest(root: Path, out: Path, name: str, **kw: object) -> pd.DataFrame:
    from tumorseg import ingest
    from tumorseg.config import IngestConfig

    ingest.run(IngestConfig(images_dir=root, name=name, out_dir=out, recursive=True, workers=1, **kw))  # type: ignore[arg-type]
    return pd.read_csv(out / name / "manifest.csv", dtype={"group": str})


def test_ingest_makes_each_confirmed_stack_of_numbered_slices_one_group(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """--group-by auto (the default): a volume's numbered slices are one group; the split never cuts a stack."""
    import logging

    write_stacks(tmp_path / "data", patients=12, slices=6, anatomy=True)
    with caplog.at_level(logging.INFO, logger="tumorseg.ingest.stage"):
        df = _ingest(tmp_path / "data", tmp_path / "dm", "auto")
    assert df["group"].nunique() == 12 and (df.groupby("group")["split"].nunique() == 1).all()
    assert set(df["group"]) == {f"pat{p:02d}/pat{p:02d}_1-6" for p in range(12)}
    assert df.loc[df["case_id"] == "pat03/pat03_4", "group"].item() == "pat03/pat03_1-6"
    said = [r.getMessage() for r in caplog.records if "each stack is one group" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("72 of 72 images are numbered slices of 12 stacks")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "numbered" in r.getMessage()]
    # the manifest's groups give the plan its stacks and the val unit its patients (rules 9 and 10)
    assert [len(run) for run in SliceStacks.from_frame(df).runs] == [6] * 12
    # asked for per-case groups: kept, with the warning naming the fix
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tumorseg.ingest.stage"):
        df = _ingest(tmp_path / "data", tmp_path / "dm", "case", group_by="case")
    assert df["group"].nunique() == 72
    assert any("--group-by case" in r.getMessage() for r in caplog.records)


def test_stacks_stay_per_case_groups_unless_confirmed_and_numerous(tmp_path: Path) -> None:
    """Numbered files that are not neighbours, and too few stacks, keep per-case groups; a gap is bridged."""
    write_stacks(tmp_path / "noise", patients=12, slices=6, anatomy=False)
    assert _ingest(tmp_path / "noise", tmp_path / "dm", "noise")["group"].nunique() == 72
    write_stacks(tmp_path / "few", patients=9, slices=6, anatomy=True)  # under MIN_STACKS: 9 groups, no split
    assert _ingest(tmp_path / "few", tmp_path / "dm", "few")["group"].nunique() == 54
    write_stacks(tmp_path / "gap", patients=12, slices=8, anatomy=True, skip=4)  # 1-3 and 5-8
    df = _ingest(tmp_path / "gap", tmp_path / "dm", "gap")
    # a missing slice does not cut a patient in two (the slices either side are still neighbours) ...
    assert df["group"].nunique() == 12 and (df.groupby("group")["split"].nunique() == 1).all()
    assert set(df.loc[df["case_id"].str.startswith("pat00/"), "group"]) == {"pat00/pat00_1-8"}
    # ... but slice context stops at the gap
    assert sorted({len(run) for run in SliceStacks.from_frame(df).runs}) == [3, 4]
    # the same images again: the same manifest, byte for byte
    _ingest(tmp_path / "gap", tmp_path / "dm2", "gap")
    assert (tmp_path / "dm" / "gap" / "manifest.csv").read_bytes() == \
        (tmp_path / "dm2" / "gap" / "manifest.csv").read_bytes()


def write_numbered_on(folder: Path, offset: int, alike: bool) -> None:
    """12 volumes of 8 slices as ``folder/slice_<offset * p + z>.png`` (+ masks); volume 5 misses slice 4.

    ``alike``: one structure drifting on from volume to volume (each volume's first slice looks like a neighbour of
    the last one's last), else each volume's far from the last one's.
    """
    from tumorseg.imageio import write_mask_png, write_png

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    folder.mkdir(parents=True)
    for p in range(12):
        cy, cx = rng.uniform(8, 20), 8 + 16 * (p % 2)
        for z in range(8):
            if p == 5 and z == 4:
                continue
            centre = (16.0, 4 + 2 * p + 0.25 * z) if alike else (cy + 0.5 * z, cx)
            blob = np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 40.0)
            write_png(folder / f"slice_{offset * p + z}.png",
                      np.clip(255 * blob + rng.normal(0, 4, (32, 32)), 0, 255).astype(np.uint8))
            mask = np.zeros((32, 32), np.uint8)
            mask[12:18, 12:18] = z % 2
            write_mask_png(folder / f"slice_{offset * p + z}_mask.png", mask)


def test_volumes_numbered_on_in_one_folder_are_one_group_each(tmp_path: Path) -> None:
    """One folder and prefix, each volume numbered from its own offset. A missing slice within a volume is
    bridged; the gap between two volumes is not: unrelated edge slices across a short gap, or a gap longer than
    the runs either side however alike the edges look."""
    for offset, alike in ((10, False), (100, True)):
        write_numbered_on(tmp_path / f"flat{offset}", offset, alike)
        df = _ingest(tmp_path / f"flat{offset}", tmp_path / "dm", f"flat{offset}")
        assert set(df["group"]) == {f"slice_{offset * p}-{offset * p + 7}" for p in range(12)}
        assert (df.groupby("group")["split"].nunique() == 1).all()


def test_a_layout_every_slice_shares_is_not_similarity() -> None:
    """Brain-like slices: a head centred in every image. Neighbours are told apart by what is their own."""
    from tumorseg.context import ADJACENT_MARGIN

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:48]
    head = 200 * np.exp(-((yy - 24) ** 2 + (xx - 24) ** 2) / 250.0)

    def blob(cy: float, cx: float) -> np.ndarray:
        return 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 12.0)

    volumes = []
    for _ in range(8):  # each patient's own structure, drifting slowly from slice to slice
        cy, cx = rng.uniform(12, 36, 2)
        volumes.append([(head + blob(cy + 0.5 * z, cx) + rng.normal(0, 2, (48, 48)))[None] for z in range(3)])
    adjacent, unrelated = consecutive_similarity(volumes, np.random.default_rng(1))
    assert adjacent - unrelated >= ADJACENT_MARGIN
    # the same layout, but each numbered image its own: not neighbours
    shuffled = [[(head + blob(*rng.uniform(12, 36, 2)) + rng.normal(0, 2, (48, 48)))[None] for _ in range(3)]
                for _ in range(8)]
    adjacent, unrelated = consecutive_similarity(shuffled, np.random.default_rng(1))
    assert adjacent - unrelated < ADJACENT_MARGIN
