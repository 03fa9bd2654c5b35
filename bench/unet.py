"""Kernel-level probe: one SDXL (or SD1.5) UNet call with CFG under each speed variant, on one GPU.

`sdxl-deploy bench-unet --out DIR` times the denoiser alone, the part that is 90 % of a request, so that
the choice of a default (attention backend, Inductor options, batch size of coalesced requests) rests on a
measurement rather than a guess. Each variant is data (`VARIANTS`): how the UNet is run and how many images
one call carries. It prints a table last (ms per call, ms per image, achieved TFLOP/s, images/s relative to
batch 1 of the same variant) and writes JSON after every variant, so a run cut short keeps what it had.

Random weights (the published architecture built by `service.builders`): timings only, never quality.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.measure import cuda_sync, environment

log = logging.getLogger("bench-unet")


@dataclass(frozen=True)
class Variant:
    """How one UNet call is run: eager or compiled, which attention kernel, Inductor options, batch."""

    name: str
    compiled: bool
    images: int = 1  # images per call; CFG doubles the UNet batch
    attention: str = "default"  # "default" (PyTorch's own choice) or "cudnn"
    coordinate_descent: bool = False  # Inductor's coordinate-descent tuning of its Triton kernels
    fp8: bool = False  # torchao float8 linears (dynamic per-row activation and weight scales): changes output
    regional: bool = (
        False  # diffusers' compile_repeated_blocks: each transformer block compiled, not the UNet
    )


VARIANTS: tuple[Variant, ...] = (
    Variant("eager", compiled=False, images=1),
    Variant("eager", compiled=False, images=2),
    Variant("eager", compiled=False, images=4),
    Variant("eager+cudnn-attention", compiled=False, images=1, attention="cudnn"),
    Variant("compiled (service default)", compiled=True, images=1),
    Variant("compiled (service default)", compiled=True, images=2),
    Variant("compiled (service default)", compiled=True, images=4),
    Variant("compiled+cudnn-attention", compiled=True, images=1, attention="cudnn"),
    Variant("compiled+coordinate-descent", compiled=True, images=1, coordinate_descent=True),
    Variant("compiled+fp8 linears (torchao)", compiled=True, images=1, fp8=True),
    Variant("compiled, regional (repeated blocks)", compiled=True, images=1, regional=True),
)
NEW_SIZE = {1024: 512, 512: 768, 128: 64}  # the size each compiled variant compiles next (compile time only)


@contextmanager
def attention_backend(kind: str) -> Iterator[None]:
    """Restrict scaled_dot_product_attention to cuDNN's kernel ("cudnn"), or leave PyTorch's choice."""
    if kind == "default":
        yield
        return
    flags = (
        torch.backends.cuda.flash_sdp_enabled(),
        torch.backends.cuda.mem_efficient_sdp_enabled(),
        torch.backends.cuda.cudnn_sdp_enabled(),
    )
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(flags[0])
        torch.backends.cuda.enable_mem_efficient_sdp(flags[1])
        torch.backends.cuda.enable_cudnn_sdp(flags[2])


def unet_inputs(unet: Any, images: int, size: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """The tensors a pipeline hands the UNet for `images` images with CFG (batch 2 * images)."""
    batch = 2 * images
    latent = size // 8
    config = unet.config
    torch.manual_seed(0)  # the same inputs every time: outputs of two variants can be compared
    inputs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype),
        "encoder_hidden_states": torch.randn(
            batch, 77, config.cross_attention_dim, device=device, dtype=dtype
        ),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype),
        }
    return inputs


def unet_flops(unet: Any, inputs: dict[str, Any]) -> float:
    """FLOPs of one call, counted by PyTorch's FlopCounterMode on the eager module."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(timestep=torch.tensor(500.0, device=inputs["sample"].device), **inputs)
    return float(counter.get_total_flops())


def time_calls(unet: Any, inputs: dict[str, Any], calls: int, compiled: bool) -> list[float]:
    """Seconds per call of `calls` consecutive calls (timesteps walk down as in a sampler), synchronised."""
    device = inputs["sample"].device
    timesteps = torch.linspace(999, 1, calls, device=device)
    seconds: list[float] = []
    with torch.no_grad():
        for t in timesteps:
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()
            cuda_sync()
            started = time.perf_counter()
            unet(timestep=t, **inputs)
            cuda_sync()
            seconds.append(time.perf_counter() - started)
    return seconds


def stage_times(base: Any, size: int, tiny_vae: Any = None, reps: int = 5) -> dict[str, float]:
    """Milliseconds of the eager stages around the denoiser: prompt encoding with CFG, VAE decode of one
    image (and the opt-in tiny VAE's, when given), and diffusers' tensor -> PIL post-processing (on the CPU)
    against the service's (`engine.tensor_to_pil`: 8-bit on the GPU, then PIL)."""
    from service.engine import tensor_to_pil

    device = base.unet.device

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(reps):
            cuda_sync()
            t0 = time.perf_counter()
            fn()
            cuda_sync()
            times.append(time.perf_counter() - t0)
        return round(min(times) * 1000, 2)

    latents = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=base.vae.dtype)
    with torch.no_grad():
        image = base.vae.decode(latents).sample
        return {
            "encode_prompt_cfg": best(
                lambda: base.encode_prompt(
                    "a photo of a cat",
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=True,
                )
            ),
            "vae_decode": best(lambda: base.vae.decode(latents).sample),
            **({"tiny_vae_decode": best(lambda: tiny_vae.decode(latents).sample)} if tiny_vae else {}),
            "postprocess_pil": best(lambda: base.image_processor.postprocess(image, output_type="pil")),
            "postprocess_service": best(
                lambda: tensor_to_pil(base.image_processor.postprocess(image, output_type="pt"))
            ),
        }


@dataclass
class Measured:
    variant: Variant
    compile_s: float | None
    ms_per_call: float
    ms_per_image: float
    tflops: float
    calls: int
    rel_err: float | None  # ||out - eager out|| / ||eager out|| for one call at t=500 (images=1 only)
    new_size_compile_s: float | None = None  # first calls at NEW_SIZE (compile + CUDA graph), compiled only


def run(
    out: Path,
    *,
    family: str = "sdxl",
    calls: int = 30,
    budget_s: float = 540.0,
    variants: tuple[Variant, ...] = VARIANTS,
    tiny: bool = False,
) -> list[Measured]:
    """Build the model's UNet on the GPU (bf16, fused QKV, channels_last: the service's eager set-up) and
    time every variant; skip the rest once `budget_s` has passed. `tiny`: the tiny model on the CPU in
    float32 (a dry run of this code for tests; its figures mean nothing)."""
    from service.accel import use_compile_cache
    from service.builders import build_model, build_tiny_vae

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model = f"{'tiny' if tiny else 'synthetic'}-{family}"
    size = 128 if tiny else 1024 if family == "sdxl" else 512
    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    base, _ = build_model(model, device=device, dtype=dtype)
    stages = stage_times(base, size, build_tiny_vae(model, device=device, dtype=dtype))
    unet = base.unet.eval()
    del base
    unet.fuse_qkv_projections()
    unet.to(memory_format=torch.channels_last)
    use_compile_cache(tempfile.mkdtemp(prefix="bench-unet-inductor-"))  # fresh: every compile is cold
    flops_per_image = unet_flops(unet, unet_inputs(unet, 1, size, dtype, device))
    reference = one_output(unet, unet_inputs(unet, 1, size, dtype, device))
    results: list[Measured] = []
    skipped: list[str] = []
    for variant in variants:
        if time.perf_counter() - started > budget_s:
            skipped.append(f"{variant.name} x{variant.images}")
        else:
            log.info("variant %s, %d image(s) per call", variant.name, variant.images)
            try:
                results.append(
                    _measure(unet, variant, size, dtype, calls, flops_per_image, device, reference)
                )
            except Exception as exc:  # one variant failing (a kernel the card lacks) must not end the run
                log.exception("variant %s failed", variant.name)
                skipped.append(f"{variant.name} x{variant.images}: {type(exc).__name__}: {str(exc)[:200]}")
        _write(out, family, size, flops_per_image, results, skipped, stages)
    print(json.dumps(stages))
    print(table(results, family, size, flops_per_image, skipped, str(dtype).removeprefix("torch.")))
    return results


def one_output(unet: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """The UNet's output at t=500 for `inputs`, as float32 (copied out of any CUDA-graph pool)."""
    with torch.no_grad():
        timestep = torch.tensor(500.0, device=inputs["sample"].device)
        return unet(timestep=timestep, **inputs).sample.float().clone()


def fp8_copy(unet: Any) -> Any:
    """A copy of `unet` whose linear layers run in float8 (torchao, dynamic per-row scales)."""
    import copy

    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    quantized = copy.deepcopy(unet)
    quantize_(quantized, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return quantized


def _measure(
    unet: Any,
    v: Variant,
    size: int,
    dtype: torch.dtype,
    calls: int,
    flops: float,
    device: str,
    reference: torch.Tensor,
) -> Measured:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    inputs = unet_inputs(unet, v.images, size, dtype, device)
    if v.fp8:
        unet = fp8_copy(unet)
    compile_s = None
    with attention_backend(v.attention):
        if v.compiled:
            torch._dynamo.reset()
            inductor_config.coordinate_descent_tuning = v.coordinate_descent
            if v.regional:  # in place: undone below
                unet.compile_repeated_blocks(mode="reduce-overhead", fullgraph=True, dynamic=False)
                runner = unet
            else:
                runner = torch.compile(unet, mode="reduce-overhead", fullgraph=False, dynamic=False)
            t0 = time.perf_counter()
            time_calls(runner, inputs, 3, compiled=True)  # compile, then record the CUDA graph
            compile_s = round(time.perf_counter() - t0, 1)
        else:
            runner = unet
            time_calls(runner, inputs, 2, compiled=False)
        seconds = time_calls(runner, inputs, calls, compiled=v.compiled)
        rel_err = None
        if v.images == 1:
            if v.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            rel_err = float((one_output(runner, inputs) - reference).norm() / reference.norm())
        new_size_s = None
        if v.compiled and v.images == 1:
            other = unet_inputs(unet, 1, NEW_SIZE.get(size, size // 2), dtype, device)
            t0 = time.perf_counter()
            time_calls(runner, other, 3, compiled=True)
            new_size_s = round(time.perf_counter() - t0, 1)
    inductor_config.coordinate_descent_tuning = False
    if v.regional:
        for module in unet.modules():
            if module.__class__.__name__ in unet._repeated_blocks:
                module._compiled_call_impl = None
    per_call = statistics.median(seconds)
    return Measured(
        variant=v,
        compile_s=compile_s,
        ms_per_call=round(per_call * 1000, 2),
        ms_per_image=round(per_call * 1000 / v.images, 2),
        tflops=round(flops * v.images / per_call / 1e12, 1),
        calls=calls,
        rel_err=None if rel_err is None else round(rel_err, 5),
        new_size_compile_s=new_size_s,
    )


def _write(  # after every variant: a run cut short keeps what it had
    out: Path,
    family: str,
    size: int,
    flops: float,
    results: list[Measured],
    skipped: list[str],
    stages: dict[str, float],
) -> None:
    data = {
        "family": family,
        "size": size,
        "tflop_per_image_call": round(flops / 1e12, 3),
        "flop_per_image_call": flops,
        "results": [asdict(r) for r in results],
        "skipped": skipped,
        "stages_ms": stages,
        "environment": environment(),
    }
    (out / "bench-unet.json").write_text(json.dumps(data, indent=2))


def table(
    results: list[Measured], family: str, size: int, flops: float, skipped: list[str], dtype: str = "bf16"
) -> str:
    """The figures as a plain-text table (printed last)."""
    rows = [
        f"{family} UNet at {size}x{size}, CFG on, {dtype}: {flops / 1e12:.2f} TFLOP per image per call",
        f"{'variant':32} {'img':>3} {'ms/call':>8} {'ms/img':>7} {'TFLOP/s':>8} {'vs x1':>6} {'compile':>8} "
        f"{'rel.err':>8} {'new size':>8}",
    ]
    single = {r.variant.name: r.ms_per_image for r in results if r.variant.images == 1}
    for r in results:
        one = single.get(r.variant.name)
        speedup = f"{one / r.ms_per_image:.2f}x" if one else "-"
        compile_s = f"{r.compile_s:.0f} s" if r.compile_s is not None else "-"
        rows.append(
            f"{r.variant.name:32} {r.variant.images:>3} {r.ms_per_call:>8.2f} {r.ms_per_image:>7.2f} "
            f"{r.tflops:>8.1f} {speedup:>6} {compile_s:>8} "
            f"{'-' if r.rel_err is None else format(r.rel_err, '.1e'):>8} "
            f"{'-' if r.new_size_compile_s is None else format(r.new_size_compile_s, '.0f') + ' s':>8}"
        )
    if skipped:
        rows.append(f"skipped (budget): {', '.join(skipped)}")
    return "\n".join(rows)
