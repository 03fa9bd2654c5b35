"""The HTTP contract: request and response bodies of every endpoint, in one place.

The app written against the old SD1.5 script sends `prompt`, `num_inference_steps`, `width`, `height`,
`use_refiner`, `use_face_restoration` and `hires_fix`, and reads `success`, `image` and
`final_resolution`. Those fields keep their names and meaning here; everything else is additive.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from service.samplers import SAMPLER_NAMES

OutputFormat = Literal["png", "jpeg", "webp"]
Backend = Literal["sd15", "sdxl"]
StartupPhase = Literal["loading", "warming_up", "ready", "failed"]

MAX_SEED = 2**32 - 1
MAX_BATCH = 8


class GenerateRequest(BaseModel):
    """Body of `POST /generate`. Unknown fields are accepted (older apps send them), not used, and named in
    the answer's `warnings` (`unknown_fields`)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(..., min_length=1, description="What to draw.")
    negative_prompt: str | None = Field(None, description="What to avoid.")
    num_inference_steps: int = Field(30, ge=1, le=150, description="Denoising steps.")
    width: int | None = Field(
        None, ge=64, le=2048, multiple_of=8, description="Pixels; default 1024 on SDXL, 512 on SD1.5."
    )
    height: int | None = Field(
        None, ge=64, le=2048, multiple_of=8, description="Pixels; default 1024 on SDXL, 512 on SD1.5."
    )
    guidance_scale: float = Field(7.5, ge=0.0, le=30.0, description="Classifier-free guidance strength.")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="None or -1 picks a random seed.")
    use_refiner: bool | None = Field(None, description="SDXL refiner pass; default on when one is loaded.")
    refiner_split: float = Field(0.8, gt=0.0, lt=1.0, description="Fraction of steps run by the base model.")
    use_face_restoration: bool = Field(False, description="Face restoration, when a restorer is installed.")
    hires_fix: bool = Field(False, description="Upscale 1.5x and refine with an img2img pass.")
    hires_scale: float = Field(1.5, ge=1.0, le=2.0, description="Upscale factor of the hires fix.")
    hires_strength: float = Field(
        0.35, ge=0.01, le=1.0, description="Denoising strength of the hires pass (at least 0.01)."
    )
    output_format: OutputFormat = Field("png", description="Image encoding of the base64 answer.")
    sampler: str | None = Field(
        None,
        max_length=64,
        description=f"A1111 sampler name ({', '.join(SAMPLER_NAMES)}); default: the model's own scheduler.",
    )
    batch_size: int = Field(
        1, ge=1, le=MAX_BATCH, description="Images in one batch; image i uses seed + i (as in A1111)."
    )

    def unknown_fields(self) -> list[str]:
        """The fields sent that this schema does not have, each with the nearest known name if one is close."""
        known = list(type(self).model_fields)
        named = []
        for name in sorted(self.model_extra or {}):
            near = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            named.append(f"{name} (did you mean {near[0]}?)" if near else name)
        return named


class GenerateResponse(BaseModel):
    """Body of a successful `POST /generate`."""

    success: Literal[True] = True
    image: str = Field(..., description="Base64 of the encoded image (no data: prefix).")
    final_resolution: str = Field(..., description='"WIDTHxHEIGHT" of the returned image.')
    seed: int
    model: str
    output_format: OutputFormat
    timings: dict[str, float] = Field(..., description="Seconds per stage, plus queue and total.")
    peak_vram_gb: float | None = Field(None, description="Peak GPU memory during this request.")
    warnings: list[str] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list, description="The seed of every image, first = `seed`.")
    images: list[str] | None = Field(
        None, description="Base64 of every image when batch_size > 1 (`image` is the first)."
    )
    sampler: str | None = Field(None, description="The sampler used; null: the model's own scheduler.")


class StartupFacts(BaseModel):
    """How this process started, as it saw it (`/health`'s `startup`): what flows and benchmarks read instead
    of its log. Times are `time.time()` epoch seconds; durations are seconds."""

    phase: StartupPhase
    milestones: dict[str, float] = Field(
        default_factory=dict,
        description='When each start-up step was reached: "started" (settings read, imports done), '
        '"loading_started", "base_loaded", "warmup_started", "warmup_done", "ready".',
    )
    load_s: float | None = Field(None, description="Loading the pipelines onto the device.")
    warmup_s: float | None = Field(None, description="The whole warm-up before /ready (compiles included).")
    compile: bool = Field(False, description="torch.compile in force.")
    compiled_functions: int = Field(0, description="Functions compiled (and saved) during this start.")
    loaded_functions: int = Field(
        0, description="Functions loaded whole from saved-compile files this start."
    )
    compile_fallbacks: list[str] = Field(
        default_factory=list, description="Signatures that ran under plain torch.compile, with the reason."
    )
    compiled_shapes: list[str] = Field(
        default_factory=list, description='What the warm-up compiled, e.g. "base 1024x1024 x1".'
    )
    warnings: list[str] = Field(
        default_factory=list, description="What went wrong without stopping the start."
    )


class CompiledFunction(BaseModel):
    """One compiled function the service loaded (or built before /ready) and what it covers."""

    module: str = Field(description='"unet", "refiner unet" or "vae-decoder".')
    covers: str = Field(
        description='The first input\'s shape it takes: "2x4x64x64" (static), or "2x4xHxW" (dynamic: every '
        "height and width its guards accept)."
    )
    dynamic: bool
    file: str = Field(description="Its file in the compile cache's saved/ folder.")
    source: str = Field(
        description='"loaded" from disk (built by the compile step) or "compiled" by this start.'
    )


class CompileStatus(BaseModel):
    """The compiled functions (`/health`'s `compiles`). Shapes are the module and its first input: the
    latents, e.g. "unet 2x4x128x128" (batch 2 with guidance; x8 in pixels). The service never compiles once
    ready: a shape no function accepts runs uncompiled, and is listed and counted here."""

    functions: list[CompiledFunction] = Field(default_factory=list)
    compiled: list[str] = Field(
        default_factory=list, description='What the functions cover, e.g. "unet 2x4x64x64", "unet 2x4xHxW".'
    )
    uncompiled: dict[str, int] = Field(
        default_factory=dict, description="Shapes no compiled function accepted: calls run uncompiled."
    )
    uncompiled_calls: int = Field(0, description="Module calls run uncompiled (no function accepted them).")
    problems: list[str] = Field(
        default_factory=list,
        description="Files that could not be loaded (the compile step builds them again), and signatures "
        "that could not be compiled whole.",
    )


class CompileReport(BaseModel):
    """What one compile step did (`sdxl-deploy serve --compile-only`: its last stdout line)."""

    model: str
    built: bool = Field(description="Whether the settings compile with saved functions (else see `note`).")
    note: str = ""
    functions: list[CompiledFunction] = Field(default_factory=list)
    compiled: int = Field(0, description="Functions compiled and saved by this step.")
    reused: int = Field(0, description="Functions already on disk, loaded and kept.")
    problems: list[str] = Field(default_factory=list)
    load_s: float = 0.0
    compile_s: float = 0.0
    peak_vram_gb: float | None = Field(
        None,
        description="The most GPU memory the step allocated (with several jobs, their peaks summed: an upper "
        "bound of what they held at once).",
    )
    jobs: int = Field(1, description="Processes that built side by side (`compile_jobs`).")


class HealthResponse(BaseModel):
    """Body of `GET /health` (always 200 while the process lives)."""

    status: Literal["healthy", "loading", "unhealthy"]
    model_loaded: bool
    cuda_available: bool
    codeformer_available: bool
    vram_available: str | None = Field(None, description='"12.3GB / 24.0GB" (free / total) or null.')
    model: str
    backend: Backend | None
    refiner_loaded: bool
    device: str
    version: str
    uptime_s: float
    queue_depth: int
    quality_options: list[str] = Field(
        default_factory=list,
        description="Opt-in settings in force that change the images (SDXL_CFG_CUTOFF, SDXL_TINY_VAE); "
        "empty: the images are diffusers' own, up to floating-point rounding.",
    )
    prompt_cache: dict[str, int] | None = Field(
        None,
        description="The store of prompt embeddings (SDXL_PROMPT_CACHE_SIZE): texts kept, its size, and how "
        "many encodings came from it (hits) or were computed (misses); null until loaded.",
    )
    error: str | None = Field(None, description="Why the model failed to load, when unhealthy.")
    startup: StartupFacts
    listening: list[int] = Field(
        default_factory=list, description="The ports it listens on (empty when not served by its own server)."
    )
    staged: bool = Field(
        False,
        description="Listening on its staging port (SDXL_STAGE_PORT) because its own port was held at start; "
        "SIGUSR1 makes it take its own port over.",
    )
    taking_over: bool = Field(
        False,
        description="Staged and told (SIGUSR1) to take its own port over: it binds that port within a "
        "millisecond of the old service letting it go.",
    )
    compiles: CompileStatus | None = Field(
        None,
        description="The compiled functions and what they cover, and the shapes run uncompiled; null without "
        "saved compile.",
    )


class ServiceHealth(BaseModel):
    """A `/health` body as read from whatever service answers: this release (a `HealthResponse`), an older
    release that lacks some fields, or the user's SD1.5 script (`status`, `model_loaded`, `cuda_available`).

    The fields a reader uses, named as in `HealthResponse`, each optional (None: the body does not say). The
    body's other keys are kept, and it dumps back as it was answered (less a known field of another type): a
    record of it keeps its keys.
    """

    model_config = ConfigDict(extra="allow", strict=True)  # strict: `model_loaded: "false"` is not False

    status: str | None = None
    model_loaded: bool | None = None
    model: str | None = None
    backend: str | None = None
    device: str | None = None
    quality_options: list[str] = Field(default_factory=list)
    listening: list[int] = Field(default_factory=list)
    taking_over: bool | None = None
    error: str | None = None

    @classmethod
    def of(cls, body: Any) -> ServiceHealth:
        """Any JSON body: a non-object one is kept under `body`; a known field of another type is left out
        (the reader sees it unsaid) rather than refusing the whole answer."""
        said = dict(body) if isinstance(body, dict) else {"body": body}
        try:
            return cls.model_validate(said)
        except ValidationError as exc:
            wrong = {str(error["loc"][0]) for error in exc.errors() if error["loc"]}
            return cls.model_validate({key: value for key, value in said.items() if key not in wrong})

    @model_serializer(mode="wrap")
    def _as_answered(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if key in self.model_fields_set}


def serving(health: HealthResponse | ServiceHealth) -> bool:
    """Whether a service that answered `/health` (200) is serving: it says neither that it is still loading or
    broken (`status`) nor that its model is not loaded. A body that says neither, as an old script's may, is
    serving."""
    return health.model_loaded is not False and health.status not in ("loading", "unhealthy")


class ReadyResponse(BaseModel):
    """Body of `GET /ready`."""

    ready: bool
    detail: str


class ErrorResponse(BaseModel):
    """Body of every error answer."""

    success: Literal[False] = False
    error: str
    error_type: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these error statuses, each answered with an `ErrorResponse` body."""
    return {code: {"model": ErrorResponse} for code in codes}
