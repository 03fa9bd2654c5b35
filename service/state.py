"""The service's life: loading state, and the one generation path every API route goes through."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial
from typing import Literal

from sdxl_deploy import __version__
from service.encoding import to_base64
from service.engine import Engine, GenerationResult
from service.errors import NotReady
from service.metrics import ServiceMetrics
from service.params import GenerationParams, final_size, resolve_params
from service.schema import GenerateRequest, GenerateResponse, HealthResponse, OutputFormat
from service.settings import ServiceSettings
from service.worker import GenerationQueue, Job

log = logging.getLogger(__name__)

LoadStatus = Literal["loading", "ready", "failed"]


class ServiceState:
    """Owns the engine, the queue and the metrics of one running service."""

    def __init__(self, settings: ServiceSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or Engine(settings)
        self.queue = GenerationQueue(settings.max_queue, settings.retry_after_s)
        self.metrics = ServiceMetrics(lambda: self.queue.depth, self._vram_used_gb)
        self.started_at = time.monotonic()
        self.status: LoadStatus = "loading"
        self.load_error: str | None = None

    # ----- loading -------------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Load the model on a background thread so `/health` answers while it loads."""
        thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            self.engine.load()
            self.status = "ready"
        except Exception as exc:  # keep the process up and say why (a failed setup is a state, not a crash)
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.status = "failed"
            log.exception("Model failed to load: %s", self.load_error)

    def ensure_ready(self) -> None:
        """Raise NotReady (503) unless the model is loaded."""
        if self.status == "loading":
            raise NotReady("model is still loading; retry shortly", self.settings.retry_after_s)
        if self.status == "failed":
            raise NotReady(f"model failed to load: {self.load_error}", self.settings.retry_after_s)

    # ----- reporting -----------------------------------------------------------------------------

    def health(self) -> HealthResponse:
        import torch

        vram = self.engine.vram() if self.status == "ready" else None
        spec = self.engine.spec
        return HealthResponse(
            status={"ready": "healthy", "loading": "loading", "failed": "unhealthy"}[self.status],
            model_loaded=self.status == "ready",
            cuda_available=torch.cuda.is_available(),
            codeformer_available=self.engine.restorer is not None,
            vram_available=f"{vram[0]:.1f}GB / {vram[1]:.1f}GB" if vram else None,
            model=spec.name if spec else self.settings.model,
            backend=spec.backend if spec else None,
            refiner_loaded=self.engine.refiner_loaded,
            device=str(self.engine.device),
            version=__version__,
            uptime_s=round(time.monotonic() - self.started_at, 1),
            queue_depth=self.queue.depth,
            error=self.load_error,
        )

    def _vram_used_gb(self) -> float:
        vram = self.engine.vram() if self.status == "ready" else None
        return round(vram[1] - vram[0], 3) if vram else 0.0

    # ----- the generation path -------------------------------------------------------------------

    def params_for(self, req: GenerateRequest) -> GenerationParams:
        """Validate a request against the loaded model (422 on a bad value)."""
        self.ensure_ready()
        assert self.engine.spec is not None
        return resolve_params(
            req,
            self.engine.spec,
            refiner_loaded=self.engine.refiner_loaded,
            restorer_loaded=self.engine.restorer is not None,
            max_prompt_chars=self.settings.max_prompt_chars,
        )

    async def run(self, params: GenerationParams) -> tuple[GenerationResult, Job]:
        """Queue one generation on the GPU worker (429 when full, 504 past the timeout)."""
        return await self.queue.run(partial(self.engine.generate, params), self.settings.request_timeout_s)

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        """Validate, queue, generate, encode: what `POST /generate` does."""
        started = time.perf_counter()
        params = self.params_for(req)
        result, job = await self.run(params)
        image_b64, encode_s = await encode(result, req.output_format)
        total = time.perf_counter() - started
        timings = {"queue": round(job.queue_seconds, 4), **result.timings, "encode": encode_s}
        timings["total"] = round(total, 4)
        self.record_success(total, len([result]), result.peak_vram_gb)
        width, height = final_size(params)
        log.info(
            "generated %dx%d steps=%d seed=%d refiner=%s in %.2f s",
            width,
            height,
            params.steps,
            result.seed,
            params.use_refiner,
            total,
        )
        return GenerateResponse(
            image=image_b64,
            final_resolution=f"{result.image.width}x{result.image.height}",
            seed=result.seed,
            model=self.engine.spec.name if self.engine.spec else self.settings.model,
            output_format=req.output_format,
            timings=timings,
            peak_vram_gb=result.peak_vram_gb,
            warnings=result.warnings,
        )

    def record_success(self, seconds: float, images: int, peak_vram_gb: float | None) -> None:
        self.metrics.generation_seconds.observe(seconds)
        self.metrics.images.inc(images)
        if peak_vram_gb is not None:
            self.metrics.peak_vram.set(peak_vram_gb)


async def encode(result: GenerationResult, output_format: OutputFormat) -> tuple[str, float]:
    """Encode off the event loop; return the base64 text and the seconds it took."""
    started = time.perf_counter()
    text = await asyncio.to_thread(to_base64, result.image, output_format)
    return text, round(time.perf_counter() - started, 4)
