"""Post-processing: how probabilities become a mask (threshold, argmax, component rules), chosen on val.

The choice (:class:`Postprocess`) is made after training (``tumorseg.train.postprocess``) and stored in the
checkpoint, so evaluate, predict and the MLflow model apply the same one.

A **volumetric** choice applies the component rules to the connected components of a whole ordered stack of
slices (a volume ingested in slice mode, or numbered slice files), as nnU-Net's post-processing does on
volumes: a speck on a tumour-free slice is one small component of its own, where the tumour continues over
its neighbours as one large one. :meth:`Postprocess.stack_masks` takes a stack's probabilities in slice
order; :class:`StackBuffer` gathers a stream of cases into their stacks.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import numpy as np

from tumorseg.labels import Classes

if TYPE_CHECKING:
    from tumorseg.config import TrainConfig

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True)
class Postprocess:
    """How probabilities become a mask: chosen on val after training, stored in the checkpoint.

    A multi-class probability map ``(K, H, W)`` becomes the argmax class of each pixel (the threshold
    plays no part), and the component rule applies to each tumour class on its own (removed
    components become background, as nnU-Net's post-processing).

    Attributes:
        threshold: a pixel is tumour when its probability exceeds this (binary).
        keep: ``all`` components, only the ``largest``, or those of at least ``min_size`` pixels.
        min_size: the smallest component kept with ``keep="min_size"`` (pixels at the original resolution).
        tta: average the network over mirrored copies of the input.
        min_confidence: binary models: drop components whose confidence is below this, before the
            ``keep`` rule (a whole doubtful blob goes; the boundaries of the others stay at ``threshold``).
        confidence: how a component's confidence is measured: ``peak``, its most likely pixel (hysteresis
            thresholding: a component cut at ``threshold`` stays if the network is sure of it somewhere),
            or ``mean``, its mean probability (the rule of models chosen before ``peak`` existed).
        volumetric: the component rules apply to the components of a whole ordered stack of slices
            (:meth:`stack_masks`; ``min_size`` then counts voxels), not of each slice on its own.
    """

    threshold: float = 0.5
    keep: Literal["all", "largest", "min_size"] = "all"
    min_size: int = 0
    tta: bool = False
    min_confidence: float = 0.0
    confidence: Literal["peak", "mean"] = "peak"
    volumetric: bool = False

    def mask(self, prob: np.ndarray, classes: Classes | None = None) -> np.ndarray:
        """``uint8 (H, W)`` mask from ``float (H, W)`` probabilities; class indices from ``(K, H, W)``.

        Volumes alike (``(X, Y, Z)``, ``(K, X, Y, Z)``). Several channels are decided by
        :meth:`tumorseg.labels.Classes.decide` (the argmax, or the regions of ``classes`` thresholded and
        painted); without ``classes``, the argmax of a 3-dimensional ``prob``.
        """
        if _channels(prob, classes):
            if classes is None:
                return self.per_class(np.argmax(prob, axis=0).astype(np.uint8))
            return self.per_class(classes.decide(prob, self.threshold))
        mask = (prob > self.threshold).astype(np.uint8)
        if (self.keep == "all" and self.min_confidence <= 0) or not mask.any():
            return mask
        labels, sizes = components(mask)
        return self.filter(labels, sizes, component_confidence(labels, sizes, prob, self.confidence))

    def stack_masks(self, probs: Sequence[np.ndarray], classes: Classes | None = None) -> list[np.ndarray]:
        """The masks of an ordered stack of slices' probabilities (each as :meth:`mask` takes it).

        Volumetric: each slice is decided on its own (threshold, argmax or regions), then the component
        rules apply to the components of the stacked ``(D, H, W)`` masks, with each component's confidence
        measured over all its voxels. Otherwise, or where the slices differ in shape, slice by slice.
        """
        shapes = {p.shape for p in probs}
        if not self.volumetric or len(probs) < 2 or len(shapes) != 1:
            return [self.mask(p, classes) for p in probs]
        if _channels(probs[0], classes):  # several channels: the class index map, then the rule per class in 3D
            flat = replace(self, keep="all", min_confidence=0.0)
            return list(self.per_class(np.stack([flat.mask(p, classes) for p in probs])))
        stack = np.stack(probs)
        mask = (stack > self.threshold).astype(np.uint8)
        if (self.keep == "all" and self.min_confidence <= 0) or not mask.any():
            return list(mask)
        labels, sizes = components(mask)
        return list(self.filter(labels, sizes, component_confidence(labels, sizes, stack, self.confidence)))

    def per_class(self, index: np.ndarray) -> np.ndarray:
        """The component rule applied to each class of a class-index map (removed pixels become 0)."""
        if self.keep == "all":
            return index
        out = index.copy()
        for k in np.unique(index)[1:] if index.any() else []:
            out[(index == k) & (self.filter(*components(index == k)) == 0)] = 0
        return out

    def filter(self, labels: np.ndarray, sizes: np.ndarray, confidence: np.ndarray | None = None) -> np.ndarray:
        """The component rules on a labelled mask (:func:`components`; confidences: :func:`component_confidence`)."""
        return self.alive(sizes, confidence)[labels].astype(np.uint8)

    def alive(self, sizes: np.ndarray, confidence: np.ndarray | None = None) -> np.ndarray:
        """Which labelled components the rules keep (entry 0, the background, never)."""
        alive = np.ones(sizes.size, dtype=bool)
        alive[0] = False
        if self.min_confidence > 0 and confidence is not None:
            alive &= confidence >= self.min_confidence
        if self.keep == "largest" and alive.any():
            biggest = int(np.argmax(np.where(alive, sizes, -1)))
            alive[:] = False
            alive[biggest] = True
        elif self.keep == "min_size":
            alive &= sizes >= max(1, self.min_size)
        return alive

    def to_dict(self) -> dict[str, Any]:
        """Plain values for the checkpoint."""
        return {"threshold": float(self.threshold), "keep": self.keep, "min_size": int(self.min_size),
                "tta": bool(self.tta), "min_confidence": float(self.min_confidence), "confidence": self.confidence,
                "volumetric": bool(self.volumetric)}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], cfg: TrainConfig) -> Postprocess:
        """The checkpoint's choice; a checkpoint from before post-processing uses the config's threshold.

        A choice stored with ``min_confidence`` but no ``confidence`` measure was made with the mean.
        """
        d = ckpt.get("postprocess") or {}
        return cls(threshold=float(d.get("threshold", cfg.threshold)), keep=d.get("keep", "all"),
                   min_size=int(d.get("min_size", 0)), tta=bool(d.get("tta", cfg.tta)),
                   min_confidence=float(d.get("min_confidence", 0.0)),
                   confidence=d.get("confidence", "mean" if "min_confidence" in d else "peak"),
                   volumetric=bool(d.get("volumetric", False)))


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fully connected components of a binary mask (8 neighbours in 2D, 26 in 3D): ``(labels, pixels per label)``.

    Label 0 is the background.
    """
    from skimage.measure import label

    labels = label(mask > 0, connectivity=mask.ndim)
    return labels, np.bincount(labels.ravel())


def component_means(labels: np.ndarray, sizes: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """The mean probability of each labelled component (entry 0: the background)."""
    return np.bincount(labels.ravel(), weights=prob.ravel(), minlength=sizes.size) / np.maximum(sizes, 1)


def component_peaks(labels: np.ndarray, sizes: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """The highest probability in each labelled component (entry 0: the background's)."""
    peaks = np.zeros(sizes.size, dtype=np.float64)
    np.maximum.at(peaks, labels.ravel(), prob.ravel())
    return peaks


def component_confidence(labels: np.ndarray, sizes: np.ndarray, prob: np.ndarray,
                         measure: Literal["peak", "mean"]) -> np.ndarray:
    """Each labelled component's confidence by ``measure`` (:attr:`Postprocess.confidence`)."""
    return (component_peaks if measure == "peak" else component_means)(labels, sizes, prob)




class StackBuffer(Generic[K, T]):
    """Gathers a stream of cases into the ordered stacks they belong to (for volumetric post-processing).

    Args:
        stacks: each stack's case keys in slice order.

    :meth:`add` returns the groups a case completes, each a list of ``(key, item)`` in slice order: a case in
    no stack at once on its own, a stack once the last of its cases has arrived (in any order). Only the
    stacks still being filled are held, so a stream ordered by stack holds one stack at a time.
    """

    def __init__(self, stacks: Sequence[Sequence[K]]) -> None:
        self.stacks = [list(run) for run in stacks]
        self._stack_of = {key: i for i, run in enumerate(self.stacks) for key in run}
        self._held: dict[int, dict[K, T]] = {}

    def add(self, key: K, item: T) -> list[list[tuple[K, T]]]:
        """Take one case; the groups now complete."""
        s = self._stack_of.get(key)
        if s is None:
            return [[(key, item)]]
        held = self._held.setdefault(s, {})
        held[key] = item
        if len(held) < len(self.stacks[s]):
            return []
        del self._held[s]
        return [[(k, held[k]) for k in self.stacks[s]]]

    def rest(self) -> list[list[tuple[K, T]]]:
        """The cases of stacks that never completed, each on its own (slice order within its stack)."""
        out = [[(k, held[k])] for s, held in sorted(self._held.items()) for k in self.stacks[s] if k in held]
        self._held.clear()
        return out


def _channels(prob: np.ndarray, classes: Classes | None) -> bool:
    """Whether ``prob`` has a channel axis first: a multi-class model's (known from ``classes``), else 3 dims."""
    if classes is not None:
        return bool(classes.multiclass or classes.regions)
    return prob.ndim == 3
