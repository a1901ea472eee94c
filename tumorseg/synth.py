"""The built-in synthetic dataset: image/mask PNG pairs of "tumours" for demos and tests.

Made with MONAI's ``create_test_image_2d``: bright blobs on a noisy background. File
names carry a patient id with several slices per patient
(``patient_007_slice_2.png``), so patient-aware splitting has something to do; about
one image in eight has an empty mask. Deterministic for a seed.

With ``classes=K`` (K >= 2) each blob is one of K tumour classes (MONAI's ``num_seg_classes``),
its brightness ``k / K`` telling which, and the masks are label maps of the values ``0..K``: ingest them
with ``--labels`` (:func:`labels_text`).

With ``dims=3`` the cases are volumes instead (:func:`make_volume`): ``case_007.nii.gz`` images (``int16``,
1 mm voxels) of a smooth body with ellipsoid tumours of the K classes, and label volumes of the same name,
ingested as volumes (each one case, for a 3D model), or in slice mode with ``--slice-axis 2`` (ordered slice
stacks for a 2D model).
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


def labels_text(classes: int) -> str:
    """The ``--labels`` of a ``classes``-class synthetic dataset: ``0=background,1=class_1,...``."""
    return ",".join(["0=background", *(f"{k}=class_{k}" for k in range(1, classes + 1))])


def make_pair(size: int, seed: int, empty: bool, classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One ``uint8`` image and its mask, ``size x size``: ``{0, 1}``, or label values ``0..classes``."""
    from monai.data import create_test_image_2d

    rng = np.random.RandomState(seed)
    rad_max = max(3, size // 5)
    rad_min = max(2, size // 25)
    img, lab = create_test_image_2d(
        size,
        size,
        num_objs=0 if empty else int(rng.randint(1, 4) if classes == 1 else rng.randint(2, 2 + classes)),
        rad_max=rad_max,
        rad_min=rad_min,
        noise_max=0.1,
        num_seg_classes=classes,
        random_state=rng,
    )
    if classes > 1:
        # MONAI rescales each image to its own maximum, so a blob's brightness would depend on the other
        # blobs present; a fixed brightness per class (k / classes over noise) makes the class visible alone
        img = np.maximum(lab / classes, rng.uniform(0, 0.1, size=lab.shape))
    image = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return image, (lab > 0).astype(np.uint8) if classes == 1 else lab.astype(np.uint8)


def make_volume(size: int, seed: int, empty: bool, classes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One ``int16`` cube of side ``size`` and its label volume (``uint8``, values ``0..classes``).

    A smooth ellipsoid body (so neighbouring slices look alike, as in a scan) holds one to three ellipsoid
    tumours per class, each class at its own brightness, under Gaussian noise.
    """
    rng = np.random.RandomState(seed)
    grid = np.indices((size, size, size), dtype=np.float32)
    centre = np.full(3, (size - 1) / 2.0, np.float32)
    body = (((grid - centre[:, None, None, None]) / (0.42 * size)) ** 2).sum(axis=0) <= 1.0
    label = np.zeros((size, size, size), np.uint8)
    if not empty:
        for k in range(1, classes + 1):
            for _ in range(int(rng.randint(1, 3 if classes > 1 else 4))):
                radii = rng.uniform(size / 14, size / 7, 3).astype(np.float32)
                c = rng.uniform(0.3 * size, 0.7 * size, 3).astype(np.float32)
                inside = (((grid - c[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(axis=0) <= 1.0
                label[inside & body] = k
    image = 300.0 * body + 600.0 * label / classes + rng.normal(0.0, 60.0, label.shape)
    return np.clip(image, -1000, 3000).astype(np.int16), label


def _write_volumes(images_dir: Path, masks_dir: Path, n: int, size: int, seed: int, classes: int) -> int:
    """Write ``n`` volumes and label volumes as NIfTI; returns how many hold no tumour."""
    from tumorseg.imageio.nifti import write_nifti

    n_empty = 0
    for i in range(n):
        case_seed = seed * 1_000_003 + i
        empty = np.random.RandomState(case_seed + 7).rand() < 0.125
        n_empty += int(empty)
        image, label = make_volume(size, case_seed, empty, classes)
        write_nifti(images_dir / f"case_{i:03d}.nii.gz", image, np.eye(4))
        write_nifti(masks_dir / f"case_{i:03d}.nii.gz", label, np.eye(4))
    return n_empty


def run(out_dir: Path, n: int = 160, size: int = 128, seed: int = 0, classes: int = 1,
        dims: int = 2) -> SynthResult:
    """Write ``n`` pairs into ``out_dir/images`` and ``out_dir/masks``.

    Args:
        out_dir: created if missing; existing files of the same names are replaced.
        n: number of image/mask pairs (volumes with ``dims=3``).
        size: image side in pixels (square; a cube for volumes), at least 16.
        seed: the same seed gives byte-identical files.
        classes: tumour classes; 1 writes binary 0/255 masks, more write label maps ``0..classes``.
        dims: 2 for PNG images, 3 for NIfTI volumes.
    """
    if n < 1:
        raise TumorsegError(f"--n {n}: need at least 1 image")
    if size < 16:
        raise TumorsegError(f"--size {size}: images must be at least 16 pixels wide")
    if not 1 <= classes <= 20:
        raise TumorsegError(f"--classes {classes}: give 1 (binary) to 20 tumour classes")
    if dims not in (2, 3):
        raise TumorsegError(f"--dims {dims}: give 2 (PNG images) or 3 (NIfTI volumes)")
    images_dir, masks_dir = Path(out_dir) / "images", Path(out_dir) / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    if dims == 3:
        return SynthResult(images_dir, masks_dir, n, _write_volumes(images_dir, masks_dir, n, size, seed, classes))
    n_empty = 0
    for i in range(n):
        patient, slice_no = divmod(i, SLICES_PER_PATIENT)
        case_seed = seed * 1_000_003 + i
        empty = np.random.RandomState(case_seed + 7).rand() < 0.125
        n_empty += int(empty)
        image, mask = make_pair(size, case_seed, empty, classes)
        name = f"patient_{patient:03d}_slice_{slice_no}.png"
        write_png(images_dir / name, image)
        if classes == 1:
            write_mask_png(masks_dir / name, mask)
        else:
            write_png(masks_dir / name, mask)
    return SynthResult(images_dir, masks_dir, n, n_empty)
