"""Reading one image file as 8-bit RGB, whatever its stored mode.

Every dataset (and any tool that must accept what training accepts) reads images through
:func:`open_rgb`. PIL's own ``convert("RGB")`` is right for most modes but not all:

* 16-bit and 32-bit integer images (``I;16``, ``I;16B``, ``I``: 16-bit PNGs, TIFFs) are
  clipped at 255, so almost every pixel turns white. They are scaled to 8 bits instead:
  ``I;16*`` by 255/65535; ``I`` by its range (see :func:`to_8bit`).
* Float images (``F``) are truncated to 0 and 1. Values in [0, 1] are scaled by 255.
* Transparency (``RGBA``, ``LA``, ``PA``, a palette or grayscale image with a
  transparent colour) is dropped, leaving whatever colour the transparent pixels happen
  to store. Transparent areas are composited onto white, as a viewer shows them.

Grayscale (``L``), bilevel (``1``), palette (``P``), ``CMYK`` (Adobe-inverted JPEGs are
handled by PIL's decoder) and ``YCbCr``/``LAB``/``HSV`` go through PIL's conversion.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

# Alpha-carrying modes; palette and grayscale images may instead name a transparent colour.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_BACKGROUND = (255, 255, 255, 255)


class BadImageError(OSError):
    """An image file that is missing, truncated or cannot be decoded."""


def to_8bit(image: Image.Image) -> Image.Image:
    """Maps a 16/32-bit integer or float single-channel image to mode ``L``.

    * ``I;16``, ``I;16L``, ``I;16B``, ``I;16N``: ``round(v * 255 / 65535)``.
    * ``I`` (32-bit; 16-bit PNGs open as ``I`` in some Pillow versions): taken as 8-bit
      when every value lies in 0..255, as 16-bit when in 0..65535, else scaled from its
      minimum (0) to its maximum (255).
    * ``F``: scaled by 255 when every value lies in [0, 1]; else clipped to 0..255 when
      in that range, else scaled from its minimum to its maximum.

    Args:
        image: A PIL image in one of the modes above.

    Returns:
        A mode ``L`` image of the same size.
    """
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16"):
        scale, offset = 255 / 65535, 0.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scale, offset = 255.0, 0.0
    elif low >= 0 and high <= 255:
        scale, offset = 1.0, 0.0
    elif image.mode == "I" and low >= 0 and high <= 65535:
        scale, offset = 255 / 65535, 0.0
    else:
        scale, offset = 255 / max(high - low, 1e-12), low
    out = np.clip(np.rint((values - offset) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts a decoded PIL image of any mode to 8-bit RGB (see the module docstring)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Opens and fully decodes one image file as 8-bit RGB.

    Raises:
        BadImageError: The file is missing, truncated or not a decodable image; the
            message names the path.
    """
    try:
        with Image.open(path) as img:
            # Decode now: a truncated file must fail here, where the path is known, not
            # later inside a transform.
            img.load()
            # The decoded pixels stay valid once the file is closed.
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from err


__all__ = ["BadImageError", "open_rgb", "to_8bit", "to_rgb"]
