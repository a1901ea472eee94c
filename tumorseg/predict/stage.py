"""``tumorseg predict``: write a tumour mask for every input image.

Inputs are image files and folders (PNG, TIFF, NIfTI; ``--recursive`` walks subfolders).
Each image gets one mask of the same name and size in the output folder (sub-folders of an
input folder are kept):

* ``--format png`` (default): ``<stem>.png``, 0/255 greyscale;
* ``--format nifti``: ``<stem>.nii.gz``, ``uint8`` 0/1, with the input's affine for NIfTI inputs.

A multi-class model writes label maps of its declared values instead (``uint8``, PNG or NIfTI), and
``--probabilities`` one channel per class: a float32 ``<stem>_prob.tif`` (one page per class, in label
order) beside a PNG, or the class as the last axis of ``<stem>_prob.nii.gz``.

A 3D NIfTI volume is predicted slice by slice along ``slice_axis`` and written back as one
volume of the input's shape and affine (always NIfTI: a PNG cannot hold a volume).
``--probabilities`` adds ``<stem>_prob.png`` (8-bit) or ``<stem>_prob.nii.gz`` (float32).

Inputs are never written: an output folder equal to an input folder, or an output that
would replace an input file (or a copy of it), is refused before any work is done.

An input whose stored intensity range is far from the training images' (another bit depth,
another kind of image) is named in a warning (:meth:`tumorseg.inference.Segmenter.intensity_outside_training`;
the first few by name, the rest counted) and flagged in ``predictions.csv``.
"""

from __future__ import annotations

import filecmp
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import PredictConfig
from tumorseg.errors import TumorsegError
from tumorseg.fsutil import atomic_write_text, not_utf8
from tumorseg.imageio import FORMATS_TEXT, image_format, split_ext
from tumorseg.predict.files import (
    Item,
    Loaded,
    file_neighbours,
    file_stacks,
    join_channel_files,
    load_item,
    write_outputs,
)

if TYPE_CHECKING:
    from tumorseg.inference import Segmenter
    from tumorseg.modelref import ModelRef

log = logging.getLogger(__name__)

PROB_SUFFIX = "_prob"


@dataclass
class PredictResult:
    """What :func:`run` produced.

    Attributes:
        output_dir: where the masks are.
        n_written: masks written (one per input image).
        n_inputs: input images.
        n_slices: 2D planes predicted (a volume counts its slices).
        n_probabilities: probability maps written.
        outputs: ``(input, mask[, probability map])`` paths per image, in input order.
        run_id: the predict MLflow run.
        model: where the model came from.
        seconds: wall time of the prediction loop.
        n_intensity_outside_training: inputs whose stored intensities are far from the training images'
            (each named in a warning, the first few at least).
    """

    output_dir: Path
    n_written: int
    n_inputs: int
    n_slices: int = 0
    n_probabilities: int = 0
    outputs: list[tuple[Path, ...]] = field(default_factory=list)
    run_id: str = ""
    model: ModelRef | None = None
    seconds: float = 0.0
    n_intensity_outside_training: int = 0


# ----------------------------------------------------------------------------- inputs and outputs


def _walk(folder: Path, recursive: bool, skip: Path) -> list[Path]:
    """Sorted images in ``folder``: image files and DICOM series folders (hidden entries and the output skipped)."""
    from tumorseg.imageio.dicom import is_series_folder

    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        out.extend(here / f for f in filenames if not f.startswith(".") and image_format(here / f) is not None)
        series = [d for d in dirnames if not d.startswith(".") and is_series_folder(here / d)]
        out.extend(here / d for d in series)
        dirnames[:] = sorted(d for d in dirnames if recursive and not d.startswith(".") and d not in series
                             and (here / d).resolve() != skip)
    return sorted(out)


def collect_inputs(cfg: PredictConfig) -> list[Item]:
    """Expand files and folders into a list of images; missing or unsupported inputs are errors."""
    out_resolved = cfg.output_dir.expanduser().resolve()
    items: list[Item] = []
    for raw in cfg.inputs:
        path = Path(raw).expanduser()
        if not path.exists():
            raise TumorsegError(f"{path}: input not found; give image files ({FORMATS_TEXT}) or folders")
        if path.is_dir() and image_format(path) != "dicom-series":
            if path.resolve() == out_resolved:
                raise TumorsegError(f"{cfg.output_dir}: the output folder is the input folder {path}; "
                                    "choose another output folder (inputs are never overwritten)")
            files = _walk(path, cfg.recursive, out_resolved)
            if not files:
                hint = "" if cfg.recursive else " (add --recursive for subfolders)"
                raise TumorsegError(f"{path}: no images ({FORMATS_TEXT}) in this folder{hint}")
            base = len(items)
            items.extend([Item(base + i, f, f.relative_to(path)) for i, f in enumerate(files)])
        else:
            if image_format(path) is None:
                raise TumorsegError(f"{path}: unsupported format; use {FORMATS_TEXT}")
            if path.resolve().parent == out_resolved:
                raise TumorsegError(f"{cfg.output_dir}: the output folder holds the input {path.name}; "
                                    "choose another output folder (inputs are never overwritten)")
            items.append(Item(len(items), path, Path(path.name)))
    if not items:
        raise TumorsegError("no input images; give image files or folders")
    for it in items:
        if shown := not_utf8(str(it.path)):
            raise TumorsegError(f"{shown}: file name is not valid UTF-8 (written in an older encoding?); rename it")
    return items


MARKER = ".tumorseg-predict"
"""Written into an output folder before its first mask: predict replaces only files of a folder that holds it."""


def plan_outputs(items: list[Item], cfg: PredictConfig, volumes: set[int] | None = None,
                 multiclass: bool = False) -> None:
    """Set each item's output paths and refuse collisions with each other or with any input."""
    inputs = {it.path.resolve(): it for it in items}
    input_ids = {}
    for it in items:
        st = it.path.stat()
        input_ids[(st.st_dev, st.st_ino)] = it
    taken: dict[Path, Item] = {}
    ours = (cfg.output_dir / MARKER).is_file()  # a folder an earlier predict wrote: its outputs are replaced
    for it in items:
        stem, _ = split_ext(it.rel.name)
        nifti = cfg.format == "nifti" or (volumes is not None and it.index in volumes)
        ext = ".nii.gz" if nifti else ".png"
        parent = cfg.output_dir / it.rel.parent
        it.mask_out = parent / f"{stem}{ext}"
        prob_ext = ".tif" if multiclass and not nifti else ext  # K channels: a PNG cannot hold them
        it.prob_out = parent / f"{stem}{PROB_SUFFIX}{prob_ext}" if cfg.probabilities else None
        for out in (it.mask_out, it.prob_out):
            if out is None:
                continue
            key = out.resolve()
            if key in taken:
                raise TumorsegError(f"{it.path} and {taken[key].path} would both write {out}; "
                                    "predict them into different output folders")
            taken[key] = it
            if key in inputs:
                raise TumorsegError(f"{out}: would overwrite the input {inputs[key].path}; choose another "
                                    "output folder (inputs are never overwritten)")
            if out.exists():
                st = out.stat()
                other = input_ids.get((st.st_dev, st.st_ino))
                if other is not None or filecmp.cmp(out, it.path, shallow=False):
                    src = other.path if other is not None else it.path
                    raise TumorsegError(f"{out}: is (a copy of) the input {src}; the output folder holds the "
                                        "input files - choose another output folder")
                if not ours:  # ground-truth masks named like the images, say: never overwritten
                    raise TumorsegError(f"{out}: exists and no earlier tumorseg predict wrote this folder (no "
                                        f"{MARKER}); choose a new or empty output folder (files are never "
                                        "overwritten that predict did not write)")


# ----------------------------------------------------------------------------- the stage


def run(cfg: PredictConfig) -> PredictResult:
    """Predict a mask for every image in ``cfg.inputs`` into ``cfg.output_dir``.

    Returns:
        Output folder, counts, the files written, MLflow run id.

    Raises:
        TumorsegError: missing or unsupported inputs, an output folder that would touch the inputs,
            unknown/corrupt model, images whose channels the model cannot take.
    """
    from tumorseg import tracking
    from tumorseg.modelref import resolve_model

    if cfg.output_dir.exists() and not cfg.output_dir.is_dir():
        raise TumorsegError(f"{cfg.output_dir}: output path exists and is not a folder")
    items = collect_inputs(cfg)
    seg, mref = resolve_model(cfg.model, cfg.tracking, cfg.device)
    if seg.config.spatial_dims == 3 and int(seg.base_channels) > 1:  # several MR sequences: maybe one file each
        items = join_channel_files(items, int(seg.base_channels))
    volumes = _nifti_outputs(items) if cfg.format == "png" else set()
    plan_outputs(items, cfg, volumes, seg.classes.multiclass)  # the model says what its outputs hold
    threshold = float(cfg.threshold if cfg.threshold is not None else seg.threshold)
    tags = {"tumorseg.model_ref": mref.ref, "tumorseg.checkpoint_sha256": mref.checkpoint_sha256,
            "tumorseg.train_run_id": mref.train_run_id}
    tags = {k: v for k, v in tags.items() if v}
    with tracking.start_run(cfg.tracking, "predict", run_name=f"predict-{mref.short_name}", tags=tags) as trk:
        trk.log_params({
            "model": mref.ref, "checkpoint_sha256": mref.checkpoint_sha256, "train_run_id": mref.train_run_id,
            "inputs": ", ".join(str(p) for p in cfg.inputs), "output_dir": str(cfg.output_dir),
            "recursive": cfg.recursive, "format": cfg.format, "probabilities": cfg.probabilities, "tta": cfg.tta,
            "threshold": threshold, "batch_size": cfg.batch_size, "device": str(seg.device),
            "slice_axis": cfg.slice_axis,
        })
        t0 = time.perf_counter()
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.output_dir / MARKER, f"masks written by tumorseg predict, model {mref.ref}\n")
        rows = predict_items(seg, items, threshold, cfg)
        seconds = time.perf_counter() - t0
        n_slices = sum(r["slices"] for r in rows)
        n_empty = sum(1 for r in rows if r["tumour_pixels"] == 0)
        n_outside = sum(1 for r in rows if r["intensity_outside_training"])
        trk.log_metrics({"n_inputs": len(items), "n_written": len(rows), "n_slices": n_slices,
                         "n_empty_predictions": n_empty, "n_intensity_outside_training": n_outside,
                         "seconds": seconds,
                         "slices_per_second": n_slices / seconds if seconds > 0 else float("nan")})
        _log_listing(trk, rows)
        trk.set_description(
            f"{len(rows)} masks for {len(items)} inputs ({n_slices} slices), {n_empty} predicted tumour-free: "
            f"`{mref.short_name}` into `{cfg.output_dir}`, threshold {threshold:g}.")
        run_id = trk.run_id
    outputs = [(it.path, it.mask_out) + ((it.prob_out,) if it.prob_out is not None else ()) for it in items]
    log.info("wrote %d mask(s) for %d slice(s) to %s in %.1f s", len(rows), n_slices, cfg.output_dir, seconds)
    return PredictResult(output_dir=cfg.output_dir, n_written=len(rows), n_inputs=len(items), n_slices=n_slices,
                         n_probabilities=sum(1 for it in items if it.prob_out is not None), outputs=outputs,
                         run_id=run_id, model=mref, seconds=seconds, n_intensity_outside_training=n_outside)


def _nifti_outputs(items: list[Item]) -> set[int]:
    """Items written as NIfTI, on their input's grid.

    Volumes (NIfTI, NRRD/MHA, DICOM series and multi-frame, TIFF stacks), and 2D NIfTI or NRRD/MHA files, whose
    (x, y) axes a PNG of (rows, columns) would show transposed.
    """
    from tumorseg.imageio import DecodeError, volume_shape

    out = set()
    for it in items:
        try:
            if volume_shape(it.path) is not None:
                out.add(it.index)
            elif image_format(it.path) in ("nifti", "itk"):
                out.add(it.index)
        except DecodeError as exc:
            raise TumorsegError(str(exc)) from exc
    if out:
        log.warning("%d volume(s) and 2D grid file(s) are written as .nii.gz, on their input's grid (a PNG cannot "
                    "hold a volume, and shows x, y axes transposed)", len(out))
    return out


RANGE_WARNINGS = 5
"""Inputs named one by one when their intensities are far from the training images'; the rest are counted."""


def _planes(loaded_iter: Iterator[Loaded], seg: Segmenter, outside: dict[int, Path],
            neighbours: Any = None) -> Iterator[tuple[Loaded, int, np.ndarray]]:
    """The network inputs of every input's planes, in order.

    Inputs far from the training intensities are warned about and recorded in ``outside`` (index -> path).
    A 2.5D model's planes carry their neighbours: a volume's own slices, or for a 2D file
    ``neighbours(loaded)``, the planes of its window of files.
    """
    from tumorseg.context import window_image
    from tumorseg.inference import channels_compatible
    from tumorseg.placement import spacing_problem

    for loaded in loaded_iter:
        if why := spacing_problem(seg.config, _spacing(loaded)):
            raise TumorsegError(f"{loaded.item.path}: {why}")
        c = int(loaded.planes[0].shape[0])
        if not channels_compatible(c, int(seg.base_channels), seg.config.spatial_dims == 3):
            raise TumorsegError(f"{loaded.item.path}: {c}-channel image but the model takes {seg.base_channels} "
                                "channel(s)")
        why = seg.intensity_outside_training(loaded.decoded.array)
        if why is not None:
            outside[loaded.item.index] = loaded.item.path
            if len(outside) <= RANGE_WARNINGS:
                log.warning("%s: %s", loaded.item.path, why)
        planes = loaded.planes
        if seg.context and len(planes) == 1 and neighbours is not None:
            planes = [window_image(neighbours(loaded), seg.base_channels)]
        else:
            planes = seg.stack(planes)
        for i, plane in enumerate(planes):
            yield loaded, i, plane


def _spacing(loaded: Loaded) -> tuple[float, ...] | None:
    """A canonical volume's voxel size (a 3D model's input), else ``None``."""
    from tumorseg.imageio.volume import canonical_spacing

    affine = loaded.decoded.affine
    return canonical_spacing(affine) if loaded.canonical and affine is not None else None


def predict_items(seg: Segmenter, items: list[Item], threshold: float, cfg: PredictConfig) -> list[dict[str, Any]]:
    """Decode inputs in threads, predict planes in batches across files, write each file when complete.

    With volumetric post-processing, a volume's slices are one stack, and so are 2D files numbered as slices
    of one (:func:`file_stacks`): such files are written once the last of their stack is predicted.
    """
    from tumorseg.postprocessing import StackBuffer
    from tumorseg.progress import track
    from tumorseg.streaming import batched, prefetch

    workers = min(4, os.cpu_count() or 1)
    volumes = seg.config.spatial_dims == 3
    loaded_iter = prefetch(lambda it: load_item(it, cfg.slice_axis, volumes), items, workers,
                           ahead=2 if volumes else max(2, workers * 2))
    partial: dict[int, list[np.ndarray | None]] = {}
    outside: dict[int, Path] = {}
    rows: list[dict[str, Any]] = []
    stacks: StackBuffer[int, tuple[Loaded, list[np.ndarray]]] = StackBuffer(
        file_stacks(items) if seg.post.volumetric else [])
    if stacks.stacks:
        log.info("volumetric post-processing: %d of %d inputs are slices of numbered stacks, post-processed "
                 "together", sum(len(r) for r in stacks.stacks), len(items))
    writes: deque[tuple[Loaded, Future[int]]] = deque()

    def collect(block: bool) -> None:
        while writes and (block or writes[0][1].done() or len(writes) > 2 * cfg.batch_size):
            loaded, fut = writes.popleft()
            it = loaded.item
            rows.append({"input": str(it.path), "mask": str(it.mask_out),
                         "probabilities": str(it.prob_out or ""), "height": int(loaded.planes[0].shape[1]),
                         "width": int(loaded.planes[0].shape[2]),
                         "slices": int(loaded.planes[0].shape[3]) if loaded.canonical else len(loaded.planes),
                         "tumour_pixels": fut.result(), "intensity_outside_training": it.index in outside})

    def write(group: list[tuple[int, tuple[Loaded, list[np.ndarray]]]]) -> None:
        if len(group) == 1:  # one input: its own planes are the stack (a volume's slices)
            loaded, probs = group[0][1]
            masks = [seg.stack_masks(probs, threshold)]
        else:  # 2D files of one stack
            masks = [[m] for m in seg.stack_masks([probs[0] for _, (_, probs) in group], threshold)]
        for (_, (loaded, probs)), mask in zip(group, masks, strict=True):
            writes.append((loaded, writer.submit(write_outputs, loaded, probs, mask, cfg, seg.classes)))

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="tumorseg-write") as writer:
        neighbours = file_neighbours(items, seg.context, cfg.slice_axis) if seg.context else None
        bs = seg.batch_for(cfg.batch_size)
        for batch in track(batched(_planes(loaded_iter, seg, outside, neighbours), bs), None, "predict"):
            probs = seg.predict_proba([plane for _, _, plane in batch], tta=cfg.tta,
                                      spacings=[_spacing(loaded) for loaded, _, _ in batch])
            for (loaded, i, _), prob in zip(batch, probs, strict=True):
                buf = partial.setdefault(loaded.item.index, [None] * len(loaded.planes))
                buf[i] = prob
                if all(p is not None for p in buf):
                    del partial[loaded.item.index]
                    for group in stacks.add(loaded.item.index, (loaded, [p for p in buf if p is not None])):
                        write(group)
            collect(block=False)
        for group in stacks.rest():
            write(group)
        collect(block=True)
    if len(outside) > RANGE_WARNINGS:
        log.warning("%d more inputs have intensities far from the training images' (%d of %d in all; column "
                    "intensity_outside_training of predictions.csv in the MLflow run)",
                    len(outside) - RANGE_WARNINGS, len(outside), len(items))
    rows.sort(key=lambda r: r["input"])
    return rows


def _log_listing(trk: Any, rows: list[dict[str, Any]]) -> None:
    """Log ``predictions.csv`` (input, outputs, size, tumour pixels) to the run, not to the output folder."""
    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="tumorseg-predict-") as tmp:
        path = Path(tmp) / "predictions.csv"
        pd.DataFrame(rows).to_csv(path, index=False, lineterminator="\n")
        trk.log_artifact(path)
