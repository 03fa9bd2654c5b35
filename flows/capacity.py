"""Staged or stop-first: whether the box has room to run the new service beside the old one.

A staged deploy starts the new service on its staging port while the old one serves, so both hold their
memory for the whole warm-up and compile. The need of each model is a table measured on the GPU (the
whole process as nvidia-smi shows it, the compile peak included), plus a margin (`new.vram_margin_gb`);
the old service already holds its share, so nvidia-smi's free VRAM is what the new one can have. A model
the table does not know is not guessed at: stop-first, with a note. On a box without a GPU (the demo, the
tests) the tiny models run on the CPU, and free RAM (MemAvailable) decides.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from flows.errors import PreflightRefused
from flows.hosts import Host
from flows.procs import listener_pids
from flows.target import Target
from flows.tasks.preflight import HostFacts

StartMode = Literal["staged", "stop-first"]

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


class StartDecision(BaseModel):
    """How the new service starts, and why (summary facts and the dry-run plan say it)."""

    mode: StartMode
    requested: Literal["auto", "staged", "stop-first"]
    reason: str
    stage_port: int | None = None  # where the staged service listens until cut-over
    need_gb: float | None = None
    free_gb: float | None = None


def free_ram_gb(host: Host) -> float | None:
    """MemAvailable on the box (GiB), or None when /proc/meminfo cannot be read."""
    result = host.run("awk '$1 == \"MemAvailable:\" { print $2 }' /proc/meminfo")
    text = result.stdout.strip()
    return round(int(text) / 1024 / 1024, 1) if result.ok and text.isdigit() else None


def room_for_both(
    host: Host, target: Target, facts: HostFacts
) -> tuple[bool, str, float | None, float | None]:
    """(fits, why, need, free): whether the new service fits beside the old one on this box."""
    model, margin = target.new.model, target.new.vram_margin_gb
    if facts.gpus:
        need = VRAM_NEED_GIB.get(model)
        free = facts.gpus[0].free_gb
        if need is None:
            return (
                False,
                f"no measured VRAM need for model {model!r} (known: {', '.join(VRAM_NEED_GIB)})",
                None,
                free,
            )
        wanted = round(need + margin, 1)
        fits = free >= wanted
        verb = "fits in" if fits else "does not fit in"
        return (
            fits,
            f"{model} needs {need:g} + {margin:g} GiB margin = {wanted:g} GiB, {verb} {free:g} GiB free VRAM",
            wanted,
            free,
        )
    need = RAM_NEED_GIB.get(model)
    if need is None:
        return False, f"no GPU, and no measured CPU memory need for model {model!r}", None, None
    free = free_ram_gb(host)
    if free is None:
        return False, "no GPU, and the free RAM could not be read", need, None
    fits = free >= need
    return (
        fits,
        f"no GPU: {model} needs {need:g} GiB RAM, {'fits in' if fits else 'does not fit in'} {free:g} GiB free",
        need,
        free,
    )


def decide_start_mode(host: Host, target: Target, facts: HostFacts) -> StartDecision:
    """auto: staged when the box has room and the staging port is free; a forced `staged` that cannot work
    (the port taken, or the new service meant for another port than the app's) is refused."""
    new, requested = target.new, target.new.start_mode
    if requested == "stop-first":
        return StartDecision(mode="stop-first", requested=requested, reason="new.start_mode is stop-first")
    blockers = []
    if new.port != target.current.port:
        blockers.append(
            f"the new service's port {new.port} is not the app's port {target.current.port}: nothing to take over"
        )
    holders = listener_pids(host, new.staging_port)
    if holders:
        blockers.append(f"the staging port {new.staging_port} is in use (PIDs {holders})")
    fits, why, need, free = room_for_both(host, target, facts)
    if requested == "staged":
        if blockers:
            raise PreflightRefused(f"new.start_mode is staged, but {'; '.join(blockers)}")
        note = "" if fits else " (forced: the measured need says it may not fit)"
        return StartDecision(
            mode="staged",
            requested=requested,
            reason=f"new.start_mode is staged; {why}{note}",
            stage_port=new.staging_port,
            need_gb=need,
            free_gb=free,
        )
    if blockers or not fits:
        return StartDecision(
            mode="stop-first",
            requested=requested,
            reason="; ".join([*blockers, why]),
            need_gb=need,
            free_gb=free,
        )
    return StartDecision(
        mode="staged",
        requested=requested,
        reason=why,
        stage_port=new.staging_port,
        need_gb=need,
        free_gb=free,
    )
