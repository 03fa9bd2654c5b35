"""Image encoding for the HTTP answer: fast settings, base64 text."""

from __future__ import annotations

import base64
import io

from PIL import Image

from service.schema import OutputFormat

# compress_level=1 is ~5x faster than Pillow's default 6 for a few % larger files (docs/BENCHMARKS.md).
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "png": {"format": "PNG", "compress_level": 1},
    "jpeg": {"format": "JPEG", "quality": 90},
    "webp": {"format": "WEBP", "quality": 90, "method": 2},
}


def encode_image(image: Image.Image, output_format: OutputFormat = "png") -> bytes:
    """Encode one image in the requested format."""
    buffer = io.BytesIO()
    img = image.convert("RGB") if output_format == "jpeg" and image.mode != "RGB" else image
    img.save(buffer, **_SAVE_OPTIONS[output_format])
    return buffer.getvalue()


def to_base64(image: Image.Image, output_format: OutputFormat = "png") -> str:
    """Encode one image and return it as base64 text (no data: prefix, as the app expects)."""
    return base64.b64encode(encode_image(image, output_format)).decode("ascii")
