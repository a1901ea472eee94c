"""Human-readable summaries printed by the CLI (rich tables on stdout)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tumorseg.ingest import IngestResult


def _console() -> Any:
    from rich.console import Console

    return Console(soft_wrap=True)


def print_ingest_summary(res: IngestResult) -> None:
    """Cases, groups, tumour/empty counts and achieved fractions per split."""
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
    con.print(f"rejected files: {res.n_rejected}" + (f" (see {res.manifest_dir / 'rejected.csv'})" if res.n_rejected else ""))
    con.print(f"dataset digest: {res.dataset_digest}")
