"""Embed's images: decoded under a pixel budget, every bad one the caller's error.

An Embed request carries encoded images straight from the network, and decoding them
is where a server's memory goes and where Pillow raises whatever a malformed file
provokes (``SyntaxError`` for a broken PNG, ``DecompressionBombError``, ``EOFError``,
``struct.error``, ...). A 64 KiB PNG may declare 8192 x 8192 pixels (about 200 MB
once decoded), and a request may carry ``ServiceLimits.max_embed`` of them. So:

1. every image's header is read first: ``Image.open`` reads the size without
   decoding, and the request is refused when its images declare more pixels together
   than the budget (``max_pixels``: ``ServiceLimits.max_embed_pixels``, ``bankd serve
   --max-embed-pixels``) -- before anything is decoded. Decoded memory is about 3-4
   bytes a pixel (RGB or RGBA) plus the RGB copy of one image at a time, so the
   budget bounds what one Embed call holds;
2. only raster formats are opened (``FORMATS``): never EPS or PDF, which Pillow hands
   to Ghostscript;
3. anything that goes wrong opening or decoding one image is INVALID_ARGUMENT naming
   the image's index in the request, and nothing is logged: the input is at fault,
   not the server.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

from bankd_client import errors

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def _problem(e: Exception) -> str:
    text = str(e) or "no details"
    return f"{type(e).__name__}: {text}"


def decode_images(blobs: Sequence[bytes], max_pixels: int) -> list:
    """Encoded images -> RGB PIL images, or InvalidArgument naming the first bad image.

    The headers of all images are read and their declared pixels summed against
    max_pixels before any image is decoded (GIF and animated formats: the first frame).
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    opened = []
    total = 0
    for i, blob in enumerate(blobs):
        if not blob:
            raise errors.InvalidArgument(f"image {i} is empty (0 bytes)")
        try:
            im = Image.open(io.BytesIO(blob), formats=FORMATS)
            width, height = im.size
        # Pillow raises many exception types on a malformed header (SyntaxError,
        # struct.error, DecompressionBombError, ...): all are this image's fault.
        except UnidentifiedImageError:
            raise errors.InvalidArgument(
                f"image {i} is not a {'/'.join(FORMATS)} image (or its header is corrupt)"
            ) from None
        except Exception as e:
            raise errors.InvalidArgument(f"image {i} cannot be opened ({_problem(e)})") from None
        pixels = width * height
        if pixels < 1:
            raise errors.InvalidArgument(f"image {i} declares a size of {width} x {height}")
        total += pixels
        if total > max_pixels:
            what = f"image {i} ({width} x {height})"
            if pixels < total:
                what = f"images 0..{i} (image {i}: {width} x {height})"
            raise errors.InvalidArgument(
                f"{what}: {total} pixels, over this server's budget of {max_pixels} "
                "pixels per Embed request (bankd serve --max-embed-pixels); send smaller "
                "images or fewer per request"
            )
        opened.append(im)
    decoded = []
    for i, im in enumerate(opened):
        try:
            im.load()
            decoded.append(im.convert("RGB"))
        except Exception as e:  # truncated data, a corrupt stream, a lying header
            raise errors.InvalidArgument(f"image {i} cannot be decoded ({_problem(e)})") from None
        finally:
            im.close()
        opened[i] = None  # the undecoded original goes as soon as its RGB copy exists
    return decoded
