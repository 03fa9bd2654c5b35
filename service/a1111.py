"""The AUTOMATIC1111-compatible API (`/sdapi/v1/...`): a thin translation onto the service's own path.

`POST /sdapi/v1/txt2img` becomes a `GenerateRequest` and goes through `ServiceState.produce`, the same
validation, queue, engine and error mapping as `POST /generate`. Fields this server cannot honour are
ignored with a logged warning (also listed in `info.warnings`); operations it does not offer answer 404
`unsupported`, and an extension script or another checkpoint answers 422 naming the field.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import ValidationError as PydanticValidationError

from service import __version__
from service.a1111_schema import (
    A1111_NAME,
    DEFAULT_HR_DENOISE,
    DEFAULT_REFINER_SWITCH,
    PREFIX,
    OptionsResponse,
    ProgressResponse,
    ProgressState,
    SamplerItem,
    SchedulerItem,
    ScriptsList,
    SDModelItem,
    Txt2ImgRequest,
    Txt2ImgResponse,
)
from service.deps import StateDep, require_api_key_or_basic
from service.errors import Unsupported, ValidationFailed
from service.samplers import SAMPLERS, karras_variant, resolve_sampler
from service.schema import GenerateRequest, error_responses
from service.state import Generated, ServiceState

log = logging.getLogger(__name__)

# ----- translation ---------------------------------------------------------------------------------

# fields an A1111 client may send that change nothing here when they hold one of these values
_NEUTRAL: tuple[Any, ...] = ("", 0, -1, [], {}, "None")
_QUIET_VALUES: dict[str, tuple[Any, ...]] = {
    "eta": (1.0,),
    "s_noise": (1.0,),
    "s_tmax": (math.inf,),
    "hr_upscaler": ("Latent", "Lanczos"),
    "override_settings_restore_afterwards": (True,),
}
_ALWAYS_QUIET = {
    "sampler_index",
    "do_not_save_samples",
    "do_not_save_grid",
    "save_images",
    "force_task_id",
    "infotext",
    "script_args",
    "send_images",
}
_HIRES_ONLY = {
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_additional_modules",
    "hr_distilled_cfg",
    "firstphase_width",
    "firstphase_height",
}


def _neutral(key: str, value: Any) -> bool:
    """True when an ignored field holds a value that would change nothing anyway."""
    if key in _ALWAYS_QUIET or value is None or value is False or value in _QUIET_VALUES.get(key, ()):
        return True
    return not isinstance(value, bool) and value in _NEUTRAL


def translate(
    body: Txt2ImgRequest, model_name: str, refiner_name: str | None
) -> tuple[GenerateRequest, list[str]]:
    """An A1111 txt2img body -> our request, plus warnings for what it asked and will not get."""
    warnings: list[str] = []
    _refuse_extensions(body, warnings)
    _check_overrides(body.override_settings, model_name, warnings)

    sampler = resolve_sampler(body.sampler_name or body.sampler_index, "sampler_name")
    if body.scheduler and body.scheduler.lower() not in ("automatic", ""):
        variant = karras_variant(sampler) if body.scheduler.lower() == "karras" else None
        if variant:
            sampler = variant
        else:
            warnings.append(f"scheduler ignored: {body.scheduler!r} is not offered for {sampler!r}")

    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or None,
        "num_inference_steps": body.steps,
        "width": body.width,
        "height": body.height,
        "guidance_scale": body.cfg_scale,
        "seed": body.seed,
        "batch_size": body.batch_size,
        "sampler": sampler,
        "use_face_restoration": bool(body.restore_faces),
        "output_format": "png",
    }
    if body.enable_hr:
        fields["hires_fix"] = True
        fields["hires_scale"] = _hires_scale(body)
        fields["hires_strength"] = body.denoising_strength or DEFAULT_HR_DENOISE
    use_refiner = bool(body.refiner_checkpoint) and body.refiner_checkpoint != "None"
    fields["use_refiner"] = use_refiner
    if use_refiner:
        fields["refiner_split"] = body.refiner_switch_at or DEFAULT_REFINER_SWITCH
        if refiner_name and body.refiner_checkpoint not in (refiner_name, "refiner"):
            warnings.append(f"refiner_checkpoint {body.refiner_checkpoint!r}: the loaded refiner is used")

    ignored = {
        key: value
        for key, value in (body.model_extra or {}).items()
        if not _neutral(key, value) and (body.enable_hr or key not in _HIRES_ONLY)
    }
    if ignored:
        warnings.append("ignored (not supported here): " + ", ".join(sorted(ignored)))
    try:
        req = GenerateRequest(**fields)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else "body"
        raise ValidationFailed(
            A1111_NAME.get(field, field), first.get("input"), first.get("msg", "invalid value")
        ) from None
    return req, warnings


def _hires_scale(body: Txt2ImgRequest) -> float:
    """A1111's hr_resize_x/y (a target size) win over hr_scale, as there."""
    scales = [t / s for t, s in ((body.hr_resize_x, body.width), (body.hr_resize_y, body.height)) if t]
    return max(scales) if scales else body.hr_scale


def _refuse_extensions(body: Txt2ImgRequest, warnings: list[str]) -> None:
    """A selectable script or an enabled extension cannot run here: 422, as A1111 without it answers."""
    if body.script_name:
        raise ValidationFailed("script_name", body.script_name, "scripts are not supported by this server")
    for name, entry in (body.alwayson_scripts or {}).items():
        args = entry.get("args") if isinstance(entry, dict) else None
        if not args or (isinstance(args, list) and args[0] is False):  # an extension left off
            warnings.append(f"alwayson_scripts.{name} ignored (disabled)")
            continue
        raise ValidationFailed(
            f"alwayson_scripts.{name}", entry, "extensions are not supported by this server"
        )


def _check_overrides(overrides: dict[str, Any] | None, model_name: str, warnings: list[str]) -> None:
    for key, value in (overrides or {}).items():
        if key == "sd_model_checkpoint":
            if value not in (None, "", model_name):
                raise ValidationFailed(
                    "override_settings.sd_model_checkpoint", value, f"this server serves only {model_name!r}"
                )
        else:
            warnings.append(f"override_settings.{key} ignored")


def info_json(body: Txt2ImgRequest, done: Generated, model_name: str, warnings: list[str]) -> str:
    """The `info` text: A1111's `Processed.js()` keys, plus `warnings` and `timings`."""
    p, seeds = done.params, done.result.seeds
    extra: dict[str, Any] = {}
    if p.hires_fix:
        extra.update({"Hires upscale": p.hires_scale, "Denoising strength": p.hires_strength})
    if p.use_refiner:
        extra.update({"Refiner": body.refiner_checkpoint, "Refiner switch at": p.refiner_split})
    negative = p.negative_prompt or ""
    infotexts = [_infotext(p.prompt, negative, p, seed, model_name) for seed in seeds]
    return json.dumps(
        {
            "prompt": p.prompt,
            "all_prompts": [p.prompt] * len(seeds),
            "negative_prompt": negative,
            "all_negative_prompts": [negative] * len(seeds),
            "seed": seeds[0],
            "all_seeds": seeds,
            "subseed": -1,
            "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0,
            "width": p.width,
            "height": p.height,
            "sampler_name": p.sampler,
            "cfg_scale": p.guidance_scale,
            "steps": p.steps,
            "batch_size": p.batch_size,
            "restore_faces": p.face_restoration,
            "face_restoration_model": None,
            "sd_model_name": model_name,
            "sd_model_hash": None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": p.hires_strength if p.hires_fix else None,
            "extra_generation_params": extra,
            "index_of_first_image": 0,
            "infotexts": infotexts,
            "styles": [],
            "job_timestamp": datetime.datetime.now().strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": False,
            "version": f"sdxl-deploy {__version__}",
            "warnings": [*done.result.warnings, *warnings],
            "timings": done.timings,
        }
    )


def _infotext(prompt: str, negative: str, p: Any, seed: int, model_name: str) -> str:
    """A1111's one-image parameter text (what it writes into PNGs and clients parse)."""
    lines = [prompt] + ([f"Negative prompt: {negative}"] if negative else [])
    lines.append(
        f"Steps: {p.steps}, Sampler: {p.sampler}, CFG scale: {p.guidance_scale:g}, Seed: {seed}, "
        f"Size: {p.width}x{p.height}, Model: {model_name}, Version: sdxl-deploy {__version__}"
    )
    return "\n".join(lines)


def progress_of(state: ServiceState) -> ProgressResponse:
    """A1111's progress formula over the running job of our one queue."""
    job = state.queue.running
    queued = state.queue.depth
    if job is None or job.started_at is None:
        return ProgressResponse(
            progress=0, eta_relative=0, state=ProgressState(queued=queued), textinfo="Waiting..."
        )
    elapsed = time.perf_counter() - job.started_at
    progress = 0.01 + (job.step / job.total_steps if job.total_steps else 0.0)
    eta = max(elapsed / progress - elapsed, 0.0)
    started = datetime.datetime.now() - datetime.timedelta(seconds=elapsed)
    return ProgressResponse(
        progress=min(progress, 1.0),
        eta_relative=round(eta, 3),
        state=ProgressState(
            job="txt2img",
            job_count=1,
            job_timestamp=started.strftime("%Y%m%d%H%M%S"),
            sampling_step=job.step,
            sampling_steps=job.total_steps,
            queued=queued,
        ),
        textinfo=f"step {job.step}/{job.total_steps}, {queued} waiting",
    )


# ----- routes --------------------------------------------------------------------------------------


_ERRORS = error_responses(401, 422)
_BODY_ERRORS = error_responses(401, 408, 413, 422)
_GEN_ERRORS = error_responses(401, 408, 413, 422, 429, 500, 503, 504)
_UNSUPPORTED = (
    "img2img",
    "extra-single-image",
    "extra-batch-images",
    "png-info",
    "interrogate",
    "interrupt",
    "skip",
)


def create_router() -> APIRouter:
    """The `/sdapi/v1` routes; every one needs the API key when one is set."""
    router = APIRouter(
        prefix=PREFIX, tags=["AUTOMATIC1111"], dependencies=[Depends(require_api_key_or_basic)]
    )

    @router.post("/txt2img", response_model=Txt2ImgResponse, responses=_GEN_ERRORS)
    async def txt2img(body: Txt2ImgRequest, state: StateDep) -> Txt2ImgResponse:
        """A1111 txt2img through the service's one generation path (queue, validation, errors)."""
        state.ensure_ready()
        refiner = _refiner_title(state)
        req, warnings = translate(body, state.model_name, refiner)
        for warning in warnings:
            log.warning("txt2img: %s", warning)
        try:
            done = await state.produce(req, n_iter=body.n_iter)
        except ValidationFailed as exc:
            raise _renamed(exc) from None
        return Txt2ImgResponse(
            images=done.images_b64 if body.send_images else [],
            parameters=body.model_dump(mode="json"),
            info=info_json(body, done, state.model_name, warnings),
        )

    @router.get("/samplers", response_model=list[SamplerItem], responses=_ERRORS)
    def samplers() -> list[SamplerItem]:
        """The samplers txt2img (and /generate's `sampler`) accept."""
        return [SamplerItem(name=s.name, aliases=list(s.aliases), options=s.options) for s in SAMPLERS]

    @router.get("/schedulers", response_model=list[SchedulerItem], responses=_ERRORS)
    def schedulers() -> list[SchedulerItem]:
        """A1111 >= 1.9 schedulers understood in txt2img's `scheduler`."""
        return [
            SchedulerItem(name="automatic", label="Automatic"),
            SchedulerItem(name="karras", label="Karras", default_rho=7.0),
        ]

    @router.get("/sd-models", response_model=list[SDModelItem], responses=_ERRORS)
    def sd_models(state: StateDep) -> list[SDModelItem]:
        """The loaded model (and its refiner); this server does not switch checkpoints."""
        spec = state.engine.spec
        items = [
            SDModelItem(title=state.model_name, model_name=state.model_name, filename=_file(spec, "base"))
        ]
        refiner = _refiner_title(state)
        if refiner:
            items.append(SDModelItem(title=refiner, model_name=refiner, filename=_file(spec, "refiner")))
        return items

    @router.get("/options", response_model=OptionsResponse, responses=_ERRORS)
    def get_options(state: StateDep) -> OptionsResponse:
        """The few options clients read (the checkpoint first)."""
        return OptionsResponse(sd_model_checkpoint=state.model_name)

    @router.post("/options", response_model=dict[str, Any], responses=_BODY_ERRORS)
    def set_options(options: dict[str, Any], state: StateDep) -> dict[str, Any]:
        """Accepts the loaded checkpoint (a no-op); another one is 422; other options are ignored."""
        warnings: list[str] = []
        _check_overrides(options, state.model_name, warnings)
        for warning in warnings:
            log.warning("options: %s", warning.replace("override_settings.", ""))
        return {}

    @router.get("/progress", response_model=ProgressResponse, responses=_ERRORS)
    def progress(
        state: StateDep,
        skip_current_image: Annotated[bool, Query(description="Accepted; no previews are made.")] = False,
    ) -> ProgressResponse:
        """Progress and ETA of the running job (A1111's shape); `state.queued` counts waiting ones."""
        return progress_of(state)

    @router.get("/scripts", response_model=ScriptsList, responses=_ERRORS)
    def scripts() -> ScriptsList:
        """No scripts or extensions here (clients probe this at start)."""
        return ScriptsList()

    async def unsupported(request: Request) -> None:
        op = request.url.path.removeprefix(PREFIX + "/")
        raise Unsupported(f"{op} is not supported by this server (AUTOMATIC1111 API: txt2img only)")

    for op in _UNSUPPORTED:
        router.add_api_route(
            f"/{op}",
            unsupported,
            methods=["POST"],
            response_model=None,
            status_code=404,
            responses=error_responses(401, 404, 408, 413),
            summary=f"{op} (not supported: 404)",
        )
    return router


def _refiner_title(state: ServiceState) -> str | None:
    return f"{state.model_name}-refiner" if state.engine.refiner_loaded else None


def _file(spec: Any, part: str) -> str:
    return str(getattr(spec, part, None) or "")


def _renamed(exc: ValidationFailed) -> ValidationFailed:
    """A validation error of the shared path, named as the A1111 client sent the field."""
    name = A1111_NAME.get(exc.field)
    if name:
        exc.message = exc.message.replace(f"{exc.field}:", f"{name}:", 1)
        exc.args = (exc.message,)
        exc.field = name
    return exc
