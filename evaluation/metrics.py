"""Timing and resources of one service's generations: latency percentiles, steps/s, images/h, VRAM, cost.

Latency is the wall time the client waited for `/generate` (what the app feels); steps per second use the
service's own `timings["total"]`; images per hour assume one request at a time (how the box is used);
cost per image spreads the box's price per hour over those images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel

DEFAULT_PRICE_PER_HOUR = 0.40


class TimingSummary(BaseModel):
    images: int
    errors: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    steps_per_s: float | None
    images_per_hour: float | None
    peak_vram_gb: float | None
    cost_per_image: float | None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else None


def summarize_timing(
    latency_s: Sequence[float],
    generation_s: Sequence[float],
    steps: Sequence[int],
    peak_vram_gb: Sequence[float | None],
    errors: int = 0,
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
) -> TimingSummary:
    """The summary of successful generations (aligned lists, one entry per image)."""
    if price_per_hour < 0:
        raise ValueError(f"price_per_hour must be >= 0, got {price_per_hour}")
    if not len(latency_s) == len(generation_s) == len(steps):
        raise ValueError("latency_s, generation_s and steps must have one entry per image")
    images_per_hour = 3600 / float(np.mean(latency_s)) if latency_s else None
    total_steps, total_seconds = float(sum(steps)), float(sum(generation_s))
    vram = [v for v in peak_vram_gb if v is not None and math.isfinite(v)]
    return TimingSummary(
        images=len(latency_s),
        errors=errors,
        latency_p50_s=percentile(latency_s, 50),
        latency_p95_s=percentile(latency_s, 95),
        steps_per_s=total_steps / total_seconds if total_seconds > 0 else None,
        images_per_hour=images_per_hour,
        peak_vram_gb=max(vram) if vram else None,
        cost_per_image=price_per_hour / images_per_hour if images_per_hour else None,
    )
