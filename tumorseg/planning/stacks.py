"""The planning rules for groups and slice stacks (rules 9 and 10 of :mod:`tumorseg.planning.rules`).

9. **Selection unit.** Validation, the best checkpoint, early stopping and the post-processing search score what
   users report: where the groups hold several cases (slices of a volume, images of a patient: the median group has
   more than one case), the Dice of each group with its counts pooled over its cases (the volumetric, per-patient
   Dice of ``per_group.csv`` and of published per-patient results), averaged over groups; otherwise the mean
   per-case Dice. Per case, a speck on one of a volume's many tumour-free slices scores that slice 0 and swings the
   mean; pooled, it costs the patient a few pixels (:func:`selection_unit`). Measured alone on the left-atrium slice
   stacks (34% tumour-free slices, one large structure), it was level with per-slice selection on val (-0.001) and
   0.003-0.005 lower on test: kept for stacks with many empty slices and small tumours, where the per-slice mean
   swings (benchmarks/RESULTS.md).
10. **Slice context (2.5D).** Where most train cases are slices of ordered stacks (a volume in slice mode, files
   numbered by slice: the fingerprint's ``slice_stacks``) and adjacent slices are confirmed to be neighbours in the
   anatomy (they correlate clearly more than unrelated slices), the network can take ``slice_context`` neighbouring
   slices a side as extra channels (:mod:`tumorseg.context`): one a side (``CONTEXT_WHEN_ORDERED``;
   :func:`slice_context`). On the left-atrium slice stacks at an equal 30-minute CPU budget, one neighbour a side
   raised per-volume val Dice from 0.9083 (two 2D runs) to 0.9133 (test 0.9126/0.9129 to 0.9147) for a wider first
   convolution only; benchmarks/RESULTS.md. ``--set slice_context=0`` turns it off.
"""

from __future__ import annotations

import math
import statistics

from tumorseg.context import ADJACENT_MARGIN
from tumorseg.planning.fingerprint import Fingerprint

STACK_SHARE = 0.5
"""Rule 10: the share of train cases in stacks of three or more slices above which the data are slice stacks."""
CONTEXT_WHEN_ORDERED = 1
"""Rule 10: neighbouring slices a side given to the network when the data are ordered slice stacks (measured
on the left-atrium slice stacks at 30 minutes: +0.005 per-volume val Dice; benchmarks/RESULTS.md)."""


def selection_unit(group_sizes: list[int]) -> tuple[str, str]:
    """``("group" | "case", reason)``: the unit val Dice averages over (rule 9).

    Args:
        group_sizes: the number of val cases in each group.
    """
    if not group_sizes:
        return "case", "no val cases"
    median = statistics.median(group_sizes)
    if median > 1:
        return "group", (f"val groups hold {median:g} cases (median): Dice per group with counts pooled over its "
                         "cases, as per-patient results are reported")
    return "case", "val groups hold one case each: mean per-case Dice"


def slice_context(fp: Fingerprint) -> tuple[int, str]:
    """``(neighbouring slices a side, reason)`` (rule 10)."""
    st = fp.slice_stacks
    share = float(st.get("share_in_stacks", 0.0))
    if share < STACK_SHARE:
        return 0, (f"2D: {share:.0%} of the train cases are slices of ordered stacks (below {STACK_SHARE:.0%}), "
                   "so there are no neighbouring slices to give")
    adjacent, unrelated = float(st.get("adjacent", math.nan)), float(st.get("unrelated", math.nan))
    if not adjacent - unrelated >= ADJACENT_MARGIN:
        return 0, (f"2D: {share:.0%} of the train cases are numbered slices, but adjacent ones correlate "
                   f"{adjacent:.2f} against {unrelated:.2f} for unrelated ones: their order is not the anatomy's")
    where = (f"{share:.0%} of the train cases are slices of {st.get('stacks', 0):g} ordered stacks (median "
             f"{st.get('median_length', 0):g} slices; adjacent slices correlate {adjacent:.2f}, unrelated "
             f"{unrelated:.2f})")
    if CONTEXT_WHEN_ORDERED == 0:
        return 0, f"2D: {where}; 2.5D is off here (CONTEXT_WHEN_ORDERED = 0; --set slice_context=1 asks for it)"
    return CONTEXT_WHEN_ORDERED, f"2.5D, {CONTEXT_WHEN_ORDERED} neighbouring slice(s) a side: {where}"
