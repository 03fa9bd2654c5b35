"""The compile step: build the compiled functions a service with these settings loads, in a process of its own.

`sdxl-deploy serve --compile-only` (the deploy's `compile` stage runs it on the box with the new service's
command line, before that service starts) loads the model as the service would, runs the service's warm-up
generations with its saved-compile calls in build mode - a static function for each signature they make (the
default size, each coalesced batch, the `ready_sizes`) - then one dynamic-shape function per call form
(`service/saved_compile.py`), and exits. Functions already on disk for the same module key are loaded and
kept, not compiled again; a file that cannot be loaded is compiled again. Progress goes to the log (stderr);
the last stdout line is the report as JSON (`CompileReport`).

Compile off (a CPU without `SDXL_COMPILE=on`, or torch.compile not working on the device) or a torch that
cannot save compiled functions (< 2.10, `save_compiled=off`): nothing to build, and the report says what the
service does instead (serve uncompiled; or compile before `/ready` in its own process, as torch 2.5 does).
"""

from __future__ import annotations

import logging
import time

from service.accel import compile_status, plan_speed, saved_compiles
from service.engine import Engine, resolve_device
from service.models import resolve_model
from service.schema import CompileReport
from service.settings import ServiceSettings
from service.warmup import before_ready

log = logging.getLogger(__name__)


def build(settings: ServiceSettings) -> CompileReport:
    """Load the model with `settings` and build (or reuse) every compiled function the service will load."""
    started = time.perf_counter()
    spec = resolve_model(settings.model, settings.cache_dir, refiner=settings.refiner)
    plan = plan_speed(settings, resolve_device(settings.device), spec.backend)
    if not plan.compile:  # decided by the settings and the device alone: the model is not loaded for it
        reasons = "; ".join(plan.warnings) or "compile is off for these settings and device"
        return CompileReport(
            model=settings.model,
            built=False,
            note=f"nothing to build: {reasons}; the service serves uncompiled",
        )
    engine = Engine(settings)
    engine.building = True
    engine.load()
    loaded = time.perf_counter()
    report = CompileReport(model=settings.model, built=False, load_s=round(loaded - started, 1))
    speed = engine.speed
    if speed is None or not speed.compile:
        reasons = "; ".join(speed.warnings if speed else ()) or "compile is off for these settings and device"
        report.note = f"nothing to build: {reasons}; the service serves uncompiled"
        return report
    if not saved_compiles((engine.base, engine.refiner, engine.img2img)):
        report.note = (
            "nothing to build: this torch cannot save compiled functions (torch >= 2.10) or save_compiled is "
            "off; the service compiles its ready sizes before /ready in its own process"
        )
        return report
    before_ready(engine)
    status = compile_status((engine.base, engine.refiner, engine.img2img))
    functions = status.functions if status else []
    report.built = True
    report.functions = functions
    report.compiled = sum(f.source == "compiled" for f in functions)
    report.reused = sum(f.source == "loaded" for f in functions)
    report.problems = status.problems if status else []
    report.compile_s = round(time.perf_counter() - loaded, 1)
    report.peak_vram_gb = engine.peak_gb_since_start()
    return report
