"""The AUTOMATIC1111 API's request and response models (`/sdapi/v1/...`), with the bounds of the service's
own `GenerateRequest` so both schemas show the same limits; `service/a1111.py` translates and routes them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from service.params import MAX_IMAGES
from service.schema import GenerateRequest

PREFIX = "/sdapi/v1"
DEFAULT_HR_DENOISE = 0.7  # A1111's hires-fix default when a client sends none
DEFAULT_REFINER_SWITCH = 0.8

# our field -> the A1111 field a client sent, for error messages
A1111_NAME = {
    "num_inference_steps": "steps",
    "guidance_scale": "cfg_scale",
    "hires_scale": "hr_scale",
    "hires_strength": "denoising_strength",
    "refiner_split": "refiner_switch_at",
    "use_face_restoration": "restore_faces",
    "sampler": "sampler_name",
}


def _bounds(field: str) -> list[Any]:
    """The constraints of a `GenerateRequest` field, so both schemas show the same bounds."""
    return list(GenerateRequest.model_fields[field].metadata)


Steps = Annotated[(int, *_bounds("num_inference_steps"))]
Size = Annotated[(int, *_bounds("width"))]
CfgScale = Annotated[(float, *_bounds("guidance_scale"))]
Seed = Annotated[(int, *_bounds("seed"))]
BatchSize = Annotated[(int, *_bounds("batch_size"))]


class Txt2ImgRequest(BaseModel):
    """Body of `POST /sdapi/v1/txt2img` (A1111 names and defaults). Other A1111 fields are accepted and
    ignored; non-default values of them are logged and listed in `info.warnings`."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    prompt: str = Field(
        "", min_length=1, description="What to draw; unlike A1111, it must contain visible text."
    )
    negative_prompt: str = Field("", description="What to avoid.")
    steps: Steps = Field(50, description="Denoising steps.")
    width: Size = Field(512, description="Pixels, a multiple of 8 within the model's size range.")
    height: Size = Field(512, description="Pixels, a multiple of 8 within the model's size range.")
    cfg_scale: CfgScale = Field(7.0, description="Classifier-free guidance strength.")
    seed: Seed = Field(-1, description="-1 picks a random seed; image i of the request uses seed + i.")
    batch_size: BatchSize = Field(1, description="Images per batch.")
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES, description="Batches, one after another.")
    sampler_name: str | None = Field(None, max_length=64, description="See GET /sdapi/v1/samplers.")
    sampler_index: str = Field("Euler", max_length=64, description="Used when sampler_name is empty.")
    scheduler: str | None = Field(
        None, max_length=64, description='"automatic" (the sampler\'s own) or "karras".'
    )
    enable_hr: bool = Field(False, description="Hires fix: upscale, then an img2img pass.")
    hr_scale: float = Field(2.0, description="Hires upscale factor (1-2 here).")
    hr_resize_x: int = Field(0, ge=0, description="Hires target width; 0: use hr_scale.")
    hr_resize_y: int = Field(0, ge=0, description="Hires target height; 0: use hr_scale.")
    denoising_strength: float | None = Field(None, description="Hires pass strength; 0/null: 0.7.")
    refiner_checkpoint: str | None = Field(None, description="Any refiner title enables the refiner.")
    refiner_switch_at: float | None = Field(None, description="Fraction of steps before the refiner.")
    restore_faces: bool | None = Field(None, description="Face restoration, when a restorer is installed.")
    override_settings: dict[str, Any] | None = Field(
        None, description="Only sd_model_checkpoint (the loaded model) is understood."
    )
    script_name: str | None = Field(None, description="Scripts are not supported: must be empty.")
    alwayson_scripts: dict[str, Any] | None = Field(None, description="Extensions are not supported.")
    send_images: bool = Field(True, description="Return the images.")


class Txt2ImgResponse(BaseModel):
    """Body of a successful `POST /sdapi/v1/txt2img`, as A1111 answers it."""

    images: list[str] = Field(..., description="Base64 PNGs, batch after batch.")
    parameters: dict[str, Any] = Field(..., description="The request as received, defaults filled in.")
    info: str = Field(..., description="JSON text: seed, all_seeds, infotexts, ... (as A1111).")


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float | None = None
    need_inner_model: bool | None = None


class SDModelItem(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    title: str
    model_name: str
    hash: str | None = None
    sha256: str | None = None
    filename: str
    config: str | None = None


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queued: int = Field(0, description="Requests waiting behind the running one (not in A1111).")


class ProgressResponse(BaseModel):
    progress: float = Field(..., ge=0, le=1, description="0 to 1 of the running job.")
    eta_relative: float = Field(..., description="Seconds left, estimated.")
    state: ProgressState
    current_image: str | None = Field(None, description="Never sent: no previews.")
    textinfo: str | None = None


class OptionsResponse(BaseModel):
    """The options A1111 clients read; this server's values are fixed."""

    model_config = ConfigDict(extra="allow")

    sd_model_checkpoint: str
    sd_checkpoint_hash: str | None = None
    sd_vae: str = "Automatic"
    samples_format: str = "png"
    CLIP_stop_at_last_layers: int = 1
    show_progress_every_n_steps: int = -1


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)
