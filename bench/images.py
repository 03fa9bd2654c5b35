"""Images as the benchmark handles them: the plain API's PNG + base64, decoding an answer, comparing two."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np


def image_diff(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Mean / max absolute difference (0-255) and PSNR (dB) of two uint8 images."""
    d = a.astype(np.float64) - b.astype(np.float64)
    mse = float(np.mean(d**2))
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return {
        "mean_abs": round(float(np.mean(np.abs(d))), 4),
        "max_abs": float(np.max(np.abs(d))),
        "psnr_db": round(psnr, 2),
    }


def pil_default_png_b64(image: Any) -> str:
    """What a plain diffusers API does with the image: Pillow PNG at default settings, base64."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(b64: str) -> np.ndarray:
    """A base64 image from an answer as an RGB uint8 array."""
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
