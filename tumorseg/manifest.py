"""The manifest: the contract between ``ingest`` and every later stage.

``data_manifest/NAME/`` holds ``manifest.csv`` (one row per case), ``rejected.csv`` and
``ignored.csv`` (path, reason) and ``manifest.json`` (:class:`ManifestInfo`). ``dataset_digest`` is the
SHA-256 of ``manifest.csv``'s bytes: equal digests mean the same cases, files and splits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict

from tumorseg.errors import TumorsegError
from tumorseg.fsutil import sha256_bytes
from tumorseg.labels import Classes

COLUMNS: list[str] = [
    "case_id",
    "image",
    "mask",
    "n_masks",
    "group",
    "split",
    "fold",
    "has_tumour",
    "tumour_fraction",
    "height",
    "width",
    "channels",
    "slice_index",
    "image_sha256",
    "mask_sha256",
    "image_mode",
    "mask_encoding",
]
"""Manifest columns, in file order. ``mask`` joins several mask files with ``|`` (merged by
union); ``slice_index`` is -1 for 2D files; ``fold`` is -1 for test cases or without folds."""

MASK_SEP = "|"
SPLITS = ("train", "val", "test")


class ManifestInfo(BaseModel):
    """``manifest.json``."""

    model_config = ConfigDict(extra="allow")

    name: str
    tumorseg_version: str
    data_root: str
    dataset_digest: str
    slice_axis: int = 2
    dims: int = 2  # 3: every case is a whole volume (older manifests: 2D cases, volumes cut into slices)
    mask_threshold: float | None = None
    labels: dict[str, str] | None = None  # declared label values (as strings) -> class names; None: binary
    regions: list[tuple[str, list[int]]] | None = None  # (region name, declared values), in painting order
    config: dict[str, Any]

    @property
    def label_set(self) -> dict[int, str] | None:
        """The declared labels as ``{value: name}``, or ``None`` for binary masks."""
        return {int(v): n for v, n in self.labels.items()} if self.labels else None

    @property
    def classes(self) -> Classes:
        """The label set as the network sees it (binary without declared labels)."""
        return Classes(self.label_set, dict(self.regions) if self.regions else None)

    counts: dict[str, Any]
    summary: dict[str, Any]


def require_same_labels(model: Classes, data: Classes, source: str | os.PathLike[str], what: str) -> None:
    """Stop with one line when a model's label set is not the manifest's (scores would be meaningless)."""
    if not model.same_as(data):
        raise TumorsegError(f"{source}: its labels are {data.describe()} but {what} was trained on "
                            f"{model.describe()}; use a model trained on this label set")


def require_same_dims(dims: int, info: ManifestInfo, source: str | os.PathLike[str], what: str) -> None:
    """Raise when a model (or config) of ``dims`` spatial dimensions meets a manifest of the other kind."""
    if dims == info.dims:
        return
    held = "3D volumes (each one case)" if info.dims == 3 else "2D cases (images, or volumes cut into slices)"
    fix = ("a 3D model (plan=auto, or image_size with 3 values)" if info.dims == 3 else
           "a 2D model, or re-ingest the volumes without --slice-axis for a 3D one")
    raise TumorsegError(f"{source}: holds {held} but {what} is {dims}D; use {fix}")


def resolve_manifest_dir(path: str | os.PathLike[str]) -> Path:
    """Accept a manifest folder or a file in it."""
    p = Path(path)
    if p.is_file() or p.name in ("manifest.csv", "manifest.json"):
        p = p.parent
    return p


def read_manifest_info(path: str | os.PathLike[str]) -> ManifestInfo:
    """Read ``manifest.json``; missing or broken is a one-line error."""
    mdir = resolve_manifest_dir(path)
    jpath = mdir / "manifest.json"
    if not jpath.is_file():
        raise TumorsegError(f"{jpath}: manifest not found; run `tumorseg ingest ... --name {mdir.name}` first")
    try:
        return ManifestInfo.model_validate_json(jpath.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise TumorsegError(f"{jpath}: not a tumorseg manifest ({exc.__class__.__name__}); re-run ingest") from exc


def load_manifest(path: str | os.PathLike[str]) -> tuple[ManifestInfo, pd.DataFrame]:
    """Read a manifest and check ``manifest.csv`` against the digest in ``manifest.json``."""
    mdir = resolve_manifest_dir(path)
    info = read_manifest_info(mdir)
    cpath = mdir / "manifest.csv"
    if not cpath.is_file():
        raise TumorsegError(f"{cpath}: missing; re-run tumorseg ingest")
    data = cpath.read_bytes()
    if sha256_bytes(data) != info.dataset_digest:
        raise TumorsegError(f"{cpath}: changed since ingest (digest mismatch); re-run tumorseg ingest, do not edit it")
    df = pd.read_csv(cpath, dtype={"case_id": str, "image": str, "mask": str, "group": str, "split": str},
                     keep_default_na=False)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise TumorsegError(f"{cpath}: missing columns {missing}; re-run tumorseg ingest")
    return info, df


def select_split(df: pd.DataFrame, split: str, source: str | os.PathLike[str]) -> pd.DataFrame:
    """Rows of one split; an empty split is a one-line error."""
    rows = df[df["split"] == split]
    if rows.empty:
        present = sorted(set(df["split"]))
        groups = df["group"].nunique() if "group" in df.columns else len(df)
        raise TumorsegError(f"{source}: no cases in split '{split}' (splits present: {', '.join(present)}; "
                            f"{len(df)} cases in {groups} group(s)); re-ingest so that it gets some: more patients, "
                            "a --group-pattern whose first capture group is the patient's id, or other --fractions")
    return rows.reset_index(drop=True)


def image_path(info: ManifestInfo, row: Any) -> Path:
    """Absolute path of a row's image (its first channel file, where one file holds each channel)."""
    return image_paths(info, row)[0]


def image_paths(info: ManifestInfo, row: Any) -> list[Path]:
    """Absolute paths of a row's image file(s): one, or one per channel (nnU-Net's ``case_0000``, ...)."""
    return [Path(info.data_root) / p for p in str(row["image"]).split(MASK_SEP)]


def mask_paths(info: ManifestInfo, row: Any) -> list[Path]:
    """Absolute paths of a row's mask file(s)."""
    return [Path(info.data_root) / p for p in str(row["mask"]).split(MASK_SEP)]


def verify_files(info: ManifestInfo, df: pd.DataFrame, source: str | os.PathLike[str]) -> None:
    """Check every image and mask still exists with the hash recorded at ingest."""
    checked: dict[str, str] = {}

    def current(paths: list[Path]) -> str:
        for path in paths:
            if not path.exists():
                raise TumorsegError(f"{path}: listed in {source} but missing; restore it or re-run tumorseg ingest")
        key = "|".join(str(p) for p in paths)
        if key not in checked:
            checked[key] = combined_sha256(paths)
        return checked[key]

    for row in df.to_dict("records"):
        for files, expected in ((image_paths(info, row), row["image_sha256"]),
                                (mask_paths(info, row), row["mask_sha256"])):
            if current(files) != expected:
                raise TumorsegError(f"{files[0]}: changed since ingest (sha256 differs); re-run tumorseg ingest")


def combine_hashes(hashes: list[str]) -> str:
    """The recorded hash of a case's mask files.

    One file: its SHA-256. Merged masks: the SHA-256 of their hashes joined by newlines.
    """
    return hashes[0] if len(hashes) == 1 else sha256_bytes("\n".join(hashes).encode())


def combined_sha256(paths: list[Path]) -> str:
    """:func:`combine_hashes` of files on disk (a DICOM series folder or MHD pair hashed as ingest read it)."""
    from tumorseg.imageio.read import source_sha256

    return combine_hashes([source_sha256(p) for p in paths])
