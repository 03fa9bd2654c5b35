"""The fast PNG writer: same pixels as the input for every mode and size, valid PNG, both writers selectable."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from service.encoding import configure, encode_image, encode_png_fast, encoder_options, to_base64


@pytest.fixture(autouse=True)
def _restore_encoder():
    before = encoder_options()
    yield
    configure(before.png_encoder, before.threads)


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("mode", "shape"),
    [
        ("RGB", (1024, 1024, 3)),
        ("RGBA", (37, 19, 4)),
        ("L", (1, 1)),
        ("L", (2000, 3)),
        ("RGB", (512, 768, 3)),
    ],
)
@pytest.mark.parametrize("threads", [1, 4, 16])
def test_fast_png_is_lossless_for_every_mode_and_thread_count(mode: str, shape: tuple, threads: int) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(pixels, mode)
    back = _decoded(encode_png_fast(image, threads=threads))
    assert back.format == "PNG" and back.mode == mode and back.size == image.size
    assert np.array_equal(np.asarray(back), pixels)


def test_fast_png_converts_other_modes_and_compresses_smooth_images() -> None:
    palette = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8)).convert("P")
    back = _decoded(encode_png_fast(palette))
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(palette.convert("RGB")))
    x = np.linspace(0, 255, 512)
    smooth = Image.fromarray(np.stack([np.add.outer(x, x) / 2] * 3, -1).astype(np.uint8))
    assert len(encode_png_fast(smooth)) < 512 * 512 * 3 / 10  # the Up filter + deflate do compress


def test_the_setting_picks_the_writer_and_both_give_the_same_pixels() -> None:
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    configure("fast", 2)
    fast = encode_image(image, "png")
    configure("pillow")
    pillow = encode_image(image, "png")
    assert fast != pillow  # really two writers
    assert np.array_equal(np.asarray(_decoded(fast)), np.asarray(_decoded(pillow)))
    assert np.array_equal(np.asarray(_decoded(base64.b64decode(to_base64(image)))), np.asarray(image))


def test_jpeg_and_webp_are_untouched_by_the_png_setting() -> None:
    image = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    configure("fast")
    assert _decoded(encode_image(image, "jpeg")).format == "JPEG"
    assert _decoded(encode_image(image, "webp")).format == "WEBP"
