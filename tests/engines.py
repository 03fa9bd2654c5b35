"""Engines on tiny models for tests that call the service's GPU code directly (no HTTP)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.engine import Engine
from service.params import resolve_params
from service.schema import GenerateRequest
from service.settings import ServiceSettings
from service.worker import Job

# The request `generate` sends unless told otherwise
REQUEST = {"prompt": "a lighthouse at dusk", "num_inference_steps": 6, "seed": 11, "width": 64, "height": 64}


def load_engine(model_cache: Path, model: str = "tiny-sdxl", **settings: object) -> Engine:
    """A loaded engine of `model` with these settings."""
    engine = Engine(ServiceSettings(model=model, cache_dir=model_cache, **settings))
    engine.load()
    return engine


def generate(engine: Engine, **request: object) -> list[np.ndarray]:
    """Every image of one request (REQUEST with `request`'s fields), through the engine's own path."""
    assert engine.spec is not None
    params = resolve_params(
        GenerateRequest(**{**REQUEST, **request}),
        engine.spec,
        refiner_loaded=engine.refiner_loaded,
        restorer_loaded=False,
        max_prompt_chars=2000,
        cfg_cutoff=engine.settings.cfg_cutoff,
    )
    return [np.asarray(image) for image in engine.generate(params, Job()).images]
