"""Every setting of the image service, in one place (env vars `SDXL_<FIELD>` or a `.env` file)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Toggle = Literal["auto", "on", "off"]
"""A speed switch: auto decides by device; on / off force it."""

_TOGGLE_WORDS = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}


def default_cache_dir() -> Path:
    """Where generated (tiny / synthetic) models are written: `$SDXL_DEPLOY_CACHE` or ~/.cache/sdxl-deploy."""
    import os

    return Path(os.environ.get("SDXL_DEPLOY_CACHE", Path.home() / ".cache" / "sdxl-deploy" / "models"))


class ServiceSettings(BaseSettings):
    """Settings of one running image service."""

    model_config = SettingsConfigDict(env_prefix="SDXL_", env_file=".env", extra="ignore")

    # What to serve
    model: str = Field("tiny-sdxl", description="Registry name (sd15, sdxl, tiny-*, synthetic-*) or a path.")
    refiner: str | None = Field(
        None, description="Refiner hub id or folder; overrides the registry's choice."
    )
    load_refiner: bool = Field(True, description="Load the SDXL refiner when the model has one.")
    cache_dir: Path = Field(default_factory=default_cache_dir, description="Folder for generated models.")

    # Where to listen (allow_public_bind first: the host's validator reads it)
    allow_public_bind: bool = Field(False, description="Allow binding a non-loopback address on purpose.")
    host: str = Field("127.0.0.1", description="Bind address. Anything but loopback needs allow_public_bind.")
    port: int = Field(7860, ge=0, le=65535)
    stage_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="When `port` is held by another process at start, listen here instead (staged beside the "
        "old service) and take `port` over on SIGUSR1 (the deploy's cut-over). Unset: `port` only.",
    )
    api_key: SecretStr | None = Field(
        None, description="If set, requests need `Authorization: Bearer <key>`."
    )

    # Hardware and numerics
    device: str = Field("auto", description="auto, cuda, cuda:N or cpu.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto = bfloat16 on CUDA (fp16 where bf16 is unsupported), float32 on CPU."
    )
    attention_slicing: bool = Field(False, description="Lower peak VRAM, slower.")
    vae_slicing: bool = Field(False, description="Decode batch images one at a time.")
    vae_tiling: bool = Field(False, description="Decode large images in tiles (very large sizes).")
    cpu_offload: bool = Field(False, description="Model CPU offload: fits small GPUs, much slower.")
    face_restorer: str | None = Field(None, description="'package.module:factory' of a face restorer.")

    # ----- Speed (service/accel.py, docs/BENCHMARKS.md) ------------------------------------------------
    # Each technique is a switch: "auto" (the default) turns it on where it helps (CUDA) and off elsewhere;
    # "on" / "off" (or true / false) force it. None of them changes what the model computes beyond
    # floating-point rounding; the quality-changing ones (cfg_cutoff, tiny_vae, below) are opt-in only.
    sdpa: Toggle = Field("auto", description="PyTorch scaled_dot_product_attention (auto: on everywhere).")
    channels_last: Toggle = Field(
        "auto", description="UNet and VAE in channels_last memory format (auto: CUDA)."
    )
    fuse_qkv: Toggle = Field(
        "auto", description="Fuse attention q/k/v projections into one matmul (auto: CUDA)."
    )
    cudnn_benchmark: Toggle = Field(
        "auto", description="Let cuDNN pick the fastest convolutions (auto: CUDA)."
    )
    compile: Toggle = Field("auto", description="torch.compile the UNets and VAE decoder (auto: CUDA).")
    compile_vae: bool = Field(True, description="With compile on, also compile the VAE decoder.")
    compile_text_encoders: Toggle = Field(
        "auto",
        description="With compile on, also compile the text encoders (auto: SD1.5, where it measured ~7 ms of a "
        "0.17 s request; off for SDXL, whose prompt encoding is ~2 % of a request and whose start is the longer).",
    )
    save_compiled: Toggle = Field(
        "auto",
        description="With compile on, compiled modules are functions built by the compile step (serve "
        "--compile-only) and kept whole on disk (traced graph, guards, kernels: torch's ahead-of-time compile, "
        "torch >= 2.10); the service loads them and never compiles once ready (auto: on with compile).",
    )
    compile_jobs: int = Field(
        1,
        ge=1,
        le=8,
        description="Processes the compile step (serve --compile-only) builds in side by side: each loads the "
        "model (its GPU memory each) and takes the functions no other has claimed (base UNet, refiner UNet, VAE "
        "decoder; static and dynamic). 1 on a card that holds one copy of the model.",
    )
    prompt_cache_size: int = Field(
        64,
        ge=0,
        le=4096,
        description="Texts whose embeddings are kept (least recently used dropped first): a prompt or negative "
        "prompt seen lately is not encoded again. 0 = encode every text every time.",
    )
    cuda_graphs: Toggle = Field(
        "auto",
        description="Compile with CUDA graphs (mode reduce-overhead) (auto: on when compiling on CUDA).",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Persistent torch.compile cache (TORCHINDUCTOR_CACHE_DIR); default <cache_dir>/torch-compile.",
    )
    warmup_on_load: Toggle = Field(
        "auto",
        description="Run a warm-up generation before /ready, so compilation happens at start (auto: when compiling).",
    )
    ready_sizes: str = Field(
        "",
        description="Sizes that get a static compiled function (the fastest) besides the model's default size, "
        "as WIDTHxHEIGHT separated by commas (e.g. 512x512,832x1216). Every other size runs through the "
        "dynamic-shape function the compile step builds (service/saved_compile.py).",
    )
    coalesce: Toggle = Field(
        "auto",
        description="Run compatible waiting requests as one batched pipeline call (auto: SD1.5 on CUDA, where "
        "it measured 1.26x / 1.44x images/s at 2 / 4 images; SDXL at 1024 px gained 1.07x, not worth the latency).",
    )
    coalesce_max_images: int = Field(
        4,
        ge=1,
        le=8,
        description="Most images in one coalesced call; calls use powers of two up to it (each size compiles once).",
    )
    # ----- Opt-in speed that changes the images (off by default; measure the CLIP delta first: README) ------
    cfg_cutoff: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Fraction of each denoising pass's steps that use classifier-free guidance; the steps "
        "after it run the conditional half only (half the UNet work each). 1.0 = guidance on every step (off).",
    )
    tiny_vae: str = Field(
        "off",
        description="Decode with a tiny autoencoder (TAESD) instead of the full VAE: off; on = the model "
        "family's own (madebyollin/taesdxl, madebyollin/taesd; generated models carry a random one); or a "
        "hub id / folder of an AutoencoderTiny.",
    )

    png_encoder: Literal["fast", "pillow"] = Field(
        "fast", description="fast: multi-threaded PNG writer (same pixels); pillow: Pillow's encoder."
    )
    encode_threads: int = Field(0, ge=0, le=64, description="Threads of the fast PNG writer; 0 = auto.")

    # Load and limits
    max_queue: int = Field(8, ge=1, le=1024, description="Requests waiting beyond the running one; then 429.")
    request_timeout_s: float = Field(
        300.0, gt=0, description="Per-request limit, queueing included; then 504."
    )
    max_body_bytes: int = Field(65_536, ge=1024, description="Largest accepted request body; then 413.")
    max_prompt_chars: int = Field(2000, ge=1, le=100_000, description="Longest accepted prompt.")
    retry_after_s: int = Field(2, ge=1, description="Retry-After header value sent with 429 and 503.")

    # Limits and timeouts: slow or oversized clients are cut off before they reach the app.
    header_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Request line + headers must arrive within this; then 408 and close."
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=600, description="The whole request body must arrive within this; then 408 and close."
    )
    keep_alive_s: float = Field(
        5.0, gt=0, le=300, description="An idle keep-alive connection is closed after."
    )
    max_header_bytes: int = Field(
        16_384, ge=1024, le=1_048_576, description="Largest request line + headers; then 431."
    )
    max_connections: int | None = Field(
        None, ge=1, description="Open connections before uvicorn answers 503; default max_queue * 4 + 64."
    )

    # Test-only fault injection, e.g. "oom:1" = the next 1 generation raises CUDA out-of-memory.
    inject_fault: str | None = Field(None, description="Rehearsal only: 'oom:N', 'error:N' or 'crash:N'.")

    log_level: str = Field("info")

    @field_validator(
        "sdpa",
        "channels_last",
        "fuse_qkv",
        "cudnn_benchmark",
        "compile",
        "compile_text_encoders",
        "save_compiled",
        "cuda_graphs",
        "warmup_on_load",
        "coalesce",
        mode="before",
    )
    @classmethod
    def _toggle_words(cls, value: object) -> object:
        """Accept true/false (and 1/0, yes/no) for the speed switches beside auto/on/off."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            return _TOGGLE_WORDS.get(value.strip().lower(), value.strip().lower())
        return value

    @field_validator("tiny_vae", mode="before")
    @classmethod
    def _tiny_vae_words(cls, value: object) -> object:
        """true/false (1/0, yes/no) mean on/off here too; anything else is a hub id or a folder."""
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            word = value.strip()
            if word.lower() in ("", "on", "off"):
                return word.lower() or "off"
            return _TOGGLE_WORDS.get(word.lower(), word)
        return value

    @field_validator("ready_sizes", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> object:
        """WIDTHxHEIGHT, each a multiple of 8 from 64 to 2048 (what requests accept); a list is accepted too."""
        if isinstance(value, list | tuple):
            value = ",".join(map(str, value))
        if not isinstance(value, str):
            return value
        sizes = [word.strip().lower() for word in value.replace(" ", ",").split(",") if word.strip()]
        for size in sizes:
            width, _, height = size.partition("x")
            if not (width.isdigit() and height.isdigit()) or not all(
                64 <= int(n) <= 2048 and int(n) % 8 == 0 for n in (width, height)
            ):
                raise ValueError(
                    f"ready_sizes: {size!r} is not WIDTHxHEIGHT with each a multiple of 8 from 64 to 2048"
                )
        return ",".join(dict.fromkeys(sizes))

    @property
    def ready_size_list(self) -> list[tuple[int, int]]:
        """`ready_sizes` as (width, height) pairs, in order, each once."""
        pairs = (size.split("x") for size in self.ready_sizes.split(",") if size)
        return [(int(w), int(h)) for w, h in pairs]

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model must name a registry model or a path, got an empty string")
        return value.strip()

    @field_validator("host")
    @classmethod
    def _refuse_unsafe_bind(cls, value: str, info: ValidationInfo) -> str:
        if not info.data.get("allow_public_bind") and not _is_loopback(value):
            raise ValueError(
                f"host={value!r} is not a loopback address; set SDXL_ALLOW_PUBLIC_BIND=true to expose "
                "the service on purpose (and set SDXL_API_KEY)"
            )
        return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
