"""Uploaded images: JPEG or PNG only (by content), bounded in bytes and pixels, fully decoded,
then re-encoded as PNG so nothing of the original file (EXIF, ICC, text chunks, trailing data)
goes further."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from app.services.errors import Invalid, TooLarge, UnsupportedMedia

ACCEPTED_FORMATS = ("JPEG", "PNG")
# Declared content types we accept; the content itself is checked anyway.
ACCEPTED_CONTENT_TYPES = {"image/jpeg", "image/jpg", "image/png", "application/octet-stream"}
MIN_SIDE = 8


def check_content_type(content_type: str | None) -> None:
    """Refuse a part that declares a non-image type (a missing type is judged by content)."""
    if content_type and content_type.split(";")[0].strip().lower() not in ACCEPTED_CONTENT_TYPES:
        raise UnsupportedMedia(f"expected a JPEG or PNG image, got content type {content_type!r}")


def sanitize_image(data: bytes, *, max_bytes: int, max_pixels: int) -> bytes:
    """Decode ``data`` as JPEG/PNG under the limits and return it re-encoded as PNG (RGB)."""
    if len(data) > max_bytes:
        raise TooLarge(f"image exceeds the limit of {max_bytes // (1 << 20)} MB")
    if not data:
        raise Invalid("the image is empty")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as im:
            width, height = im.size  # from the header: checked before any pixel is decoded
            if width * height > max_pixels:
                raise TooLarge(
                    f"image has {width}x{height} pixels; the limit is {max_pixels} pixels"
                )
            if min(width, height) < MIN_SIDE:
                raise Invalid(f"image is {width}x{height}; each side must be >= {MIN_SIDE} pixels")
            im.load()
            rgb = ImageOps.exif_transpose(im).convert("RGB")
    except UnidentifiedImageError as e:
        raise UnsupportedMedia("not a JPEG or PNG image") from e
    except Image.DecompressionBombError as e:
        raise TooLarge(f"image is too large to decode safely: {e}") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise Invalid(f"the image is truncated or corrupt: {e}") from e
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()
