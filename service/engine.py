"""The GPU work: load the pipelines once, generate images, report memory. No web imports here."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from service.accel import SpeedPlan, apply_speed, checked_plan
from service.embeddings import TextEmbeddings
from service.encoding import configure as configure_encoder
from service.errors import Cancelled, GenerationFailed, OutOfMemory, ServiceError
from service.faults import FaultInjector
from service.hub import plan_load
from service.models import ModelSpec, resolve_model
from service.params import GenerationParams, final_size, resolve_params
from service.restorers import FaceRestorer, load_restorer
from service.samplers import SchedulerCache
from service.schema import GenerateRequest
from service.settings import ServiceSettings
from service.startup import StartupRecord
from service.steps import CfgCutoff, Progress, hires_steps, stage_steps
from service.worker import Job

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class GenerationResult:
    """The generated images (batch_size * n_iter, in seed order) and what they cost."""

    images: list[Image.Image]
    seeds: list[int]
    timings: dict[str, float]
    peak_vram_gb: float | None
    warnings: list[str] = field(default_factory=list)

    @property
    def image(self) -> Image.Image:
        """The first image (what single-image callers read)."""
        return self.images[0]

    @property
    def seed(self) -> int:
        """The seed of the first image."""
        return self.seeds[0]


def tiny_vae_source(setting: str, spec: ModelSpec) -> str | None:
    """Where the tiny VAE comes from (setting `tiny_vae`): None when off, the model's own when on."""
    if setting == "off":
        return None
    if setting != "on":
        return setting
    if spec.tiny_vae is None:
        raise ValueError(
            f"tiny_vae='on' but model {spec.name!r} has no tiny VAE of its own; "
            "set SDXL_TINY_VAE to a hub id or folder of an AutoencoderTiny"
        )
    return spec.tiny_vae


def resolve_device(setting: str) -> torch.device:
    """`auto` picks the first CUDA GPU when there is one, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={setting!r} but no CUDA GPU is visible to torch")
    return device


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA GPUs that support it, float16 on older ones, float32 on the CPU."""
    if setting != "auto":
        return _DTYPES[setting]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Engine:
    """Holds the loaded pipelines of one model and runs generations on them (one at a time)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.spec: ModelSpec | None = None
        self.base: Any = None
        self.refiner: Any = None
        self.img2img: Any = None
        self.restorer: FaceRestorer | None = None
        self.faults = FaultInjector(settings.inject_fault)
        self.speed: SpeedPlan | None = None  # the speed techniques in force (service/accel.py)
        self.startup = StartupRecord()  # how this engine's start went (`/health`'s `startup`)
        self.schedulers = SchedulerCache()
        self.quality_options: list[str] = []  # opt-in settings in force that change the images
        self.embeddings = TextEmbeddings(settings.prompt_cache_size)  # prompts encoded once, kept
        self.process_peak_gb = 0.0  # the highest per-request peak so far (peak_gb_since_start)
        self.building = (
            False  # the compile step's engine: builds compiled functions (service/compile_step.py)
        )

    # ----- loading -------------------------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self.base is not None

    def load(self) -> None:
        """Resolve the model, load base (+ refiner), move to the device, apply memory and speed settings.

        The warm-up (the first compile) comes after, before `/ready`: `service/warmup.py`."""
        s = self.settings
        configure_encoder(s.png_encoder, s.encode_threads)
        spec = resolve_model(s.model, s.cache_dir, refiner=s.refiner)
        log.info("Loading %s (%s) on %s as %s", spec.name, spec.backend, self.device, _dtype_name(self.dtype))
        kwargs: dict[str, Any] = {}
        tiny_vae = tiny_vae_source(s.tiny_vae, spec)
        if tiny_vae:
            from diffusers import AutoencoderTiny

            log.info("Loading the tiny VAE from %s (opt-in, changes the images: SDXL_TINY_VAE)", tiny_vae)
            try:
                kwargs["vae"] = _load(AutoencoderTiny, tiny_vae, self.dtype, single_file=False)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"tiny_vae={tiny_vae!r}: no AutoencoderTiny could be loaded from it: {exc}"
                ) from exc
        elif spec.vae:
            from diffusers import AutoencoderKL

            log.info("Loading VAE from %s", spec.vae)
            kwargs["vae"] = _load(AutoencoderKL, spec.vae, self.dtype, single_file=False)
            log.info("VAE loaded")
        if spec.backend == "sdxl":
            from diffusers import StableDiffusionXLImg2ImgPipeline as Img2Img
            from diffusers import StableDiffusionXLPipeline as Text2Img
        else:
            from diffusers import StableDiffusionImg2ImgPipeline as Img2Img
            from diffusers import StableDiffusionPipeline as Text2Img

            kwargs.update(safety_checker=None, requires_safety_checker=False)
        log.info("Loading %s base model from %s (first run downloads it)", spec.backend, spec.base)
        started = time.perf_counter()
        base = _load(Text2Img, spec.base, self.dtype, single_file=spec.single_file, **kwargs)
        log.info("Base model loaded in %.1f s", time.perf_counter() - started)
        self.startup.mark("base_loaded")
        refiner = None
        if spec.backend == "sdxl" and spec.refiner and s.load_refiner:
            log.info("Loading refiner from %s", spec.refiner)
            refiner = _load(
                Img2Img,
                spec.refiner,
                self.dtype,
                single_file=False,
                text_encoder_2=base.text_encoder_2,
                vae=base.vae,
            )
            log.info("Refiner loaded")
        for pipe in (base, refiner):
            if pipe is not None:
                self._place(pipe)
        # from_pipe casts the shared modules to its own dtype argument, float32 when none is given; it takes
        # the VAE only when named (it checks the type against the pipeline's declared AutoencoderKL)
        self.img2img = Img2Img.from_pipe(base, vae=base.vae, **{dtype_keyword(): self.dtype})
        self.img2img.set_progress_bar_config(disable=True)
        self.speed = checked_plan(s, self.device, spec.backend)  # compile off where it does not work
        self.startup.set(compile=self.speed.compile, warnings=list(self.speed.warnings))
        apply_speed(self.speed, (base, refiner, self.img2img), build=self.building)
        self.restorer = load_restorer(s.face_restorer)
        self.spec, self.base, self.refiner = spec, base, refiner
        self.embeddings = TextEmbeddings(s.prompt_cache_size)  # kept embeddings belong to these encoders
        self.quality_options = [f"cfg_cutoff={s.cfg_cutoff:g}"] if s.cfg_cutoff < 1.0 else []
        if tiny_vae:
            self.quality_options.append(f"tiny_vae={tiny_vae}")
        if self.quality_options:
            log.warning("opt-in settings that change the images: %s", ", ".join(self.quality_options))
        self._log_device()

    def _place(self, pipe: Any) -> None:
        """Move a pipeline to the device and apply the memory settings."""
        s = self.settings
        if s.cpu_offload and self.device.type == "cuda":
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
        if s.attention_slicing:
            pipe.enable_attention_slicing()
        if s.vae_slicing:
            pipe.vae.enable_slicing()
        if s.vae_tiling:
            pipe.vae.enable_tiling()
        pipe.set_progress_bar_config(disable=True)

    def _log_device(self) -> None:
        if self.device.type == "cuda":
            free, total = self.vram() or (0.0, 0.0)
            log.info("GPU: %s", torch.cuda.get_device_name(self.device))
            log.info("VRAM: %.1fGB free / %.1fGB total", free, total)
        else:
            log.info("Running on the CPU (no CUDA GPU): fine for tiny models, far too slow for real ones")

    # ----- state ---------------------------------------------------------------------------------

    def params(self, req: GenerateRequest, n_iter: int = 1) -> GenerationParams:
        """The one way a request becomes generation parameters for the loaded model (422 on a bad value)."""
        if self.spec is None:
            raise GenerationFailed("model is not loaded")
        return resolve_params(
            req,
            self.spec,
            refiner_loaded=self.refiner_loaded,
            restorer_loaded=self.restorer is not None,
            max_prompt_chars=self.settings.max_prompt_chars,
            n_iter=n_iter,
            cfg_cutoff=self.settings.cfg_cutoff,
        )

    @property
    def refiner_loaded(self) -> bool:
        return self.refiner is not None

    def vram(self) -> tuple[float, float] | None:
        """(free, total) GPU memory in GiB, or None without CUDA."""
        if self.device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return free / 2**30, total / 2**30

    def probe(self) -> None:
        """A tiny operation on the device; raises if the device does not compute."""
        value = torch.ones(8, device=self.device).add_(1).sum().item()
        if value != 16:
            raise RuntimeError(f"device {self.device} computed {value} for 8 * 2")

    # ----- generation ----------------------------------------------------------------------------

    def generate(self, p: GenerationParams, job: Job) -> GenerationResult:
        """Run base (+ refiner) (+ hires pass) (+ face restoration) for every batch of one request."""
        return self.generate_together([(p, job)])[0]

    def generate_jobs(self, jobs: list[Job]) -> list[GenerationResult | ServiceError]:
        """The queue's batched work: each job's payload is its GenerationParams (see `generate_together`).

        A coalesced batch that runs out of GPU memory is not the requests' fault: each one then runs alone,
        and each gets its own result or its own error.
        """
        requests = [(job.payload, job) for job in jobs]
        try:
            return self.generate_together(requests)
        except OutOfMemory:
            if len(requests) == 1:
                raise
            log.warning(
                "a coalesced batch of %d requests ran out of GPU memory: running them one by one", len(jobs)
            )
        outcomes: list[GenerationResult | ServiceError] = []
        for p, job in requests:
            try:
                outcomes.append(self.generate(p, job))
            except ServiceError as exc:
                outcomes.append(exc)
        return outcomes

    def generate_together(self, requests: list[tuple[GenerationParams, Job]]) -> list[GenerationResult]:
        """Run requests of one coalescing group (`params.coalesce_key`) as one batch, or one request alone.

        Image i of the batch gets its own generator, seeded with its request's seed, so every request gets
        the images it would get alone (up to the floating-point differences of a bigger batch).
        """
        if not self.loaded:
            raise GenerationFailed("model is not loaded")
        timings: dict[str, float] = {}
        self._reset_peak()
        try:
            self.faults.maybe_raise()
            if len(requests) == 1:
                images = self._run_stages(*requests[0], timings)
            else:
                images = self._run_coalesced(requests, timings)
        except torch.OutOfMemoryError as exc:
            self.free_memory()
            w, h = final_size(requests[0][0])
            raise OutOfMemory(
                f"GPU out of memory at {w}x{h} (memory freed; try a smaller size, use_refiner=false, "
                f"or the attention/VAE slicing settings): {str(exc).splitlines()[0]}"
            ) from None
        except Cancelled:
            raise
        except Exception as exc:
            self.free_memory()
            raise GenerationFailed(f"generation failed: {type(exc).__name__}: {exc}") from exc
        if len(requests) > 1:
            timings["batched_with"] = len(requests)
        peak = self._peak_gb()
        results, start = [], 0
        for p, _ in requests:
            count = len(p.seeds)
            results.append(
                GenerationResult(
                    images[start : start + count], p.seeds, dict(timings), peak, list(p.warnings)
                )
            )
            start += count
        return results

    def _run_stages(self, p: GenerationParams, job: Job, timings: dict[str, float]) -> list[Image.Image]:
        """Every batch of the request with its sampler; progress counts the steps of all of them."""
        progress = Progress([job], stage_steps(p) * p.n_iter)
        seeds = p.seeds
        images: list[Image.Image] = []
        with self.schedulers.use((self.base, self.refiner, self.img2img), p.sampler):
            for batch in range(p.n_iter):
                batch_seeds = seeds[batch * p.batch_size : (batch + 1) * p.batch_size]
                images += self._run_batch(p, batch_seeds, progress, timings)
        return images

    def _run_coalesced(
        self, requests: list[tuple[GenerationParams, Job]], timings: dict[str, float]
    ) -> list[Image.Image]:
        """Several requests of one group in one pipeline call: one prompt (and generator) per image."""
        first = requests[0][0]
        seeds = [seed for p, _ in requests for seed in p.seeds]
        prompts = [p.prompt for p, _ in requests for _ in p.seeds]
        negatives = None
        if first.negative_prompt is not None:  # the group key keeps None and text apart
            negatives = [p.negative_prompt or "" for p, _ in requests for _ in p.seeds]
        progress = Progress([job for _, job in requests], stage_steps(first))
        log.info("coalesced %d requests into one batch of %d images", len(requests), len(seeds))
        with self.schedulers.use((self.base, self.refiner, self.img2img), first.sampler):
            return self._run_batch(first, seeds, progress, timings, prompts=(prompts, negatives))

    def _run_batch(
        self,
        p: GenerationParams,
        seeds: list[int],
        progress: Progress,
        timings: dict[str, float],
        *,
        prompts: tuple[list[str], list[str] | None] | None = None,
    ) -> list[Image.Image]:
        """One batch: image i gets its own generator seeded with seeds[i], so each one reproduces alone.

        `prompts`: one prompt (and negative prompt) per image, for coalesced requests; else `p`'s, repeated.
        The pipelines get them as embeddings, each distinct text encoded once and kept (`service/embeddings.py`).
        The last stage hands back tensors, turned into 8-bit pixels on the device (the same arithmetic as
        diffusers' CPU post-processing, without its float32 copy of the image through numpy).
        """
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        common: dict[str, Any] = {
            "guidance_scale": p.guidance_scale,
            "generator": generators if len(generators) > 1 else generators[0],
            "num_images_per_prompt": 1,
        }
        negatives = None if p.negative_prompt is None else [p.negative_prompt] * len(seeds)
        per_image = prompts or ([p.prompt] * len(seeds), negatives)

        def texts(pipe: Any) -> dict[str, Any]:
            """The prompts as embeddings for `pipe`'s text encoders (each distinct text encoded once, kept)."""
            return self.embeddings.call_kwargs(pipe, *per_image, guided=p.guidance_scale > 1)

        last = "hires" if p.hires_fix else "refiner" if p.use_refiner else "base"
        hires_total, hires_run = hires_steps(p)
        # base and refiner are one denoising pass of p.steps (the refiner finishes the base's schedule); hires
        # is another
        guidance = CfgCutoff(p.cfg_cutoff, p.steps)
        with _timed(timings, "base"):
            extra = {"denoising_end": p.refiner_split, "output_type": "latent"} if p.use_refiner else {}
            if last == "base":
                extra["output_type"] = "pt"
            out = self.base(
                num_inference_steps=p.steps,
                width=p.width,
                height=p.height,
                callback_on_step_end=progress.callback(guidance),
                **{**common, **texts(self.base), **guidance.call_kwargs(self.base)},
                **extra,
            )
        progress.check_cancelled()
        images = out.images
        if p.use_refiner:
            with _timed(timings, "refiner"):
                images = self.refiner(
                    image=out.images,
                    num_inference_steps=p.steps,
                    denoising_start=p.refiner_split,
                    callback_on_step_end=progress.callback(guidance),
                    output_type="pt" if last == "refiner" else "pil",
                    **{**common, **texts(self.refiner), **guidance.call_kwargs(self.refiner)},
                ).images
            progress.check_cancelled()
        if p.hires_fix:
            w, h = final_size(p)
            guidance = CfgCutoff(p.cfg_cutoff, hires_run)
            with _timed(timings, "hires"):
                images = self.img2img(
                    image=[image.resize((w, h), Image.Resampling.LANCZOS) for image in images],
                    strength=p.hires_strength,
                    num_inference_steps=hires_total,
                    callback_on_step_end=progress.callback(guidance),
                    output_type="pt",
                    **{**common, **texts(self.img2img), **guidance.call_kwargs(self.img2img)},
                ).images
            progress.check_cancelled()
        with _timed(timings, last):
            images = tensor_to_pil(images)
        if p.face_restoration and self.restorer is not None:
            restorer = self.restorer
            with _timed(timings, "face_restoration"):
                images = [restorer.restore(image) for image in images]
        return list(images)

    def free_memory(self) -> None:
        """Release what a failed request left on the GPU."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.process_peak_gb = max(self.process_peak_gb, self._peak_gb() or 0.0)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb_since_start(self) -> float | None:
        """The most GPU memory this engine's process allocated at any time (None without CUDA)."""
        peak = self._peak_gb()
        return None if peak is None else max(self.process_peak_gb, peak)

    def _peak_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """A pipeline's `output_type="pt"` images (N x 3 x H x W in [0, 1], on the device) as 8-bit PIL images.

    The arithmetic of diffusers' own `numpy_to_pil` (float32, x 255, round half to even), done on the
    device: only the uint8 pixels cross to the CPU (1/4 of the float32 copy diffusers makes). A 1024 px SDXL
    image on an H200 (bench-unet's stage timing): 5.7 ms with the PIL images, against diffusers' 15.9 ms.
    """
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(pixel) for pixel in pixels]


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:  # summed over the batches of a request
        timings[stage] = round(timings.get(stage, 0.0) + time.perf_counter() - started, 4)


def _load(cls: Any, source: str, dtype: torch.dtype, *, single_file: bool, **kwargs: Any) -> Any:
    """The one loading path: `from_pretrained` (hub id or folder) or `from_single_file` (checkpoint).

    `from_pretrained` follows the source's file list (`service.hub.plan_load`): the fp16 variant in half
    precision where the repo ships it (half the download), plain weights otherwise; the log names the files.
    """
    kwargs[dtype_keyword()] = dtype
    if single_file:
        return cls.from_single_file(source, **kwargs)
    plan = plan_load(source, half=dtype in (torch.float16, torch.bfloat16), skip=set(kwargs))
    log.info("%s from %s: %s", cls.__name__, source, plan.describe())
    return cls.from_pretrained(source, **plan.kwargs, **kwargs)


def dtype_keyword() -> str:
    """diffusers 0.42 renamed `torch_dtype` to `dtype`; the GPU box may run an older release."""
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
