"""Engines on tiny models for tests that call the service's GPU code directly (no HTTP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.engine import Engine
from service.schema import GenerateRequest
from service.settings import ServiceSettings
from service.warmup import before_ready
from service.worker import Job

# The request `generate` sends unless told otherwise
REQUEST = {"prompt": "a lighthouse at dusk", "num_inference_steps": 6, "seed": 11, "width": 64, "height": 64}


def load_engine(model_cache: Path, model: str = "tiny-sdxl", **settings: object) -> Engine:
    """A loaded engine of `model` with these settings, warmed up as the service does before `/ready`."""
    engine = Engine(ServiceSettings(model=model, cache_dir=model_cache, **settings))
    engine.load()
    before_ready(engine)
    return engine


def generate(engine: Engine, **request: object) -> list[np.ndarray]:
    """Every image of one request (REQUEST with `request`'s fields), through the engine's own path."""
    params = engine.params(GenerateRequest(**{**REQUEST, **request}))
    return [np.asarray(image) for image in engine.generate(params, Job()).images]
