"""The on-disk training cache: same inputs as RAM, reuse, atomic builds, damage detected, cache CLI."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tumorseg.cli import app
from tumorseg.config import IngestConfig, TrainConfig, load_config
from tumorseg.errors import TumorsegError

TINY = ["plan=off", "epochs=2", "batch_size=4", "image_size=[48,48]", "model.channels=[8,16,32]",
        "model.num_res_units=1", "log_model=false", "val_overlays=0", "postprocess=none", "deterministic=true"]
SIZE = (48, 40)  # not the images' 64x64: the cache resizes


def _rows(manifest: Path, split: str = "train") -> tuple[object, object, object]:
    from tumorseg.data import CaseReader
    from tumorseg.manifest import load_manifest, select_split

    info, df = load_manifest(manifest)
    rows = select_split(df, split, "m")
    return info, rows, CaseReader(info, str(manifest / "manifest.csv"))


def _disk(manifest: Path, root: Path, mode: str = "percentile"):  # type: ignore[no-untyped-def]
    from tumorseg.data.disk import open_or_build

    info, rows, reader = _rows(manifest)
    return open_or_build(reader, rows, root, "train", SIZE, 1, mode, info.dataset_digest)  # type: ignore[attr-defined]


@pytest.mark.parametrize("mode", ["percentile", "dataset", "image"])
def test_disk_split_reads_what_the_ram_split_holds(manifest: Path, tmp_path: Path, mode: str) -> None:
    """Same cases, same normalisation: inputs equal to float16 precision, masks and originals exactly."""
    from tumorseg.data.split import in_ram
    from tumorseg.train.inputs import _stats

    info, rows, reader = _rows(manifest)
    ram, ram_summary = in_ram(reader, rows, SIZE, 1, mode, "ram")  # type: ignore[arg-type]
    disk, disk_summary = _disk(manifest, tmp_path, mode)
    np.testing.assert_allclose(ram_summary.sums, disk_summary.sums)
    stats = _stats(mode, ram_summary)
    ram.normalise(stats)
    disk.normalise(stats)
    assert disk.case_ids == ram.case_ids and len(disk) == len(ram) > 4
    np.testing.assert_array_equal(disk.fg_pixels, ram.fg_pixels)
    idx = np.array([3, 0, 1, 2, len(ram) - 1])  # a consecutive run and jumps
    xr, yr = ram.to_device(ram.read(idx), torch.device("cpu"))
    xd, yd = disk.to_device(disk.read(idx), torch.device("cpu"))
    assert xd.dtype == torch.float32 and xd.shape == (5, 1, *SIZE)
    assert yr is not None and yd is not None and torch.equal(yr, yd)
    spread = float(xr.abs().max())
    assert float((xr - xd).abs().max()) <= 2e-3 * max(spread, 1.0)
    for i in (0, len(ram) - 1):
        np.testing.assert_array_equal(disk.original_mask(i), ram.original_mask(i))
        assert disk.original_mask(i).shape == (64, 64)
    # and both are what inference feeds the network (tumorseg.inference.preprocess) for the same image
    from tumorseg.inference import preprocess

    case = reader.read(rows.iloc[3])  # type: ignore[attr-defined]
    expected = preprocess(case.image, SIZE, 1, stats)
    assert torch.allclose(xr[0], expected, atol=1e-4)
    assert float((xd[0] - expected).abs().max()) <= 2e-3 * max(float(expected.abs().max()), 1.0)


def test_cache_is_reused_and_keyed_by_settings(manifest: Path, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tumorseg.data.disk")
    first, _ = _disk(manifest, tmp_path)
    stamp = (first.folder / "images.npy").stat().st_mtime_ns
    again, _ = _disk(manifest, tmp_path)
    assert again.folder == first.folder and (first.folder / "images.npy").stat().st_mtime_ns == stamp
    assert "reusing" in caplog.text
    other, _ = _disk(manifest, tmp_path, "image")  # another normalisation: another folder
    assert other.folder != first.folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.folder.name, other.folder.name])


@pytest.mark.parametrize(("damage", "said"), [("truncate", "truncated"), ("delete", "missing"),
                                               ("meta", "no meta.json")])
def test_damaged_cache_is_detected_and_rebuilt(manifest: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               damage: str, said: str) -> None:
    good, _ = _disk(manifest, tmp_path)
    expected = good.read(np.arange(len(good))).images.clone()
    folder = good.folder
    del good
    if damage == "truncate":
        with open(folder / "images.npy", "r+b") as f:
            f.truncate((folder / "images.npy").stat().st_size - 100)
    elif damage == "delete":
        (folder / "masks.npy").unlink()
    else:
        (folder / "meta.json").unlink()
    caplog.set_level(logging.INFO, logger="tumorseg.data.disk")
    rebuilt, _ = _disk(manifest, tmp_path)
    assert f"cache {folder}: " in caplog.text and said in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(rebuilt.read(np.arange(len(rebuilt))).images, expected)


def test_interrupted_build_leaves_nothing_trusted(manifest: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tumorseg.data import split

    real = split.prepare
    calls = {"n": 0}

    def dies_on_the_fifth(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(split, "prepare", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        _disk(manifest, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-cache left to trust
    # a build killed outright (no chance to clean up) leaves a .partial folder: never trusted, then removed;
    # one of a build still running on another host (shared filesystem) is left alone
    import socket

    from tumorseg.data.disk import cache_key, folder_name

    info, rows, _ = _rows(manifest)
    name = folder_name("train", SIZE, cache_key(info.dataset_digest, "train",  # type: ignore[attr-defined]
                                                [str(c) for c in rows["case_id"]], SIZE, 1, "percentile"))  # type: ignore[index]
    host = socket.gethostname().replace("-", "_")
    dead = tmp_path / f"{name}.partial-{host}-999999999"
    elsewhere = tmp_path / f"{name}.partial-otherhost-{os.getpid()}"
    for p in (dead, elsewhere):
        p.mkdir()
        (p / "meta.json").write_text("{}")
    monkeypatch.setattr(split, "prepare", real)
    done, _ = _disk(manifest, tmp_path)
    assert done.folder.name == name and (done.folder / "meta.json").is_file()
    assert not dead.exists() and elsewhere.exists()


def test_truncated_read_is_one_line(manifest: Path, tmp_path: Path) -> None:
    """Damage after opening (another process truncates a file) stops with the file's name, not garbage."""
    disk, _ = _disk(manifest, tmp_path)
    with open(disk.folder / "masks.npy", "r+b") as f:
        f.truncate(200)
    with pytest.raises(TumorsegError, match=r"masks\.npy: truncated .*tumorseg cache clear"):
        disk.read(np.array([len(disk) - 1]))


def test_training_from_disk_is_deterministic_and_auto_switches(manifest: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from tumorseg import train
    from tumorseg.checkpoint import load as load_checkpoint
    from tumorseg.data import split

    def cfg(name: str, *extra: str) -> TrainConfig:
        return load_config(TrainConfig, None, [*TINY, f"run_name={name}", *extra],
                           base={"manifest": str(manifest), "out": str(tmp_path)})

    a = train.run(cfg("a", "cache=disk"))
    assert sorted(p.name.split("-")[0] for p in (manifest / "cache").iterdir()) == ["train", "val"]
    monkeypatch.setattr(split, "RAM_LIMIT_BYTES", 1024)  # auto: this dataset is now "large"
    b = train.run(cfg("b", "cache=auto"))
    from tumorseg.checkpoint import train_config

    assert train_config(load_checkpoint(tmp_path / "b" / "last.pt")).cache == "disk"  # a resume reads the same cache
    wa, wb = load_checkpoint(tmp_path / "a" / "last.pt")["model"], load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["val_dice"] for h in a.history] == [h["val_dice"] for h in b.history]


def test_cache_cli_lists_and_clears(manifest: Path, tmp_path: Path) -> None:
    _disk(manifest, tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "list", str(manifest), "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and "train" in res.output and "48x40" in res.output
    res = runner.invoke(app, ["cache", "clear", str(manifest), "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and "removed 1 cache folder(s) of tiny" in res.output
    assert list(tmp_path.iterdir()) == []
    res = runner.invoke(app, ["cache", "list", str(manifest), "--cache-dir", str(tmp_path)])
    assert res.exit_code == 0 and "no cache" in res.output
    for command in ("list", "clear"):  # a misspelt manifest folder is named, not reported as having no cache
        res = runner.invoke(app, ["cache", command, str(tmp_path / "nosuch")])
        assert res.exit_code == 2 and res.stderr.strip() == (f"error: {tmp_path / 'nosuch'}: no such manifest folder; "
                                                              "give data_manifest/NAME (or --cache-dir)")


def test_unwritable_cache_folder_is_one_line(manifest: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        root = blocker / "cache"  # a folder under a file: fails even for root
    else:
        tmp_path.chmod(0o500)
        root = tmp_path / "cache"
    with pytest.raises(TumorsegError, match="cannot create the cache folder.*cache_dir"):
        _disk(manifest, root)


def test_reingested_manifest_gets_a_new_cache_and_the_old_one_goes(synth_data: Path, tmp_path: Path) -> None:
    """A scheduled pipeline re-ingests every cycle: the old version's cache must not pile up."""
    import shutil

    from tumorseg import ingest
    from tumorseg.data import CaseReader
    from tumorseg.data.disk import open_or_build
    from tumorseg.manifest import load_manifest, select_split

    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    other = tmp_path / "other-cache"
    cfg = IngestConfig(images_dir=data / "images", masks_dir=data / "masks", name="grows", out_dir=tmp_path / "dm",
                       group_pattern=r"(patient_\d+)", seed=3, workers=1)

    def build(manifest: Path, root: Path, size: tuple[int, int] = SIZE) -> Path:
        info, df = load_manifest(manifest)
        reader = CaseReader(info, str(manifest / "manifest.csv"))
        split, _ = open_or_build(reader, select_split(df, "train", "m"), root, "train", size, 1, "percentile",
                                 info.dataset_digest)
        return split.folder

    manifest = ingest.run(cfg).manifest_dir
    first = build(manifest, tmp_path / "cache")
    # another manifest sharing the cache root is left alone
    shutil.copytree(manifest, tmp_path / "dm2" / "grows")
    kept = build(tmp_path / "dm2" / "grows", other, (32, 32))
    shutil.copytree(kept, tmp_path / "cache" / kept.name)
    for name in ("images", "masks"):  # a new patient arrives; ingest again into the same manifest
        shutil.copy(data / name / "patient_000_slice_0.png", data / name / "patient_999_slice_0.png")
    manifest = ingest.run(cfg).manifest_dir
    second = build(manifest, tmp_path / "cache")
    assert second != first and second.is_dir() and not first.exists()
    assert (tmp_path / "cache" / kept.name).is_dir()


def test_folders_in_use_are_neither_pruned_nor_cleared(manifest: Path, tmp_path: Path) -> None:
    """An overlapping run still reading an older cache keeps it; once closed, it can go."""
    from tumorseg.data.maintenance import clear, prune_stale

    split, _ = _disk(manifest, tmp_path)
    folder, owner = split.folder, split.meta["manifest_path"]
    prune_stale(tmp_path, {"manifest_path": owner, "digest": "a newer ingest"})
    assert folder.is_dir()
    assert clear(tmp_path, manifest) == (0, 0, 1)
    assert split.read(np.array([0])).images.shape[0] == 1  # still readable
    split.close()
    prune_stale(tmp_path, {"manifest_path": owner, "digest": "a newer ingest"})
    assert not folder.exists()
