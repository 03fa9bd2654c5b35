"""Turn a validated request into concrete generation parameters for the loaded model."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from service.errors import ValidationFailed
from service.models import ModelSpec
from service.schema import MAX_SEED, GenerateRequest


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


def resolve_params(
    req: GenerateRequest,
    spec: ModelSpec,
    *,
    refiner_loaded: bool,
    restorer_loaded: bool,
    max_prompt_chars: int,
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
    )


def _scaled(size: int, scale: float) -> int:
    """Size after upscaling, rounded down to a multiple of 8."""
    return int(size * scale) // 8 * 8


def final_size(params: GenerationParams) -> tuple[int, int]:
    """Width and height of the image the request will return."""
    if params.hires_fix:
        return _scaled(params.width, params.hires_scale), _scaled(params.height, params.hires_scale)
    return params.width, params.height
