"""Staged or stop-first: whether the box has room to run the new service beside the old one.

A staged deploy starts the new service on its staging port while the old one serves, so both hold their
memory for the whole warm-up and compile. The need of each model is a table measured on the GPU (the
whole process as nvidia-smi shows it, the compile peak included), plus a margin (`new.vram_margin_gb`);
the old service already holds its share, so nvidia-smi's free VRAM is what the new one can have. A folder or
file needs what its family's published model needs (`flows/box/model_check.py` reads its family on the box).
On a box without a GPU (the demo, the tests) the tiny models run on the CPU, and free RAM (MemAvailable)
decides.

`auto` never chooses stop-first, the order that takes the app down: a staging port that something else holds
moves the staged service to the next free port, and where staging cannot work (no room, no measured need, the
new service meant for another port than the app's) preflight refuses, saying why and that
`new.start_mode: stop-first` is the way to deploy anyway.

The compile step (stage `compile`, `flows/stages/compile.py`) loads the model and compiles in a process of its
own, needing what the new service needs. Staged, it runs beside the old service before the new one starts. A
stop-first deploy runs it before the old service stops where the same room test says both fit; else after the
stop, and its time adds to the app's downtime (the plan says so). Its processes side by side
(`SDXL_COMPILE_JOBS`, each loading the model) are as many as the card's free memory holds copies of the new
service's need, at most `MAX_COMPILE_JOBS`: one on a 24 GiB card beside the old service.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from flows.box.hosts import Host
from flows.box.model_check import NewModel
from flows.box.procs import listener_pids, listening_ports
from flows.config.target import StartMode, Target
from flows.errors import PreflightRefused
from flows.evidence.results import GpuInfo, HostFacts

# GiB the new service's whole process needs on the GPU at its peak (the compile included), measured with
# nvidia-smi. sdxl / synthetic-sdxl (base + refiner): 17,540 MiB during the compile, H200, 2026-12-01;
# 17,970 MiB in bench-beside (a first deploy's cold compile beside the old service), H200, 2026-12-02.
# sd15: the seed's set-up (fp16, attention and VAE slicing) held 4.0 GiB on the same day. The tiny models
# are a few million parameters.
VRAM_NEED_GIB: dict[str, float] = {
    "sdxl": 17.6,
    "synthetic-sdxl": 17.6,
    "sd15": 4.0,
    "synthetic-sd15": 4.0,
    "tiny-sdxl": 0.0,
    "tiny-sd15": 0.0,
}
# GiB of RAM a CPU-served model needs (a tiny SDXL pipeline's script measured 860 MB RSS, 2026-11-26).
RAM_NEED_GIB: dict[str, float] = {"tiny-sdxl": 1.0, "tiny-sd15": 1.0}
# The step's long compiles: base UNet and refiner UNet (static and dynamic each), VAE decoder.
MAX_COMPILE_JOBS = 4
# Ports after a taken default staging port tried for the staged service.
STAGE_PORT_SEARCH = 100


class StartDecision(BaseModel):
    """How the new service starts, and why (summary facts and the dry-run plan say it)."""

    mode: StartMode
    requested: Literal["auto", "staged", "stop-first"]
    reason: str
    stage_port: int | None = None  # where the staged service listens until cut-over (staged only)
    need_gb: float | None = None
    free_gb: float | None = None
    compile_beside: bool = True  # the compile step runs while the old service serves (else after it stopped)
    compile_reason: str = ""
    compile_jobs: int | None = None  # the step's processes side by side; None: as new.env says (or 1)


def free_ram_gb(host: Host) -> float | None:
    """MemAvailable on the box (GiB), or None when /proc/meminfo cannot be read."""
    result = host.run("awk '$1 == \"MemAvailable:\" { print $2 }' /proc/meminfo")
    text = result.stdout.strip()
    return round(int(text) / 1024 / 1024, 1) if result.ok and text.isdigit() else None


def room_for_both(
    host: Host, target: Target, facts: HostFacts, model: NewModel
) -> tuple[bool, str, float | None, float | None]:
    """(fits, why, need, free): whether the new service fits beside the old one on this box."""
    measured = model.measured_as
    who = model.spec.name if model.kind == "known" else f"{model.describe()}, measured as {measured},"
    return _room(host, facts.gpus, measured, who, target.new.vram_margin_gb)


def step_room(host: Host, model: str, margin: float) -> tuple[bool, str]:
    """(fits, why): whether a compile step of `model` (a recorded release's) fits beside what runs on the box
    now (`sdxl-deploy compile`, beside the serving release)."""
    fits, why, _, _ = _room(host, read_gpus(host)[0], model, model, margin)
    return fits, why


def _room(
    host: Host, gpus: list[GpuInfo], measured: str, who: str, margin: float
) -> tuple[bool, str, float | None, float | None]:
    """(fits, why, need, free) of a process of model `measured` beside what the box runs now."""
    if gpus:
        need = VRAM_NEED_GIB.get(measured)
        free = gpus[0].free_gb
        if need is None:
            return (
                False,
                f"no measured VRAM need for model {measured!r} (known: {', '.join(VRAM_NEED_GIB)})",
                None,
                free,
            )
        wanted = round(need + margin, 1)
        fits = free >= wanted
        verb = "fits in" if fits else "does not fit in"
        return (
            fits,
            f"{who} needs {need:g} + {margin:g} GiB margin = {wanted:g} GiB, {verb} {free:g} GiB free VRAM",
            wanted,
            free,
        )
    need = RAM_NEED_GIB.get(measured)
    if need is None:
        return False, f"no GPU, and no measured CPU memory need for model {measured!r}", None, None
    free = free_ram_gb(host)
    if free is None:
        return False, "no GPU, and the free RAM could not be read", need, None
    fits = free >= need
    return (
        fits,
        f"no GPU: {who} needs {need:g} GiB RAM, {'fits in' if fits else 'does not fit in'} {free:g} GiB free",
        need,
        free,
    )


def choose_stage_port(host: Host, target: Target) -> tuple[int, str]:
    """(port, note): the staging port, or, when something else holds the default one, the next free port on
    the box (the note says which). A taken `new.stage_port` that the target sets is refused."""
    new = target.new
    holders = listener_pids(host, new.staging_port)
    if not holders:
        return new.staging_port, ""
    taken = f"the staging port {new.staging_port} is in use on {host.name} (PIDs {holders})"
    if new.stage_port is not None:
        raise PreflightRefused(
            f"new.stage_port: {taken}; free it, or leave new.stage_port unset to stage on a free port"
        )
    listening = listening_ports(host)
    first = new.staging_port + 1
    for port in range(first, min(first + STAGE_PORT_SEARCH, 65536)):
        if port not in listening and port != new.port:
            return port, f"; {taken}, so the new service stages on port {port}"
    raise PreflightRefused(
        f"{taken}, and so are ports {first}-{first + STAGE_PORT_SEARCH - 1}; set new.stage_port to a free port"
    )


def cannot_stage(requested: str, why: str) -> PreflightRefused:
    """The refusal of a start mode that needs staging where staging cannot work."""
    return PreflightRefused(
        f"new.start_mode is {requested}, but the new service cannot start beside the old one: {why}; set "
        "new.start_mode: stop-first to deploy anyway (the old service is stopped first, and the app is down "
        "until the new one is ready)"
    )


def decide_start_mode(host: Host, target: Target, facts: HostFacts, model: NewModel) -> StartDecision:
    """auto: staged when the box has room, on a free staging port; where staging cannot work, auto and a
    forced `staged` are refused (stop-first is chosen by the target only). A forced `staged` goes on where
    the room is unknown or too small, and says so."""
    new, requested = target.new, target.new.start_mode
    if requested == "stop-first":
        fits, room, need, free = room_for_both(host, target, facts, model)
        beside, why = compile_placement(fits, room)
        jobs, jobs_why = compile_jobs(target, need if facts.gpus else None, free)
        return StartDecision(
            mode="stop-first",
            requested=requested,
            reason="new.start_mode is stop-first",
            compile_beside=beside,
            compile_reason=f"{why}; {jobs_why}",
            compile_jobs=jobs,
        )
    if new.port != target.current.port:
        raise cannot_stage(
            requested,
            f"the new service's port {new.port} is not the app's port {target.current.port}: nothing to take over",
        )
    port, port_note = choose_stage_port(host, target)
    fits, why, need, free = room_for_both(host, target, facts, model)
    if requested == "auto" and not fits:
        raise cannot_stage(requested, why)
    forced = "new.start_mode is staged; " if requested == "staged" else ""
    note = "" if fits else " (forced: staged although it may not fit)"
    jobs, jobs_why = compile_jobs(target, need if facts.gpus else None, free)
    return StartDecision(
        mode="staged",
        requested=requested,
        reason=f"{forced}{why}{port_note}{note}",
        stage_port=port,
        need_gb=need,
        free_gb=free,
        compile_reason=f"it runs beside the old service, before the new one starts; {jobs_why}",
        compile_jobs=jobs,
    )


def compile_jobs(target: Target, need: float | None, free: float | None) -> tuple[int | None, str]:
    """(jobs, why): the compile step's processes side by side - as many as `free` GiB of VRAM holds copies of
    `need` (the new service's, margin included), at most `MAX_COMPILE_JOBS`; 1 without a GPU or a measured
    need. None where the target's new.env sets `SDXL_COMPILE_JOBS` (the service reads it)."""
    if "SDXL_COMPILE_JOBS" in target.new.env:
        return (
            None,
            f"its processes side by side: {target.new.env['SDXL_COMPILE_JOBS']} (new.env SDXL_COMPILE_JOBS)",
        )
    if not need or free is None:
        return 1, "one process"
    jobs = max(1, min(MAX_COMPILE_JOBS, int(free // need)))
    return jobs, (
        f"{jobs} process{'es side by side' if jobs > 1 else ''}, each loading the model "
        f"({need:g} GiB each, {free:g} GiB free VRAM, at most {MAX_COMPILE_JOBS})"
    )


def compile_placement(fits: bool, why: str) -> tuple[bool, str]:
    """(beside, why) for a stop-first deploy: the compile step runs before the old service stops where the box
    has room for it beside the old one (`fits`: the room test of staging, `why` its reason), else after the stop."""
    if fits:
        return True, f"it runs before the old service stops: {why}"
    return False, (
        f"it runs after the old service stopped, adding its time to the app's downtime: no room for it beside "
        f"the old service ({why})"
    )


def read_gpus(host: Host) -> tuple[list[GpuInfo], str | None]:
    """The box's GPUs (name, total and free GiB) and the driver version, from nvidia-smi; none without it."""
    result = host.run(
        "nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv,noheader,nounits"
    )
    if not result.ok:
        return [], None
    gpus, driver = [], None
    for line in result.stdout.strip().splitlines():
        name, total, free, driver = (part.strip() for part in line.split(","))
        gpus.append(
            GpuInfo(name=name, total_gb=round(int(total) / 1024, 1), free_gb=round(int(free) / 1024, 1))
        )
    return gpus, driver
