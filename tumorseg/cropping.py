"""nnU-Net's crop to the nonzero region: a volume is cut to the box of its nonzero voxels before resampling.

Skull-stripped brain MRI (BraTS and the like) and other masked scans store a zero background around the
anatomy, often more than half of the volume. nnU-Net crops every case to the bounding box of the voxels
that are nonzero in any channel before anything else, so the planned grid, the training patches and the
network's time go to the anatomy. Where a volume has no zero border the box is the whole volume.

Training crops its cases in the reader and inference crops its inputs by the same rule, the image alone (labels
outside the box are dropped, as nnU-Net does; evaluate scores whole volumes and counts them as missed); the
prediction is pasted back into the input's own grid, background outside the box
(:meth:`tumorseg.inference.Segmenter.predict_proba`).
"""

from __future__ import annotations

import numpy as np

Box = tuple[slice, ...]


def nonzero_box(image: np.ndarray) -> Box:
    """The bounding box of a ``(C, *spatial)`` array's voxels nonzero in any channel (the whole if none is)."""
    nonzero = np.any(np.asarray(image) != 0, axis=0)
    box: list[slice] = []
    for axis in range(nonzero.ndim):
        others = tuple(a for a in range(nonzero.ndim) if a != axis)
        hit = np.flatnonzero(np.any(nonzero, axis=others))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, nonzero.shape[axis]))
    return tuple(box)


def box_shape(box: Box) -> tuple[int, ...]:
    """The size of ``box`` per axis."""
    return tuple(int(s.stop) - int(s.start) for s in box)


def paste(prob: np.ndarray, box: Box, shape: tuple[int, ...], softmax: bool) -> np.ndarray:
    """Probabilities predicted inside ``box`` placed into a ``shape`` grid, background outside.

    ``prob`` is ``(*box)`` (a sigmoid's tumour probability) or ``(K, *box)`` per class; outside the box the
    background has probability 1 under a softmax and every class (or region) 0 otherwise.
    """
    lead = prob.shape[: prob.ndim - len(shape)]
    out = np.zeros((*lead, *shape), dtype=prob.dtype)
    if softmax and lead:
        out[0] = 1.0
    index: tuple[slice, ...] = (slice(None),) * len(lead) + tuple(box)
    out[index] = prob
    return out
