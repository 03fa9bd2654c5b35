"""The PNG writers on 1024x1024 images: the service's fast writer against Pillow (level 1 and default), with
base64, as the service answers."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.images import pil_default_png_b64
from bench.measure import best_of
from bench.scenarios import TARGETS


def time_encoders() -> dict[str, Any]:
    """PNG + base64 of 1024x1024 images: the fast writer against Pillow (level 1 and default)."""
    from PIL import Image

    from service.encoding import configure, to_base64

    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 1024)
    smooth = np.stack([np.add.outer(x, x) / 2, np.add.outer(x, -x) / 2 + 128, np.tile(x, (1024, 1))], -1)
    images = {
        "noise": rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8),
        "smooth_plus_noise": (smooth + rng.normal(0, 6, smooth.shape)).clip(0, 255).astype(np.uint8),
    }
    out: dict[str, Any] = {"cpu_count": os.cpu_count(), "target_ms": TARGETS["encode_1024_ms"]}
    for name, array in images.items():
        img = Image.fromarray(array)
        row: dict[str, Any] = {}
        for label, fn in (
            ("fast_png_b64", lambda img=img: to_base64(img, "png")),
            ("pillow_level1_b64", lambda img=img: with_encoder("pillow", lambda: to_base64(img, "png"))),
            ("pillow_default_b64", lambda img=img: pil_default_png_b64(img)),
            ("jpeg90_b64", lambda img=img: to_base64(img, "jpeg")),
        ):
            row[label + "_ms"] = round(best_of(fn, 7) * 1000, 1)
        row["fast_png_b64_mb"] = round(len(to_base64(img, "png")) / 1e6, 2)
        row["pillow_level1_b64_mb"] = round(
            len(with_encoder("pillow", lambda img=img: to_base64(img))) / 1e6, 2
        )
        out[name] = row
    configure("fast")
    return out


def with_encoder(kind: Any, fn: Callable[[], Any]) -> Any:
    """`fn()` with the service's PNG encoder set to `kind`, then the previous one again."""
    from service.encoding import configure, encoder_options

    before = encoder_options()
    configure(kind, before.threads)
    try:
        return fn()
    finally:
        configure(before.png_encoder, before.threads)
