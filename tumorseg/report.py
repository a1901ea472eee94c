"""Human-readable summaries printed by the CLI (rich tables on stdout)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tumorseg.evaluate import EvaluateResult
    from tumorseg.ingest import IngestResult


def _console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=True)


def print_ingest_summary(res: IngestResult) -> None:
    """Cases, groups, tumour/empty counts and achieved fractions per split; rejected and ignored files."""
    from rich.table import Table

    s = res.summary
    table = Table(title=f"manifest {res.manifest_dir}")
    for col in ("split", "cases", "groups", "tumour", "empty", "case fraction", "group fraction"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, v in s["splits"].items():
        table.add_row(split, str(v["cases"]), str(v["groups"]), str(v["tumour"]), str(v["empty"]),
                      f"{v['case_fraction']:.3f}", f"{v['group_fraction']:.3f}")
    table.add_row("all", str(s["cases"]), str(s["groups"]), str(s["tumour"]), str(s["empty"]), "1.000", "1.000")
    con = _console()
    con.print(table)
    con.print(f"groups in more than one split: {s['groups_straddling_splits']}")
    if s.get("lossy_masks"):
        con.print(f"JPEG masks: {s['lossy_masks']} case(s) binarised at half their range (JPEG never stores two exact "
                  "values; see mask_encoding in manifest.csv)")
    where = f" (see {res.manifest_dir / 'rejected.csv'})" if res.n_rejected else ""
    con.print(f"rejected files: {res.n_rejected}{where}")
    if res.n_ignored:
        files = "file" if res.n_ignored == 1 else "files"
        con.print(f"ignored {res.n_ignored} non-image {files} (see {res.ignored_csv})")
    con.print(f"dataset digest: {res.dataset_digest}")


def _num(v: Any, fmt: str = ".4f") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    return "n/a" if f != f else format(f, fmt)


def print_eval_summary(res: EvaluateResult) -> None:
    """Dice/IoU distribution, pooled and per-patient Dice, empty-case false positives, and provenance."""
    from rich.table import Table

    s = res.summary
    name = s.get("manifest", {}).get("name", "")
    table = Table(title=f"evaluate {name} / {res.split}: {res.n_cases} cases")
    for col in ("metric", "mean", "median", "std", "p5", "p95"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for key, label in (("dice", "Dice"), ("iou", "IoU")):
        stats = ("mean", "median", "std", "p5", "p95")
        table.add_row(label, *(_num(s.get(f"{key}_{stat}")) for stat in stats))
    unit = {"pixels": "px"}.get(str(s.get("surface_unit", "pixels")), str(s.get("surface_unit", "")))
    for key, label in (("hd95", f"HD95 ({unit})"), ("assd", f"ASSD ({unit})")):
        if f"{key}_mean" in s:
            table.add_row(label, _num(s[f"{key}_mean"], ".2f"), _num(s[f"{key}_median"], ".2f"), "", "", "")
    con = _console()
    con.print(table)
    for cname, cs in (s.get("classes") or {}).items():  # a label map: each tumour class on its own
        surface = "".join(f", {label} {_num(cs[f'{key}_mean'], '.2f')}" for key, label in
                          (("hd95", f"HD95 ({unit})"), ("assd", f"ASSD ({unit})")) if f"{key}_mean" in cs)
        con.print(f"class {cname}: mean Dice {_num(cs.get('dice_mean'))}, IoU {_num(cs.get('iou_mean'))}{surface}")
    if "n_hd95_undefined" in s:
        penalised = (f"; {s['n_hd95_penalised']} scored the image diagonal"
                     if s.get("hd95_empty") == "diagonal" else "")
        con.print(f"HD95 left out of the mean: {s['n_hd95_undefined']} of {s.get('n_cases')} cases (missed tumour "
                  f"{s['n_hd95_missed_tumour']}, false positive on tumour-free {s['n_hd95_fp_on_empty']}, both "
                  f"empty {s['n_hd95_both_empty']}){penalised}; HD95 = max of the two directed 95th percentiles "
                  "(MONAI, DeepMind surface-distance; not medpy)")
    if s.get("n_intensity_outside_training"):
        con.print(f"cases with intensities far from the training images': {s['n_intensity_outside_training']} "
                  "(see the warning above)")
    con.print(f"mean Dice 95% bootstrap CI: [{_num(s.get('dice_ci_low'))}, {_num(s.get('dice_ci_high'))}] "
              f"over {s.get('n_scored')} scored cases")
    con.print(f"global (pooled) Dice: {_num(s.get('dice_global'))}   mean per-group Dice: "
              f"{_num(s.get('dice_group_mean'))} over {s.get('n_groups')} groups")
    con.print(f"false positives on empty ground truth: {s.get('n_fp_empty')}/{s.get('n_gt_empty')} "
              f"(rate {_num(s.get('fp_rate_empty'), '.3f')})")
    if "pixel_accuracy" in s:
        per_class = ", ".join(f"{k.removeprefix('pixel_accuracy_')} {_num(v)}" for k, v in s.items()
                              if k.startswith("pixel_accuracy_") and k != "pixel_accuracy_note")
        con.print(f"pixel accuracy: {_num(s.get('pixel_accuracy'))} ({per_class}; background dominates it: Dice is "
                  "the headline)")
    con.print(f"empty rule: {s.get('empty_rule')}")
    model = s.get("model", {})
    sha = str(model.get("checkpoint_sha256", ""))[:16]
    train_run = model.get("train_run_id") or "unknown"
    con.print(f"model: {model.get('ref')} (sha256 {sha}, training run {train_run})")
    con.print(f"manifest digest: {s.get('manifest', {}).get('dataset_digest')}")
    con.print(f"outputs: {res.out_dir}   MLflow run: {res.run_id}")


def print_rows(title: str, rows: list[tuple[str, str]], stderr: bool = False) -> None:
    """A two-column table (setting, value) on the terminal (stdout, or stderr)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(key, value)
    (Console(stderr=True, soft_wrap=True) if stderr else _console()).print(table)
