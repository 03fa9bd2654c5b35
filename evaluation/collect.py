"""Sending prompts and seeds to a service over HTTP: every image saved, one table row per request.

Works with this project's service and with the user's old SD1.5 script (which has no `/ready`, names no
model and answers only `image` and `final_resolution`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from evaluation.prompts import Prompt
from evaluation.results import GENERATION_COLUMNS, GenerationSettings, Role, ServiceInfo
from service.client import decode_image
from service.schema import ServiceHealth, serving

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


class NoImageAnswer(RuntimeError):
    """A `/generate` request that did not give an image."""


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """K seeds (0..K-1) or an explicit list."""
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {seeds}")
        return list(range(seeds))
    chosen = [int(s) for s in seeds]
    if not chosen:
        raise ValueError("seeds must not be empty")
    return chosen


def _http(url: str, api_key: str | None, timeout: float) -> httpx.Client:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)


def service_info(url: str, role: Role, api_key: str | None = None) -> ServiceInfo:
    """Ask `/health` what the service serves; raises a clear error when it is not up and loaded.

    Only `/health` is required (the user's old SD1.5 script has no `/ready` and names no model).
    """
    with _http(url, api_key, 30) as http:
        try:
            response = http.get("/health")
            body = response.json() if response.is_success else None
        except (httpx.HTTPError, ValueError) as exc:
            raise RuntimeError(f"{role} service at {url} did not answer GET /health: {exc}") from exc
    if not isinstance(body, dict):
        raise RuntimeError(
            f"{role} service at {url}: GET /health answered {response.status_code}, not a JSON 200"
        )
    health = ServiceHealth.of(body)
    if not serving(health):
        raise RuntimeError(f"{role} service at {url} is not ready: /health says {body}")
    return ServiceInfo(
        role=role,
        url=url,
        model=health.model or f"{role} service",
        backend=health.backend,
        device=health.device,
        quality_options=health.quality_options,
    )


def _generate(http: httpx.Client, payload: dict[str, Any]) -> dict[str, Any]:
    """POST /generate; the answer's JSON, which must carry a base64 `image` (new or old contract)."""
    response = http.post("/generate", json=payload)
    try:
        body = response.json()
    except ValueError:
        body = None
    if not response.is_success or not isinstance(body, dict):
        detail = body.get("error") if isinstance(body, dict) else response.text[:300]
        raise NoImageAnswer(f"HTTP {response.status_code}: {detail}")
    if body.get("success") is False or not isinstance(body.get("image"), str):
        raise NoImageAnswer(f"answer without an image: {str(body.get('error') or list(body))[:300]}")
    return body


def collect(
    url: str,
    role: Role,
    prompts: Sequence[Prompt],
    seeds: int | Sequence[int],
    run_dir: str | Path,
    settings: GenerationSettings | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
    on_image: Callable[[], None] | None = None,
    first_id: int = 0,
) -> tuple[ServiceInfo, pd.DataFrame]:
    """Generate every prompt x seed on one service; save the images; one row per request.

    A failed request is a row with `error` set, so one bad answer does not end the run. Prompt ids count
    from `first_id` (a second batch of the same run continues the first one's ids).
    """
    import pandas as pd

    settings = settings or GenerationSettings()
    info = service_info(url, role, api_key)
    image_dir = Path(run_dir) / "images" / role
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    with _http(url, api_key, timeout) as http:
        for prompt_id, prompt in enumerate(prompts, start=first_id):
            for seed in seed_list(seeds):
                row: dict[str, Any] = dict.fromkeys(GENERATION_COLUMNS)
                row.update(
                    role=role,
                    model=info.model,
                    prompt_id=prompt_id,
                    prompt=prompt.text,
                    category=prompt.category,
                    seed=seed,
                    steps=settings.num_inference_steps,
                )
                started = time.perf_counter()
                try:
                    answer = _generate(http, settings.payload(prompt.text, seed))
                    latency = time.perf_counter() - started
                    image = decode_image(answer["image"])
                except (NoImageAnswer, httpx.HTTPError, OSError, ValueError, binascii.Error) as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                    log.warning("%s %r seed %d: %s", role, prompt.text[:40], seed, row["error"])
                else:
                    path = image_dir / f"p{prompt_id:03d}-s{seed}.{(image.format or 'png').lower()}"
                    path.write_bytes(base64.b64decode(answer["image"]))
                    timings = answer.get("timings") or {}
                    row.update(
                        image=path.relative_to(run_dir).as_posix(),
                        resolution=answer.get("final_resolution") or f"{image.width}x{image.height}",
                        latency_s=latency,
                        generation_s=float(timings.get("total", latency)),
                        peak_vram_gb=answer.get("peak_vram_gb"),
                    )
                rows.append(row)
                if on_image:
                    on_image()
    return info, pd.DataFrame(rows)
