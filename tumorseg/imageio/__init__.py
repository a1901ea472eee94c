"""The one image loader: every stage reads and writes images and masks through here.

Formats (one module each, all behind :func:`decode`): PNG, JPEG and BMP through Pillow
(:mod:`.pillow`), TIFF frames and stacks through tifffile (:mod:`.tiff`), NIfTI through nibabel
(:mod:`.nifti`), DICOM files and series folders through pydicom (:mod:`.dicom`), NRRD and MHA/MHD
through SimpleITK (:mod:`.itk`, the optional ``itk`` extra). What a decoded file is (a ``(C, H, W)``
image or an ``(X, Y, Z)`` grid with a RAS+ affine) is :class:`Decoded` in :mod:`.base`, the choice of
decoder by path is :mod:`.read`, and masks, planes and label maps are :mod:`.masks`.
"""

from tumorseg.imageio.base import (
    EXTENSIONS,
    FORMATS_TEXT,
    LOSSY,
    Decoded,
    DecodeError,
    Format,
    nonfinite,
    split_ext,
)
from tumorseg.imageio.masks import (
    binarize_decoded_mask,
    binarize_mask,
    check_label_format,
    label_decoded_mask,
    label_map,
    load_image,
    load_mask,
    mask_from_decoded,
    mask_plane,
    mask_threshold_for,
    plane_spacing,
    read_nifti_affine,
    slice_of,
    to_channels,
    union_masks,
    write_mask_png,
    write_png,
)
from tumorseg.imageio.nifti import write_nifti
from tumorseg.imageio.read import decode, image_format, read_bytes, volume_shape

__all__ = [
    "EXTENSIONS", "FORMATS_TEXT", "LOSSY", "Decoded", "DecodeError", "Format", "binarize_decoded_mask",
    "binarize_mask", "check_label_format", "decode", "image_format", "label_decoded_mask", "label_map",
    "load_image", "load_mask", "mask_from_decoded", "mask_plane", "mask_threshold_for", "nonfinite", "plane_spacing",
    "read_bytes", "read_nifti_affine", "slice_of", "split_ext", "to_channels", "union_masks", "volume_shape",
    "write_mask_png", "write_nifti", "write_png",
]
