"""Image encoding for the HTTP answer: a fast multi-threaded PNG writer, JPEG / WebP, base64 text.

Pillow's PNG encoder spends 140-270 ms on a 1024x1024 image (adaptive row filters, one deflate stream on one
core). The fast writer produces a standard PNG with the same pixels: numpy applies the "Up" row filter, the
filtered rows are deflated in parallel slices (zlib releases the GIL) joined with full flushes into one
zlib stream (as pigz does), and the checksums are computed once over the whole data.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from service.schema import OutputFormat

PngEncoder = Literal["fast", "pillow"]

# compress_level=1 is ~5x faster than Pillow's default 6 for a few % larger files (docs/BENCHMARKS.md).
_SAVE_OPTIONS: dict[str, dict[str, object]] = {
    "png": {"format": "PNG", "compress_level": 1},
    "jpeg": {"format": "JPEG", "quality": 90},
    "webp": {"format": "WEBP", "quality": 90, "method": 2},
}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOR_TYPES = {"L": (1, 0), "RGB": (3, 2), "RGBA": (4, 6)}  # mode -> (channels, PNG colour type)
_MIN_SLICE_BYTES = 256 * 1024  # below this a slice costs more in thread hand-off than it saves


@dataclass
class EncoderOptions:
    """How PNGs are written: `fast` (parallel, same pixels) or `pillow`; threads 0 = auto."""

    png_encoder: PngEncoder = "fast"
    threads: int = 0


_options = EncoderOptions()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def configure(png_encoder: PngEncoder = "fast", threads: int = 0) -> None:
    """Set the process-wide PNG writer (the service calls this once at load, from its settings)."""
    global _options
    _options = EncoderOptions(png_encoder, threads)


def encoder_options() -> EncoderOptions:
    """The PNG writer in use."""
    return _options


def _threads(requested: int) -> int:
    return requested if requested > 0 else max(1, min(8, os.cpu_count() or 1))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="png-deflate")
        return _pool


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def _up_filtered(pixels: np.ndarray) -> np.ndarray:
    """Rows prefixed with PNG filter type 2 ("Up": each byte minus the byte above, mod 256)."""
    height, row_bytes = pixels.shape
    out = np.empty((height, row_bytes + 1), dtype=np.uint8)
    out[:, 0] = 2
    out[0, 1:] = pixels[0]
    np.subtract(pixels[1:], pixels[:-1], out=out[1:, 1:])
    return out.reshape(-1)


def encode_png_fast(image: Image.Image, *, threads: int = 0, level: int = 1) -> bytes:
    """A standard 8-bit PNG of `image` (L, RGB or RGBA; other modes are converted to RGB), deflated in parallel."""
    if image.mode not in _PNG_COLOR_TYPES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    channels, color_type = _PNG_COLOR_TYPES[image.mode]
    width, height = image.size
    raw = _up_filtered(np.asarray(image, dtype=np.uint8).reshape(height, width * channels))
    view = memoryview(raw)  # zero-copy slices
    parts = max(1, min(_threads(threads), len(raw) // _MIN_SLICE_BYTES))
    bounds = [len(raw) * i // parts for i in range(parts + 1)]

    def deflate(i: int) -> bytes:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -15)  # raw deflate, no zlib header
        body = compressor.compress(view[bounds[i] : bounds[i + 1]])
        return body + compressor.flush(zlib.Z_FINISH if i == parts - 1 else zlib.Z_FULL_FLUSH)

    pieces = list(_executor().map(deflate, range(parts))) if parts > 1 else [deflate(0)]
    # zlib header 0x78 0x01 (32 KiB window, fastest), the joined deflate data, Adler-32 of everything
    idat = b"\x78\x01" + b"".join(pieces) + struct.pack(">I", zlib.adler32(view))
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return _PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def encode_image(image: Image.Image, output_format: OutputFormat = "png") -> bytes:
    """Encode one image in the requested format."""
    if output_format == "png" and _options.png_encoder == "fast":
        return encode_png_fast(image, threads=_options.threads)
    buffer = io.BytesIO()
    img = image.convert("RGB") if output_format == "jpeg" and image.mode != "RGB" else image
    img.save(buffer, **_SAVE_OPTIONS[output_format])
    return buffer.getvalue()


def to_base64(image: Image.Image, output_format: OutputFormat = "png") -> str:
    """Encode one image and return it as base64 text (no data: prefix, as the app expects)."""
    return base64.b64encode(encode_image(image, output_format)).decode("ascii")
