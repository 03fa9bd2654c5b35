"""The plain-diffusers baseline: the same scenarios through stock pipelines in fp16, eager, as most self-hosted
SD APIs run them (then with attention and VAE slicing), with Pillow's default PNG + base64 on top."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.images import pil_default_png_b64
from bench.measure import cuda_sync, free_memory, p50, peak_gib_and_reset
from bench.scenarios import Scenario, scenario_sizes

if TYPE_CHECKING:
    from bench.harness import Bench


def run_baseline(bench: Bench, family: str, model_dir: Path) -> None:
    """Load the model with plain diffusers and time every scenario of `family`, then one with slicing."""
    started = time.perf_counter()
    base, refiner = load_plain(model_dir, family)
    load_s = round(time.perf_counter() - started, 2)
    out: dict[str, Any] = {"load_from_disk_s": load_s}
    for s in bench.scenarios(family):
        r = time_plain(base, refiner, s, bench.c.baseline_reps, bench.c.tiny)
        bench.baseline_images[s.name] = r.pop("_image")
        out[s.name] = {"fp16_eager": r}
        bench.results.baseline[family] = out
        bench.save()
    if bench.c.slicing_baseline:
        for pipe in (base, refiner):
            if pipe is not None:
                pipe.enable_attention_slicing()
                pipe.vae.enable_slicing()
        for s in bench.scenarios(family)[:1]:  # slicing only slows down: one scenario shows it
            r = time_plain(base, refiner, s, max(2, bench.c.baseline_reps - 1), bench.c.tiny)
            r.pop("_image")
            out[s.name]["fp16_eager_attention_vae_slicing"] = r
    bench.results.baseline[family] = out
    del base, refiner
    free_memory()


def load_plain(model_dir: Path, family: str) -> tuple[Any, Any]:
    """The baseline: plain diffusers from the local folder, fp16, on the GPU."""
    import torch
    from diffusers import (
        StableDiffusionPipeline,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
    )

    from service.engine import dtype_keyword

    cuda = torch.cuda.is_available()
    kw = {dtype_keyword(): torch.float16 if cuda else torch.float32}
    device = "cuda" if cuda else "cpu"
    if family == "sd15":
        base = StableDiffusionPipeline.from_pretrained(
            str(model_dir / "base"), safety_checker=None, requires_safety_checker=False, **kw
        )
        refiner = None
    else:
        base = StableDiffusionXLPipeline.from_pretrained(str(model_dir / "base"), **kw)
        refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            str(model_dir / "refiner"), text_encoder_2=base.text_encoder_2, vae=base.vae, **kw
        )
    for pipe in (base, refiner):
        if pipe is not None:
            pipe.to(device)
            pipe.set_progress_bar_config(disable=True)
    return base, refiner


def plain_call(base: Any, refiner: Any, s: Scenario, tiny: bool) -> Any:
    """One image of scenario `s` through the stock pipelines (base, then the refiner when `s` asks)."""
    import torch

    steps, size = scenario_sizes(s, tiny)
    common = {"prompt": s.prompt, "guidance_scale": 7.5}
    gen = torch.Generator("cpu").manual_seed(s.seed)
    if s.use_refiner:
        latents = base(
            num_inference_steps=steps,
            width=size,
            height=size,
            denoising_end=s.refiner_split,
            output_type="latent",
            generator=gen,
            **common,
        ).images
        return refiner(
            image=latents,
            num_inference_steps=steps,
            denoising_start=s.refiner_split,
            generator=gen,
            **common,
        ).images[0]
    return base(num_inference_steps=steps, width=size, height=size, generator=gen, **common).images[0]


def time_plain(base: Any, refiner: Any, s: Scenario, reps: int, tiny: bool) -> dict[str, Any]:
    """Pipeline time and pipeline + PNG + base64 of `reps` runs after one warm-up; the last image in `_image`."""
    plain_call(base, refiner, s, tiny)  # warm-up (cuDNN, allocator)
    cuda_sync()
    peak_gib_and_reset()
    pipeline_s, with_encode_s, encode_s = [], [], []
    image = None
    for _ in range(reps):
        t0 = time.perf_counter()
        image = plain_call(base, refiner, s, tiny)
        cuda_sync()
        t1 = time.perf_counter()
        pil_default_png_b64(image)
        t2 = time.perf_counter()
        pipeline_s.append(t1 - t0)
        encode_s.append(t2 - t1)
        with_encode_s.append(t2 - t0)
    return {
        "pipeline_p50_s": p50(pipeline_s),
        "pipeline_plus_png_b64_p50_s": p50(with_encode_s),
        "pil_png_b64_p50_ms": round(p50(encode_s) * 1000, 1),
        "runs_s": [round(x, 4) for x in pipeline_s],
        "peak_vram_gib": peak_gib_and_reset(),
        "_image": np.asarray(image),
    }
