"""The built-in synthetic dataset: image/mask PNG pairs of "tumours" for demos and tests.

Made with MONAI's ``create_test_image_2d``: bright blobs on a noisy background. File
names carry a patient id with several slices per patient
(``patient_007_slice_2.png``), so patient-aware splitting has something to do; about
one image in eight has an empty mask. Deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.errors import TumorsegError
from tumorseg.imageio import write_mask_png, write_png

SLICES_PER_PATIENT = 4
GROUP_PATTERN = r"(patient_\d+)"
"""The ``--group-pattern`` that groups the synthetic files by patient."""


@dataclass(frozen=True)
class SynthResult:
    """What :func:`run` wrote."""

    images_dir: Path
    masks_dir: Path
    n: int
    n_empty: int


def make_pair(size: int, seed: int, empty: bool) -> tuple[np.ndarray, np.ndarray]:
    """One ``uint8`` image and its ``{0, 1}`` mask, ``size x size``."""
    from monai.data import create_test_image_2d

    rng = np.random.RandomState(seed)
    rad_max = max(3, size // 5)
    rad_min = max(2, size // 25)
    img, lab = create_test_image_2d(
        size,
        size,
        num_objs=0 if empty else int(rng.randint(1, 4)),
        rad_max=rad_max,
        rad_min=rad_min,
        noise_max=0.1,
        num_seg_classes=1,
        random_state=rng,
    )
    image = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return image, (lab > 0).astype(np.uint8)


def run(out_dir: Path, n: int = 160, size: int = 128, seed: int = 0) -> SynthResult:
    """Write ``n`` pairs into ``out_dir/images`` and ``out_dir/masks``.

    Args:
        out_dir: created if missing; existing files of the same names are replaced.
        n: number of image/mask pairs.
        size: image side in pixels (square), at least 16.
        seed: the same seed gives byte-identical files.
    """
    if n < 1:
        raise TumorsegError(f"--n {n}: need at least 1 image")
    if size < 16:
        raise TumorsegError(f"--size {size}: images must be at least 16 pixels wide")
    images_dir, masks_dir = Path(out_dir) / "images", Path(out_dir) / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    n_empty = 0
    for i in range(n):
        patient, slice_no = divmod(i, SLICES_PER_PATIENT)
        case_seed = seed * 1_000_003 + i
        empty = np.random.RandomState(case_seed + 7).rand() < 0.125
        n_empty += int(empty)
        image, mask = make_pair(size, case_seed, empty)
        name = f"patient_{patient:03d}_slice_{slice_no}.png"
        write_png(images_dir / name, image)
        write_mask_png(masks_dir / name, mask)
    return SynthResult(images_dir, masks_dir, n, n_empty)
