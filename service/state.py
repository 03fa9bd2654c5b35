"""The service's life: loading state, and the one generation path every API route goes through."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

from service import __version__
from service.accel import compile_status
from service.encoding import to_base64
from service.engine import Engine, GenerationResult
from service.errors import NotReady
from service.metrics import ServiceMetrics
from service.params import GenerationParams, coalesce_key, final_size
from service.schema import CompileStatus, GenerateRequest, GenerateResponse, HealthResponse, OutputFormat
from service.settings import ServiceSettings
from service.warmup import before_ready
from service.worker import GenerationQueue, Job

log = logging.getLogger(__name__)

LoadStatus = Literal["loading", "ready", "failed"]


class ServiceState:
    """Owns the engine, the queue and the metrics of one running service."""

    def __init__(self, settings: ServiceSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine or Engine(settings)
        self.queue = GenerationQueue(settings.max_queue, settings.retry_after_s)
        self.metrics = ServiceMetrics(lambda: self.queue.depth, self._vram_used_gb, self._compiles)
        self.started_at = time.monotonic()
        self.load_error: str | None = None
        self.listening: list[int] = []  # the ports its server listens on (service/server.py keeps it)
        self.taking_over = False  # told to take its own port over, binding it the moment it is free

    # ----- loading -------------------------------------------------------------------------------

    def start_loading(self) -> threading.Thread:
        """Load the model on a background thread so `/health` answers while it loads."""
        thread = threading.Thread(target=self._load, name="model-loader", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        """Load, warm up, then ready; or failed, with the reason. Each step is noted in `startup`."""
        startup = self.engine.startup
        try:
            startup.mark("loading_started")
            started = time.perf_counter()
            self.queue.call(self.engine.load)  # on the GPU worker thread (see GenerationQueue.call)
            startup.set(load_s=round(time.perf_counter() - started, 3))
            self.queue.call(lambda: before_ready(self.engine))  # the warm-up: on that thread too
            if self.engine.speed is not None:
                self.queue.batch_sizes = self.engine.speed.coalesce_sizes
            startup.mark("ready", phase="ready")
            log.info("Model loaded successfully: %s", self.model_name)
        except Exception as exc:  # keep the process up and say why (a failed setup is a state, not a crash)
            self.load_error = f"{type(exc).__name__}: {exc}"
            startup.set(phase="failed")
            log.exception("Model failed to load: %s", self.load_error)

    @property
    def status(self) -> LoadStatus:
        """loading (warm-up included), ready or failed: the start-up record's phase."""
        phase = self.engine.startup.phase
        return "loading" if phase == "warming_up" else phase

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
            quality_options=list(self.engine.quality_options),
            prompt_cache=self.engine.embeddings.stats() if self.status == "ready" else None,
            error=self.load_error,
            startup=self.engine.startup.facts(),
            listening=list(self.listening),
            staged=bool(self.listening) and self.settings.port not in self.listening,
            taking_over=self.taking_over,
            compiles=self._compiles(),
        )

    def _compiles(self) -> CompileStatus | None:
        engine = self.engine
        return compile_status((engine.base, engine.refiner, engine.img2img)) if engine.loaded else None

    def _vram_used_gb(self) -> float:
        vram = self.engine.vram() if self.status == "ready" else None
        return round(vram[1] - vram[0], 3) if vram else 0.0

    # ----- the generation path -------------------------------------------------------------------

    def params_for(self, req: GenerateRequest, n_iter: int = 1) -> GenerationParams:
        """Validate a request against the loaded model (422 on a bad value)."""
        self.ensure_ready()
        return self.engine.params(req, n_iter)

    async def run(self, params: GenerationParams) -> tuple[GenerationResult, Job]:
        """Queue one generation on the GPU worker (429 when full, 504 past the timeout); it may run in one
        batched call with compatible waiting requests (`coalesce` setting)."""
        return await self.queue.run(
            self.engine.generate_jobs,
            self.settings.request_timeout_s,
            payload=params,
            group=coalesce_key(params),
            images=len(params.seeds),
        )

    async def produce(self, req: GenerateRequest, n_iter: int = 1) -> Generated:
        """The one generation path of every API: validate, queue, generate, encode, count."""
        started = time.perf_counter()
        params = self.params_for(req, n_iter)
        result, job = await self.run(params)
        images_b64, encode_s = await encode(result, req.output_format)
        total = time.perf_counter() - started
        timings = {"queue": round(job.queue_seconds, 4), **result.timings, "encode": encode_s}
        timings["total"] = round(total, 4)
        self.record_success(total, len(result.images), result.peak_vram_gb)
        if job.batched_with > 1:
            self.metrics.coalesced.inc()
        width, height = final_size(params)
        log.info(
            "generated %d x %dx%d steps=%d sampler=%s seeds=%s refiner=%s in %.2f s",
            len(result.images),
            width,
            height,
            params.steps,
            params.sampler or "default",
            result.seeds if len(result.seeds) <= 4 else f"{result.seed}..{result.seeds[-1]}",
            params.use_refiner,
            total,
        )
        return Generated(params, result, images_b64, timings)

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        """What `POST /generate` does: one batch, the first image in `image`, all of them in `images`."""
        done = await self.produce(req)
        result = done.result
        return GenerateResponse(
            image=done.images_b64[0],
            final_resolution=f"{result.image.width}x{result.image.height}",
            seed=result.seed,
            model=self.model_name,
            output_format=req.output_format,
            timings=done.timings,
            peak_vram_gb=result.peak_vram_gb,
            warnings=result.warnings,
            seeds=result.seeds,
            images=done.images_b64 if len(done.images_b64) > 1 else None,
            sampler=done.params.sampler,
        )

    @property
    def model_name(self) -> str:
        return self.engine.spec.name if self.engine.spec else self.settings.model

    def record_success(self, seconds: float, images: int, peak_vram_gb: float | None) -> None:
        self.metrics.generation_seconds.observe(seconds)
        self.metrics.images.inc(images)
        if peak_vram_gb is not None:
            self.metrics.peak_vram.set(peak_vram_gb)


@dataclass(frozen=True)
class Generated:
    """What the generation path hands to an API layer: the resolved params, the result, base64 images."""

    params: GenerationParams
    result: GenerationResult
    images_b64: list[str]
    timings: dict[str, float]


async def encode(result: GenerationResult, output_format: OutputFormat) -> tuple[list[str], float]:
    """Encode every image off the event loop; return the base64 texts and the seconds it took."""
    started = time.perf_counter()
    texts = await asyncio.to_thread(lambda: [to_base64(image, output_format) for image in result.images])
    return texts, round(time.perf_counter() - started, 4)
