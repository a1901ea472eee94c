"""The dataset fingerprint: what planning needs to know about the train split, in seconds.

Sizes, channels, tumour sizes and the share of tumour-free cases come from the manifest's
columns (no decoding). Intensity percentiles, whether colour images are grey stored as RGB,
and whether the images share an orientation come from a seeded sample of decoded train
images read through the one case reader.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from tumorseg.manifest import ManifestInfo

if TYPE_CHECKING:
    import pandas as pd

    from tumorseg.data import Case


class Fingerprint(BaseModel):
    """``fingerprint.json``: the train split in numbers.

    Attributes:
        manifest_name: the manifest.
        manifest_digest: its digest.
        n_train: train cases.
        size_median: median ``(height, width)`` in pixels.
        size_p10: 10th percentile of height and of width.
        size_p90: 90th percentile of height and of width.
        channels: stored channels (the most channels any case has).
        grey_as_rgb: every sampled colour image has three equal channels.
        intensity: per channel ``p0_5``, ``p50``, ``p99_5``, ``mean``, ``std`` of the sampled images.
        foreground_fraction: mean tumour pixel fraction over the train cases.
        empty_share: share of train cases without tumour.
        tumour_pixels: over the cases with tumour: ``median``, ``p5``, ``p1`` tumour area in pixels.
        tumour_diameter: the same as equivalent circle diameters in pixels.
        class_diameter: label maps only (``--labels``): per class, ``median`` and ``p5`` of its equivalent
            diameter (circle, or sphere for volumes) over the cases that hold it; the plan's resolution floor keeps
            the smallest class visible (:func:`smallest_structure`). Empty for binary masks.
        sampled_images: images decoded for the intensity statistics.
        orientation: per axis (``vertical``, ``horizontal``), the share of the sampled images whose mirror
            asymmetry along it agrees with the other sampled images' (:func:`orientation`): about 0.5 when
            the images have no preferred orientation, near 1 when they share one (ultrasound: the probe at
            the top). Empty in fingerprints from before it was measured.
        label_order: label maps with two or more foreground classes: per axis (``vertical``, ``horizontal``,
            ``depth``), the share of the sampled cases whose classes lie apart along it in the same order
            (:func:`label_order`): near 1 where the labels name positions (a head and a tail, a left and a right
            organ), low for nested or interleaved classes. Empty for binary masks, too few cases holding two
            classes, or fingerprints from before it was measured.
        slice_stacks: ordered slice stacks among the train cases (:mod:`tumorseg.context`): ``stacks`` (of
            three or more), ``share_in_stacks``, ``median_length``, and the median correlation of ``adjacent``
            slices against that of ``unrelated`` ones (slices of other stacks, or far apart), which confirms
            that the order is the anatomy's. Empty when no case is in a stack.
        natural: every train image is a 2D 8-bit file (PNG, TIFF; not a NIfTI volume or slice) of one or
            three channels: photographs and ultrasound look like the images an ImageNet encoder learnt from.
            False in fingerprints from before it was measured.
        dims: 3 when the cases are whole volumes (``manifest.json`` ``dims: 3``); the fields below are theirs.
        shape_median: median volume size in voxels, per canonical (RAS+) axis; ``size_median`` holds its first two.
        spacing_median: median voxel size (mm) per canonical axis; ``spacing_p10``/``spacing_p90``: percentiles.
        nonzero_share: the median share of a sampled volume's voxels inside its nonzero box (nnU-Net's
            ``median_relative_size_after_cropping``; 1.0 without zero borders; :mod:`tumorseg.cropping`).
        shape_median_cropped: the sampled volumes' median nonzero box per axis, in mm, over ``spacing_median``:
            the voxels the median cropped volume spans at the median spacing.
        extent_p95: the 95th percentile per canonical axis of the train volumes' extent in mm (shape times
            spacing); ``extent_p95_cropped``: the same of the sampled volumes' nonzero boxes. The 3D plan's grid
            holds a volume of that extent whole (:mod:`tumorseg.placement`).
    """

    model_config = ConfigDict(extra="forbid")

    manifest_name: str
    manifest_digest: str
    n_train: int
    size_median: tuple[int, int]
    size_p10: tuple[int, int]
    size_p90: tuple[int, int]
    channels: int
    grey_as_rgb: bool
    intensity: list[dict[str, float]]
    foreground_fraction: float
    empty_share: float
    tumour_pixels: dict[str, float]
    tumour_diameter: dict[str, float]
    sampled_images: int
    class_diameter: dict[str, dict[str, float]] = {}
    orientation: dict[str, float] = {}
    label_order: dict[str, float] = {}
    natural: bool = False
    slice_stacks: dict[str, float] = {}
    dims: int = 2
    shape_median: tuple[int, int, int] | None = None
    spacing_median: tuple[float, float, float] | None = None
    spacing_p10: tuple[float, float, float] | None = None
    spacing_p90: tuple[float, float, float] | None = None
    nonzero_share: float | None = None
    shape_median_cropped: tuple[int, int, int] | None = None
    extent_p95: tuple[float, float, float] | None = None
    extent_p95_cropped: tuple[float, float, float] | None = None


def smallest_structure(fp: Fingerprint) -> tuple[str, dict[str, float]]:
    """``(name, {"median", "p5"})`` of the smallest labelled structure: the tumour, or the smallest class of a map.

    The resolution floor keeps it visible: with several classes, the union (``tumour_diameter``) is larger than
    its parts, and a class that vanishes at the planned resolution cannot be segmented.
    """
    out = ("tumour", fp.tumour_diameter)
    for name, d in fp.class_diameter.items():
        if 0 < d["median"] < out[1]["median"] or not out[1]["median"]:
            out = (name, d)
    return out


def _class_diameters(train: pd.DataFrame, volumes: bool) -> dict[str, dict[str, float]]:
    """Per class of a label map (the manifest's ``px_<name>`` counts): median and p5 equivalent diameter."""
    names = [str(c)[3:] for c in train.columns if str(c).startswith("px_")]
    if len(names) < 2:  # binary, or one class: the tumour's figures are its own
        return {}
    size = _sphere_diameter if volumes else _diameter
    out = {}
    for name in names:
        px = train[f"px_{name}"].to_numpy(dtype=np.float64)
        px = px[np.isfinite(px) & (px > 0)]
        if px.size:
            out[name] = {"median": size(float(np.median(px))), "p5": size(float(np.percentile(px, 5)))}
    return out


def _diameter(area: float) -> float:
    return float(math.sqrt(4.0 * area / math.pi)) if area > 0 else 0.0


def orientation(images: list[np.ndarray], side: int = 64) -> dict[str, float]:
    """Per axis, the share of ``(C, H, W)`` images that agree with the others on which way up they are.

    Each image is made grey, standardised and resized to ``side`` x ``side``; its mirror
    asymmetry along an axis is ``(z - flip(z)) / 2``. An image agrees when its asymmetry
    correlates positively with the summed asymmetry of all the *other* images (leave-one-out,
    so an image never votes for itself). Random orientations give about 0.5; a dataset
    scanned one way up (the same anatomy or probe side at the top) gives nearly 1.
    """
    from skimage.transform import resize

    if len(images) < 8:
        return {}
    z = []
    for im in images:
        grey = im.astype(np.float32).reshape(-1, *im.shape[-2:]).mean(axis=0)
        grey = (grey - grey.mean()) / max(float(grey.std()), 1e-6)
        z.append(resize(grey, (side, side), order=1, anti_aliasing=True))
    stack = np.stack(z)
    out = {}
    for axis, name in ((1, "vertical"), (2, "horizontal")):
        anti = (stack - np.flip(stack, axis)) / 2
        total = anti.sum(axis=0)
        agree = [float((a * (total - a)).sum()) > 0 for a in anti]
        out[name] = round(float(np.mean(agree)), 4)
    return out


MIN_ORDER_CASES = 8
"""Sampled cases holding both classes of a pair below which :func:`label_order` does not judge their order."""
AXIS_NAMES = ("vertical", "horizontal", "depth")
"""Array axes of a mask ``(H, W)`` or volume ``(X, Y, Z)``, as ``augment.flip_axes`` names them."""


def label_order(masks: list[np.ndarray]) -> dict[str, float]:
    """Per axis, the share of the cases that agree on the order of their label map's classes along it.

    For each pair of foreground classes held together by at least ``MIN_ORDER_CASES`` of ``masks`` (class
    indices), the share of those cases in which the pair lies apart along the axis (centroids further apart than
    the classes' mean spread along it) on the majority's side; per axis, the highest share over the pairs.
    Near 1 where the classes sit in fixed places relative to each other: labels that name positions (a head and a
    tail, a left and a right organ), or organs in their anatomical places; a mirrored view along that axis shows
    them swapped, a case that never occurs. Nested or interleaved classes (tumour regions) lie apart in few cases
    and score low.
    """
    votes: dict[tuple[int, int], list[np.ndarray]] = {}
    for mask in masks:
        centre, spread = _centres_and_spreads(mask)
        present = [int(k) for k in np.flatnonzero(~np.isnan(centre[:, 0])) if k > 0]
        for i, a in enumerate(present):
            for b in present[i + 1:]:
                gap = centre[b] - centre[a]
                apart = np.abs(gap) > (spread[a] + spread[b]) / 2
                votes.setdefault((a, b), []).append(np.where(apart, np.sign(gap), 0.0))
    out: dict[str, float] = {}
    for found in votes.values():
        if len(found) < MIN_ORDER_CASES:
            continue
        stacked = np.stack(found)
        for axis, name in enumerate(AXIS_NAMES[: stacked.shape[1]]):
            share = max(float((stacked[:, axis] > 0).mean()), float((stacked[:, axis] < 0).mean()))
            out[name] = round(max(out.get(name, 0.0), share), 4)
    return out


def _centres_and_spreads(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class value (rows) and axis (columns), the centroid and standard deviation of its voxels' coordinates.

    One pass per axis whatever the number of classes (a profile of every class per slice); NaN for absent values.
    """
    labels = mask.astype(np.int64, copy=False)
    k = int(labels.max()) + 1
    centre, spread = np.full((k, labels.ndim), np.nan), np.full((k, labels.ndim), np.nan)
    for axis in range(labels.ndim):
        profile = np.stack([np.bincount(np.take(labels, i, axis=axis).ravel(), minlength=k)
                            for i in range(labels.shape[axis])]).astype(np.float64)  # (positions, classes)
        total = profile.sum(axis=0)
        held = total > 0
        x = np.arange(labels.shape[axis], dtype=np.float64)[:, None]
        mean = (profile * x).sum(axis=0)[held] / total[held]
        centre[held, axis] = mean
        spread[held, axis] = np.sqrt((profile[:, held] * (x - mean) ** 2).sum(axis=0) / total[held])
    return centre, spread


def compute(info: ManifestInfo, train: pd.DataFrame, source: str, sample: int = 48, seed: int = 0) -> Fingerprint:
    """The fingerprint of ``train`` (the manifest's train rows).

    Args:
        info: the manifest's ``manifest.json``.
        train: the train split's rows.
        source: the manifest path named in errors.
        sample: how many images to decode for the intensity statistics.
        seed: which ones (a seeded choice: the same manifest gives the same fingerprint).
    """
    from tumorseg.data import CaseReader

    volumes = info.dims == 3
    h = train["height"].to_numpy(dtype=np.int64)
    w = train["width"].to_numpy(dtype=np.int64)
    frac = train["tumour_fraction"].to_numpy(dtype=np.float64)
    has = train["has_tumour"].astype(str).str.lower().isin(["true", "1"]).to_numpy()
    area = frac * h * w * (train["depth"].to_numpy(dtype=np.int64) if volumes else 1)
    if volumes:  # whole volumes are large: a few give the intensity statistics
        sample = min(sample, VOLUME_SAMPLE)
    tumour = area[has & (area > 0)]
    pick = np.sort(np.random.RandomState(seed).permutation(len(train))[: min(sample, len(train))])
    cases = CaseReader(info, source).read_all(train.iloc[pick])
    channels = int(train["channels"].astype(int).max())
    colour = [c.image for c in cases if c.image.shape[0] == 3]
    grey_as_rgb = bool(colour) and all(np.array_equal(im[0], im[1]) and np.array_equal(im[0], im[2])
                                       for im in colour)
    stats: list[dict[str, float]] = []
    for ch in range(max(c.image.shape[0] for c in cases)):
        values = np.concatenate([c.image[min(ch, c.image.shape[0] - 1)].ravel()[::7] for c in cases])
        p = np.percentile(values, [0.5, 50, 99.5])
        stats.append({"p0_5": float(p[0]), "p50": float(p[1]), "p99_5": float(p[2]),
                      "mean": float(values.mean()), "std": float(values.std())})
    pix = {"median": float(np.median(tumour)) if tumour.size else 0.0,
           "p5": float(np.percentile(tumour, 5)) if tumour.size else 0.0,
           "p1": float(np.percentile(tumour, 1)) if tumour.size else 0.0}
    return Fingerprint(
        manifest_name=info.name,
        manifest_digest=info.dataset_digest,
        n_train=len(train),
        size_median=(int(np.median(h)), int(np.median(w))),
        size_p10=(int(np.percentile(h, 10)), int(np.percentile(w, 10))),
        size_p90=(int(np.percentile(h, 90)), int(np.percentile(w, 90))),
        channels=channels,
        grey_as_rgb=grey_as_rgb,
        intensity=stats,
        foreground_fraction=float(frac.mean()) if frac.size else 0.0,
        empty_share=float(1.0 - has.mean()) if has.size else 0.0,
        tumour_pixels=pix,
        tumour_diameter={k: (_sphere_diameter(v) if volumes else _diameter(v)) for k, v in pix.items()},
        sampled_images=len(cases),
        class_diameter=_class_diameters(train, volumes),
        orientation={} if volumes else orientation([c.image for c in cases]),
        label_order=label_order([c.mask for c in cases]),
        natural=natural(train),
        slice_stacks={} if volumes else slice_stacks(info, train, source, seed),
        **(cropped_geometry(volume_geometry(train), cases) if volumes else {}),
    )


VOLUME_SAMPLE = 12
"""Volumes decoded for a 3D fingerprint's intensity statistics."""


def _sphere_diameter(volume: float) -> float:
    return float((6.0 * volume / math.pi) ** (1.0 / 3.0)) if volume > 0 else 0.0


def volume_geometry(train: pd.DataFrame) -> dict[str, Any]:
    """A 3D fingerprint's shape and spacing statistics, per canonical axis (the manifest's stored axes permuted)."""
    from tumorseg.imageio.volume import canonical_axes

    shapes, spacings = [], []
    for h, w, d, sp, codes in train[["height", "width", "depth", "spacing", "orientation"]].itertuples(
            index=False, name=None):
        order = canonical_axes(str(codes))
        stored_shape = (int(h), int(w), int(d))
        stored_spacing = [float(v) for v in str(sp).split("x")]
        shapes.append([stored_shape[order[a]] for a in range(3)])
        spacings.append([stored_spacing[order[a]] for a in range(3)])
    shape, spacing = np.asarray(shapes, dtype=np.float64), np.asarray(spacings, dtype=np.float64)

    def per_axis(a: np.ndarray, q: float) -> tuple[float, float, float]:
        v = np.percentile(a, q, axis=0)
        return round(float(v[0]), 6), round(float(v[1]), 6), round(float(v[2]), 6)

    med = np.median(shape, axis=0)
    return {"dims": 3, "shape_median": (int(med[0]), int(med[1]), int(med[2])),
            "spacing_median": per_axis(spacing, 50), "spacing_p10": per_axis(spacing, 10),
            "spacing_p90": per_axis(spacing, 90), "extent_p95": per_axis(shape * spacing, 95)}


def cropped_geometry(geometry: dict[str, Any], cases: list[Case]) -> dict[str, Any]:
    """``geometry`` with what cropping to the nonzero box leaves of the sampled volume cases (canonical axes)."""
    from tumorseg.cropping import box_shape, nonzero_box

    if not cases:
        return geometry
    boxes = [box_shape(nonzero_box(c.image)) for c in cases]
    share = float(np.median([math.prod(b) / math.prod(c.image.shape[1:]) for b, c in zip(boxes, cases, strict=True)]))
    extents = np.asarray([[n * s for n, s in zip(b, c.spacing or (1.0, 1.0, 1.0), strict=True)]
                          for b, c in zip(boxes, cases, strict=True)])
    mm, p95 = np.median(extents, axis=0), np.percentile(extents, 95, axis=0)
    shape = [max(1, int(round(v / s))) for v, s in zip(mm, geometry["spacing_median"], strict=True)]
    return {**geometry, "nonzero_share": round(share, 4), "shape_median_cropped": (shape[0], shape[1], shape[2]),
            "extent_p95_cropped": (round(float(p95[0]), 4), round(float(p95[1]), 4), round(float(p95[2]), 4))}


def slice_stacks(info: ManifestInfo, train: pd.DataFrame, source: str, seed: int = 0,
                 sample: int = 12) -> dict[str, float]:
    """The train split's ordered slice stacks, with the similarity of adjacent slices in a seeded sample of them.

    Three consecutive slices are read from each of up to ``sample`` stacks.
    """
    from tumorseg.context import SliceStacks, sampled_similarity
    from tumorseg.data import CaseReader

    stacks = SliceStacks.from_frame(train)
    out = stacks.summary(len(train))
    runs = [r for r in stacks.runs if len(r) >= 3]
    if not runs:
        return {}
    index = {str(c): i for i, c in enumerate(train["case_id"])}
    reader = CaseReader(info, source)

    def read(ids: Sequence[str]) -> list[np.ndarray]:
        return [c.image for c in reader.read_all(train.iloc[[index[c] for c in ids]], workers=1)]

    found = sampled_similarity(runs, read, seed, sample)
    return {**out, "adjacent": round(found.adjacent, 4), "unrelated": round(found.unrelated, 4)}


def natural(train: pd.DataFrame) -> bool:
    """Whether every row is a 2D 8-bit image of 1 or 3 channels (``image_mode`` ``"PNG:RGB uint8"``, no NIfTI)."""
    modes = train["image_mode"].astype(str)
    return bool(len(train)) and bool(
        modes.str.endswith(" uint8").all() and not modes.str.startswith("NIfTI").any()
        and (train["slice_index"].astype(int) < 0).all() and train["channels"].astype(int).isin([1, 3]).all())
