"""Inspection (worker side): decode one case, validate its mask, return one small manifest row."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from tumorseg.fsutil import sha256_bytes
from tumorseg.imageio import (
    DecodeError,
    binarize_mask,
    check_label_format,
    decode,
    label_map,
    mask_plane,
    mask_threshold_for,
    nonfinite,
    read_bytes,
    union_masks,
)
from tumorseg.imageio.volume import axcodes, spacing_of
from tumorseg.ingest.discover import Task, base_name
from tumorseg.manifest import MASK_SEP, combine_hashes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InspectContext:
    """What every worker needs besides the task (sent once, at worker start)."""

    root: str
    mask_threshold: float | None
    slice_axis: int | None  # None: a volume is one case (its row has depth, spacing and orientation)
    labels: dict[int, str] | None = None  # declared label values -> names (multi-class); None: binary masks


def _fraction(mask: Any) -> tuple[bool, float]:
    n = int(np.count_nonzero(mask))
    return n > 0, round(n / mask.size, 6)


def class_columns(labels: dict[int, str] | None) -> list[str]:
    """The manifest's per-class pixel-count columns (``px_<name>`` per foreground class, in class order)."""
    from tumorseg.labels import Classes  # class order: the background first (a label set may lack 0)

    return [f"px_{name}" for name in Classes(labels).names[1:]] if labels else []


def _class_counts(plane: Any, labels: dict[int, str] | None) -> dict[str, int]:
    """Pixels of each foreground class in a class-index plane."""
    if not labels:
        return {}
    counts = np.bincount(plane.ravel(), minlength=len(labels))
    return {col: int(counts[k + 1]) for k, col in enumerate(class_columns(labels))}


_DTYPE_NAMES: dict[Any, str] = {}


def _dtype_name(dtype: Any) -> str:
    """``str(dtype)``, cached: numpy builds the name in Python on every call."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


def inspect_case(task: Task, ctx: InspectContext) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Decode one case in a worker: manifest rows, or the reasons it is rejected."""
    rel_img = task.image
    img_path = os.path.join(ctx.root, rel_img)
    try:
        image, img_sha = _read_image(ctx.root, rel_img)
    except DecodeError as exc:
        return [], [(rel_img, _reason(exc, img_path))]
    channels = image.array.shape[0] if not image.is_grid else (image.array.shape[3] if image.array.ndim == 4 else 1)
    if channels not in (1, 3) and not image.is_grid:
        return [], [(rel_img, f"{channels}-channel image; use grey or RGB(A)")]
    if image.array.ndim == 4 and ctx.slice_axis is not None:
        return [], [(rel_img, f"a {channels}-channel volume (MR sequences as channels); ingest it without "
                              "--slice-axis, as one case")]
    if bad := nonfinite(image.array, "pixel value"):
        return [], [(rel_img, f"{bad} and re-export the file")]
    # Compare masks with the image as the loaders will read them: a volume as (X, Y, Z), any
    # 2D file (a one-slice NIfTI included) as one (H, W) plane, so formats can be mixed.
    volume = image.is_volume
    img_shape = image.array.shape[:3] if volume else _plane(image.array, image.is_grid).shape

    masks = []
    encodings = []
    hashes = []
    for rel in task.masks:
        path = os.path.join(ctx.root, rel)
        try:
            mdata = read_bytes(path)
            hashes.append(sha256_bytes(mdata))
            decoded = decode(mdata, path, "mask")
            if decoded.is_grid:
                plane = decoded.array if decoded.is_volume or volume else decoded.array[:, :, 0]
            else:
                plane = mask_plane(decoded.array, path)
            if ctx.labels:
                check_label_format(decoded, path)
                binary, values = label_map(plane, path, ctx.labels)
            else:
                binary, values = binarize_mask(plane, path, mask_threshold_for(decoded, ctx.mask_threshold))
        except DecodeError as exc:
            return [], [(rel, _reason(exc, path)), (rel_img, f"its mask {base_name(rel)} was rejected")]
        if not volume and not decoded.is_volume and bool(decoded.is_grid) != bool(image.is_grid):  # (x, y) axes
            # against (rows, columns): which is which depends on the tool that wrote the grid file
            grid, picture = (base_name(rel), base_name(rel_img)) if decoded.is_grid else (base_name(rel_img),
                                                                                        base_name(rel))
            return [], [(rel, f"a 2D image and mask whose axes differ: {grid} is a grid file (x, y: NIfTI, NRRD, "
                              f"MHA) and {picture} a picture (rows, columns); save the mask in its image's format"),
                        (rel_img, f"its mask {base_name(rel)} is in another kind of format")]
        if binary.shape != img_shape:
            kinds = "" if len(img_shape) == binary.ndim else (
                f" (a {len(img_shape)}D image with a {binary.ndim}D mask: "
                + ("a volume among 2D images? ingest volumes apart, or cut them with --slice-axis"
                   if len(img_shape) == 3 else "a 3D mask for a 2D image?") + ")")
            return [], [
                (rel,
                 f"size mismatch: image is {_fmt_shape(img_shape)}, mask is {_fmt_shape(binary.shape)}{kinds}; "
                 "masks must match their image pixel for pixel"),
                (rel_img, f"its mask {base_name(rel)} has another size"),
            ]
        other = _other_grid(image.affine, decoded.affine)
        if other:
            return [], [(rel, f"on another grid than its image {base_name(rel_img)} ({other}); resample the mask "
                              "onto the image's grid"),
                        (rel_img, f"its mask {base_name(rel)} lies on another grid")]
        masks.append(binary)
        encodings.append(f"{decoded.mode} {values}")
    mask = union_masks(masks)
    mask_sha = combine_hashes(hashes)
    common = {
        "image": rel_img,
        "mask": MASK_SEP.join(task.masks),
        "n_masks": len(task.masks),
        "group": task.group,
        "channels": channels,
        "image_sha256": img_sha,
        "mask_sha256": mask_sha,
        "image_mode": f"{image.mode} {_dtype_name(image.array.dtype)}",
        "mask_encoding": "; ".join(sorted(set(encodings))),
    }
    if task.split is not None:
        common["fixed_split"] = task.split  # not a manifest column: assign_splits keeps it as the split
    if volume and ctx.slice_axis is None:
        assert image.affine is not None  # a volume is a grid
        has, frac = _fraction(mask)
        spacing = "x".join(f"{v:.6g}" for v in spacing_of(image.affine))
        return [{**common, "case_id": task.key, "slice_index": -1, "has_tumour": has, "tumour_fraction": frac,
                 "height": mask.shape[0], "width": mask.shape[1], **_class_counts(mask, ctx.labels),
                 **volume_columns(mask.shape[2], spacing, axcodes(image.affine))}], []
    if volume:
        assert ctx.slice_axis is not None
        rows = []
        for k in range(mask.shape[ctx.slice_axis]):
            plane2d = np.take(mask, k, axis=ctx.slice_axis)
            has, frac = _fraction(plane2d)
            rows.append({**common, "case_id": f"{task.key}#{'xyz'[ctx.slice_axis]}{k:03d}", "slice_index": k,
                         "has_tumour": has, "tumour_fraction": frac,
                         "height": plane2d.shape[0], "width": plane2d.shape[1], **_class_counts(plane2d, ctx.labels)})
        return rows, []
    plane2d = mask
    has, frac = _fraction(plane2d)
    return [{**common, "case_id": task.key, "slice_index": -1, "has_tumour": has, "tumour_fraction": frac,
             "height": plane2d.shape[0], "width": plane2d.shape[1], **_class_counts(plane2d, ctx.labels)}], []


VOLUME_COLUMNS = ["depth", "spacing", "orientation"]
"""A volume case's extra manifest columns (``dims: 3`` manifests): its third size, the voxel size of each stored
axis in mm (``0.7x0.7x3``) and the stored orientation's letters (``LPS``); ``height``/``width`` hold its first two
sizes. Cases are read in canonical RAS+ order (:mod:`tumorseg.imageio.volume`)."""


def volume_columns(depth: int, spacing: str, orientation: str) -> dict[str, Any]:
    """The :data:`VOLUME_COLUMNS` of one volume case."""
    return dict(zip(VOLUME_COLUMNS, (depth, spacing, orientation), strict=True))


def _read_image(root: str, rel: str) -> tuple[Any, str]:
    """A case's decoded image and its recorded hash; several channel files (``a|b``) become one volume."""
    from tumorseg.imageio.volume import stack_channels

    paths = [os.path.join(root, p) for p in rel.split(MASK_SEP)]
    data = [read_bytes(p) for p in paths]
    decoded = [decode(d, p, "image") for d, p in zip(data, paths, strict=True)]
    image = decoded[0] if len(paths) == 1 else stack_channels(decoded, paths)
    return image, combine_hashes([sha256_bytes(d) for d in data])


def _plane(arr: Any, grid: bool) -> Any:
    """The first 2D plane of a decoded non-volume: ``(C, H, W)`` or a grid's ``(X, Y, 1)``."""
    return arr[:, :, 0] if grid else arr[0]


GRID_TOLERANCE = 1e-3
"""Relative tolerance on voxel size and absolute (mm) on origin and axes between an image's grid and its mask's."""


def _other_grid(image: Any, mask: Any) -> str | None:
    """How a mask's voxel grid differs from its image's (both RAS+ affines), or ``None`` when they agree.

    Compared only where both files state a grid (a PNG mask beside a NIfTI slice has none to compare).
    """
    if image is None or mask is None:
        return None
    spacing_i, spacing_m = (np.sqrt(np.square(a[:3, :3]).sum(axis=0)) for a in (image, mask))
    if not np.allclose(spacing_i, spacing_m, rtol=GRID_TOLERANCE, atol=1e-6):
        return f"voxel size {_fmt_vec(spacing_i)} mm vs {_fmt_vec(spacing_m)} mm"
    if not np.allclose(image[:3, 3], mask[:3, 3], atol=GRID_TOLERANCE * max(1.0, float(spacing_i.max()))):
        return f"origin {_fmt_vec(image[:3, 3])} vs {_fmt_vec(mask[:3, 3])}"
    if not np.allclose(image[:3, :3] / spacing_i, mask[:3, :3] / spacing_m, atol=GRID_TOLERANCE):
        return "axes point in other directions (another orientation)"
    return None


def _fmt_vec(v: Any) -> str:
    return "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")"


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _reason(exc: DecodeError, path: str) -> str:
    """The message without the leading path (the report has its own path column)."""
    msg = str(exc)
    prefix = f"{path}: "
    return msg[len(prefix):] if msg.startswith(prefix) else msg


_worker_ctx: InspectContext | None = None


def _init_worker(ctx: InspectContext) -> None:
    global _worker_ctx
    _worker_ctx = ctx


def _inspect_in_worker(task: Task) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    assert _worker_ctx is not None
    return inspect_case(task, _worker_ctx)


def inspect_all(tasks: list[Task], ctx: InspectContext, workers: int) -> Iterator[tuple[list[dict[str, Any]], list]]:
    """Inspect cases in order, in ``workers`` processes (in-process for 1).

    The context goes to each worker once (pool initializer), not with every task.
    """
    if workers <= 1 or len(tasks) < 2:
        yield from (inspect_case(t, ctx) for t in tasks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(ctx,))
    try:
        yield from pool.imap(_inspect_in_worker, tasks, chunksize=max(1, min(32, len(tasks) // (workers * 8))))
        # let the workers finish and exit by themselves: Pool.terminate (what `with` calls) was seen to hang
        # joining a worker signalled while it waited on the task queue's lock
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def inconsistent_volumes(rows: list[dict[str, Any]]) -> dict[int, str]:
    """``id(row) -> reason`` for the volumes unlike the rest of a set (its rejected rows).

    Other channels than most (a volume's channels are its sequences: T1, T2, FLAIR...), or a voxel size that is a
    header's unit rather than a scan's (:func:`tumorseg.placement.implausible_spacing`: metres written as mm).
    """
    import statistics
    from collections import Counter

    from tumorseg.placement import implausible_spacing

    counts = Counter(int(r["channels"]) for r in rows)
    usual = max(counts, key=lambda c: (counts[c], -c))
    bad = {id(r): f"{r['channels']} channel(s) where the other volumes hold {usual}; give every case the same "
           "sequences (or ingest it apart)" for r in rows if int(r["channels"]) != usual}
    sizes = {id(r): tuple(sorted(float(v) for v in str(r["spacing"]).split("x"))) for r in rows}
    median = tuple(statistics.median(col) for col in zip(*sizes.values(), strict=True))
    for r in rows:
        reason = implausible_spacing(sizes[id(r)], median, "the set's median")
        if reason and id(r) not in bad:
            bad[id(r)] = reason
    return bad
