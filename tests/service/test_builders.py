"""Generated random-weight models: real tokenizer, real structure, saved and reloaded like hub models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from service.builders import GENERATED_MODELS, build_model, ensure_model, model_spec, save_model
from service.tokenizer import write_clip_tokenizer

REPO = Path(__file__).resolve().parents[2]
TINY = ["tiny-sd15", "tiny-sdxl"]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def generate(pipe, *, seed: int = 0, width: int = 64, height: int = 64, **kw) -> np.ndarray:
    """One 2-step image as a uint8 array."""
    generator = torch.Generator().manual_seed(seed)
    out = pipe(
        prompt="a red fox in the snow",
        num_inference_steps=2,
        width=width,
        height=height,
        generator=generator,
        **kw,
    )
    return np.asarray(out.images[0])


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh cache with both tiny models, built once per session through `ensure_model`."""
    cache = tmp_path_factory.mktemp("models")
    for name in TINY:
        ensure_model(name, cache)
    return cache


@pytest.fixture(scope="session")
def loaded(tiny_cache: Path) -> dict[str, tuple]:
    """name -> (base, refiner or None), loaded back with `from_pretrained` like real hub models."""
    sd15 = StableDiffusionPipeline.from_pretrained(tiny_cache / "tiny-sd15" / "base")
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_cache / "tiny-sdxl" / "base")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_cache / "tiny-sdxl" / "refiner")
    for pipe in (sd15, sdxl, refiner):
        pipe.set_progress_bar_config(disable=True)
    return {"tiny-sd15": (sd15, None), "tiny-sdxl": (sdxl, refiner)}


# --- tokenizer ---------------------------------------------------------------------------------------


def test_tokenizer_ids_equal_open_clip(tmp_path: Path) -> None:
    import open_clip

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.model_max_length) == (49406, 49407, 77)
    prompts = [
        "a photo of an astronaut riding a horse on mars",
        "Café naïve résumé — 東京の夜景, 🚀 émoji",
        "HELLO, world!! it's 3.14 o'clock...",
        "a castle on a hill at sunset, " * 30,  # ~240 tokens: truncated to 77
    ]
    for prompt in prompts:
        ours = tokenizer(prompt, padding="max_length", max_length=77, truncation=True)
        theirs = open_clip.tokenize([prompt])[0].tolist()
        n = sum(ours.attention_mask)
        assert ours.input_ids[:n] == theirs[:n], prompt
        assert theirs[n:] == [0] * (77 - n)  # open_clip pads with 0, the SD tokenizer with <|endoftext|>
        assert ours.input_ids[n:] == [49407] * (77 - n)
    assert n == 77 and ours.input_ids[-1] == 49407  # the long prompt keeps its end token


# --- specs -------------------------------------------------------------------------------------------


def test_unknown_name_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    assert set(GENERATED_MODELS) == {"tiny-sd15", "tiny-sdxl", "synthetic-sd15", "synthetic-sdxl"}
    for call in (lambda: build_model("sdxl-huge"), lambda: ensure_model("sdxl-huge", tmp_path)):
        with pytest.raises(ValueError, match=r"'sdxl-huge'.*tiny-sd15.*tiny-sdxl.*synthetic-sdxl"):
            call()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("name", "part", "billions"),
    [
        ("synthetic-sdxl", "unet", 2.567),
        ("synthetic-sdxl", "refiner_unet", 2.260),
        ("synthetic-sd15", "unet", 0.860),
    ],
)
def test_synthetic_unets_have_published_sizes(name: str, part: str, billions: float) -> None:
    """Built on the meta device: shapes only, no full-size weights on this CPU."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**getattr(model_spec(name), part))
    assert round(n_params(unet) / 1e9, 3) == billions


def test_synthetic_encoders_and_vae_have_published_sizes() -> None:
    spec = model_spec("synthetic-sdxl")
    with torch.device("meta"):
        clip_l = CLIPTextModel(CLIPTextConfig(**spec.text_encoder))
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2))
        vae = AutoencoderKL(**spec.vae)
    assert round(n_params(clip_l) / 1e6) == 123  # CLIP ViT-L/14 text tower
    assert round(n_params(big_g) / 1e6) == 695  # OpenCLIP ViT-bigG/14 text tower + projection
    assert round(n_params(vae) / 1e6, 1) == 83.7
    assert spec.unet["projection_class_embeddings_input_dim"] == 2816
    assert spec.refiner_unet["projection_class_embeddings_input_dim"] == 2560


# --- tiny models: saved, reloaded, generating ---------------------------------------------------------


def test_saved_folders_are_complete_pipelines(tiny_cache: Path) -> None:
    for name, backend in (("tiny-sd15", "sd15"), ("tiny-sdxl", "sdxl")):
        folder = tiny_cache / name
        info = json.loads((folder / "MODEL.json").read_text())
        assert {k: info[k] for k in ("name", "backend", "seed", "generated")} == {
            "name": name,
            "backend": backend,
            "seed": 0,
            "generated": True,
        }
        assert info["description"] == GENERATED_MODELS[name]
        assert (folder / "base" / "model_index.json").is_file()
        assert list((folder / "base" / "unet").glob("*.safetensors"))
        assert (folder / "refiner" / "model_index.json").is_file() == (backend == "sdxl")
    assert not [p for p in tiny_cache.iterdir() if ".partial-" in p.name]  # no half-written folders left


def test_tiny_sdxl_has_the_real_structure(loaded: dict[str, tuple]) -> None:
    base, refiner = loaded["tiny-sdxl"]
    assert type(base.text_encoder) is CLIPTextModel
    assert type(base.text_encoder_2) is CLIPTextModelWithProjection
    for config in (base.text_encoder.config, base.text_encoder_2.config):
        assert (config.vocab_size, config.eos_token_id, config.max_position_embeddings) == (49408, 49407, 77)
        assert config.num_hidden_layers >= 2  # SDXL reads hidden_states[-2]
    unet = base.unet.config
    assert unet.addition_embed_type == "text_time"
    assert (
        unet.cross_attention_dim
        == base.text_encoder.config.hidden_size + base.text_encoder_2.config.hidden_size
    )
    pooled = base.text_encoder_2.config.projection_dim
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + pooled
    ref = refiner.unet.config
    assert ref.projection_class_embeddings_input_dim == 5 * ref.addition_time_embed_dim + pooled
    assert len(ref.block_out_channels) == 4 and len(unet.block_out_channels) == 3
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert refiner.config.requires_aesthetics_score is True
    assert base.vae_scale_factor == 8 and base.vae.config.scaling_factor == 0.13025
    scheduler = base.scheduler.config
    assert type(base.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end) == (
        "scaled_linear",
        0.00085,
        0.012,
    )
    assert (scheduler.steps_offset, scheduler.timestep_spacing) == (1, "leading")
    total = sum(
        n_params(m) for m in (base.text_encoder, base.text_encoder_2, base.unet, base.vae, refiner.unet)
    )
    assert total < 15e6


def test_tiny_sd15_has_the_real_structure(loaded: dict[str, tuple]) -> None:
    base, _ = loaded["tiny-sd15"]
    assert base.safety_checker is None and base.feature_extractor is None
    assert base.vae_scale_factor == 8 and base.vae.config.scaling_factor == 0.18215
    assert base.unet.config.cross_attention_dim == base.text_encoder.config.hidden_size
    assert base.text_encoder.config.eos_token_id == 49407
    assert n_params(base.unet) + n_params(base.text_encoder) + n_params(base.vae) < 10e6


@pytest.mark.parametrize("name", TINY)
def test_generates_requested_sizes_deterministically(loaded: dict[str, tuple], name: str) -> None:
    base, _ = loaded[name]
    square = generate(base, seed=1)
    assert square.shape == (64, 64, 3)
    assert generate(base, seed=2, width=128, height=96).shape == (96, 128, 3)
    assert np.array_equal(generate(base, seed=1), square)
    assert not np.array_equal(generate(base, seed=3), square)
    assert square.std() > 5  # a real image, not one flat colour


@pytest.mark.parametrize("name", TINY)
def test_reloaded_pipeline_equals_the_built_one(loaded: dict[str, tuple], name: str) -> None:
    built, _ = build_model(name, seed=0)
    built.set_progress_bar_config(disable=True)
    reloaded, _ = loaded[name]
    assert np.array_equal(generate(built, seed=7), generate(reloaded, seed=7))
    other, _ = build_model(name, seed=1)  # another weight seed, other weights
    assert not torch.equal(other.unet.conv_in.weight, built.unet.conv_in.weight)


def test_base_to_refiner_latent_handoff(loaded: dict[str, tuple]) -> None:
    base, refiner = loaded["tiny-sdxl"]
    generator = torch.Generator().manual_seed(0)
    kw = {"prompt": "a lighthouse", "num_inference_steps": 4, "generator": generator}
    latents = base(width=128, height=96, output_type="latent", denoising_end=0.8, **kw).images
    assert latents.shape == (1, 4, 12, 16)
    image = refiner(image=latents, denoising_start=0.8, **kw).images[0]
    assert image.size == (128, 96)


# --- the cache ------------------------------------------------------------------------------------------


def test_ensure_model_builds_once(tiny_cache: Path) -> None:
    marker = tiny_cache / "tiny-sd15" / "MODEL.json"
    before = marker.stat().st_mtime_ns
    assert ensure_model("tiny-sd15", tiny_cache) == tiny_cache / "tiny-sd15"
    assert marker.stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="already exists"):
        save_model("tiny-sd15", tiny_cache / "tiny-sd15")


def test_ensure_model_rebuilds_a_stale_copy(tmp_path: Path) -> None:
    path = ensure_model("tiny-sd15", tmp_path)
    assert json.loads((path / "MODEL.json").read_text())["seed"] == 0
    assert ensure_model("tiny-sd15", tmp_path, seed=1) == path  # another recipe: rebuilt in place
    assert json.loads((path / "MODEL.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-sd15.lock", "tiny-sd15"]


def test_ensure_model_is_safe_when_two_processes_race(tmp_path: Path) -> None:
    script = (
        "import os, sys; from service.builders import ensure_model; "
        "p = ensure_model('tiny-sd15', sys.argv[1]); "
        "print(os.stat(p).st_ino, os.stat(p / 'MODEL.json').st_mtime_ns)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1]  # one folder, written once: the loser reused it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tiny-sd15.lock", "tiny-sd15"]
