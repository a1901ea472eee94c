"""Orientation-aware mirroring: the fingerprint measures it, the plan keeps it, training and TTA follow it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ingest_synth
from test_plan import fake_probe, fingerprint

from tumorseg.augment import augment_batch
from tumorseg.config import AugmentConfig
from tumorseg.imageio import write_png
from tumorseg.inference import network_logits
from tumorseg.planning import rules
from tumorseg.planning.fingerprint import compute, orientation


def probe_side_up(n: int, shape: tuple[int, int] = (48, 64), seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Ultrasound-like images: bright near the probe (top), darker with depth, a dark blob anywhere."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(1.0, 0.25, shape[0])[:, None] * np.ones(shape)
    out = []
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for _ in range(n):
        cy, cx, r = rng.integers(12, shape[0] - 12), rng.integers(12, shape[1] - 12), rng.integers(5, 10)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image = 200 * depth + rng.normal(0, 25, shape)
        image[blob] *= 0.3
        out.append((np.clip(image, 0, 255).astype(np.uint8), blob.astype(np.uint8) * 255))
    return out


def test_orientation_is_near_one_for_shared_orientation_and_low_for_random() -> None:
    cases = probe_side_up(40)
    shared = orientation([im[None] for im, _ in cases])
    assert shared["vertical"] >= 0.95 > rules.ORIENTED > shared["horizontal"]
    rng = np.random.default_rng(1)
    turned = [np.flip(im, axis=int(rng.integers(0, 2))) if rng.random() < 0.5 else im for im, _ in cases]
    shuffled = orientation([im[None] for im in turned])
    assert shuffled["vertical"] < rules.ORIENTED and shuffled["horizontal"] < rules.ORIENTED
    assert orientation([im[None] for im, _ in cases[:5]]) == {}  # too few images to say


def test_fingerprint_of_real_files_holds_the_orientation_and_the_plan_keeps_it(tmp_path: Path) -> None:
    from tumorseg.manifest import load_manifest, select_split

    for i, (image, mask) in enumerate(probe_side_up(40)):
        write_png(tmp_path / "images" / f"patient_{i:03d}_slice_0.png", image)
        write_png(tmp_path / "masks" / f"patient_{i:03d}_slice_0.png", mask)
    mdir = ingest_synth(tmp_path / "images", tmp_path / "masks", tmp_path / "manifests", "probe")
    info, df = load_manifest(mdir)
    fp = compute(info, select_split(df, "train", str(mdir)), str(mdir))
    assert fp.orientation["vertical"] >= rules.ORIENTED > fp.orientation["horizontal"]
    out = rules.choose(fp, 600.0, 10, fake_probe(5e6), "cpu")
    assert out["train"]["augment"]["flip_axes"] == ["horizontal"]
    assert "up-down orientation" in out["reasons"]["flip_axes"]


def test_without_a_measured_orientation_both_axes_are_flipped() -> None:
    out = rules.choose(fingerprint((64, 64), 20.0), 600.0, 100, fake_probe(5e6), "cpu")
    assert out["train"]["augment"]["flip_axes"] == ["vertical", "horizontal"] and "flip_axes" not in out["reasons"]
    fp = fingerprint((64, 64), 20.0).model_copy(update={"orientation": {"vertical": 0.95, "horizontal": 0.97}})
    out = rules.choose(fp, 600.0, 100, fake_probe(5e6), "cpu")
    assert out["train"]["augment"]["flip_axes"] == [] and out["reasons"]["flip_axes"].startswith("no flips")


@pytest.mark.parametrize("axes", [("horizontal",), ("vertical",), ()])
def test_training_flips_only_along_the_free_axes(axes: tuple[str, ...]) -> None:
    cfg = AugmentConfig(flip_axes=axes, affine=False, intensity=False, prob=0.5)  # type: ignore[arg-type]
    image = torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16).repeat(64, 1, 1, 1)
    mask = (image > 100).to(torch.uint8)
    out, out_mask = augment_batch(image, mask, cfg, torch.Generator().manual_seed(0))
    allowed = [image[0]] + [image[0].flip(d - 1) for d in cfg.flip_dims]  # square, yet no 90-degree turns
    seen = [next(k for k, a in enumerate(allowed) if torch.equal(o, a)) for o in out]  # StopIteration: a stray flip
    assert sorted(set(seen)) == list(range(len(allowed)))  # and every allowed one happens
    assert torch.equal(out_mask, (out > 100).to(torch.uint8))


def test_default_augmentation_is_unchanged_by_the_axes_option() -> None:
    """Both axes free (the default, and every config written before the option) draw the same stream as before."""
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(8, 1, 16, 16, generator=gen)
    a, _ = augment_batch(image, image > 0.5, AugmentConfig(), torch.Generator().manual_seed(1))
    b, _ = augment_batch(image, image > 0.5, AugmentConfig(flip_axes=("vertical", "horizontal")),
                         torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert AugmentConfig().flip_dims == (2, 3)


def test_mirroring_tta_averages_over_exactly_the_free_axes() -> None:
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False).eval()  # not mirror-symmetric: a random kernel
    x = torch.rand(2, 1, 12, 10)
    with torch.no_grad():
        plain = net(x)
        h = net(x.flip(3)).flip(3)
        v = net(x.flip(2)).flip(2)
        hv = net(x.flip(2, 3)).flip(2, 3)
        assert torch.allclose(network_logits(net, x, tta=True, mirror=(3,)), (plain + h) / 2, atol=1e-6)
        assert torch.allclose(network_logits(net, x, tta=True, mirror=(2,)), (plain + v) / 2, atol=1e-6)
        assert torch.allclose(network_logits(net, x, tta=True), (plain + h + v + hv) / 4, atol=1e-6)
        assert torch.equal(network_logits(net, x, tta=True, mirror=()), plain)
        assert not torch.allclose((plain + h) / 2, (plain + h + v + hv) / 4, atol=1e-4)


def test_the_segmenter_mirrors_along_the_axes_its_training_config_names() -> None:
    """predict/evaluate/pyfunc: TTA of a model trained with horizontal flips only averages two views, not four."""
    from tumorseg.config import TrainConfig
    from tumorseg.inference import Segmenter

    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    image = np.random.default_rng(0).integers(0, 255, (1, 16, 16)).astype(np.float32)

    def logit(p: np.ndarray) -> np.ndarray:
        p = p.astype(np.float64)
        return np.log(p / (1 - p))

    for axes, dims in ((("horizontal",), [(2,)]), (("vertical", "horizontal"), [(2,), (1,), (1, 2)])):
        cfg = TrainConfig(image_size=(16, 16), amp=False, augment=AugmentConfig(flip_axes=axes))  # type: ignore[arg-type]
        seg = Segmenter(net, cfg, 1, torch.device("cpu"))
        views = [logit(seg.predict_proba([image], tta=False)[0])]
        for d in dims:
            flipped = np.ascontiguousarray(np.flip(image, d))
            views.append(np.flip(logit(seg.predict_proba([flipped], tta=False)[0]), tuple(a - 1 for a in d)))
        tta = logit(seg.predict_proba([image], tta=True)[0])
        np.testing.assert_allclose(tta, np.mean(views, axis=0), atol=2e-4)


# ----------------------------------------------------------------------------- classes in one order (rule 8, V8)


def two_part_masks(n: int, ordered: bool, shape: tuple[int, ...] = (32, 32), seed: int = 0) -> list[np.ndarray]:
    """Label maps of a blob cut in two along axis 0: class 1 before class 2 (``ordered``), or either way round."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = np.zeros(shape, np.uint8)
        centre = rng.integers(10, 22, len(shape))
        box = tuple(slice(c - 6, c + 6) for c in centre)
        mask[box] = 1
        second = (slice(centre[0], centre[0] + 6),) + box[1:]
        first = (slice(centre[0] - 6, centre[0]),) + box[1:]
        mask[second if ordered or rng.random() < 0.5 else first] = 2
        out.append(mask)
    return out


def test_label_order_is_one_along_the_axis_the_classes_keep_and_about_half_elsewhere() -> None:
    from tumorseg.planning.fingerprint import label_order

    ordered = label_order(two_part_masks(12, ordered=True))
    assert ordered["vertical"] == 1.0
    assert ordered["horizontal"] == 0.0  # the halves share their centre across: no side at all
    either = label_order(two_part_masks(40, ordered=False))
    assert 0.3 < either["vertical"] < rules.ORIENTED
    assert label_order(two_part_masks(7, ordered=True)) == {}  # too few cases holding both to say
    assert label_order([(m > 0).astype(np.uint8) for m in two_part_masks(12, ordered=True)]) == {}  # binary
    volumes = label_order(two_part_masks(9, ordered=True, shape=(32, 32, 32)))
    assert volumes == {"vertical": 1.0, "horizontal": 0.0, "depth": 0.0}


def test_the_plans_do_not_mirror_along_an_axis_whose_classes_keep_one_order() -> None:
    from test_volumes import fingerprint as volume_fingerprint

    from tumorseg.planning import volumes
    from tumorseg.planning.probe import Throughput

    fp = fingerprint((64, 64), 20.0).model_copy(update={"label_order": {"vertical": 0.95, "horizontal": 0.6}})
    out = rules.choose(fp, 600.0, 100, fake_probe(5e6), "cpu")
    assert out["train"]["augment"]["flip_axes"] == ["horizontal"]
    assert "one order along the vertical axis in 95%" in out["reasons"]["flip_axes"]

    def probe(model: object, size: tuple[int, ...], batch: int) -> Throughput:
        return Throughput(10.0, 120.0)

    vol = volume_fingerprint((1.0, 1.0, 1.0), (36, 50, 33))
    assert volumes.choose(vol, 1800, 8, probe, "cpu")["train"]["augment"]["flip_axes"] == [  # type: ignore[arg-type]
        "vertical", "horizontal", "depth"]
    headed = vol.model_copy(update={"label_order": {"vertical": 0.5, "horizontal": 1.0, "depth": 0.92}})  # type: ignore[attr-defined]
    plan = volumes.choose(headed, 1800, 8, probe, "cpu")  # type: ignore[arg-type]
    assert plan["train"]["augment"]["flip_axes"] == ["vertical"]
    assert "not where the classes lie in one order along the horizontal (RAS y, back-front) axis in 100%" in \
        plan["reasons"]["flip_axes"]
    assert plan["reasons"]["flip_axes"].startswith("the vertical axis of")


def test_a_volume_set_stored_in_two_orientations_shows_its_order_in_the_canonical_one(tmp_path: Path) -> None:
    """Half the files are stored LPS (x to the left): read canonically (RAS+), class 1 lies left of class 2 in all."""
    import nibabel as nib
    from test_volumes import ingest

    from tumorseg.imageio.nifti import write_nifti
    from tumorseg.manifest import load_manifest, select_split

    ras, lps = np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([-1.0, -1.0, 1.0, 1.0])
    for i, label in enumerate(two_part_masks(16, ordered=True, shape=(32, 32, 20), seed=3)):
        affine = lps if i % 2 else ras
        stored = nib.orientations.apply_orientation(label, nib.orientations.io_orientation(affine))  # RAS -> stored
        image = (100.0 + 300.0 * (stored > 0) + np.random.default_rng(i).normal(0, 20, stored.shape)).astype(np.int16)
        write_nifti(tmp_path / "images" / f"case_{i:03d}.nii.gz", image, affine)
        write_nifti(tmp_path / "labels" / f"case_{i:03d}.nii.gz", stored, affine)
    mdir = ingest(tmp_path / "images", tmp_path / "labels", tmp_path / "manifests",
                  labels={0: "background", 1: "head", 2: "tail"})
    info, df = load_manifest(mdir)
    fp = compute(info, select_split(df, "train", str(mdir)), str(mdir))
    assert fp.label_order["vertical"] == 1.0 and fp.label_order["depth"] == 0.0
