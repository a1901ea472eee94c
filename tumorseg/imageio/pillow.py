"""PNG, JPEG and BMP through Pillow: 8/16-bit grey, RGB(A), palette and 1-bit images."""

from __future__ import annotations

import io
import os

import numpy as np

from tumorseg.imageio.base import Decoded, DecodeError, Format

_NAMES = {"png": "PNG", "jpeg": "JPEG", "bmp": "BMP"}


def decode_pillow(data: bytes, path: str | os.PathLike[str], role: str, fmt: Format) -> Decoded:
    """Decode a PNG, JPEG or BMP file to ``(C, H, W)``.

    EXIF orientation is applied (the image as a viewer shows it; a JPEG mask saved by the same camera
    software turns with it). A JPEG mask is reduced to one grey plane: compression leaves the channels of
    a grey-stored-as-RGB mask slightly different, which is noise, not colour.
    """
    from PIL import Image, ImageOps

    name = _NAMES[fmt]
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            mode = opened.mode
            if fmt == "jpeg" and mode not in ("L", "RGB"):
                raise DecodeError(f"{path}: {mode} JPEG ({_jpeg_mode_text(mode)}); save the image as 8-bit grey "
                                  "or RGB (JPEG) or as PNG")
            img = ImageOps.exif_transpose(opened) if fmt == "jpeg" else opened
            if mode == "P":
                if role == "mask":
                    arr = np.asarray(img)
                else:
                    has_alpha = "transparency" in img.info
                    arr = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                arr = np.asarray(img.convert("RGB"))
            elif mode == "1":
                arr = np.asarray(img).astype(np.uint8)
            elif fmt == "jpeg" and role == "mask" and mode == "RGB":
                arr = np.asarray(img.convert("L"))
            else:
                arr = np.asarray(img)
            if role == "mask" and arr.ndim == 3 and arr.shape[2] in (2, 4):
                colour, alpha = arr[..., :-1], arr[..., -1]
                if colour.min() == colour.max() and alpha.min() != alpha.max():
                    arr = alpha  # drawn in the alpha channel alone (an overlay saved as the mask)
    except DecodeError:
        raise
    except Image.DecompressionBombError as exc:  # pragma: no cover - defensive
        raise DecodeError(f"{path}: image too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        bits = _jpeg_precision(data) if fmt == "jpeg" else 8
        if bits not in (8, None):
            raise DecodeError(f"{path}: {bits}-bit JPEG ({_jpeg_mode_text('I')}), which Pillow does not decode; "
                              "save the image as 8-bit JPEG, or as 16-bit PNG/TIFF") from exc
        # Pillow's "cannot identify image file <BytesIO ...>" names our buffer, not the file: say it plainly.
        detail = f"not a {name} image" if "cannot identify" in str(exc) else str(exc)
        raise DecodeError(f"{path}: truncated or corrupt {name} ({detail}); re-export the file") from exc
    return Decoded(channels_first(arr, path), f"{name}:{mode}", lossy=fmt == "jpeg")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_precision(data: bytes) -> int | None:
    """The sample precision in a JPEG's frame header (only to name why Pillow refused a file), or ``None``."""
    i = 2 if data[:2] == b"\xff\xd8" else len(data)
    while i + 4 < len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF and i + 4 < len(data):
            return data[i + 4]
        i += 2 + length
    return None


def _jpeg_mode_text(mode: str) -> str:
    if mode == "CMYK":
        return "print colours, which have no fixed RGB meaning"
    if mode.startswith("I"):
        return "more than 8 bits per sample"
    return f"pixel mode {mode}"


def channels_first(arr: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """``(H, W)`` -> ``(1, H, W)``; ``(H, W, 3|4)`` -> ``(3, H, W)`` with alpha dropped."""
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3 and arr.shape[2] in (2, 3, 4):
        keep = 1 if arr.shape[2] == 2 else 3  # grey+alpha or colour(+alpha): alpha dropped
        return np.ascontiguousarray(np.moveaxis(arr[:, :, :keep], 2, 0))
    raise DecodeError(
        f"{path}: pixel array of shape {arr.shape} is not a 2D grey or colour image; "
        "multi-channel stacks are not supported"
    )
