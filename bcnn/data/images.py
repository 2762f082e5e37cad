"""Reading one image file as upright 8-bit RGB, whatever its stored mode.

Every dataset (and any tool that must accept what training accepts) reads images through
:func:`open_rgb`. PIL's ``convert("RGB")`` clips 16/32-bit images at 255 (almost all
white), truncates float ones to 0 and 1 and drops transparency (leaving whatever colour
transparent pixels store); :func:`to_rgb` scales to 8 bits and composites onto white.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from bcnn.errors import BadImageError

# Larger or more elongated files are bad images (``on_bad_image``). The pixel limit is
# Pillow's MAX_IMAGE_PIXELS default (256 MB decoded as RGB); the aspect ratio bounds what
# a short-side resize makes of a file: 1 x 20000 pixels resized to 448 wide is 12 GB.
MAX_PIXELS = 89_478_485
MAX_ASPECT_RATIO = 50
# Alpha-carrying modes; palette and grayscale images may instead name a transparent colour.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_BACKGROUND = (255, 255, 255, 255)


def to_8bit(image: Image.Image) -> Image.Image:
    """Maps a 16/32-bit integer or float single-channel image to a mode ``L`` image.

    ``I;16*`` modes: ``round(v * 255 / 65535)``. ``I`` (16-bit PNGs open as ``I`` in some
    Pillow versions) and ``F``: as 8-bit when every value lies in 0..255 (``F`` in [0, 1]:
    times 255), ``I`` as 16-bit when in 0..65535, else scaled from minimum to maximum.
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
    """Converts a decoded PIL image of any mode to 8-bit RGB, transparency onto white."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _BACKGROUND), rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(
    path: str | os.PathLike, crop: Callable[[Image.Image], Image.Image] | None = None
) -> Image.Image:
    """Opens and fully decodes one image file as upright 8-bit RGB.

    Args:
        path: The image file.
        crop: Applied to the decoded image before it is turned upright: boxes (and the
            Aircraft banner) refer to the pixels as stored, as the annotators saw them.

    Raises:
        BadImageError: The file is missing, truncated, not a decodable image, or larger
            or more elongated than the limits above; the message names the path.
    """
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise BadImageError(
                    f"image {path} has {w} x {h} = {w * h:,} pixels, above "
                    f"bcnn.data.images.MAX_PIXELS = {MAX_PIXELS:,} (a decompression bomb?)"
                )
            if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                raise BadImageError(
                    f"image {path} is {w} x {h} pixels: one side is more than "
                    f"bcnn.data.images.MAX_ASPECT_RATIO = {MAX_ASPECT_RATIO} times the other"
                )
            # Decode now: a truncated file must fail here, where the path is known, not
            # later inside a transform. The decoded pixels outlive the closed file.
            img.load()
            return to_rgb(ImageOps.exif_transpose(crop(img) if crop else img))
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"cannot read image {path}: {err}") from err
