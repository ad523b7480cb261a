"""Image bytes → RGB PIL images, with every way an image file goes wrong turned into a counted skip.

The shard reader and the converter both decode here, so they agree on what an unusable image is:

* bytes that do not decode in full (corrupt, cut in half, not an image): "unreadable image";
* more pixels than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``): "image too
  large". The limit is PIL's own and stays as it is: raising it globally would let one crafted
  file take all of a loader worker's memory;

and every mode becomes RGB: CMYK and palette images are converted, 16-bit greyscale is scaled to
8 bits, and transparency is composited on white.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, ImageOps

from .records import REASON_IMAGE_TOO_LARGE, REASON_UNREADABLE_IMAGE, RecordError

# Modes with an alpha channel; a palette or RGB image can also carry transparency in info.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# 16-bit greyscale, as PNG and TIFF files of 16 bits per sample open (plain "I" on some Pillow releases).
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_BACKGROUND = (255, 255, 255)


@contextmanager
def opened_image(data: bytes, where: str) -> Iterator[Image.Image]:
    """The image in ``data``, decoded in full (so a truncated file fails here, not in collation).

    Raises:
        RecordError: reason "image too large" over the decompression-bomb limit, "unreadable
        image" for anything else that fails inside the ``with`` block; the message starts with ``where``.
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns between one and two times the limit; such an image is skipped too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                yield image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RecordError(f"{where}: {exc}", REASON_IMAGE_TOO_LARGE) from exc
    except RecordError:
        raise
    except Exception as exc:  # PIL raises many exception types for corrupt data
        raise RecordError(f"{where}: cannot decode image ({exc})", REASON_UNREADABLE_IMAGE) from exc


def decode_rgb(data: bytes, where: str) -> Image.Image:
    """Image bytes (any format PIL reads) as an RGB image, upright by its EXIF orientation.

    Raises:
        RecordError: "unreadable image" or "image too large" (see :func:`opened_image`).
    """
    with opened_image(data, where) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB mode: 16-bit greyscale scaled to 8 bits, transparency composited on white,
    every other mode (CMYK, palette, greyscale, ...) converted by PIL."""
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255, which turns almost every pixel white.
        image = image.convert("I").point(lambda value: value / 256).convert("L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        # Transparent pixels keep whatever colour they were stored with (often black), and dropping
        # the alpha channel would show it: dark text or a logo on a transparent background would
        # vanish. White is the page a viewer or a document shows such an image on.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


__all__ = ["decode_rgb", "opened_image", "to_rgb"]
