"""Discovery: pair image files with their mask files by stem, never by position."""

from __future__ import annotations

import logging
import os
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from tumorseg.config import IngestConfig
from tumorseg.fsutil import not_utf8
from tumorseg.imageio import EXTENSIONS, FORMATS_TEXT, split_ext
from tumorseg.imageio.dicom import is_series_folder
from tumorseg.imageio.volume import CHANNEL_FILE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One case to inspect: an image and its mask files, as POSIX paths relative to the data root.

    Plain strings, not ``Path`` objects: tasks are pickled to the worker processes and the
    paths go into the manifest as they are.
    """

    key: str
    image: str
    masks: tuple[str, ...]
    group: str | None
    split: str | None = None
    """A split the user fixed (a pairs list's ``split`` column); ``None``: the stable hash split."""


def _list_files(folder: Path, recursive: bool, skip: frozenset[Path] = frozenset()) -> list[tuple[str, bool, bool]]:
    """Files under ``folder`` as sorted ``(relative POSIX path, is_symlink, is_series)`` triples.

    A folder that holds one DICOM series is listed as one image (``is_series``), not walked.
    Hidden files and folders are skipped, and so are symlinked folders (never followed) and
    the folders in ``skip`` (resolved paths): a masks folder or the manifest output folder
    that lies inside the walked tree is not read as images on a ``--recursive`` walk.
    Symlinked files are listed (even broken ones, so they are reported, not lost). Plain
    strings and ``os.scandir`` rather than ``pathlib``: discovery of large folders is
    otherwise dominated by path-object overhead.
    """
    out: list[tuple[str, bool, bool]] = []
    stack = [("", os.fspath(folder))]
    while stack:
        rel_dir, abs_dir = stack.pop()
        with os.scandir(abs_dir) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if Path(entry.path).resolve() in skip:
                        continue
                    if is_series_folder(entry.path):
                        out.append((f"{rel_dir}{entry.name}", False, True))
                    elif recursive:
                        stack.append((f"{rel_dir}{entry.name}/", entry.path))
                elif entry.is_symlink():
                    if not entry.is_dir():
                        out.append((f"{rel_dir}{entry.name}", True, False))
                elif entry.is_file():
                    out.append((f"{rel_dir}{entry.name}", False, False))
    out.sort(key=lambda item: item[0].split("/"))
    return out


KNOWN_MASK_SUFFIXES = ("_mask", "_segmentation", "_seg", "_lesion", "_gt", "_label")
"""Mask suffixes public datasets use (``x_mask``; ISIC's ``x_Segmentation``; PH2's ``x_lesion``): all of them,
in any case, mark a mask under the default ``--mask-suffix _mask``; any other ``--mask-suffix`` is the only one."""

MASK_FOLDERS = frozenset({"mask", "masks", "label", "labels", "labelstr", "labelsts", "gt", "groundtruth",
                          "groundtruths", "annotation", "annotations", "segmentation", "segmentations"})
"""Folder names (lower case, without spaces, ``_`` and ``-``) that hold masks named like their images:
Kvasir-SEG's ``masks/``, CVC-ClinicDB's ``Ground Truth/``, nnU-Net's ``labelsTr/``."""


def _mask_regex(suffix: str) -> re.Pattern[str]:
    if not suffix:  # masks named exactly like their images (in their own folder): no index to read off a name
        return re.compile(r"^(?P<base>.+)(?P<idx>)$")
    if suffix != "_mask":
        return re.compile(rf"^(?P<base>.+?){re.escape(suffix)}(?:_(?P<idx>\d+))?$")
    alternatives = "|".join(re.escape(s) for s in KNOWN_MASK_SUFFIXES)  # any case: ISIC writes _Segmentation
    return re.compile(rf"^(?P<base>.+?)(?i:{alternatives})(?:_(?P<idx>\d+))?$")


def in_mask_folder(rel: str) -> bool:
    """True for a file whose folder's name says it holds masks (:data:`MASK_FOLDERS`)."""
    folder = rel.rpartition("/")[0].rpartition("/")[2]
    return re.sub(r"[\s_-]", "", folder.lower()) in MASK_FOLDERS


def base_name(rel: str) -> str:
    """The file name of a POSIX relative path."""
    return rel.rpartition("/")[2]


UNSUPPORTED_IMAGES = {".gif": "PNG", ".webp": "PNG", ".jp2": "PNG", ".heic": "PNG", ".nhdr": "NRRD (one file)"}
"""Image formats ingest does not read: such files are rejected (with the format to convert to), not ignored."""


def _not_an_image(ext: str) -> str:
    """The ``ignored.csv`` reason for a file whose extension is not an image format."""
    return f"not an image ({ext or 'no extension'}); ingest reads {FORMATS_TEXT}"


def discover(cfg: IngestConfig, root: Path) -> tuple[list[Task], list[tuple[str, str]], list[tuple[str, str]]]:
    """Pair images with masks by stem.

    Returns:
        The cases, the rejected image files and the ignored non-image files (the last two
        as ``(root-relative path, reason)`` pairs).
    """
    assert cfg.images_dir is not None, "a pairs list is discovered by tumorseg.ingest.pairs"
    images_dir = cfg.images_dir.resolve()
    masks_dir = (cfg.masks_dir or cfg.images_dir).resolve()
    same_folder = masks_dir == images_dir
    mask_re = _mask_regex(cfg.mask_suffix)
    rejected: list[tuple[str, str]] = []
    ignored: list[tuple[str, str]] = []
    # files are kept as paths relative to ``root`` (the manifest's form) until a Task is made
    images: dict[str, list[str]] = defaultdict(list)
    masks: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    image_rel: dict[str, str] = {}  # root-relative -> relative to IMAGES_DIR (for --group-pattern)

    def key_of(rel: str, stem: str) -> str:
        rel_dir = rel.rpartition("/")[0]
        # NFC: a name typed on Linux and the same name copied from macOS (NFD) are one stem
        return unicodedata.normalize("NFC", f"{rel_dir}/{stem}" if rel_dir else stem)

    def prefix_of(folder: Path) -> str:
        rel = folder.relative_to(root).as_posix()
        return "" if rel == "." else f"{rel}/"

    def accept(rel_root: str, is_link: bool, is_series: bool) -> str | None:
        """The file's stem, or ``None`` for a file that cannot be a case.

        A file that is not an image by its extension is ignored; an image file that cannot be
        used is rejected. A DICOM series folder's stem is its whole name.
        """
        if shown := not_utf8(rel_root):
            rejected.append((shown, "file name is not valid UTF-8 (written in an older encoding?); rename it"))
            return None
        if is_series:
            return base_name(rel_root)
        stem, ext = split_ext(base_name(rel_root))
        if ext in UNSUPPORTED_IMAGES:
            rejected.append((rel_root, f"unsupported image format '{ext}'; convert it to {UNSUPPORTED_IMAGES[ext]} "
                                       "(lossless), which ingest reads"))
            return None
        if ext not in EXTENSIONS:
            ignored.append((rel_root, _not_an_image(ext)))
            return None
        if is_link and not (root / rel_root).resolve().is_relative_to(root):
            rejected.append((rel_root, f"resolves outside the data root {root} (symlink?); copy the file in"))
            return None
        return stem

    # manifests written inside the input tree must not be ingested by the next --recursive run
    outputs = {cfg.out_dir.resolve(), (cfg.out_dir / cfg.name).resolve()}
    prefix = prefix_of(images_dir)
    for rel, is_link, is_series in _list_files(images_dir, cfg.recursive,
                                               frozenset({masks_dir, *outputs}) - {images_dir}):
        rel_root = prefix + rel
        stem = accept(rel_root, is_link, is_series)
        if stem is None:
            continue
        m = mask_re.match(stem) if same_folder else None
        if m:
            masks[key_of(rel, m["base"])][int(m["idx"] or 0)].append(rel_root)
        elif same_folder and in_mask_folder(rel):  # masks/x.jpg beside images/x.jpg, one root walked
            masks[key_of(rel, stem)][0].append(rel_root)
        else:
            images[key_of(rel, stem)].append(rel_root)
            image_rel[rel_root] = rel
    if not same_folder:
        prefix = prefix_of(masks_dir)
        for rel, is_link, is_series in _list_files(masks_dir, cfg.recursive,
                                                   frozenset({images_dir, *outputs}) - {masks_dir}):
            rel_root = prefix + rel
            stem = accept(rel_root, is_link, is_series)
            if stem is None:
                continue
            m = mask_re.match(stem)
            base, idx = (m["base"], int(m["idx"] or 0)) if m else (stem, 0)
            masks[key_of(rel, base)][idx].append(rel_root)

    _pair_sibling_folders(images, masks)
    _pair_channel_files(images, masks)
    tasks: list[Task] = []
    for key in sorted(set(images) | set(masks)):
        imgs = images.get(key, [])
        mask_sets = masks.get(key, {})
        mask_files = [p for idx in sorted(mask_sets) for p in mask_sets[idx]]
        if not imgs:
            for p in mask_files:
                rejected.append((p, "mask without image: no image with this stem; add it or remove the mask"))
            continue
        if len(imgs) > 1:
            names = ", ".join(base_name(p) for p in imgs)
            for p in imgs + mask_files:
                rejected.append((p, f"two images share the stem '{key}' ({names}); keep one of them"))
            continue
        stem = base_name(key)
        if not mask_files:
            ext = split_ext(base_name(imgs[0].split("|")[0]))[1] or ".png"  # a DICOM series folder: none
            rejected.append(
                (imgs[0],
                 f"image without mask: expected a mask named like '{stem}{cfg.mask_suffix}{ext}'"
                 + (f" or '{stem}{ext}' in a masks/ folder beside its own" if same_folder
                    else f" or '{stem}{ext}' in {masks_dir}"))
            )
            continue
        clash = [ps for ps in mask_sets.values() if len(ps) > 1]
        if clash:
            names = ", ".join(base_name(p) for p in clash[0])
            for p in imgs + mask_files:
                rejected.append((p, f"two masks share one stem ({names}); keep one of them"))
            continue
        group = _group_of(cfg, image_rel[imgs[0].split("|")[0]], key)
        if group is None:
            rejected.append((imgs[0], f"path does not match --group-pattern {cfg.group_pattern!r}; fix the pattern"))
            continue
        tasks.append(Task(key, imgs[0], tuple(mask_files), group))
    return tasks, rejected, ignored


def _pair_sibling_folders(images: dict[str, list[str]], masks: dict[str, dict[int, list[str]]]) -> None:
    """Pair an image with masks of the same stem in a sibling folder (``x/images/a.png`` + ``x/masks/a_mask.png``).

    Public datasets often keep images and masks in sibling folders under one parent (per
    class or per patient). An image with no mask in its own folder takes the masks of the same
    stem from a sibling folder, but only when that stem names exactly one such image and one
    such mask set under the parent: an ambiguous stem stays unpaired (and is rejected).
    """
    def split(key: str) -> tuple[str, str]:
        folder, _, stem = key.rpartition("/")
        return folder.rpartition("/")[0] if folder else "\0", stem

    lonely_images: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key in images:
        if key not in masks:
            lonely_images[split(key)].append(key)
    lonely_masks: dict[tuple[str, str], list[str]] = defaultdict(list)
    for key in masks:
        if key not in images:
            lonely_masks[split(key)].append(key)
    for where, keys in lonely_images.items():
        mask_keys = lonely_masks.get(where, [])
        if len(keys) == 1 and len(mask_keys) == 1:
            masks[keys[0]] = masks.pop(mask_keys[0])


def _pair_channel_files(images: dict[str, list[str]], masks: dict[str, dict[int, list[str]]]) -> None:
    """Join nnU-Net's per-channel image files into one case whose mask has the bare stem (``case.nii.gz``).

    Only where no mask has a file's own stem, the bare stem has masks but no image, and the channels number
    ``0000`` up without a gap; the joined paths (channel order, ``|`` between) are the case's ``image``.
    """
    by_base: dict[str, dict[int, str]] = defaultdict(dict)
    for key in images:
        m = CHANNEL_FILE.match(key)
        if m and key not in masks and m["base"] in masks and m["base"] not in images and len(images[key]) == 1:
            by_base[m["base"]][int(m["channel"])] = key
    for base, channels in by_base.items():
        if sorted(channels) != list(range(len(channels))):
            continue  # a gap: left as separate images (each rejected without a mask)
        images[base] = ["|".join(images.pop(channels[c])[0] for c in range(len(channels)))]


def _group_of(cfg: IngestConfig, rel: str, key: str) -> str | None:
    """The group of an image from its path relative to IMAGES_DIR."""
    if cfg.group_pattern:
        m = re.search(cfg.group_pattern, rel)
        if not m:
            return None
        return m.group(1) if m.re.groups else m.group(0)
    if cfg.group_by == "folder":
        return rel.rpartition("/")[0] or "."
    return key
