"""Turn a validated request into concrete generation parameters for the loaded model."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from service.errors import ValidationFailed
from service.models import ModelSpec
from service.samplers import resolve_sampler
from service.schema import MAX_BATCH, MAX_SEED, GenerateRequest

MAX_IMAGES = 4 * MAX_BATCH  # batch_size * n_iter per request


@dataclass(frozen=True)
class GenerationParams:
    """Everything the engine needs for one image; no defaults left to guess."""

    prompt: str
    negative_prompt: str | None
    steps: int
    width: int
    height: int
    guidance_scale: float
    seed: int
    use_refiner: bool
    refiner_split: float
    hires_fix: bool
    hires_scale: float
    hires_strength: float
    face_restoration: bool
    warnings: tuple[str, ...] = field(default_factory=tuple)
    sampler: str | None = None  # A1111 name; None: the model's own scheduler
    batch_size: int = 1
    n_iter: int = 1  # batches run one after another in the same job
    # fraction of each denoising pass guided (CFG); the rest unguided (setting cfg_cutoff)
    cfg_cutoff: float = 1.0

    @property
    def seeds(self) -> list[int]:
        """The seed of every image: seed + i, as A1111 numbers them across batches."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size * self.n_iter)]


def resolve_params(
    req: GenerateRequest,
    spec: ModelSpec,
    *,
    refiner_loaded: bool,
    restorer_loaded: bool,
    max_prompt_chars: int,
    n_iter: int = 1,
    cfg_cutoff: float = 1.0,
) -> GenerationParams:
    """Fill backend defaults, check backend-specific bounds, and say what will be ignored."""
    if not req.prompt.strip():
        raise ValidationFailed("prompt", req.prompt, "must contain visible text")
    if len(req.prompt) > max_prompt_chars:
        raise ValidationFailed("prompt", req.prompt, f"longer than {max_prompt_chars} characters")
    if req.negative_prompt and len(req.negative_prompt) > max_prompt_chars:
        raise ValidationFailed(
            "negative_prompt", req.negative_prompt, f"longer than {max_prompt_chars} characters"
        )
    width = req.width or spec.default_size
    height = req.height or spec.default_size
    for name, value in (("width", width), ("height", height)):
        if not spec.min_size <= value <= spec.max_size:
            raise ValidationFailed(
                name, value, f"must be between {spec.min_size} and {spec.max_size} for {spec.name}"
            )

    warnings: list[str] = []
    unknown = req.unknown_fields()
    if unknown:
        warnings.append(f"unknown fields ignored: {', '.join(unknown)}")
    use_refiner = refiner_loaded if req.use_refiner is None else req.use_refiner
    if use_refiner and not refiner_loaded:
        why = "SD1.5 has no refiner" if spec.backend == "sd15" else "no refiner is loaded"
        warnings.append(f"use_refiner ignored: {why}")
        use_refiner = False
    if req.use_face_restoration and not restorer_loaded:
        warnings.append("use_face_restoration ignored: no face restorer is installed")
    if req.hires_fix:
        final_w, final_h = _scaled(width, req.hires_scale), _scaled(height, req.hires_scale)
        if max(final_w, final_h) > spec.max_size:
            raise ValidationFailed(
                "hires_scale",
                req.hires_scale,
                f"{final_w}x{final_h} exceeds {spec.max_size} px for {spec.name}",
            )

    sampler = None if req.sampler is None else resolve_sampler(req.sampler, "sampler")
    if not 1 <= req.batch_size <= MAX_BATCH:
        raise ValidationFailed("batch_size", req.batch_size, f"must be between 1 and {MAX_BATCH}")
    if n_iter < 1 or req.batch_size * n_iter > MAX_IMAGES:
        raise ValidationFailed(
            "n_iter", n_iter, f"batch_size * n_iter must be between 1 and {MAX_IMAGES} images"
        )

    seed = secrets.randbelow(MAX_SEED + 1) if req.seed is None or req.seed < 0 else req.seed
    return GenerationParams(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        steps=req.num_inference_steps,
        width=width,
        height=height,
        guidance_scale=req.guidance_scale,
        seed=seed,
        use_refiner=use_refiner,
        refiner_split=req.refiner_split,
        hires_fix=req.hires_fix,
        hires_scale=req.hires_scale,
        hires_strength=req.hires_strength,
        face_restoration=req.use_face_restoration and restorer_loaded,
        warnings=tuple(warnings),
        sampler=sampler,
        batch_size=req.batch_size,
        n_iter=n_iter,
        cfg_cutoff=cfg_cutoff,
    )


def _scaled(size: int, scale: float) -> int:
    """Size after upscaling, rounded down to a multiple of 8."""
    return int(size * scale) // 8 * 8


def final_size(params: GenerationParams) -> tuple[int, int]:
    """Width and height of the image the request will return."""
    if params.hires_fix:
        return _scaled(params.width, params.hires_scale), _scaled(params.height, params.hires_scale)
    return params.width, params.height


def coalesce_key(params: GenerationParams) -> tuple[object, ...] | None:
    """Requests with equal keys can run in one pipeline call (one prompt and seed per image); None: alone.

    Everything that decides the shape of the call or the computation besides prompt and seed is in the key.
    A missing negative prompt and a given one stay apart: SDXL encodes "no negative prompt" as zeros, not as
    the empty text. Hires passes and multi-batch (n_iter) requests always run alone.
    """
    if params.hires_fix or params.n_iter != 1:
        return None
    return (
        params.steps,
        params.width,
        params.height,
        params.guidance_scale,
        params.use_refiner,
        params.refiner_split if params.use_refiner else None,
        params.sampler,
        params.negative_prompt is None,
        params.face_restoration,
        params.cfg_cutoff,
    )
