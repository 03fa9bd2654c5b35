"""Random-weight Stable Diffusion pipelines with the real component structure, saved like hub models.

Nothing can be downloaded here, so the project builds its own models: "tiny-*" (a few M parameters,
CPU-fast, for tests and demos) and "synthetic-*" (the published full-size configs, for GPU timing). They are
written with `save_pretrained` and the service loads them through the same `from_pretrained` path as real
hub models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from filelock import FileLock
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from service.tokenizer import (
    BOS_TOKEN_ID,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    EOS_TOKEN_ID,
    write_clip_tokenizer,
)

Backend = Literal["sd15", "sdxl"]

# The SD1.5 / SDXL training schedule, with Euler sampling.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _clip_text(hidden: int, layers: int, heads: int, ffn: int, act: str, projection: int) -> dict[str, Any]:
    """CLIPTextConfig arguments for a text encoder that reads our CLIP tokenizer's ids."""
    return {
        "vocab_size": CLIP_VOCAB_SIZE,
        "max_position_embeddings": CLIP_MAX_LENGTH,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "hidden_act": act,
        "projection_dim": projection,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
        "pad_token_id": EOS_TOKEN_ID,
    }


def _vae(
    channels: tuple[int, ...], groups: int, layers: int, sample_size: int, scaling: float
) -> dict[str, Any]:
    """AutoencoderKL arguments: one level per channel count (4 levels = scale factor 8)."""
    return {
        "block_out_channels": channels,
        "down_block_types": ("DownEncoderBlock2D",) * len(channels),
        "up_block_types": ("UpDecoderBlock2D",) * len(channels),
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": layers,
        "norm_num_groups": groups,
        "sample_size": sample_size,
        "scaling_factor": scaling,
    }


def _taesd(channels: int, blocks: int) -> dict[str, Any]:
    """AutoencoderTiny (TAESD) arguments: 4 levels (scale factor 8) of `channels` wide blocks.

    TAESD and TAESDXL (madebyollin/taesd, madebyollin/taesdxl) are 64 channels with (1, 3, 3, 3) encoder and
    (3, 3, 3, 1) decoder blocks; the tiny test version uses one block per level.
    """
    return {
        "encoder_block_out_channels": (channels,) * 4,
        "decoder_block_out_channels": (channels,) * 4,
        "num_encoder_blocks": (1, blocks, blocks, blocks),
        "num_decoder_blocks": (blocks, blocks, blocks, 1),
        "latent_channels": 4,
    }


def _sd15_unet(
    channels: tuple[int, ...], heads: int, cross_dim: int, groups: int, sample_size: int, layers: int = 2
) -> dict:
    """SD1.5 UNet arguments: three cross-attention levels, then a plain one; `layers` blocks per level."""
    return {
        "block_out_channels": channels,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "attention_head_dim": heads,
        "cross_attention_dim": cross_dim,
        "layers_per_block": layers,
        "norm_num_groups": groups,
        "sample_size": sample_size,
    }


def _sdxl_unet(
    channels: tuple[int, ...],
    heads: tuple[int, ...],
    transformer_layers: tuple[int, ...] | int,
    cross_dim: int,
    pooled_dim: int,
    time_dim: int,
    groups: int,
    sample_size: int,
    *,
    refiner: bool = False,
) -> dict[str, Any]:
    """SDXL base (3 levels) or refiner (4 levels) UNet arguments with the `text_time` added embedding.

    The added embedding reads the pooled text embedding plus `time_dim` features for each micro-condition:
    6 for the base (original size, crop, target size) and 5 for the refiner (size, crop, aesthetic score).
    """
    if refiner:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
        up = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    else:
        down = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
        up = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    return {
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "attention_head_dim": heads,
        "transformer_layers_per_block": transformer_layers,
        "cross_attention_dim": cross_dim,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": time_dim * (5 if refiner else 6) + pooled_dim,
        "layers_per_block": 2,
        "norm_num_groups": groups,
        "sample_size": sample_size,
    }


@dataclass(frozen=True)
class ModelSpec:
    """Component configs of one generated model (dicts of constructor arguments)."""

    backend: Backend
    description: str
    text_encoder: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    tiny_vae: dict[str, Any]  # the opt-in tiny autoencoder (SDXL_TINY_VAE=on), saved beside the model
    text_encoder_2: dict[str, Any] | None = None  # SDXL: the second encoder, with projection
    refiner_unet: dict[str, Any] | None = None  # SDXL: the refiner's own UNet


# Published configs (see docs of stable-diffusion-v1-5 and stable-diffusion-xl-{base,refiner}-1.0).
_CLIP_L = _clip_text(768, 12, 12, 3072, "quick_gelu", 768)
_CLIP_BIG_G = _clip_text(1280, 32, 20, 5120, "gelu", 1280)
# Tiny versions: same levels and kinds of blocks, small widths; tiny-sd15 has one block per level (its CPU compiles,
# which the tests run, take ~25 % less CPU than with two). Two encoder layers since SDXL reads hidden_states[-2].
_TINY_CLIP_L = _clip_text(32, 2, 4, 64, "quick_gelu", 32)
_TINY_CLIP_G = _clip_text(64, 2, 4, 128, "gelu", 32)
_TINY_VAE = {"channels": (16, 32, 32, 32), "groups": 8, "layers": 1, "sample_size": 128}
_TAESD = _taesd(64, 3)
_TINY_TAESD = _taesd(8, 1)
# Pooled text width (second encoder's projection), time-feature width, group-norm groups, latent size.
_SDXL_EXTRA = {"pooled_dim": 1280, "time_dim": 256, "groups": 32, "sample_size": 128}
_TINY_SDXL_EXTRA = {"pooled_dim": 32, "time_dim": 8, "groups": 8, "sample_size": 16}

SPECS: dict[str, ModelSpec] = {
    "tiny-sd15": ModelSpec(
        backend="sd15",
        description="SD1.5-shaped pipeline with random weights (~3.6 M params, one block per level), CPU-fast, for tests and demos",
        text_encoder=_TINY_CLIP_L,
        unet=_sd15_unet((32, 32, 64, 64), 2, cross_dim=32, groups=8, sample_size=16, layers=1),
        vae=_vae(**_TINY_VAE, scaling=0.18215),
        tiny_vae=_TINY_TAESD,
    ),
    "tiny-sdxl": ModelSpec(
        backend="sdxl",
        description="SDXL-shaped base + refiner with random weights (~11.5 M params), CPU-fast, for tests and demos",
        text_encoder=_TINY_CLIP_L,
        text_encoder_2=_TINY_CLIP_G,
        unet=_sdxl_unet((32, 64, 64), (2, 4, 4), (1, 1, 2), cross_dim=32 + 64, **_TINY_SDXL_EXTRA),
        refiner_unet=_sdxl_unet(
            (32, 64, 64, 64), (2, 4, 4, 4), 1, cross_dim=64, refiner=True, **_TINY_SDXL_EXTRA
        ),
        vae=_vae(**_TINY_VAE, scaling=0.13025),
        tiny_vae=_TINY_TAESD,
    ),
    "synthetic-sd15": ModelSpec(
        backend="sd15",
        description="full-size SD1.5 architecture (UNet 0.860 B params) with random weights, for GPU timing",
        text_encoder=_CLIP_L,
        unet=_sd15_unet((320, 640, 1280, 1280), 8, cross_dim=768, groups=32, sample_size=64),
        vae=_vae((128, 256, 512, 512), groups=32, layers=2, sample_size=512, scaling=0.18215),
        tiny_vae=_TAESD,
    ),
    "synthetic-sdxl": ModelSpec(
        backend="sdxl",
        description="full-size SDXL base (UNet 2.567 B) + refiner (2.260 B) with random weights, for GPU timing",
        text_encoder=_CLIP_L,
        text_encoder_2=_CLIP_BIG_G,
        unet=_sdxl_unet((320, 640, 1280), (5, 10, 20), (1, 2, 10), cross_dim=768 + 1280, **_SDXL_EXTRA),
        refiner_unet=_sdxl_unet(
            (384, 768, 1536, 1536), (6, 12, 24, 24), 4, cross_dim=1280, refiner=True, **_SDXL_EXTRA
        ),
        vae=_vae((128, 256, 512, 512), groups=32, layers=2, sample_size=1024, scaling=0.13025),
        tiny_vae=_TAESD,
    ),
}

GENERATED_MODELS: dict[str, str] = {name: spec.description for name, spec in SPECS.items()}


def model_spec(name: str) -> ModelSpec:
    """The spec of a generated model; ValueError naming the valid names for anything else."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown generated model {name!r}; valid names: {', '.join(SPECS)}") from None


def _clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as tmp:
        return CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp)))


def build_model(
    name: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[DiffusionPipeline, DiffusionPipeline | None]:
    """Build (base pipeline, refiner pipeline or None) with random weights; the same seed gives the same weights.

    Modules are created directly on `device` (fast init of full-size models on a GPU), then cast to `dtype`.
    SDXL's refiner shares the VAE and the second text encoder with the base, as the diffusers docs load it.
    """
    spec = model_spec(name)
    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        text_encoder_2 = (
            CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
            if spec.text_encoder_2
            else None
        )
        unet = UNet2DConditionModel(**spec.unet)
        refiner_unet = UNet2DConditionModel(**spec.refiner_unet) if spec.refiner_unet else None
        vae = AutoencoderKL(**spec.vae)
    for module in (text_encoder, text_encoder_2, unet, refiner_unet, vae):
        if module is not None and module.dtype != dtype:
            module.to(dtype=dtype)

    if spec.backend == "sd15":
        base = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=_clip_tokenizer(),
            unet=unet,
            scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return base, None

    tokenizer_2 = _clip_tokenizer()
    base = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=text_encoder_2,
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=refiner_unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_CONFIG),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    return base, refiner


def build_tiny_vae(
    name: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> AutoencoderTiny:
    """The model's tiny autoencoder with random weights (what `SDXL_TINY_VAE=on` loads for it)."""
    torch.manual_seed(seed + 1)
    with torch.device(device):
        vae = AutoencoderTiny(**model_spec(name).tiny_vae)
    return vae.to(dtype=dtype)


def model_fingerprint(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
    """A short hash of everything that decides a generated model's files, so a cache notices stale copies."""
    recipe = {
        "spec": asdict(model_spec(name)),
        "scheduler": SCHEDULER_CONFIG,
        "seed": seed,
        "dtype": str(dtype),
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def read_model_info(path: Path) -> dict[str, Any] | None:
    """The MODEL.json of a generated model folder, or None when there is none."""
    marker = Path(path) / "MODEL.json"
    return json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None


def save_model(
    name: str,
    out_dir: Path,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Build a generated model; write `base/`, `refiner/` (SDXL), `tiny_vae/` and `MODEL.json` under `out_dir`.

    Written into a temporary sibling folder and renamed into place, so `out_dir` either holds a complete
    model or does not exist. An existing `out_dir` is replaced only with `overwrite=True`.
    """
    spec = model_spec(name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"out_dir {str(out_dir)!r} already exists; remove it to rebuild model {name!r}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    base, refiner = build_model(name, seed=seed, device=device, dtype=dtype)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        base.save_pretrained(tmp / "base", safe_serialization=True)
        if refiner is not None:
            refiner.save_pretrained(tmp / "refiner", safe_serialization=True)
        tiny_vae = build_tiny_vae(name, seed=seed, device=device, dtype=dtype)
        tiny_vae.save_pretrained(tmp / "tiny_vae", safe_serialization=True)
        info = {
            "name": name,
            "backend": spec.backend,
            "seed": seed,
            "generated": True,
            "description": spec.description,
            "dtype": str(dtype).removeprefix("torch."),
            "fingerprint": model_fingerprint(name, seed=seed, dtype=dtype),
        }
        (tmp / "MODEL.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():  # overwrite: move the old copy aside first, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / out_dir.name)
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_model(
    name: str,
    cache_dir: Path,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Return `cache_dir/name`, building it with `save_model` only if it is missing or stale.

    Stale means built from another recipe (spec, seed, dtype: see `model_fingerprint`), e.g. by an older
    version of this module. A file lock makes concurrent callers (several processes) build it once; the
    others wait and reuse it. Synthetic models want `device="cuda", dtype=torch.float16`.
    """
    fingerprint = model_fingerprint(name, seed=seed, dtype=dtype)
    cache_dir = Path(cache_dir)
    path = cache_dir / name

    def is_current() -> bool:
        info = read_model_info(path)
        return info is not None and info.get("fingerprint") == fingerprint

    if is_current():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f".{name}.lock")):
        if is_current():  # another process built it while we waited
            return path
        if path.exists() and read_model_info(path) is None:
            raise FileExistsError(f"{str(path)!r} exists but holds no MODEL.json: not a generated model")
        for leftover in cache_dir.glob(f".{name}.partial-*"):  # from a build that crashed
            shutil.rmtree(leftover, ignore_errors=True)
        return save_model(name, path, seed=seed, device=device, dtype=dtype, overwrite=True)
