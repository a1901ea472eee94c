"""The component-confidence rule of post-processing: exact on hand-made maps, chosen on val, stored with the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tumorseg.config import LossConfig, ModelConfig, TrainConfig
from tumorseg.inference import Postprocess, component_confidence, component_means, component_peaks, components
from tumorseg.train.postprocess import pick


def three_blobs() -> np.ndarray:
    prob = np.zeros((20, 20), np.float32)
    prob[1:5, 1:5] = 0.95  # A: 16 px, sure
    prob[10:13, 10:13] = 0.65  # B: 9 px, doubtful
    prob[17, 17] = 0.55  # C: 1 px, doubtful
    return prob


def test_component_means_are_exact() -> None:
    prob = three_blobs()
    labels, sizes = components(prob > 0.5)
    assert sizes.tolist() == [374, 16, 9, 1]
    np.testing.assert_allclose(component_means(labels, sizes, prob), [0.0, 0.95, 0.65, 0.55], atol=1e-6)


def rimmed_blob() -> np.ndarray:
    """One 6x6 component: a sure 2x2 core (0.95) in a doubtful rim (0.55); mean 0.6167, peak 0.95."""
    prob = np.zeros((10, 10), np.float32)
    prob[2:8, 2:8] = 0.55
    prob[4:6, 4:6] = 0.95
    return prob


def test_component_peaks_are_exact() -> None:
    prob = three_blobs()
    prob[2, 2] = 0.99
    labels, sizes = components(prob > 0.5)
    np.testing.assert_allclose(component_peaks(labels, sizes, prob), [0.0, 0.99, 0.65, 0.55], atol=1e-6)
    rim_labels, rim_sizes = components(rimmed_blob() > 0.5)
    np.testing.assert_allclose(component_confidence(rim_labels, rim_sizes, rimmed_blob(), "mean"),
                               [0.0, (32 * 0.55 + 4 * 0.95) / 36], atol=1e-6)
    np.testing.assert_allclose(component_confidence(rim_labels, rim_sizes, rimmed_blob(), "peak"), [0.0, 0.95],
                               atol=1e-6)


def test_the_peak_keeps_a_sure_core_with_its_doubtful_rim() -> None:
    """Hysteresis: the boundary stays at the threshold, the component lives by its most likely pixel."""
    assert int(Postprocess(min_confidence=0.9).mask(rimmed_blob()).sum()) == 36
    assert int(Postprocess(min_confidence=0.96).mask(rimmed_blob()).sum()) == 0
    assert int(Postprocess(min_confidence=0.7, confidence="mean").mask(rimmed_blob()).sum()) == 0


@pytest.mark.parametrize(("post", "pixels"), [
    (Postprocess(), 26),
    (Postprocess(min_confidence=0.6), 25),  # C goes
    (Postprocess(min_confidence=0.7), 16),  # B and C go, A keeps its boundary
    (Postprocess(min_confidence=0.99), 0),
    (Postprocess(min_confidence=0.6, keep="min_size", min_size=10), 16),
    (Postprocess(min_confidence=0.96, keep="largest"), 0),  # the largest of nothing left is nothing
    (Postprocess(keep="largest"), 16),
])
def test_doubtful_components_are_dropped_whole(post: Postprocess, pixels: int) -> None:
    assert int(post.mask(three_blobs()).sum()) == pixels


def test_pick_prefers_the_confidence_rule_only_when_val_rises() -> None:
    base = Postprocess()
    sure = Postprocess(min_confidence=0.8)
    assert pick([(sure, 0.75)], base, 0.70) == (sure, 0.75)
    assert pick([(sure, 0.701)], base, 0.70) == (base, 0.70)  # within MIN_GAIN: the plain prediction


def test_the_confidence_rule_travels_with_the_checkpoint(tmp_path: Path) -> None:
    import torch

    from tumorseg import checkpoint
    from tumorseg.inference import Segmenter
    from tumorseg.model import build_model

    torch.manual_seed(0)
    model = ModelConfig(channels=[8, 16, 32], num_res_units=1)
    cfg = TrainConfig(image_size=(32, 32), model=model, plan="off", loss=LossConfig())
    payload = checkpoint.build_payload(build_model(model, 1), cfg, 1)
    chosen = Postprocess(threshold=0.4, keep="min_size", min_size=3, min_confidence=0.8)
    payload["postprocess"] = chosen.to_dict()
    checkpoint.save(tmp_path / "best.pt", payload)
    seg = Segmenter.from_checkpoint(tmp_path / "best.pt", "cpu")
    assert seg.post == chosen and seg.mask(three_blobs()).sum() == 16
    assert seg.post.confidence == "peak" and seg.post.to_dict()["confidence"] == "peak"
    before = dict(payload, postprocess={k: v for k, v in chosen.to_dict().items()
                                        if k not in ("min_confidence", "confidence")})
    checkpoint.save(tmp_path / "old.pt", before)  # chosen before the rule existed: nothing dropped for doubt
    assert Segmenter.from_checkpoint(tmp_path / "old.pt", "cpu").post.min_confidence == 0.0
    mean_rule = dict(payload, postprocess={k: v for k, v in chosen.to_dict().items() if k != "confidence"})
    checkpoint.save(tmp_path / "mean.pt", mean_rule)  # chosen while the rule measured the mean: it still does
    old = Segmenter.from_checkpoint(tmp_path / "mean.pt", "cpu")
    assert old.post.confidence == "mean" and old.post.min_confidence == 0.8
    assert int(old.mask(rimmed_blob()).sum()) == 0 and int(seg.mask(rimmed_blob()).sum()) == 36
