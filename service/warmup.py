"""The warm-up before `/ready`: short generations through the service's own path, so that torch.compile
compiles the shapes real requests use before a client waits for them; then what this start compiled.

Runs on the GPU worker thread, after `Engine.load` (see `ServiceState`), when the speed plan asks for it
(`warmup_on_load`, auto: with compile). What it did goes into the engine's start-up record (`/health`'s
`startup`): its phase and milestones, `warmup_s`, the shapes it compiled, the saved-compile counts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch
from torch._dynamo.utils import compile_times

from service.accel import saved_compiles
from service.engine import Engine
from service.schema import GenerateRequest
from service.worker import Job

log = logging.getLogger(__name__)

WARMUP_STEPS = 4  # with the refiner's default split 0.8: 3 base steps and 1 refiner step


@dataclass(frozen=True)
class Shape:
    """One warm-up generation: base alone or base + refiner, at one size, with a batch of `images`."""

    use_refiner: bool
    width: int
    height: int
    images: int

    def __str__(self) -> str:
        stages = "base + refiner" if self.use_refiner else "base"
        return f"{stages} {self.width}x{self.height} x{self.images}"


def before_ready(engine: Engine) -> None:
    """What runs between loading and `/ready`: the warm-up when the speed plan asks for one, then the
    compile facts of this start (functions loaded, compiled, problems) into `startup`.

    Serving, the warm-up runs the loaded functions (and records their CUDA graphs); when no compiled function
    of some module is on disk (no compile step ran for this model and versions), a start with the warm-up on
    builds them first, as the compile step would (without it they run uncompiled), and says so in its
    warnings. Once ready, nothing compiles in this process:
    saved-compile calls run a shape no function accepts uncompiled, and torch.compile's other callers (the
    text encoders, `save_compiled=off`) run a new shape eagerly (`torch.compiler.set_stance`).
    """
    startup = engine.startup
    saved = saved_compiles(_pipes(engine))
    missing = [call for call in saved if not call.functions]
    warmup = engine.speed is not None and engine.speed.warmup
    building = engine.building or (bool(missing) and warmup)
    if missing and not engine.building:
        names = ", ".join(sorted({call.name for call in missing}))
        startup.warn(
            f"no compiled functions on disk for {names} in {missing[0].cache_dir}: "
            + (
                "compiled in this process before /ready"
                if building
                else "they run uncompiled (warmup_on_load is off)"
            )
            + " (run `sdxl-deploy serve --compile-only` with the same settings first; a deploy does)"
        )
    if warmup or building:
        startup.mark("warmup_started", phase="warming_up")
        started = time.perf_counter()
        for call in saved:
            call.build = building
        shapes = warm_up(engine, record=building)
        if building:
            for call in saved:
                call.build_dynamic()
                call.build = False
        seconds = time.perf_counter() - started
        startup.set(warmup_s=round(seconds, 3), compiled_shapes=[str(shape) for shape in shapes])
        startup.mark("warmup_done")
        log.info("speed: warm-up took %.1f s", seconds)
        if engine.speed is not None and engine.speed.compile and building:
            log.info(
                "speed: where the compile time went (s, torch's own counters):\n%s",
                compile_times("str", True),
            )
    if engine.speed is not None and engine.speed.compile and hasattr(torch.compiler, "set_stance"):
        torch.compiler.set_stance("eager_on_recompile")  # from here on, a new shape never compiles here
    startup.set(
        compiled_functions=sum(len(c.compiled) for c in saved),
        loaded_functions=sum(len(c.loaded) for c in saved),
        compile_fallbacks=[f"{c.label}: {problem}" for c in saved for problem in c.problems],
    )
    if saved:
        log.info(
            "speed: saved compile: %d loaded from disk, %d compiled and saved; functions: %s%s",
            sum(len(c.loaded) for c in saved),
            sum(len(c.compiled) for c in saved),
            ", ".join(cover for c in saved for cover in c.covers()),
            "".join(f"; {c.label}: {problem}" for c in saved for problem in c.problems),
        )


def warm_up(engine: Engine, *, record: bool = False) -> list[Shape]:
    """One short generation at the model's default size for each shape requests may take, then at each of
    the `ready_sizes` (base alone and base + refiner, one image), and, serving with dynamic-shape functions
    loaded, once at half the default size (`dynamic_warmup_size`); returns them.

    Compiles the UNet(s) and the VAE decoder for the default size with CFG on (what real requests use), so a
    cold start pays the compile before `/ready`. With `cfg_cutoff` below 1 each UNet also sees the unguided
    (half-batch) shape: the base pass is cut after half its steps, and the base + refiner pass is split in
    the middle and cut inside the refiner's steps. `record` (building): the saved-compile calls keep the call
    forms of the one-image generations, for their dynamic-shape functions. The compiled functions keep the CUDA-graph tree they were
    compiled with, so the GPU worker thread replays (and, on its first request, records) graphs in that same
    tree: the warm-up runs on that thread and must not reset it.
    """
    sizes = engine.speed.coalesce_sizes if engine.speed else (1,)
    cut = engine.settings.cfg_cutoff < 1.0
    shapes: list[Shape] = []
    # base alone first (base UNet + VAE decoder), then base + refiner (the refiner's UNet): timed apart;
    # then each batch size that coalesced requests may form (a batch of k compiles like k images);
    # then each of the ready sizes, one image; serving with dynamic-shape functions, one size only they serve
    runs: list[tuple[int, tuple[int, int] | None]] = [(images, None) for images in sizes]
    if engine.speed is not None and engine.speed.compile:  # uncompiled, another size costs nothing new
        runs += [(1, size) for size in engine.settings.ready_size_list]
    if not record and any(f.dynamic for call in saved_compiles(_pipes(engine)) for f in call.functions):
        runs.append((1, dynamic_warmup_size(engine)))
    for images, size in runs:
        for use_refiner in (False, True) if engine.refiner_loaded else (False,):
            width, height = size or (None, None)
            request = GenerateRequest(
                prompt="warm-up",
                num_inference_steps=WARMUP_STEPS,
                seed=0,
                use_refiner=use_refiner,
                batch_size=images,
                width=width,
                height=height,
                refiner_split=0.5 if cut else 0.8,  # 2 base + 2 refiner steps
            )
            params = engine.params(request)
            if cut:  # guided 3 of 4 / 2 of 4 steps: the cutoff falls inside the refiner's / the base's steps
                params = dataclasses.replace(params, cfg_cutoff=0.75 if use_refiner else 0.5)
            shape = Shape(use_refiner, params.width, params.height, images)
            if shape in shapes:  # a ready size that is the default size
                continue
            log.info(
                "speed: warming up %s at %dx%d, %d image(s) (the first compile takes minutes)",
                "base + refiner" if use_refiner else "base",
                shape.width,
                shape.height,
                images,
            )
            t0 = time.perf_counter()
            for call in saved_compiles(_pipes(engine)):
                call.recording = record and images == 1
            engine.generate(params, Job())
            log.info(
                "speed: warm-up %s, %d image(s) took %.1f s",
                "base + refiner" if use_refiner else "base",
                images,
                time.perf_counter() - t0,
            )
            shapes.append(shape)
    return shapes


def _pipes(engine: Engine) -> tuple[object, ...]:
    """The pipelines whose UNets and VAE decoder may hold saved-compile calls."""
    return (engine.base, engine.refiner, engine.img2img)


def dynamic_warmup_size(engine: Engine) -> tuple[int, int]:
    """A size only the dynamic-shape functions serve: half the default size (SDXL's 512x512, A1111's default),
    or the next multiple of 64 up where a static function (the default, a ready size) covers that one; within
    the model's range. Their first call in a process is slow on the GPU (12.9 s at 512x512 after a 1024x1024
    warm-up on the H100, docs/BENCHMARKS.md; 0.6 s the next time): paid here, before `/ready`, not by a client."""
    spec = engine.spec
    default, low, high = (spec.default_size, spec.min_size, spec.max_size) if spec else (1024, 512, 2048)
    static = {(default, default), *engine.settings.ready_size_list}
    half = max(low, default // 2 // 64 * 64)
    sides = [side for side in range(half, high + 1, 64) if (side, side) not in static]
    return (sides[0], sides[0]) if sides else (half, half)
