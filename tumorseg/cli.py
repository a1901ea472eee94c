"""The ``tumorseg`` command line. It only parses arguments and calls ``<stage>.run(config)``.

Heavy modules (torch, MONAI, MLflow) are imported inside the commands, so ``tumorseg
--help`` answers at once. A :class:`~tumorseg.errors.TumorsegError` becomes one line on
stderr and exit code 2 (4 for a held pipeline lock); success exits 0.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from tumorseg.config import (
    EvaluateConfig,
    IngestConfig,
    PredictConfig,
    TrackingConfig,
    TrainConfig,
    build_config,
)
from tumorseg.errors import ExitCode, TumorsegError, filesystem_refusal
from tumorseg.labels import parse_labels, parse_regions
from tumorseg.splits import parse_fractions
from tumorseg.tracking import check_uri, resolve_tracking_uri

app = typer.Typer(
    name="tumorseg",
    help="Tumour segmentation on MONAI + PyTorch, tracked in MLflow. Stages: synth, ingest, train, evaluate, "
    "predict; `pipeline run` chains them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pipeline_app = typer.Typer(help="Run a pipeline YAML from pipelines/ (ingest -> train -> evaluate -> promote).",
                           no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
cache_app = typer.Typer(help="The on-disk training cache (cache: disk, or auto above 2 GiB of cases).",
                        no_args_is_help=True)
app.add_typer(cache_app, name="cache")

F = TypeVar("F", bound=Callable[..., Any])

TrackingUri = Annotated[
    str | None,
    typer.Option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)"),
]
Experiment = Annotated[str, typer.Option("--experiment", help="MLflow experiment name")]
Device = Annotated[str, typer.Option("--device", help="auto | cuda | cpu")]


def user_errors(fn: F) -> F:
    """Turn our user errors, and the file system's refusals a user can fix, into one line and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TumorsegError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            if (line := filesystem_refusal(exc)) is None:
                raise
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(ExitCode.CONFIG) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(ExitCode.INTERRUPTED) from None

    return wrapper  # type: ignore[return-value]


def _tracking(uri: str | None, experiment: str) -> TrackingConfig:
    check_uri(resolve_tracking_uri(uri))  # before the stage does any work
    return TrackingConfig(uri=uri, experiment=experiment)


def _echo_json(obj: Any) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, default=str))


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and errors only")] = False,
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "git"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


# ----------------------------------------------------------------------------- synth


@app.command()
@user_errors
def synth(
    out_dir: Annotated[Path, typer.Argument(help="folder to write images/ and masks/ into")],
    n: Annotated[int, typer.Option("--n", help="number of image/mask pairs")] = 160,
    size: Annotated[int, typer.Option("--size", help="image side in pixels")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="random seed (same seed, same files)")] = 0,
    classes: Annotated[int, typer.Option("--classes", help="tumour classes: 1 = binary masks, K > 1 = label "
                                         "maps of the values 0..K")] = 1,
    dims: Annotated[int, typer.Option("--dims", help="2: PNG images; 3: NIfTI volumes (SIZE^3) with ellipsoid "
                                      "tumours")] = 2,
) -> None:
    """Write the built-in synthetic dataset: N image/mask PNG pairs, 4 slices per patient (or N volumes)."""
    from tumorseg import synth as stage

    res = stage.run(out_dir, n=n, size=size, seed=seed, classes=classes, dims=dims)
    what = "volumes" if dims == 3 else "pairs"
    typer.echo(f"wrote {res.n} {what} ({res.n_empty} with empty masks) to {res.images_dir} and {res.masks_dir}")
    labels = f" --labels {stage.labels_text(classes)}" if classes > 1 else ""
    grouping = "   (each volume one case)" if dims == 3 else f" --group-pattern '{stage.GROUP_PATTERN}'"
    typer.echo(f"ingest with: tumorseg ingest {res.images_dir} {res.masks_dir} --name NAME{labels}{grouping}")


# ----------------------------------------------------------------------------- ingest


@app.command()
@user_errors
def ingest(
    images_dir: Annotated[Path | None, typer.Argument(
        help="folder of images (and masks, if MASKS_DIR is omitted); omit with --pairs")] = None,
    masks_dir: Annotated[Path | None, typer.Argument(help="folder of masks (default: IMAGES_DIR)")] = None,
    name: Annotated[str, typer.Option("--name", help="manifest name: writes data_manifest/NAME/")] = ...,  # type: ignore[assignment]
    pairs: Annotated[Path | None, typer.Option(
        "--pairs", help="CSV listing the cases instead of folders: columns image,mask[,group][,split], paths "
                        "relative to the CSV")] = None,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="where manifests live")] = Path("data_manifest"),
    mask_suffix: Annotated[str, typer.Option(help="stem suffix marking a mask (x_mask.png, x_mask_1.png)")] = "_mask",
    recursive: Annotated[bool, typer.Option("--recursive", help="walk subfolders")] = False,
    group_pattern: Annotated[
        str | None, typer.Option(help="regex on the relative path; group 1 is the patient")
    ] = None,
    group_by: Annotated[str, typer.Option(
        help="auto | case | folder: grouping without --group-pattern; auto: each case its own group, but each "
             "stack of numbered 2D slices (x_1.png, x_2.png, ...) one group where they are slices of a volume")
    ] = "auto",
    fractions: Annotated[str, typer.Option(help="train,val,test fractions")] = "0.7,0.15,0.15",
    seed: Annotated[int, typer.Option(help="split seed")] = 0,
    folds: Annotated[int, typer.Option(help="cross-validation folds over non-test cases (0 = none)")] = 0,
    mask_threshold: Annotated[float | None, typer.Option(help="binarise multi-valued masks: values > T")] = None,
    labels: Annotated[str | None, typer.Option(
        help="label maps: declared values and names, e.g. 0=background,1=necrosis,2=edema")] = None,
    regions: Annotated[str | None, typer.Option(
        help="region-based training over the labels (overlapping, painted back in this order), e.g. "
             "'whole=1,2,3 core=1,3 enhancing=3'")] = None,
    slice_axis: Annotated[int | None, typer.Option(help="cut volumes (NIfTI, NRRD/MHA, DICOM, TIFF stacks) into "
                                                        "2D slices along this axis; default: a volume is a case")
                          ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="fail (exit 2, no manifest) on any rejected file")] = False,
    workers: Annotated[int, typer.Option(help="decode processes (0 = one per core, max 8)")] = 0,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "tumorseg",
) -> None:
    """Pair images with masks, validate them and write a manifest with stable patient-aware splits."""
    from tumorseg import ingest as stage

    cfg = build_config(
        IngestConfig,
        dict(images_dir=images_dir, masks_dir=masks_dir, pairs=pairs, name=name, out_dir=out_dir,
             mask_suffix=mask_suffix, recursive=recursive, group_pattern=group_pattern, group_by=group_by,
             fractions=parse_fractions(fractions), seed=seed, folds=folds, mask_threshold=mask_threshold,
             labels=parse_labels(labels) if labels is not None else None,
             regions=parse_regions(regions) if regions is not None else None,
             slice_axis=slice_axis, strict=strict, workers=workers,
             tracking=_tracking(tracking_uri, experiment)),
        "ingest options",
    )
    res = stage.run(cfg)
    from tumorseg.report import print_ingest_summary

    print_ingest_summary(res)


# ----------------------------------------------------------------------------- plan


@app.command()
@user_errors
def plan(
    manifest: Annotated[Path, typer.Argument(help="manifest folder, e.g. data_manifest/NAME")],
    budget: Annotated[str | None, typer.Option("--budget", help="training time budget, e.g. 30m, 2h, 90s "
                                               "(default: 30m on a CPU, 15m on a GPU)")] = None,
    device: Device = "auto",
    out: Annotated[Path | None, typer.Option("--out", help="folder for plan.json (default: the manifest folder)")
                   ] = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "tumorseg",
) -> None:
    """Fingerprint the train split, probe the device and write plan.json (what `train --plan` uses)."""
    from tumorseg import planning
    from tumorseg.config import PlanConfig

    cfg = build_config(PlanConfig, dict(manifest=manifest, budget=budget, device=device, out=out,
                                        tracking=_tracking(tracking_uri, experiment)), "plan options")
    result, path = planning.run(cfg)
    from tumorseg.report import print_rows

    print_rows(f"plan for {result.manifest_name}", planning.summary_rows(result))
    typer.echo(f"wrote {path}")


# ----------------------------------------------------------------------------- train


@app.command()
@user_errors
def train(
    manifest: Annotated[Path | None, typer.Argument(help="manifest folder, e.g. data_manifest/NAME")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML training config")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: key=value, dotted for nested")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="folder for run folders (default: runs/)")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="continue a run folder from its last.pt")] = None,
    budget: Annotated[str | None, typer.Option("--budget", help="wall-time budget, e.g. 30m, 2h, 90s: the run "
                                               "ends within it and its LR schedule spans it (default: 30m on a "
                                               "CPU, 15m on a GPU)")] = None,
    plan_file: Annotated[Path | None, typer.Option("--plan", help="plan.json from tumorseg plan (default: plan "
                                                   "now; --set plan=off trains the config as given)")] = None,
    tracking_uri: TrackingUri = None,
    experiment: Annotated[str | None, typer.Option("--experiment", help="MLflow experiment name")] = None,
) -> None:
    """Train on the manifest's train split, validating on val; planned from the data and the budget."""
    started = time.perf_counter()  # the time budget counts the imports below
    from tumorseg import train as stage
    from tumorseg.config import load_config

    if resume is not None:
        extra = [name for name, value in (("MANIFEST", manifest), ("--config", config), ("--set", set_), ("--out", out),
                 ("--budget", budget), ("--plan", plan_file), ("--experiment", experiment)) if value]
        if extra:
            raise TumorsegError(f"--resume {resume} continues that run with its own settings and what is left of its "
                                f"budget; drop {', '.join(extra)} (or start a new run without --resume)")
        res = stage.resume(resume, tracking_uri=tracking_uri, started=started)
    else:
        if manifest is None:
            raise TumorsegError("train needs a MANIFEST folder (e.g. data_manifest/NAME) or --resume RUN_DIR")
        tracking = {k: v for k, v in (("uri", tracking_uri), ("experiment", experiment)) if v}
        given = {"out": out and str(out), "tracking": tracking or None, "budget": budget,
                 "plan": plan_file and str(plan_file)}
        base: dict[str, Any] = {"manifest": str(manifest), **{k: v for k, v in given.items() if v is not None}}
        cfg = load_config(TrainConfig, config, set_, base=base)
        if out is not None:
            cfg.out = out
        cfg.manifest = manifest
        res = stage.run(cfg, started=started)
    if res.is_main_process:
        typer.echo(f"best val Dice {res.best_val_dice:.4f} at epoch {res.best_epoch}; run folder {res.run_dir}")


# ----------------------------------------------------------------------------- evaluate


@app.command()
@user_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="run folder, checkpoint, MLflow run id, or models:/NAME@alias")],
    manifest: Annotated[Path, typer.Option("--manifest", help="manifest folder")] = ...,  # type: ignore[assignment]
    split: Annotated[str, typer.Option(help="split to score")] = "test",
    out: Annotated[Path | None, typer.Option(help="output folder (default: eval/<manifest>-<split>-<model>)")] = None,
    empty_both: Annotated[str, typer.Option("--empty-both", help="score when both masks are empty: nan | 1")] = "nan",
    surface: Annotated[bool, typer.Option("--surface", help="also HD95 and ASSD (pixels; mm for NIfTI)")] = False,
    hd95_empty: Annotated[str, typer.Option(
        "--hd95-empty", help="HD95 of a missed tumour / false positive on a tumour-free image: nan (left out of "
                             "the mean, counted) | diagonal (the image diagonal)")] = "nan",
    batch_size: Annotated[int, typer.Option(help="inference batch size")] = 16,
    device: Device = "auto",
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "tumorseg",
) -> None:
    """Score a model on a manifest split: per-case and per-patient Dice/IoU, summary and review images."""
    from tumorseg import evaluate as stage

    cfg = build_config(
        EvaluateConfig,
        dict(model=model, manifest=manifest, split=split, out=out, empty_both=empty_both, surface=surface,
             hd95_empty=hd95_empty, batch_size=batch_size, device=device, tracking=_tracking(tracking_uri, experiment)),
        "evaluate options",
    )
    res = stage.run(cfg)
    from tumorseg.report import print_eval_summary

    print_eval_summary(res)


# ----------------------------------------------------------------------------- predict


@app.command()
@user_errors
def predict(
    model: Annotated[str, typer.Argument(help="run folder, checkpoint, MLflow run id, or models:/NAME@alias")],
    paths: Annotated[list[Path], typer.Argument(help="INPUT... [OUTPUT_DIR]: image files or folders; the last "
                                                     "path is the output folder unless it is an existing file")],
    output_dir: Annotated[Path | None, typer.Option("--output-dir", "-o", help="output folder")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", help="walk subfolders of input folders")] = False,
    format: Annotated[str, typer.Option("--format", help="png (0/255) | nifti (.nii.gz)")] = "png",
    probabilities: Annotated[bool, typer.Option("--probabilities", help="also write the sigmoid map")] = False,
    tta: Annotated[bool | None, typer.Option("--tta/--no-tta", help="average mirrored predictions "
                                             "(default: what the model chose on val)")] = None,
    threshold: Annotated[float | None, typer.Option(help="probability threshold (default: the model's)")] = None,
    batch_size: Annotated[int, typer.Option(help="inference batch size")] = 16,
    device: Device = "auto",
    tracking_uri: TrackingUri = None,
    experiment: Experiment = "tumorseg",
) -> None:
    """Write a mask for every input image (same name and size)."""
    from tumorseg import predict as stage

    inputs = list(paths)
    if output_dir is None and len(inputs) >= 2 and not inputs[-1].is_file():
        output_dir = inputs.pop()
    cfg = build_config(
        PredictConfig,
        dict(model=model, inputs=inputs, output_dir=output_dir or Path("predictions"), recursive=recursive,
             format=format, probabilities=probabilities, tta=tta, threshold=threshold, batch_size=batch_size,
             device=device, tracking=_tracking(tracking_uri, experiment)),
        "predict options",
    )
    res = stage.run(cfg)
    typer.echo(f"wrote {res.n_written} mask(s) to {res.output_dir}")


# ----------------------------------------------------------------------------- serve


@app.command()
@user_errors
def serve(
    model: Annotated[str, typer.Argument(help="models:/NAME@alias, models:/NAME/VERSION, runs:/<id>/model, an "
                                              "MLflow run id, or a downloaded MLflow model folder")],
    host: Annotated[str, typer.Option("--host", help="address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="port to listen on")] = 5001,
    tracking_uri: TrackingUri = None,
) -> None:
    """Serve a logged model over HTTP with MLflow's scoring server (POST /invocations) until Ctrl-C."""
    from tumorseg import serve as stage

    stage.run(model, host=host, port=port, tracking=TrackingConfig(uri=tracking_uri))


# ----------------------------------------------------------------------------- cache

CacheManifest = Annotated[Path, typer.Argument(help="manifest folder, e.g. data_manifest/NAME", metavar="manifest")]
CacheDir = Annotated[Path | None, typer.Option("--cache-dir", help="cache folder (default: MANIFEST/cache)")]


@cache_app.command("list")
@user_errors
def cache_list(manifest: CacheManifest, cache_dir: CacheDir = None) -> None:
    """List the cache folders of a manifest: split, size, cases, disk used."""
    from tumorseg.data import maintenance
    from tumorseg.report import print_rows

    manifest, root = maintenance.cache_root(manifest, cache_dir)
    rows = maintenance.entries(root, manifest)
    if not rows:
        typer.echo(f"{root}: no cache of {manifest}")
        return
    for row in rows:
        print_rows(row["folder"], [(k, str(v)) for k, v in row.items() if k != "folder"])


@cache_app.command("clear")
@user_errors
def cache_clear(manifest: CacheManifest, cache_dir: CacheDir = None) -> None:
    """Delete the cache folders of a manifest (they are rebuilt by the next run that needs them)."""
    from tumorseg.data import maintenance

    manifest, root = maintenance.cache_root(manifest, cache_dir)
    folders, size, busy = maintenance.clear(root, manifest)
    kept = f"; kept {busy} folder(s) a running training still reads" if busy else ""
    typer.echo(f"{root}: removed {folders} cache folder(s) of {manifest.name}, {size / 2**20:.1f} MiB{kept}")


# ----------------------------------------------------------------------------- pipeline


@pipeline_app.command("run")
@user_errors
def pipeline_run(
    file: Annotated[Path, typer.Argument(help="pipeline YAML, e.g. pipelines/demo.yaml")],
    force: Annotated[bool, typer.Option("--force", help="train even when the data is unchanged")] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Run ingest -> train -> evaluate -> register/promote; exit code says what happened (see README)."""
    from tumorseg import pipeline as stage

    res = stage.run(stage.load(file, tracking_uri=tracking_uri), force=force)
    # a failed stage is an error line, like other errors
    typer.echo(res.message, err=res.exit_code == ExitCode.STAGE_FAILED)
    raise typer.Exit(res.exit_code)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    app()

