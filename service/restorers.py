"""Face restoration behind one small interface; restorers plug in by import path."""

from __future__ import annotations

import importlib
import logging
from typing import Protocol

from PIL import Image

log = logging.getLogger(__name__)


class FaceRestorer(Protocol):
    """Anything that takes an image and returns it with faces restored."""

    name: str

    def restore(self, image: Image.Image) -> Image.Image: ...


def load_restorer(spec: str | None) -> FaceRestorer | None:
    """Load `module:factory` (for example a CodeFormer wrapper); None when not configured."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ValueError(f"face_restorer={spec!r} must look like 'package.module:factory'")
    factory = getattr(importlib.import_module(module_name), attr)
    restorer = factory()
    log.info("face restorer loaded: %s", restorer.name)
    return restorer
