"""Housekeeping of the on-disk cache: builds in progress, folders in use, stale versions, ``tumorseg cache``.

A :class:`~tumorseg.data.disk.DiskSplit` holds a shared ``flock`` on its folder's ``meta.json``
while open; removing a folder (pruning an older manifest version, ``tumorseg cache clear``) first
tries an exclusive lock and skips the folder when a run still reads it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def partial_suffix() -> str:
    """``.partial-<host>-<pid>``: a build in progress, told apart across the hosts of a shared filesystem."""
    return f".partial-{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def _dead_partial(path: Path) -> bool:
    """A ``.partial`` folder whose builder (on this host) is gone; other hosts' folders are left alone."""
    host, _, pid = path.name.rsplit(".partial-", 1)[-1].rpartition("-")
    if host != socket.gethostname().replace("-", "_") or not pid.isdigit():
        return False
    return int(pid) == os.getpid() or not _alive(int(pid))


def remove_stale_partials(root: Path, name: str) -> None:
    """Remove the dead partial builds of folder ``name`` (see :func:`_dead_partial`)."""
    for old in root.glob(f"{name}.partial-*"):
        if _dead_partial(old):
            shutil.rmtree(old, ignore_errors=True)


def _unused(folder: Path) -> bool:
    """True when no open :class:`DiskSplit` holds ``folder`` (its shared lock on ``meta.json``)."""
    try:
        fd = os.open(folder / "meta.json", os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases the probe's lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_stale(root: Path, current: dict[str, Any]) -> None:
    """Remove folders built from an older version of the same manifest (re-ingested since: never used again).

    A scheduled pipeline re-ingests into the same manifest folder every cycle; without this, each
    cycle would leave a full cache behind. Folders of other manifests sharing ``root`` are kept.
    """
    for child in sorted(root.iterdir()):
        try:
            meta = json.loads((child / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("manifest_path") == current["manifest_path"] and meta.get("digest") != current["digest"]:
            if not _unused(child):
                log.info("cache %s: built for an older version of %s, but a run still reads it; kept", child,
                         current["manifest_path"])
                continue
            log.info("cache %s: built for an older version of %s; removing it", child, current["manifest_path"])
            shutil.rmtree(child, ignore_errors=True)


def cache_root(manifest: Path, cache_dir: Path | None) -> tuple[Path, Path]:
    """``(manifest folder, cache folder)`` of ``tumorseg cache``.

    A manifest folder that is not there is an error unless the cache folder is named (the caches of a manifest
    since removed can still be listed and cleared).
    """
    from tumorseg.errors import TumorsegError
    from tumorseg.manifest import resolve_manifest_dir

    manifest = resolve_manifest_dir(manifest)
    if cache_dir is None and not manifest.is_dir():
        raise TumorsegError(f"{manifest}: no such manifest folder; give data_manifest/NAME (or --cache-dir)")
    return manifest, cache_dir or manifest / "cache"


def clear(root: Path, manifest: Path) -> tuple[int, int, int]:
    """Remove ``manifest``'s cache folders under ``root`` (and dead partial builds); (folders, bytes, in use).

    Folders of other manifests sharing ``root`` and folders an open run still reads are kept.
    """
    if not root.is_dir():
        return 0, 0, 0
    mine = str(manifest.resolve())
    folders, size, busy = 0, 0, 0
    for child in sorted(root.iterdir()):
        if not child.is_dir():
            continue
        if ".partial-" in child.name:
            if not _dead_partial(child):
                continue
        else:
            try:
                meta = json.loads((child / "meta.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if meta.get("manifest_path") != mine:
                continue
            if not _unused(child):
                busy += 1
                continue
        size += sum(f.stat().st_size for f in child.rglob("*") if f.is_file())
        shutil.rmtree(child, ignore_errors=True)
        folders += 1
    return folders, size, busy


def entries(root: Path, manifest: Path) -> list[dict[str, Any]]:
    """One row per complete cache folder of ``manifest`` under ``root``: folder, split, size, cases, MiB."""
    rows: list[dict[str, Any]] = []
    if not root.is_dir():
        return rows
    for child in sorted(root.iterdir()):
        meta_path = child / "meta.json"
        if not meta_path.is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("manifest_path") != str(manifest.resolve()):
            continue
        used = sum(f.stat().st_size for f in child.iterdir() if f.is_file())
        rows.append({"folder": child.name, "split": meta.get("split"), "size": "x".join(map(str, meta.get("size", []))),
                     "cases": meta.get("n"), "MiB": round(used / 2**20, 1)})
    return rows
