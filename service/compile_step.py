"""The compile step: build the compiled functions a service with these settings loads, in a process of its own.

`sdxl-deploy serve --compile-only` (the deploy's `compile` stage runs it on the box with the new service's
command line, before that service starts) loads the model as the service would, runs the service's warm-up
generations with its saved-compile calls in build mode - a static function for each signature they make (the
default size, each coalesced batch, the `ready_sizes`) - then one dynamic-shape function per call form
(`service/saved_compile.py`), and exits. Functions already on disk for the same module key are loaded and
kept, not compiled again; a file that cannot be loaded is compiled again. Progress goes to the log (stderr);
the last stdout line is the report as JSON (`CompileReport`).

With `compile_jobs` N > 1 the step runs N processes of this build side by side on one folder, each loading the
model: each function is built by the first process to claim it (`saved_compile`), the others run that call
uncompiled and take the next; the report merges theirs (peak GPU memory summed, an upper bound of what they held
at once). A job that fails fails the step.

Compile off (a CPU without `SDXL_COMPILE=on`, or torch.compile not working on the device) or a torch that
cannot save compiled functions (< 2.10, `save_compiled=off`): nothing to build, and the report says what the
service does instead (serve uncompiled; or compile before `/ready` in its own process, as torch 2.5 does).
"""

from __future__ import annotations

import logging
import multiprocessing
import tempfile
import time
from pathlib import Path

from service.accel import compile_status, plan_speed, saved_compiles
from service.engine import Engine, resolve_device
from service.models import resolve_model
from service.schema import CompiledFunction, CompileReport
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
    if settings.compile_jobs > 1 and plan.save_compiled:
        return _build_side_by_side(settings, started)
    return _build_here(settings, started)


def _build_here(settings: ServiceSettings, started: float) -> CompileReport:
    """The step in this process: load the model, run the warm-up in build mode, build the dynamic functions."""
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


def _build_side_by_side(settings: ServiceSettings, started: float) -> CompileReport:
    """`compile_jobs` processes of `_build_here` on one folder (module doc); their reports merged."""
    jobs = settings.compile_jobs
    one = settings.model_copy(update={"compile_jobs": 1})
    context = multiprocessing.get_context("spawn")  # a fresh interpreter each: no CUDA state is forked
    with tempfile.TemporaryDirectory(prefix="compile-jobs-") as folder:
        answers = [Path(folder) / f"job-{index}.json" for index in range(1, jobs + 1)]
        processes = [
            context.Process(target=_job, args=(index, one, answer), name=f"compile-job-{index}")
            for index, answer in enumerate(answers, 1)
        ]
        log.info("compile step: %d processes side by side, each loading %s", jobs, settings.model)
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        failed = [f"job {i} exited with code {p.exitcode}" for i, p in enumerate(processes, 1) if p.exitcode]
        if failed:
            raise RuntimeError(f"compile step: {'; '.join(failed)} (its log lines above say why)")
        reports = [CompileReport.model_validate_json(answer.read_text()) for answer in answers]
    return merge(reports, seconds=time.perf_counter() - started)


def _job(index: int, settings: ServiceSettings, answer: Path) -> None:
    """One process of a side-by-side step: its log lines say which job; its report goes to `answer`."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s job {index} %(name)s: %(message)s", force=True
    )
    answer.write_text(_build_here(settings, time.perf_counter()).model_dump_json())


def merge(reports: list[CompileReport], seconds: float) -> CompileReport:
    """One report of several jobs on one folder: each function once, compiled if any job compiled it."""
    functions: dict[str, CompiledFunction] = {}
    for function in (f for report in reports for f in report.functions):
        known = functions.get(function.file)
        if known is None or function.source == "compiled":
            functions[function.file] = function
    load_s = max(r.load_s for r in reports)
    peaks = [r.peak_vram_gb for r in reports if r.peak_vram_gb is not None]
    return CompileReport(
        model=reports[0].model,
        built=all(r.built for r in reports),
        note="; ".join(dict.fromkeys(r.note for r in reports if r.note)),
        functions=sorted(functions.values(), key=lambda f: (f.module, f.dynamic, f.covers)),
        compiled=sum(f.source == "compiled" for f in functions.values()),
        reused=sum(f.source == "loaded" for f in functions.values()),
        problems=list(dict.fromkeys(p for r in reports for p in r.problems)),
        load_s=load_s,
        compile_s=round(seconds - load_s, 1),
        peak_vram_gb=round(sum(peaks), 2) if peaks else None,
        jobs=len(reports),
    )
